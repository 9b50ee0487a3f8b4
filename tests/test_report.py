"""Reports: several runs' evaluations side by side, from their results.json files alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_tune import report, run_folder
from llama_tune.errors import UserError


def _results(run_dir: Path, accuracy: float) -> Path:
    """A run's results.json as `llama-tune evaluate` writes it (the fields reports read)."""
    interval = {"value": accuracy, "low": accuracy - 0.05, "high": accuracy + 0.05}
    base = {"value": 0.5, "low": 0.45, "high": 0.55}
    results = {
        "settings": {"bootstrap_resamples": 100, "seed": 0},
        "systems": {
            "tuned": {"metrics": {"accuracy": interval}, "parameters": 10, "examples_per_s": 1.0},
            "base": {"metrics": {"accuracy": base}, "parameters": 9, "examples_per_s": 2.0},
        },
    }
    path = run_folder.evaluation_folder(run_dir, "validation", best=False) / run_folder.RESULTS
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))
    return path


def test_runs_are_compared_in_one_table(tmp_path: Path) -> None:
    paths = [_results(tmp_path / "plain", 0.8), _results(tmp_path / "robust", 0.9)]
    rows = report.compare_runs(paths, tmp_path / "comparison")
    assert list(rows) == [
        "plain (tuned, validation)",
        "plain (base, validation)",
        "robust (tuned, validation)",
        "robust (base, validation)",
    ]
    markdown = (tmp_path / "comparison" / run_folder.REPORT_MD).read_text()
    assert "| robust (tuned, validation) | 0.9000 [0.8500, 0.9500] |" in markdown
    page = (tmp_path / "comparison" / run_folder.REPORT_HTML).read_text()
    assert "data:image/png;base64," in page
    assert "Robustness" not in page


def test_runs_that_share_a_folder_name_keep_their_own_rows(tmp_path: Path) -> None:
    paths = [_results(tmp_path / "a/run", 0.8), _results(tmp_path / "b/run", 0.9)]
    paths.append(_results(tmp_path / "other", 0.7))
    rows = report.compare_runs(paths, tmp_path / "comparison")
    assert rows["a/run (tuned, validation)"]["accuracy"]["value"] == 0.8
    assert rows["b/run (tuned, validation)"]["accuracy"]["value"] == 0.9
    # A name no other run has stays the name alone.
    assert rows["other (tuned, validation)"]["accuracy"]["value"] == 0.7
    assert len(rows) == 6
    # The same run named twice is one evaluation.
    spelt_otherwise = tmp_path / "b" / ".." / paths[0].relative_to(tmp_path)
    again = report.compare_runs([paths[0], spelt_otherwise], tmp_path / "c")
    assert list(again) == ["run (tuned, validation)", "run (base, validation)"]
    assert "1 evaluation(s)" in (tmp_path / "c" / "report.md").read_text()


def test_a_split_not_scored_is_named_with_the_splits_that_were(cli_here, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _results(run_dir, 0.8)
    err = cli_here("report", str(run_dir), "--split", "test", expect=2)
    assert err.splitlines() == [
        f"error: {run_dir} has no results for split 'test' (it has: validation)"
    ]
    output = ["--output", str(tmp_path / "comparison")]
    cli_here("report", str(run_dir), "--split", "validation", *output)
    err = cli_here("report", str(tmp_path / "never-scored"), *output, expect=2)
    assert "has no evaluation results; run llama-tune evaluate first" in err


def test_lm_eval_results_are_left_out_of_a_comparison(cli_here, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _results(run_dir, 0.8)
    harness_results = run_dir / run_folder.EVALUATION / run_folder.LM_EVAL / run_folder.RESULTS
    harness_results.parent.mkdir()
    harness_results.write_text(json.dumps({"results": {"sst2": {"acc,none": 0.5}}}))
    cli_here("report", str(run_dir), "--output", str(tmp_path / "comparison"))
    err = cli_here("report", str(run_dir), "--split", run_folder.LM_EVAL, expect=2)
    assert "has no results for split 'lm-eval' (it has: validation)" in err


def test_intervals_are_shown_with_four_decimals() -> None:
    assert report.format_interval({"value": 0.5, "low": 0.25, "high": 0.75}) == (
        "0.5000 [0.2500, 0.7500]"
    )


def test_an_output_that_is_a_file_is_named(tmp_path: Path) -> None:
    paths = [_results(tmp_path / "plain", 0.8)]
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(UserError, match="taken is a file, not a folder for the report"):
        report.compare_runs(paths, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "keep me"
