"""Checkpoints: atomic saves, pruning, exact resume, refusing incompatible resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from safetensors.torch import load_file

from llama_tune import checkpoint, config, run_folder, train


def test_crash_mid_save_keeps_the_previous_checkpoint(
    tiny_recipe, crash_during_save, same_weights
) -> None:
    reference = tiny_recipe("reference", max_steps=12, checkpoint={"every": 4})
    crashing = tiny_recipe("crashing", max_steps=12, checkpoint={"every": 4})
    expected = train.run(config.load(reference), reference)

    with crash_during_save("step-00000008", "scheduler.pt"):
        train.run(config.load(crashing), crashing)

    run_dir = config.run_dir(config.load(crashing), crashing)
    assert checkpoint.latest(run_dir).name == "step-00000004"
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]

    resumed = train.run(config.load(crashing), crashing, resume=True)
    assert resumed.summary["steps"] == 12
    assert resumed.weights_dir.name == run_folder.ADAPTER
    same_weights(expected.weights_dir, resumed.weights_dir)


def test_only_the_last_checkpoints_are_kept(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=10, checkpoint={"every": 2, "keep_last": 2})
    result = train.run(config.load(path), path)
    kept = [folder.name for folder in checkpoint.complete_checkpoints(result.run_dir)]
    assert kept == ["step-00000006", "step-00000008"]
    state = (result.run_dir / "checkpoints" / "step-00000008" / "state.json").read_text()
    assert '"step": 8' in state


def test_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-00000004").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-00000006").mkdir()
    assert checkpoint.latest(tmp_path).name == "step-00000002"


def test_each_process_restores_its_own_random_state(tmp_path: Path) -> None:
    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        saved.append(checkpoint.rng_states())
    rng_file = tmp_path / checkpoint.RNG_FILE
    torch.save(saved, rng_file)
    draws = []
    for process_index in (0, 1):
        checkpoint.restore_rng_states(checkpoint.read_rng_file(rng_file), process_index)
        draws.append(torch.rand(4))
    for seed, draw in zip((1, 2), draws, strict=True):
        torch.manual_seed(seed)
        assert torch.equal(draw, torch.rand(4))
    # A checkpoint of an earlier version holds the main process's states alone, its NumPy
    # state as an array.
    older = dict(saved[1], numpy=numpy.random.get_state())
    torch.save(older, rng_file)
    checkpoint.restore_rng_states(checkpoint.read_rng_file(rng_file), 0)
    assert torch.equal(torch.rand(4), draws[1])


def test_each_process_restores_its_own_gpus_random_state_on_fewer_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for one GPU's generator, as torch.cuda reads and sets it: a resume may see
    # fewer GPUs than the run that saved (another node, another CUDA_VISIBLE_DEVICES).
    generators = {0: torch.tensor([7], dtype=torch.uint8)}

    def set_state(state: torch.Tensor, device: int | str = "cuda") -> None:
        index = 0 if device == "cuda" else int(device)
        if index not in generators:
            raise IndexError(f"no GPU {index}")
        generators[index] = state.clone()

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: len(generators))
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "get_rng_state", lambda *_: generators[0].clone())
    monkeypatch.setattr(cuda, "set_rng_state", set_state)
    saved = checkpoint.rng_states()
    assert torch.equal(saved["cuda"], torch.tensor([7], dtype=torch.uint8))
    rng_file = tmp_path / checkpoint.RNG_FILE
    torch.save([saved, saved | {"cuda": torch.tensor([9], dtype=torch.uint8)}], rng_file)
    checkpoint.restore_rng_states(checkpoint.read_rng_file(rng_file), 1)
    assert generators[0].tolist() == [9]
    # Checkpoints of earlier versions held every visible GPU's state (eight, here).
    eight = [torch.tensor([index], dtype=torch.uint8) for index in range(10, 18)]
    torch.save([saved | {"cuda": eight}], rng_file)
    checkpoint.restore_rng_states(checkpoint.read_rng_file(rng_file), 0)
    assert generators[0].tolist() == [10]


def test_resume_refuses_a_changed_model_or_adapter(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=4, checkpoint={"every": 2})
    result = train.run(config.load(path), path)
    # Make the finished run look interrupted after its step-2 checkpoint.
    (result.run_dir / run_folder.SUMMARY).unlink()
    assert checkpoint.latest(result.run_dir).name == "step-00000002"
    with pytest.raises(train.TrainError, match=r"changed adapter\.r, train\.batch_size"):
        train.run(config.load(path, ["adapter.r=8", "train.batch_size=4"]), path, resume=True)
    resumed = train.run(config.load(path, ["train.lr=5e-4"]), path, resume=True)
    assert resumed.summary["steps"] == 4


def test_unfinished_run_needs_resume_or_overwrite(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=6, checkpoint={"every": 2})
    run_dir = config.run_dir(config.load(path), path)
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    with pytest.raises(train.TrainError, match="unfinished run; continue it with"):
        train.run(config.load(path), path)


def test_recipe_hash_tracks_resume_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: /d, task: classification}\n")
    base = config.load(path)
    assert checkpoint.recipe_hash(base) == checkpoint.recipe_hash(config.load(path, ["train.lr=1"]))
    for changed in ("adapter.r=4", "adversarial.augment.budget=0.3", "train.packing=true"):
        assert checkpoint.recipe_hash(base) != checkpoint.recipe_hash(config.load(path, [changed]))


def test_full_fine_tuning_resumes_exactly(tiny_recipe, crash_during_save, same_weights) -> None:
    reference = tiny_recipe("full-reference", max_steps=8, checkpoint={"every": 3})
    crashing = tiny_recipe("full-crashing", max_steps=8, checkpoint={"every": 3})
    full = ["adapter=null"]
    expected = train.run(config.load(reference, full), reference)

    with crash_during_save("step-00000006"):
        train.run(config.load(crashing, full), crashing)
    resumed = train.run(config.load(crashing, full), crashing, resume=True)

    assert expected.weights_dir.name == resumed.weights_dir.name == run_folder.FULL_MODEL
    assert len(load_file(expected.weights_dir / "model.safetensors")) > 10  # not an adapter
    same_weights(expected.weights_dir, resumed.weights_dir)


def _interrupted_after(path: Path, overrides: list[str]) -> Path:
    """Train a recipe to its end, then make the run look interrupted after its checkpoints."""
    result = train.run(config.load(path, overrides), path)
    summary = json.loads((result.run_dir / run_folder.SUMMARY).read_text())
    (result.run_dir / run_folder.SUMMARY).write_text(json.dumps(summary | {"status": "x"}))
    shutil.rmtree(result.weights_dir)
    return result.run_dir


_SAVING_AS_GPU = []
"""Set while `_as_if_saved_on_a_gpu` writes: torch.save then tags CPU tensors as cuda:0's."""


def _gpu_location(storage: torch.UntypedStorage) -> str | None:
    return "cuda:0" if _SAVING_AS_GPU and storage.device.type == "cpu" else None


# Through torch's public registry of storage locations; None (not saving) defers to torch's own.
torch.serialization.register_package(1, _gpu_location, lambda *_: None)


def _as_if_saved_on_a_gpu(path: Path) -> None:
    """Rewrite a checkpoint file as a GPU run writes it: its tensors tagged as on cuda:0."""
    value = torch.load(path, weights_only=False, map_location="cpu")
    _SAVING_AS_GPU.append(True)
    try:
        torch.save(value, path)
    finally:
        _SAVING_AS_GPU.clear()
    with pytest.raises(RuntimeError, match="CUDA"):  # torch.load's default on this machine
        torch.load(path, weights_only=True)


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(
    tiny_recipe, same_weights, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its optimizer state, read back onto the GPU that saved it, would put every process's
    # copy on GPU 0; on a machine without one the checkpoint looked damaged.
    reference = tiny_recipe("reference", max_steps=6, checkpoint={"every": 4})
    expected = train.run(config.load(reference), reference)
    path = tiny_recipe("moved", max_steps=6, checkpoint={"every": 4})
    run_dir = _interrupted_after(path, [])
    (saved,) = checkpoint.complete_checkpoints(run_dir)
    for name in (checkpoint.OPTIMIZER_FILE, checkpoint.RNG_FILE):  # the scheduler's: numbers
        _as_if_saved_on_a_gpu(saved / name)
    capsys.readouterr()
    resumed = train.run(config.load(path), path, resume=True)
    assert f"resuming from {saved} (step 4)" in capsys.readouterr().out
    same_weights(expected.weights_dir, resumed.weights_dir)


def test_fp16s_loss_scale_resumes_where_it_stopped(
    tiny_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fp16 runs on GPUs alone, where Accelerate gives the backward and the optimizer a
    # GradScaler; here the same scaler on the CPU stands in, doubling its scale every two
    # unskipped steps. Resumed at its initial scale, the next steps would overflow.
    scalers: list[torch.amp.GradScaler] = []
    set_up = train.TrainingRun._setup_optimizer

    def with_a_scaler(run: train.TrainingRun) -> None:
        set_up(run)
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=2)
        run.accelerator.scaler = scaler
        run.optimizer = AcceleratedOptimizer(run.optimizer.optimizer, False, scaler)
        scalers.append(scaler)

    monkeypatch.setattr(train.TrainingRun, "_setup_optimizer", with_a_scaler)
    path = tiny_recipe(max_steps=6, checkpoint={"every": 4})
    run_dir = _interrupted_after(path, [])
    (saved,) = checkpoint.complete_checkpoints(run_dir)
    assert json.loads((saved / checkpoint.STATE_FILE).read_text())["loss_scale"]["scale"] == 64
    train.run(config.load(path), path, resume=True)
    assert [scaler.get_scale() for scaler in scalers] == [128, 128]


def test_a_changed_learning_rate_is_applied_on_resume(tiny_recipe, capsys) -> None:
    path = tiny_recipe(max_steps=6, scheduler="constant", warmup_steps=0, checkpoint={"every": 4})
    run_dir = _interrupted_after(path, [])
    capsys.readouterr()
    train.run(config.load(path, ["train.lr=5e-5", "train.weight_decay=0.1"]), path, resume=True)
    changes = [line for line in capsys.readouterr().out.splitlines() if "changed since" in line]
    assert changes == [
        "  changed since the run started: train.lr 0.001 -> 5e-05",
        "  changed since the run started: train.weight_decay 0.0 -> 0.1",
    ]
    records = [json.loads(line) for line in (run_dir / run_folder.METRICS).open()]
    rates = {record["step"]: record["lr"] for record in records if "lr" in record}
    assert rates == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 5e-5, 6: 5e-5}


def test_resume_never_finishes_below_the_steps_done(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=6, checkpoint={"every": 4})
    run_dir = _interrupted_after(path, [])
    with pytest.raises(train.TrainError, match="has trained 4 steps and the recipe plans 3"):
        train.run(config.load(path, ["train.max_steps=3"]), path, resume=True)
    assert json.loads((run_dir / run_folder.SUMMARY).read_text())["status"] == "x"


class _RunsCode:
    """A pickle that runs code when loaded without weights_only: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_no_code_runs_from_a_checkpoint(cli, tiny_recipe, tmp_path: Path) -> None:
    path = tiny_recipe(max_steps=6, checkpoint={"every": 2, "keep_last": 3})
    run_dir = _interrupted_after(path, [])
    marker = tmp_path / "code-ran"
    newest = checkpoint.latest(run_dir)
    torch.save([_RunsCode(marker)], newest / checkpoint.RNG_FILE)
    # The newest checkpoint is refused unread; the one before it is intact.
    done = cli("train", str(run_dir), "--resume")
    assert not marker.exists()
    assert f"skipping a damaged checkpoint: {newest / checkpoint.RNG_FILE}: unreadable" in (
        done.stdout
    )
    assert f"resuming from {checkpoint.complete_checkpoints(run_dir)[0]} (step 2)" in done.stdout


def test_damaged_checkpoints_fall_back_or_fail_in_one_line(cli, tiny_recipe) -> None:
    path = tiny_recipe(max_steps=6, checkpoint={"every": 2, "keep_last": 3})
    run_dir = _interrupted_after(path, [])
    older, newest = checkpoint.complete_checkpoints(run_dir)[-2:]
    (newest / checkpoint.OPTIMIZER_FILE).unlink()
    adapter = older / run_folder.ADAPTER / checkpoint.ADAPTER_WEIGHTS
    adapter.write_bytes(adapter.read_bytes()[:200])
    done = cli("train", str(run_dir), "--resume", expect=2)
    assert f"{newest / checkpoint.OPTIMIZER_FILE}: unreadable" in done.stdout
    assert f"{adapter}: unreadable" in done.stdout
    # Model loading draws progress bars on stderr first; the error is one line at the end.
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir}: no intact checkpoint to resume from"
    )
    assert "Traceback" not in done.stderr


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=6, checkpoint={"every": 4})
    run_dir = _interrupted_after(path, [])
    metrics = run_dir / run_folder.METRICS
    metrics.write_text(metrics.read_text() + '{"step": 7, "lo')
    result = train.run(config.load(path), path, resume=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert result.summary["status"] == "finished"


def test_a_checkpoint_resumes_only_on_as_many_processes(tiny_recipe) -> None:
    # Saved by one process; as if by two, it is refused on one, naming the count to launch.
    path = tiny_recipe(max_steps=6, checkpoint={"every": 4})
    run_dir = _interrupted_after(path, [])
    (saved,) = checkpoint.complete_checkpoints(run_dir)
    state = json.loads((saved / checkpoint.STATE_FILE).read_text())
    assert state["processes"] == 1
    (saved / checkpoint.STATE_FILE).write_text(json.dumps(state | {"processes": 2}))
    with pytest.raises(
        train.TrainError, match="run of 2 processes and this launch has 1"
    ) as refused:
        train.run(config.load(path), path, resume=True)
    assert "resume with 2 processes" in str(refused.value)
    assert (saved / checkpoint.STATE_FILE).is_file()
