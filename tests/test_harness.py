"""`llama-tune lm-eval`: lm-evaluation-harness scores the run's model as `evaluate` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_tune import config, evaluation, harness, train

TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
ROWS = 48


def _task_yaml(folder: Path, validation: Path, name: str = "sst2_llama_tune") -> None:
    """A harness task `name` over the shared SST-2 validation rows, with the recipe's prompt."""
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(validation)}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": TEMPLATE.replace("{text}", "{{text}}"),
        "doc_to_choice": ["negative", "positive"],
        "doc_to_target": "{{['negative', 'positive'].index(label)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(json.dumps(task))


def test_the_harness_accuracy_lies_in_evaluates_interval(
    data_root: Path, tmp_path: Path, cli_here
) -> None:
    sst2 = data_root / "classification/sst2"
    recipe = {
        "data": {"source": str(sst2), "task": "classification", "template": TEMPLATE,
                 "max_train_rows": 64, "max_eval_rows": 8},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-4},
        "evaluation": {"max_rows": ROWS, "split": "validation"},
        "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip
    recipe_path = tmp_path / "sst2.yaml"
    recipe_path.write_text(json.dumps(recipe))
    run_dir = train.run(config.load(recipe_path, []), recipe_path).run_dir
    accuracy = evaluation.run(run_dir)["systems"]["tuned"]["metrics"]["accuracy"]
    tasks = tmp_path / "tasks"
    _task_yaml(tasks, sst2 / "validation.jsonl")
    results, folder = harness.run(run_dir, ["sst2_llama_tune"], str(tasks), limit=ROWS)
    harness_accuracy = results["results"]["sst2_llama_tune"]["acc,none"]
    print(f"harness {harness_accuracy:.4f}, llama-tune {accuracy}")
    assert accuracy["low"] <= harness_accuracy <= accuracy["high"]
    # Both score the two labels' log-likelihoods after the same prompt: at most a row apart.
    assert abs(harness_accuracy - accuracy["value"]) <= 1 / ROWS + 1e-9
    assert "sst2_llama_tune" in harness.table(folder)
    err = cli_here("lm-eval", str(run_dir), "--tasks", "no_such_task", expect=2)
    assert "--tasks: lm-eval knows no task no_such_task" in err


def test_a_launched_lm_eval_is_refused_before_anything_loads(
    cli_here, tmp_path: Path, monkeypatch
) -> None:
    # Under torchrun every process would score every document and all but local rank 0
    # would fail on the harness's empty results.
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = cli_here("lm-eval", str(tmp_path / "no-run"), "--tasks", "sst2", expect=2)
    assert "lm-eval runs on one process, not 2" in err
    assert "Traceback" not in err


def test_each_task_scored_keeps_the_others_results(
    tiny_recipe, cli_here, data_root: Path, tmp_path: Path
) -> None:
    path = tiny_recipe(max_steps=1)
    cli_here("train", str(path))
    run_dir = path.parent / "run"
    tasks = tmp_path / "tasks"
    for name in ("first_task", "second_task"):
        _task_yaml(tasks, data_root / "classification/sst2/validation.jsonl", name)

    def lm_eval(task: str, limit: int, expect: int = 0) -> str:
        arguments = ["--tasks", task, "--include-path", str(tasks), "--limit", str(limit)]
        return cli_here("lm-eval", str(run_dir), *arguments, expect=expect)

    lm_eval("first_task", 2)
    lm_eval("second_task", 2)
    lm_eval("first_task", 4)
    folder = run_dir / "evaluation" / "lm-eval"
    kept = json.loads((folder / "results.json").read_text())
    assert set(kept["results"]) == {"first_task", "second_task"}
    # The first task scored again replaced its own entry, and only its own.
    assert kept["n-samples"]["first_task"]["effective"] == 4
    assert kept["n-samples"]["second_task"]["effective"] == 2
    rows = [line.split("|")[1].strip() for line in harness.table(folder).splitlines()[2:]]
    assert [row for row in rows if row] == ["first_task", "second_task"]
    # Results it cannot read are refused before the model loads, and left as they were.
    (folder / "results.json").write_text('{"results"')
    err = lm_eval("second_task", 2, expect=2)
    assert err.startswith(f"error: {folder / 'results.json'}: unreadable")
    assert (folder / "results.json").read_text() == '{"results"'


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tasks", ","], "--tasks names no task: give harness task names, comma-separated"),
        (["--tasks", "sst2", "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", "sst2", "--limit", "-3"], "--limit must be at least 1"),
        (
            ["--tasks", "sst2", "--include-path", "TMP/tasks"],
            "--include-path TMP/tasks: no such folder",
        ),
    ],
)
def test_options_the_harness_would_fail_on_are_refused_first(
    cli_here, tmp_path: Path, options: list[str], message: str
) -> None:
    # The harness failed on these after the model loaded, or took a missing folder for unknown
    # tasks: refused before even the run folder is read, in one line.
    options = [option.replace("TMP", str(tmp_path)) for option in options]
    err = cli_here("lm-eval", str(tmp_path / "no-run"), *options, expect=2)
    assert err.splitlines() == [f"error: {message.replace('TMP', str(tmp_path))}"]
