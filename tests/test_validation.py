"""Task metrics during training and the best adapter kept in best/."""

from __future__ import annotations

import json
from pathlib import Path

from llama_tune import config, evaluation, run_folder, train, validation


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / run_folder.METRICS).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [record for record in records if "eval_loss" in record]


def test_is_better_knows_which_way_each_metric_goes() -> None:
    assert validation.is_better("accuracy", 0.5, None)
    assert validation.is_better("accuracy", 0.6, 0.5)
    assert not validation.is_better("accuracy", 0.5, 0.5)
    assert validation.is_better("eval_loss", 1.0, 2.0)
    assert not validation.is_better("eval_loss", 2.0, 1.0)


def test_best_adapter_is_the_one_that_scored_best(tiny_recipe) -> None:
    path = tiny_recipe(
        max_steps=8, validation={"every": 2, "metric_rows": 24, "best_metric": "accuracy"}
    )
    result = train.run(config.load(path), path)

    evals = _evals(result.run_dir)
    assert [record["step"] for record in evals] == [0, 2, 4, 6, 8]
    assert all({"eval_accuracy", "eval_macro_f1"} <= record.keys() for record in evals)
    trained = evals[1:]
    best_value = max(record["eval_accuracy"] for record in trained)
    first_best = next(record for record in trained if record["eval_accuracy"] == best_value)
    best = validation.best_record(result.run_dir)
    assert best == {"step": first_best["step"], "metric": "accuracy", "value": best_value}
    assert result.summary["best"] == best

    # Scoring best/ on the same rows afterwards reproduces the value it was chosen for.
    results = evaluation.run(
        result.run_dir, ["evaluation.adapter=best"], split="validation", limit=24
    )
    assert results["weights"].endswith(run_folder.BEST)
    assert Path(results["output_dir"]).name == "validation-best"
    assert results["systems"]["tuned"]["metrics"]["accuracy"]["value"] == best_value
    report = (Path(results["output_dir"]) / "report.md").read_text()
    assert f"Best adapter: step {best['step']}" in report


def test_best_by_eval_loss_needs_no_task_metric(tiny_recipe) -> None:
    path = tiny_recipe(max_steps=6, validation={"every": 2, "best_metric": "eval_loss"})
    result = train.run(config.load(path), path)
    trained = _evals(result.run_dir)[1:]
    assert all("eval_accuracy" not in record for record in trained)
    lowest = min(trained, key=lambda record: record["eval_loss"])
    assert validation.best_record(result.run_dir) == {
        "step": lowest["step"],
        "metric": "eval_loss",
        "value": lowest["eval_loss"],
    }
    assert (result.run_dir / run_folder.BEST / "adapter_model.safetensors").is_file()
