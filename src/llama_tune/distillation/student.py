"""Students built from their teacher: the same embeddings, norms and head, fewer layers.

As DistilBERT did, a student that starts from a subset of the teacher's own decoder layers
begins close to the teacher, so distillation has less to recover than from random weights.
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from llama_tune.errors import UserError

_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


class StudentError(UserError):
    """A student that cannot be built as the recipe asks."""


def chosen_layers(layer_count: int, every: int | None, keep_layers: list[int] | None) -> list[int]:
    """The teacher's decoder layers the student keeps, in order."""
    if keep_layers is not None:
        outside = [index for index in keep_layers if not 0 <= index < layer_count]
        if outside:
            raise StudentError(
                f"distill.student.from_teacher.keep_layers: {outside} outside the teacher's "
                f"{layer_count} layers (0..{layer_count - 1})"
            )
        return list(keep_layers)
    assert every is not None
    return list(range(0, layer_count, every))


def from_teacher(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A copy of `teacher` with only the decoder layers `keep`, in that order.

    Everything else (embeddings, final norm, output head, rotary settings) is the teacher's.
    """
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    # Models with per-layer kinds (sliding or full attention) keep the kinds of kept layers.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = [layer_types[index] for index in keep]
    position = {teacher_index: student_index for student_index, teacher_index in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in position:
            state[f"{match.group(1)}{position[int(match.group(2))]}{match.group(3)}"] = value
    with torch.device(teacher.device):
        student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    student.load_state_dict(state, strict=True)
    return student.eval()
