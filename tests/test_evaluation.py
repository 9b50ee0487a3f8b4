"""Evaluation of run folders: damaged weights and results are named, not tracebacks."""

from __future__ import annotations

from pathlib import Path

from llama_tune import checkpoint, run_folder


def test_a_truncated_adapter_is_named(cli, tiny_recipe, tmp_path: Path) -> None:
    path = tiny_recipe(max_steps=2)
    cli("train", str(path))
    run_dir = path.parent / "run"
    adapter = run_dir / run_folder.ADAPTER / checkpoint.ADAPTER_WEIGHTS
    adapter.write_bytes(adapter.read_bytes()[:300])
    done = cli("evaluate", str(run_dir), "--split", "validation", "--limit", "8", expect=2)
    assert done.stderr.strip().splitlines() == [
        f"error: {adapter}: unreadable ({done.stderr.split('unreadable (', 1)[1].strip()}"
    ]
    assert "Traceback" not in done.stderr

    results = run_dir / run_folder.EVALUATION / "validation" / run_folder.RESULTS
    results.parent.mkdir(parents=True)
    results.write_text('{"task": "classification", "systems"')
    report = cli("report", str(run_dir), "--output", str(tmp_path / "comparison"), expect=2)
    assert report.stderr.startswith(f"error: {results}: unreadable")
    assert "Traceback" not in report.stderr
