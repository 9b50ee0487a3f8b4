"""The distillation objective: which positions count, and zero loss against itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llama_tune import attention, data, schema
from llama_tune.distillation import objective, student
from llama_tune.distillation.hidden import HiddenStateMatch
from llama_tune.distillation.teacher import FrozenTeacher, distilled_count, distilled_positions


def _settings(**values: object) -> schema.DistillConfig:
    return schema.DistillConfig(teacher={"name": "t"}, **values)


def _batch(tokenizer) -> tuple[list[data.Example], dict[str, torch.Tensor]]:
    examples = [
        data.Example("p", "t", [5, 6, 7, 8, 9, tokenizer.eos_token_id], 3, 0),
        data.Example("p", "t", [5, 6, 7, tokenizer.eos_token_id], 2, 1),
    ]
    return examples, data.collate(examples, tokenizer.pad_token_id, 8)


def test_positions_follow_the_settings(tokenizer) -> None:
    examples, batch = _batch(tokenizer)
    labels, mask = batch["labels"], batch["attention_mask"]
    packed = data.collate_packed(examples)
    for settings in (_settings(), _settings(positions="all"), _settings(label_tokens_only=True)):
        chosen = distilled_positions(labels, settings, mask)
        counts = [distilled_count(example, settings) for example in examples]
        assert chosen.sum(dim=1).tolist() == counts
        # The same positions in one packed row: none predicts across the boundary.
        in_row = distilled_positions(packed["labels"], settings, None, packed["position_ids"])
        assert in_row[0, :5].sum() == counts[0]
        assert in_row[0, 6:].sum() == counts[1]
        assert not in_row[0, 5]
    first = distilled_positions(labels, _settings(label_tokens_only=True), mask)
    # Position prompt_length - 1 predicts the first target token.
    assert first.nonzero().tolist() == [[0, 2], [1, 1]]


def test_no_distillation_loss_against_itself(tiny_model_dir: Path, tokenizer) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    copy = student.from_teacher(teacher, [0, 1]).train()
    settings = _settings(loss="jsd", temperature=2.0, positions="all")
    module = objective.DistillationObjective(copy, FrozenTeacher(teacher), settings, len(tokenizer))
    _, batch = _batch(tokenizer)
    sums = module(**batch)
    assert sums["distill"].item() < 1e-6
    assert sums["ce"].item() > 1.0
    sums["ce"].backward()
    # The teacher is frozen and outside the module: no gradients, never an optimizer parameter.
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())


def test_robust_distillation_teacher_reads_the_clean_example(
    tiny_model_dir: Path, tokenizer
) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    copy = student.from_teacher(teacher, [0, 1]).eval()
    clean, _ = _batch(tokenizer)
    # Adversarial versions: other prompt tokens (one of them longer), the same targets.
    perturbed = [
        data.Example("p", "t", [11, 12, 13, 14, 8, 9, tokenizer.eos_token_id], 4, 0),
        data.Example("p", "t", [15, 7, tokenizer.eos_token_id], 2, 1),
    ]
    module = objective.DistillationObjective(
        copy,
        FrozenTeacher(teacher),
        _settings(),
        len(tokenizer),
        sampling=objective.Sampling(tokenizer, "no", 0),
        clean_examples=clean,
    )
    student_batch = data.collate(perturbed, tokenizer.pad_token_id, 8)
    robust = module(**student_batch, **module.extra_inputs([0, 1]))["distill"]
    # The same student against a teacher that also reads the perturbed input: zero loss, as
    # the student is the teacher; against the clean input it is not.
    assert module(**student_batch)["distill"].item() < 1e-6
    assert robust.item() > 1e-3
    # Swapping roles: the student reading the clean examples matches the teacher exactly.
    clean_batch = data.collate(clean, tokenizer.pad_token_id, 8)
    assert module(**clean_batch, **module.extra_inputs([0, 1]))["distill"].item() < 1e-6


@pytest.mark.parametrize(
    "values",
    [{}, {"positions": "all", "loss": "jsd"}, {"label_tokens_only": True}],
    ids=["target", "all", "label-tokens"],
)
def test_a_packed_row_gives_the_padded_sums(
    make_tiny_llama, tokenizer, values: dict[str, object]
) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(make_tiny_llama("teacher", layers=3))
    copy = student.from_teacher(teacher, [0, 2]).train()
    for model in (teacher, copy):
        attention.use_training_attention(model, packed=True)
    hidden = HiddenStateMatch({1: 2, 2: 3}, 64, 64, "mse")
    module = objective.DistillationObjective(
        copy, FrozenTeacher(teacher), _settings(**values), len(tokenizer), hidden_match=hidden
    )
    examples, padded = _batch(tokenizer)
    expected = module(**padded)
    actual = module(**data.collate_packed(examples))
    assert set(actual) == set(expected) == {"ce", "distill", "hidden"}
    for name, value in expected.items():
        assert value > 0
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-6)
