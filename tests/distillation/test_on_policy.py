"""On-policy distillation: which steps, what the student writes, exact resume, no reference
answer scored on its steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llama_tune import config, data, run_folder, schema, train
from llama_tune.distillation import on_policy


def test_on_policy_steps_are_seeded_and_as_frequent_as_asked() -> None:
    settings = schema.OnPolicyConfig(probability=0.3)
    chosen = [on_policy.is_on_policy_step(settings, 42, step) for step in range(2000)]
    assert chosen == [on_policy.is_on_policy_step(settings, 42, step) for step in range(2000)]
    assert 0.27 < sum(chosen) / len(chosen) < 0.33
    never = schema.OnPolicyConfig(probability=0.0)
    assert not any(on_policy.is_on_policy_step(never, 42, step) for step in range(100))


def test_student_completions_replace_the_answers(tiny_model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    examples = [
        data.Example("a", "b", [5, 6, 7, 8, tokenizer.eos_token_id], 3, 0),
        data.Example("c", "d", [9, 10, tokenizer.eos_token_id], 2, 1),
    ]
    greedy = schema.OnPolicyConfig(max_new_tokens=6, temperature=0.0)
    rewritten = on_policy.student_examples(model, tokenizer, examples, greedy, "no")
    assert model.training
    for original, new in zip(examples, rewritten, strict=True):
        prompt = original.input_ids[: original.prompt_length]
        assert new.input_ids[: new.prompt_length] == prompt
        completion = new.input_ids[new.prompt_length :]
        assert 1 <= len(completion) <= 6
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=2
        )[0, len(prompt) :].tolist()
        assert completion == expected[: len(completion)]
        assert tokenizer.eos_token_id not in completion[:-1]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / run_folder.METRICS).open()]


def test_on_policy_training_resumes_exactly(resumes_exactly, tiny_model_dir: Path) -> None:
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
        "distill.on_policy.probability=0.5",
        "distill.on_policy.max_new_tokens=4",
        "adapter.dropout=0.1",
    ]
    expected = resumes_exactly("policy", overrides)
    steps = [record for record in _metrics(expected.run_dir) if "loss" in record]
    on_policy_steps = [record["step"] for record in steps if "ce_loss" not in record]
    settings = schema.OnPolicyConfig(probability=0.5)
    assert on_policy_steps == [
        step + 1 for step in range(8) if on_policy.is_on_policy_step(settings, 42, step)
    ]
    assert 0 < len(on_policy_steps) < 8
    assert all(record["distill_loss"] > 0 for record in steps)


def test_on_policy_steps_score_no_reference_answer_under_attack(
    tiny_recipe, tiny_model_dir: Path
) -> None:
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
        "distill.on_policy.probability=0.5",
        "distill.on_policy.max_new_tokens=4",
        "adversarial.train.method=fgm",
    ]
    path = tiny_recipe("policy-fgm", max_steps=6)
    result = train.run(config.load(path, overrides), path)
    steps = [record for record in _metrics(result.run_dir) if "loss" in record]
    settings = schema.OnPolicyConfig(probability=0.5)
    chosen = {step + 1 for step in range(6) if on_policy.is_on_policy_step(settings, 42, step)}
    assert 0 < len(chosen) < 6
    for record in steps:
        reference_terms = {"ce_loss", "adversarial_ce_loss"}
        expected = set() if record["step"] in chosen else reference_terms
        assert reference_terms & record.keys() == expected
        assert record["adversarial_distill_loss"] > 0
