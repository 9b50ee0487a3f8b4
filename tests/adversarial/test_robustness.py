"""Robustness scores: every system scored again under perturbed inputs, reported with drops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_tune import config, data, evaluation, run_folder, train

ROBUSTNESS = [
    "evaluation.robustness.methods=[char,gradient]",
    "evaluation.robustness.gradient_candidates=misspellings",
    "evaluation.robustness.strengths=[0.2,0.5]",
    "evaluation.split=validation",
]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def test_robustness_is_scored_and_reported_for_every_system(
    tiny_recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_recipe(max_steps=4, lr=5e-3)
    trained = train.run(config.load(path), path)
    reads = []
    training_inputs = data.training_inputs

    def counted(formatter: data.TaskFormatter):
        reads.append(formatter)
        return training_inputs(formatter)

    monkeypatch.setattr(data, "training_inputs", counted)
    results = evaluation.run(trained.run_dir, ROBUSTNESS, limit=24, base=True)
    # The misspellings' word list is read from the training split once per system, not once
    # per strength.
    assert len(reads) == 2
    out_dir = Path(results["output_dir"])
    saved = json.loads((out_dir / run_folder.RESULTS).read_text())
    for system in ("tuned", "base"):
        records = saved["systems"][system]["robustness"]
        assert [(r["method"], r["strength"]) for r in records] == [
            ("char", 0.2),
            ("char", 0.5),
            ("gradient", 0.2),
            ("gradient", 0.5),
        ]
        clean = saved["systems"][system]["metrics"]["accuracy"]["value"]
        for record in records:
            assert 0 < record["changed"] <= 24
            accuracy, drop = record["metrics"]["accuracy"], record["drop"]["accuracy"]
            assert accuracy["low"] <= accuracy["value"] <= accuracy["high"]
            assert abs(drop["value"] - (clean - accuracy["value"])) < 1e-9
            assert drop["low"] <= drop["value"] <= drop["high"]
    tuned = _lines(out_dir / "robustness-tuned.jsonl")
    base = _lines(out_dir / "robustness-base.jsonl")
    assert len(tuned) == len(base) == 4 * 24

    def inputs(lines: list[dict], method: str) -> list[str]:
        return [line["input"] for line in lines if line["method"] == method]

    # Character noise is the same for both systems; the gradient attack is each one's own.
    assert inputs(tuned, "char") == inputs(base, "char")
    assert inputs(tuned, "gradient") != inputs(base, "gradient")
    clean_inputs = [line["input"] for line in _lines(out_dir / "predictions.jsonl")]
    assert all(a != b for a, b in zip(inputs(tuned, "char")[24:], clean_inputs, strict=True))
    report = (out_dir / "report.md").read_text()
    assert "## Robustness" in report
    assert "| tuned | gradient | 0.5 |" in report
    # Base's drop against tuned's, paired on the same 24 rows: for accuracy its value is the
    # difference of the two drops.
    (base_row,) = [
        line for line in report.splitlines() if line.startswith("| base | gradient | 0.5 |")
    ]
    versus = base_row.strip(" |").split(" | ")[-1]
    drops = {s: saved["systems"][s]["robustness"][3]["drop"]["accuracy"] for s in ("tuned", "base")}
    assert versus.endswith("(24)")
    assert float(versus.split()[0]) == round(drops["base"]["value"] - drops["tuned"]["value"], 4)
    assert (out_dir / "robustness.png").stat().st_size > 10_000
    assert "Robustness" in (out_dir / "report.html").read_text()
