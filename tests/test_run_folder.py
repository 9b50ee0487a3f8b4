"""The run folder: nothing a user owns is lost to --overwrite or a failed start (real CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_tune import run_folder
from llama_tune.errors import UserError


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path, with its bytes."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_failed_overwrite_leaves_the_finished_run_as_it_was(cli_here, tiny_recipe) -> None:
    path = tiny_recipe(max_steps=2)
    cli_here("train", str(path))
    run_dir = path.parent / "run"
    before = _contents(run_dir)
    assert json.loads(before[run_folder.SUMMARY])["status"] == "finished"
    failures = [
        # Fails in set-up, after the old run was set aside: it must come back.
        (["data.source=/nonexistent"], "data source /nonexistent not found"),
        (["model.name=/no/such/model"], "/no/such/model"),
        # Fails before anything is touched.
        (["train.batch_size=0"], "train.batch_size"),
        (["--resume"], "choose one"),
    ]
    for overrides, message in failures:
        assert message in cli_here("train", str(path), *overrides, "--overwrite", expect=2)
        assert _contents(run_dir) == before, overrides
        assert sorted(path.parent.glob(".run*")) == [], "a set-aside copy was left behind"
    # A damaged summary is named when the run would be kept, and replaced with --overwrite.
    (run_dir / run_folder.SUMMARY).write_text('{"status": "fini')
    damaged = cli_here("train", str(path), expect=2)
    assert f"{run_dir / run_folder.SUMMARY}: unreadable" in damaged
    cli_here("train", str(path), "train.lr=5e-3", "--overwrite")
    after = _contents(run_dir)
    assert after["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]
    assert sorted(path.parent.glob(".run*")) == []


def test_a_folder_that_is_not_a_run_is_never_written(cli_here, tiny_recipe, tmp_path: Path) -> None:
    path = tiny_recipe(max_steps=2)
    own = tmp_path / "my-project"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    (own / "metrics.jsonl").write_text("mine too")
    for flags in ([], ["--overwrite"]):
        done = cli_here("train", str(path), f"output.dir={own}", *flags, expect=2)
        assert "is not a llama-tune run folder" in done
        assert _contents(own) == {"metrics.jsonl": b"mine too", "notes.txt": b"mine"}
    (tmp_path / "a-file").write_text("mine")
    for target in ("a-file", "a-file/run"):
        done = cli_here("train", str(path), f"output.dir={tmp_path / target}", expect=2)
        assert f"output.dir {tmp_path / target}: {tmp_path / 'a-file'} is a file, not" in done
    assert (tmp_path / "a-file").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    cli_here("train", str(path), f"output.dir={empty}", "--overwrite")
    assert (empty / run_folder.SUMMARY).is_file()


def test_a_failed_start_leaves_no_run_folder(cli, tiny_recipe) -> None:
    path = tiny_recipe(max_steps=2)
    done = cli("train", str(path), "data.source=/nonexistent", expect=2)
    assert "not found" in done.stderr
    assert not (path.parent / "run").exists()


def test_bad_rows_are_reported_when_training_starts(cli, tiny_recipe, tmp_path: Path) -> None:
    folder = tmp_path / "rows"
    folder.mkdir()
    rows = [{"text": f"row {number} was fine", "label": "positive"} for number in range(20)]
    rows += [{"text": "", "label": "negative"}] * 3 + [{"label": "negative"}] * 2
    lines = [json.dumps(row) for row in rows] + ["{not json"]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    path = tiny_recipe(max_steps=1, batch_size=4)
    done = cli("train", str(path), f"data.source={folder}", "data.max_train_rows=32")
    run_dir = path.parent / "run"
    expected = (
        f"train: {folder / 'train.jsonl'}: 20 rows used, 0 truncated (data.max_train_rows asked "
        "for 32: the file has no more usable rows); skipped 6 rows "
        f"(empty_field:text 3, invalid_json 1, missing_field:text 2; "
        f"recorded in {run_dir / run_folder.SUMMARY})"
    )
    assert expected in done.stdout


def test_an_interrupted_overwrite_is_named_not_repeated(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / run_folder.TEACHER_CACHE).mkdir(parents=True)
    (run_dir / run_folder.SUMMARY).write_text("{}")
    aside = run_folder.set_aside(run_dir)
    assert aside == tmp_path / ".run.replaced"
    # The teacher cache moved into the new run; the rest waits aside.
    assert _contents(run_dir) == {}
    assert (run_dir / run_folder.TEACHER_CACHE).is_dir()
    assert _contents(aside) == {run_folder.SUMMARY: b"{}"}
    # A second overwrite while the first one's copy is still aside (a hard kill) refuses.
    with pytest.raises(UserError, match=r"\.run\.replaced holds the run an interrupted"):
        run_folder.set_aside(run_dir)
    run_folder.put_back(run_dir, aside)
    assert _contents(run_dir) == {run_folder.SUMMARY: b"{}"}
    assert (run_dir / run_folder.TEACHER_CACHE).is_dir()
    assert not aside.exists()
