"""JSON files of a run: written atomically, and named when damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_tune.errors import UserError
from llama_tune.jsonfiles import read_json, read_jsonl, write_json


def test_json_is_written_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "summary.json"
    write_json(path, {"status": "finished", "steps": 3})
    assert read_json(path) == {"status": "finished", "steps": 3}
    assert sorted(item.name for item in path.parent.iterdir()) == ["summary.json"]


def test_damaged_files_are_named(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    summary.write_text('{"status": "fini')
    with pytest.raises(UserError, match=r"summary\.json: unreadable"):
        read_json(summary)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl: line 4 unreadable"):
        read_jsonl(metrics)
    metrics.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(metrics) == [{"step": 1}, {"step": 2}]
