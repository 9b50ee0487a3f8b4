"""Checks before any weights load: do teacher and student speak the same tokens, and will
teacher + student fit in memory?

Distillation compares the two models' distributions token id by token id, so the same vocabulary
size is not enough: the same string must map to the same id, and the special tokens (which end
answers and pad batches) must agree. A model whose embedding table is padded beyond its
tokenizer is fine; the extra logits belong to no token and are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from llama_tune.errors import UserError

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class IncompatibleTokenizers(UserError):  # noqa: N818 - reads as the finding it reports
    """Teacher and student tokenizers map text to different ids."""


def _examples(items: list, limit: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def tokenizer_differences(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase
) -> list[str]:
    """Every way the two tokenizers disagree, one line each; empty when compatible."""
    problems = []
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab))
    only_student = sorted(set(student_vocab) - set(teacher_vocab))
    if only_teacher:
        problems.append(f"tokens only the teacher has: {_examples(only_teacher)}")
    if only_student:
        problems.append(f"tokens only the student has: {_examples(only_student)}")
    moved = sorted(
        token
        for token in set(teacher_vocab) & set(student_vocab)
        if teacher_vocab[token] != student_vocab[token]
    )
    if moved:
        shown = [f"{token!r}: {teacher_vocab[token]} vs {student_vocab[token]}" for token in moved]
        problems.append(f"tokens with different ids (teacher vs student): {_examples(shown)}")
    for name in SPECIAL_TOKENS:
        teacher_token, student_token = getattr(teacher, name), getattr(student, name)
        if teacher_token != student_token:
            problems.append(f"{name}: teacher {teacher_token!r}, student {student_token!r}")
    return problems


def check_tokenizers(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """Raise IncompatibleTokenizers naming what differs."""
    problems = tokenizer_differences(teacher, student)
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise IncompatibleTokenizers(
            "distill: teacher and student tokenizers are incompatible; distillation needs the "
            f"same token ids for the same text:\n{listing}"
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part of a distillation run needs, before activations."""

    teacher_weights: int
    student_weights: int
    trainable_state: int
    """Gradients and AdamW's two moments of the trained parameters, in fp32."""

    @property
    def total(self) -> int:
        return self.teacher_weights + self.student_weights + self.trainable_state

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"estimated memory before activations: {self.total / gib:.2f} GiB "
            f"(teacher {self.teacher_weights / gib:.2f}, student {self.student_weights / gib:.2f}, "
            f"gradients and optimizer {self.trainable_state / gib:.2f})"
        )


def _meta_model(location: str, revision: str | None) -> torch.nn.Module:
    model_config = AutoConfig.from_pretrained(location, revision=revision)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def layer_count(location: str, revision: str | None = None) -> int:
    """Decoder layers of a model, from its config alone."""
    return AutoConfig.from_pretrained(location, revision=revision).num_hidden_layers


def parameter_count(
    location: str, revision: str | None = None, keep_layers: list[int] | None = None
) -> int:
    """Parameters of a model (or of a student keeping only `keep_layers` of its decoder layers),
    counted on the meta device: no weights are read."""
    model = _meta_model(location, revision)
    layers = model.get_decoder().layers
    dropped = [] if keep_layers is None else [i for i in range(len(layers)) if i not in keep_layers]
    dropped_parameters = sum(p.numel() for i in dropped for p in layers[i].parameters())
    return sum(p.numel() for p in model.parameters()) - dropped_parameters


def estimate_memory(
    teacher_parameters: int,
    teacher_bytes_per_parameter: float,
    student_parameters: int,
    student_bytes_per_parameter: float,
    trainable_parameters: int,
) -> MemoryEstimate:
    """Weights at their storage width, plus 3 fp32 values (gradient, 2 moments) per trainable."""
    return MemoryEstimate(
        teacher_weights=int(teacher_parameters * teacher_bytes_per_parameter),
        student_weights=int(student_parameters * student_bytes_per_parameter),
        trainable_state=trainable_parameters * 3 * 4,
    )
