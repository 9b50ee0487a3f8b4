"""Distillation runs end to end: preflight refusals, the student trained, the loss falling."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from launched import launch_environment, launched, same_steps, same_tensors
from llama_tune import config, evaluation, run_folder, train
from llama_tune.distillation import hidden, loading, preflight

FSDP = launch_environment(REPO / "configs" / "fsdp.yaml")
ZERO3 = launch_environment(REPO / "configs" / "deepspeed_zero3.yaml")


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / run_folder.METRICS).read_text().splitlines()
    return [record for line in lines if "eval_loss" in (record := json.loads(line))]


def test_incompatible_student_is_refused_before_training(
    tiny_recipe, tiny_model_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-student"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|new|>"])
    tokenizer.save_pretrained(other)
    path = tiny_recipe()
    recipe = config.load(path, [f"model.name={other}", f"distill.teacher.name={tiny_model_dir}"])
    expected = re.escape("tokens only the student has: '<|new|>'")
    with pytest.raises(preflight.IncompatibleTokenizers, match=expected):
        train.run(recipe, path)
    assert not (config.run_dir(recipe, path) / run_folder.METRICS).exists()


def test_a_model_not_found_is_named_by_its_key(
    tiny_recipe, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Two models in one recipe: "model '...' not found" did not say which key named it.
    path = tiny_recipe()
    keys = ["distill.teacher.name", "model.name"]
    for key, other in [keys, keys[::-1]]:
        missing = tmp_path / "no-such-model"
        recipe = config.load(path, [f"{key}={missing}", f"{other}={tiny_model_dir}"])
        with pytest.raises(loading.DistillationError, match=f"^{key}: model '{missing}' not found"):
            train.run(recipe, path)


def test_a_hidden_layer_map_is_checked_before_weights_load(
    tiny_recipe, make_tiny_llama, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_weights(*_: object) -> None:
        raise AssertionError("weights read before the layer map was checked")

    monkeypatch.setattr(loading, "load_teacher", no_weights)
    monkeypatch.setattr(loading.models, "load_base_model", no_weights)
    teacher = make_tiny_llama("teacher", layers=4)
    path = tiny_recipe()
    cut = "distill.student.from_teacher.keep_layers=[0,2]"
    for student in ([f"model.name={tiny_model_dir}"], [f"model.name={teacher}", cut]):
        overrides = [*student, f"distill.teacher.name={teacher}"]
        recipe = config.load(path, [*overrides, "distill.hidden_states.layers={3: 4}"])
        with pytest.raises(hidden.LayerMapError, match=r"3->4 outside the student's 0..2 "):
            train.run(recipe, path)


def test_lora_student_of_a_tuned_teacher_is_scored_against_both(
    tiny_recipe, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher_path = tiny_recipe("teacher", max_steps=4)
    teacher_run = train.run(config.load(teacher_path), teacher_path)
    path = tiny_recipe("student", max_steps=4)
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        f"distill.teacher.adapter={teacher_run.run_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
    ]
    recipe = config.load(path, overrides)
    assert recipe.model.name == str(tiny_model_dir)
    result = train.run(recipe, path)
    init = AutoModelForCausalLM.from_pretrained(result.run_dir / run_folder.STUDENT_INIT)
    teacher = loading.load_teacher(recipe.distill, "no")
    assert init.config.num_hidden_layers == 1
    # The student starts from the teacher's layer 1 with the teacher's adapter merged into it.
    kept = init.model.layers[0].mlp.up_proj.weight
    assert torch.equal(kept, teacher.model.layers[1].mlp.up_proj.weight)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[1]
    assert not torch.equal(kept, original.mlp.up_proj.weight)
    assert (result.weights_dir / "adapter_config.json").is_file()

    results = evaluation.run(result.run_dir, split="validation", limit=16, base=True)
    systems = results["systems"]
    assert list(systems) == ["student", "teacher", "base"]
    assert systems["student"]["parameters"] < systems["teacher"]["parameters"]
    assert set(results["differences"]) == {"student - teacher", "student - base"}
    report = (Path(results["output_dir"]) / "report.md").read_text()
    assert "as fast as the teacher" in report
    # Chat and lm-eval take the student alone: its teacher is never loaded for them.
    resolved = evaluation.resolve_target(result.run_dir, [])
    with monkeypatch.context() as patched:
        patched.setattr(loading, "load_teacher", lambda *_: pytest.fail("teacher loaded"))
        main = evaluation.main_system(resolved, "no")
    assert main.name == "student"
    assert main.model.num_parameters() == systems["student"]["parameters"]


def test_real_distillation_on_sst2_lowers_the_distillation_loss(
    tmp_path: Path, data_root: Path
) -> None:
    """The built-in model teaches a half-depth copy of itself (full fine-tuning)."""
    path = tmp_path / "distil.yaml"
    recipe = {
        "adapter": None,
        "data": {
            "source": str(data_root / "classification" / "sst2"),
            "task": "classification",
            "template": "Review: {text}\nSentiment (positive or negative):",
            "max_train_rows": 96,
            "max_eval_rows": 32,
            "max_length": 64,
        },
        "train": {"max_steps": 12, "batch_size": 8, "lr": 1e-4},
        "logging": {"every": 4},
        "validation": {"every": 12},
        "distill": {
            "teacher": {"name": "smollm2-135m-instruct"},
            "student": {"from_teacher": {"every": 2}},
            "temperature": 2.0,
            "alpha": 0.5,
        },
        "output": {"dir": str(tmp_path / "distil")},
    }
    path.write_text(json.dumps(recipe))
    result = train.run(config.load(path), path)
    before, after = _evals(result.run_dir)
    assert after["eval_distill_loss"] < 0.7 * before["eval_distill_loss"]
    assert after["eval_loss"] < before["eval_loss"]
    trained = AutoModelForCausalLM.from_pretrained(result.weights_dir)
    assert trained.config.num_hidden_layers == 15


@pytest.mark.parametrize("teacher", ["online", "cached"])
def test_packed_distillation_steps_equal_padded_ones(
    tiny_recipe, tiny_model_dir: Path, teacher: str
) -> None:
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
        "distill.positions=all",
        # Each step the whole split: packed steps are drawn at random, padded ones by length.
        "data.max_train_rows=16",
    ]
    if teacher == "cached":
        overrides.append("distill.cache={top_k: 16}")
    losses = []
    for packed in ("true", "false"):
        path = tiny_recipe(f"{teacher}-packed-{packed}", max_steps=5, grad_accumulation=2)
        result = train.run(config.load(path, [*overrides, f"train.packing={packed}"]), path)
        assert result.summary["packed"] is (packed == "true")
        lines = (result.run_dir / run_folder.METRICS).read_text().splitlines()
        records = [record for line in lines if "loss" in (record := json.loads(line))]
        losses.append([[record["loss"], record["distill_loss"]] for record in records])
    assert len(losses[0]) == 5
    assert all(distill > 0 for _, distill in losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=0)


def test_a_sharded_or_partitioned_student_distils_as_one_process(
    tiny_recipe, tiny_model_dir: Path
) -> None:
    # The teacher stays whole on every process, outside what FSDP shards and ZeRO partitions;
    # the student generates its on-policy completions sharded.
    overrides = [
        f"distill.teacher.name={tiny_model_dir}",
        "distill.student.from_teacher.keep_layers=[1]",
        "distill.hidden_states={}",
        # Greedy completions, so that one process decodes what two do; each process generates
        # inside the step with the whole student (FSDP gathers its root), in step.
        "distill.on_policy={probability: 0.5, temperature: 0, max_new_tokens: 4}",
    ]
    settings = {"max_steps": 3, "batch_size": 4}
    # The reference: one process taking both processes' rows at each step (as DDP does).
    one = tiny_recipe("one", **settings | {"batch_size": 8})
    reference = train.run(config.load(one, overrides), one).run_dir
    adapter = Path(run_folder.ADAPTER) / "adapter_model.safetensors"
    for name, launch in (("fsdp", FSDP), ("zero3", ZERO3)):
        spread = launched(tiny_recipe(name, **settings), *overrides, launch=launch)
        same_steps(reference, spread, ("loss", "distill_loss", "hidden_loss", "grad_norm"))
        same_tensors(reference / adapter, spread / adapter)
