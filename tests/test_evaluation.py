"""Evaluation of run folders: damaged weights and results are named, not tracebacks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import torchrun
from llama_tune import checkpoint, config, run_folder


def test_a_truncated_adapter_is_named(cli_here, tiny_recipe, tmp_path: Path) -> None:
    path = tiny_recipe(max_steps=2)
    cli_here("train", str(path))
    run_dir = path.parent / "run"
    adapter = run_dir / run_folder.ADAPTER / checkpoint.ADAPTER_WEIGHTS
    adapter.write_bytes(adapter.read_bytes()[:300])
    refused = cli_here("evaluate", str(run_dir), "--split", "validation", "--limit", "8", expect=2)
    assert refused.strip().splitlines() == [
        f"error: {adapter}: unreadable ({refused.split('unreadable (', 1)[1].strip()}"
    ]
    # A damaged config is named by every command that reads the weights; a missing one too.
    config_file = adapter.with_name("adapter_config.json")
    config_file.write_text('{"r": "x"')
    for command in (["evaluate", str(run_dir)], ["export", str(run_dir), str(tmp_path / "out")]):
        refused = cli_here(*command, expect=2)
        assert refused.startswith(f"error: {config_file}: unreadable (")
    config_file.unlink()
    refused = cli_here("chat", str(run_dir), "--prompt", "hi", expect=2)
    assert refused.strip() == f"error: {config_file} is missing"

    results = run_dir / run_folder.EVALUATION / "validation" / run_folder.RESULTS
    results.parent.mkdir(parents=True)
    results.write_text('{"task": "classification", "systems"')
    report = cli_here("report", str(run_dir), "--output", str(tmp_path / "comparison"), expect=2)
    assert report.startswith(f"error: {results}: unreadable")
    results.write_text('{"task": "classification"}')
    report = cli_here("report", str(run_dir), "--output", str(tmp_path / "comparison"), expect=2)
    assert report.startswith(f"error: {results}: not results written by llama-tune evaluate")


def _scored(out_dir: Path) -> tuple[dict, list[dict]]:
    results = json.loads((out_dir / "results.json").read_text())
    lines = (out_dir / "predictions.jsonl").read_text().splitlines()
    return results, [json.loads(line) for line in lines]


SLOW_MAIN_SAVE = """
import os, time
if os.environ.get("RANK") == "0":
    import peft
    save = peft.PeftModel.save_pretrained
    def slow_save(*args, **kwargs):
        time.sleep(3)
        return save(*args, **kwargs)
    peft.PeftModel.save_pretrained = slow_save
"""
"""A sitecustomize that makes the main process of a launch slow to save its adapter."""


def test_two_processes_score_each_row_once_as_one_process(
    cli_here, tiny_recipe, tmp_path: Path
) -> None:
    path = tiny_recipe(max_steps=4, lr=5e-3)
    recipe = json.loads(path.read_text())
    # 23 rows: the processes' shares differ in size. Robustness: each process perturbs the
    # rows it scores (the gradient attack through its own model) and they exchange them.
    recipe["evaluation"] = {
        "split": "validation",
        "max_rows": 23,
        "after_training": True,
        "robustness": {"methods": ["char", "gradient"], "strengths": [0.3]},
    }
    path.write_text(json.dumps(recipe))
    # Trained and scored after training on two processes, through the launcher. The main
    # process saves slowly: the other must wait for the adapter before scoring it.
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_MAIN_SAVE)
    search = os.pathsep.join(filter(None, [str(tmp_path / "slow"), os.environ.get("PYTHONPATH")]))
    done = torchrun(["train", str(path)], launch={"PYTHONPATH": search})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("23 examples scored") == 1
    out_dir = path.parent / "run" / "evaluation" / "validation"
    two, two_rows = _scored(out_dir)
    two_perturbed = (out_dir / "robustness-tuned.jsonl").read_text().splitlines()
    # The same run scored again by one process (this one).
    cli_here(
        "evaluate", str(path.parent / "run"), "--split", "validation", "--limit", "23", "--base"
    )
    one, one_rows = _scored(out_dir)
    one_perturbed = (out_dir / "robustness-tuned.jsonl").read_text().splitlines()
    assert len(one_perturbed) == 2 * 23
    assert [json.loads(line) for line in two_perturbed] == [
        json.loads(line) for line in one_perturbed
    ]
    assert [row["row"] for row in two_rows] == [row["row"] for row in one_rows]
    assert len({row["row"] for row in two_rows}) == two["n"] == 23
    assert [row["prediction"] for row in two_rows] == [row["prediction"] for row in one_rows]
    for first, second in zip(one_rows, two_rows, strict=True):
        for label, logprob in first["label_logprobs"].items():
            assert second["label_logprobs"][label] == pytest.approx(logprob, abs=1e-4)
    for system in ("tuned", "base"):
        assert two["systems"][system]["metrics"] == one["systems"][system]["metrics"]
        robustness = [
            [
                {k: v for k, v in record.items() if k != "seconds"}
                for record in run["systems"][system]["robustness"]
            ]
            for run in (two, one)
        ]
        assert robustness[0] == robustness[1]


OWN_DISKS = """
import os
if "RANK" in os.environ:
    os.chdir(os.path.join(os.environ["MACHINES"], "machine-" + os.environ["RANK"]))
"""
"""A sitecustomize that starts each launched process in a folder of its own: a relative run
folder names each process's own copy, as on machines with disks of their own."""


def test_processes_with_their_own_copies_of_a_run_score_the_systems_the_main_ones_holds(
    cli_here, tiny_recipe, tmp_path: Path
) -> None:
    path = tiny_recipe(max_steps=2)
    cli_here("train", str(path))
    for machine in ("machine-0", "machine-1"):
        shutil.copytree(path.parent / "run", tmp_path / machine / "run")
    # Only the main machine's copy was scored with the base before: its results keep the base
    # only if every process scores it again (a process scoring fewer systems would leave the
    # others waiting in their collectives).
    results = tmp_path / "machine-0" / "run" / run_folder.EVALUATION / "validation"
    results.mkdir(parents=True)
    (results / run_folder.RESULTS).write_text(json.dumps({"systems": {"base": {}}}))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(OWN_DISKS)
    search = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    arguments = ["evaluate", "run", "--split", "validation", "--limit", "8"]
    done = torchrun(
        arguments, launch={"PYTHONPATH": search, "MACHINES": str(tmp_path)}, timeout=120
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stderr.count("scoring the base model too") == 1
    written = json.loads((results / run_folder.RESULTS).read_text())
    assert set(written["systems"]) == {"tuned", "base"}


def test_a_recipes_base_scores_neither_block_its_training_nor_replace_its_runs(
    cli_here, tiny_recipe
) -> None:
    # The base model scored from the recipe first (as quickstart.yaml suggests), then trained
    # into the same output.dir; evaluating the recipe again would replace the run's results.
    path = tiny_recipe(max_steps=2)
    cli_here("evaluate", str(path), "--split", "validation", "--limit", "8")
    run_dir = path.parent / "run"
    assert (run_dir / run_folder.EVALUATION / "validation" / run_folder.RESULTS).is_file()
    cli_here("train", str(path))
    results = run_dir / run_folder.EVALUATION / "validation" / run_folder.RESULTS
    before = results.read_bytes()
    refused = cli_here("evaluate", str(path), "--split", "validation", "--limit", "8", expect=2)
    assert f"output.dir {run_dir} holds a run of this recipe" in refused
    assert results.read_bytes() == before
    # Scored with the base, then again without --base: the base is scored again, not dropped.
    scoring = ["--split", "validation", "--limit", "8"]
    cli_here("evaluate", str(run_dir), *scoring, "--base")
    with_base = json.loads(results.read_text())
    said = cli_here("evaluate", str(run_dir), *scoring)
    again = json.loads(results.read_text())
    assert set(again["systems"]) == set(with_base["systems"]) == {"tuned", "base"}
    assert again["differences"].keys() == with_base["differences"].keys() == {"tuned - base"}
    assert "scoring the base model too" in said


def test_an_adapter_on_another_base_is_named(cli_here, tiny_recipe, make_tiny_llama) -> None:
    path = tiny_recipe(max_steps=2)
    cli_here("train", str(path))
    run_dir = path.parent / "run"
    other = make_tiny_llama("wider", width=32, layers=1, seed=1)
    refused = cli_here(
        "evaluate", str(run_dir), "--split", "validation", f"model.name={other}", expect=2
    )
    assert f"{run_dir / run_folder.ADAPTER} was trained on another model than model.name" in refused
    assert "Traceback" not in refused


def test_a_run_trained_on_relative_paths_is_evaluated_from_anywhere(
    cli_here, tiny_recipe, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_recipe(max_steps=2)
    monkeypatch.chdir(tiny_model_dir.parent)
    cli_here("train", str(path), f"model.name={tiny_model_dir.name}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_dir = path.parent / "run"
    cli_here("evaluate", str(run_dir), "--split", "validation", "--limit", "4")
    saved = config.load_run(run_dir)
    assert saved.model.name == str(tiny_model_dir)
