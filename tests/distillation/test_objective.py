"""The distillation objective: which positions count, and zero loss against itself."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llama_tune import data, schema
from llama_tune.distillation import objective, student
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
    for settings in (_settings(), _settings(positions="all"), _settings(label_tokens_only=True)):
        chosen = distilled_positions(labels, mask, settings)
        counts = [distilled_count(example, settings) for example in examples]
        assert chosen.sum(dim=1).tolist() == counts
    first = distilled_positions(labels, mask, _settings(label_tokens_only=True))
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
