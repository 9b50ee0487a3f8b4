"""Checkpoints: atomic saves, pruning, exact resume, refusing incompatible resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_tune import checkpoint, config, train


def test_crash_mid_save_keeps_the_previous_checkpoint(
    tiny_recipe, crash_during_save, same_weights
) -> None:
    reference = tiny_recipe("reference", max_steps=12, save_steps=4)
    crashing = tiny_recipe("crashing", max_steps=12, save_steps=4)
    expected = train.run(config.load(reference), reference)

    with crash_during_save("step-00000008", "scheduler.pt"):
        train.run(config.load(crashing), crashing)

    run_dir = config.run_dir(config.load(crashing), crashing)
    assert checkpoint.latest(run_dir).name == "step-00000004"
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]

    resumed = train.run(config.load(crashing), crashing, resume=True)
    assert resumed.summary["steps"] == 12
    assert resumed.weights_dir.name == train.ADAPTER
    same_weights(expected.weights_dir, resumed.weights_dir)


def test_only_the_last_checkpoints_are_kept(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=10, save_steps=2, keep_last_checkpoints=2)
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
    torch.save(saved, tmp_path / checkpoint.RNG_FILE)
    draws = []
    for process_index in (0, 1):
        checkpoint.restore_rng(tmp_path, process_index)
        draws.append(torch.rand(4))
    for seed, draw in zip((1, 2), draws, strict=True):
        torch.manual_seed(seed)
        assert torch.equal(draw, torch.rand(4))
    # A checkpoint of an earlier version holds the main process's states alone.
    torch.save(saved[1], tmp_path / checkpoint.RNG_FILE)
    checkpoint.restore_rng(tmp_path, 0)
    assert torch.equal(torch.rand(4), draws[1])


def test_resume_refuses_a_changed_model_or_adapter(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=4, save_steps=2)
    result = train.run(config.load(path), path)
    # Make the finished run look interrupted after its step-2 checkpoint.
    (result.run_dir / train.SUMMARY).unlink()
    assert checkpoint.latest(result.run_dir).name == "step-00000002"
    with pytest.raises(train.TrainError, match=r"changed adapter\.r, train\.batch_size"):
        train.run(config.load(path, ["adapter.r=8", "train.batch_size=4"]), path, resume=True)
    resumed = train.run(config.load(path, ["train.lr=5e-4"]), path, resume=True)
    assert resumed.summary["steps"] == 4


def test_unfinished_run_needs_resume_or_overwrite(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=6, save_steps=2)
    run_dir = config.run_dir(config.load(path), path)
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    with pytest.raises(train.TrainError, match="unfinished run; use --resume"):
        train.run(config.load(path), path)


def test_recipe_hash_tracks_resume_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: /d, task: classification}\n")
    base = config.load(path)
    assert checkpoint.recipe_hash(base) == checkpoint.recipe_hash(config.load(path, ["train.lr=1"]))
    for changed in ("adapter.r=4", "adversarial.augment.budget=0.3"):
        assert checkpoint.recipe_hash(base) != checkpoint.recipe_hash(config.load(path, [changed]))


def test_full_fine_tuning_resumes_exactly(tiny_recipe, crash_during_save, same_weights) -> None:
    reference = tiny_recipe("full-reference", max_steps=8, save_steps=3)
    crashing = tiny_recipe("full-crashing", max_steps=8, save_steps=3)
    full = ["adapter=null"]
    expected = train.run(config.load(reference, full), reference)

    with crash_during_save("step-00000006"):
        train.run(config.load(crashing, full), crashing)
    resumed = train.run(config.load(crashing, full), crashing, resume=True)

    assert expected.weights_dir.name == resumed.weights_dir.name == train.FULL_MODEL
    assert len(load_file(expected.weights_dir / "model.safetensors")) > 10  # not an adapter
    same_weights(expected.weights_dir, resumed.weights_dir)
