"""Students built from the teacher's layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_tune.distillation import student


@pytest.fixture
def teacher(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_keeping_every_layer_gives_the_teacher_exactly(teacher) -> None:
    copy = student.from_teacher(teacher, [0, 1])
    input_ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(input_ids).logits, teacher(input_ids).logits)


def test_student_keeps_the_chosen_layers(teacher) -> None:
    half = student.from_teacher(teacher, [1])
    assert half.config.num_hidden_layers == 1
    assert len(half.model.layers) == 1
    teacher_layer = teacher.model.layers[1].state_dict()
    for name, value in half.model.layers[0].state_dict().items():
        assert torch.equal(value, teacher_layer[name]), name
    assert torch.equal(half.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(half.model.norm.weight, teacher.model.norm.weight)
    assert half.lm_head.weight.data_ptr() == half.model.embed_tokens.weight.data_ptr()
    # The copy owns its weights: training the student leaves the teacher alone.
    assert half.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


def test_layer_choice() -> None:
    assert student.chosen_layers(30, 2, None) == list(range(0, 30, 2))
    assert student.chosen_layers(6, None, [5, 0]) == [5, 0]
    with pytest.raises(student.StudentError, match=r"keep_layers: \[6\] outside .* 6 layers"):
        student.chosen_layers(6, None, [0, 6])
