"""Paired comparison of two systems' drops from their per-row scores."""

from __future__ import annotations

import json
from pathlib import Path

from llama_tune.adversarial import paired_drops


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _scores(clean: list[float], perturbed: list[float], rows: list[int]) -> paired_drops.RowScores:
    return paired_drops.RowScores(
        clean=dict(zip(rows, clean, strict=True)),
        perturbed={("char", 0.1): dict(zip(rows, perturbed, strict=True))},
    )


def test_a_system_that_loses_less_on_the_same_rows_is_clearly_better() -> None:
    rows = list(range(40))
    # Both score every row clean; the reference loses 20 rows under noise, the system 5.
    reference = _scores([1.0] * 40, [0.0] * 20 + [1.0] * 20, rows)
    system = _scores([1.0] * 40, [0.0] * 5 + [1.0] * 35, rows)
    interval, compared = paired_drops.drop_difference(system, reference, "char", 0.1, 500, 0)
    assert compared == 40
    assert interval.value == -15 / 40
    assert interval.high < 0
    interval, _ = paired_drops.drop_difference(reference, system, "char", 0.1, 500, 0)
    assert interval.value == 15 / 40
    assert interval.low > 0


def test_only_rows_both_scored_are_compared() -> None:
    reference = _scores([1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1, 2, 3])
    system = _scores([1.0, 0.0], [1.0, 0.0], [2, 9])
    interval, compared = paired_drops.drop_difference(system, reference, "char", 0.1, 100, 0)
    assert compared == 1
    assert interval.value == -1.0
    assert paired_drops.drop_difference(system, reference, "word", 0.1, 100, 0) is None
    assert (
        paired_drops.drop_difference(_scores([1.0], [0.0], [7]), reference, "char", 0.1, 100, 0)
        is None
    )


def test_row_scores_are_read_from_an_evaluation_folder(tmp_path: Path) -> None:
    _write(
        tmp_path / paired_drops.predictions_file("tuned", first=True), [{"row": 4, "score": 1.0}]
    )
    _write(
        tmp_path / paired_drops.robustness_file("tuned"),
        [
            {"method": "char", "strength": 0.1, "row": 4, "score": 0.0},
            {"method": "gradient", "strength": 0.1, "row": 4, "score": 1.0},
        ],
    )
    scores = paired_drops.load_row_scores(tmp_path, "tuned", first=True)
    assert scores == paired_drops.RowScores(
        clean={4: 1.0}, perturbed={("char", 0.1): {4: 0.0}, ("gradient", 0.1): {4: 1.0}}
    )
    # The base system of the same evaluation wrote no files here.
    assert paired_drops.load_row_scores(tmp_path, "base", first=False) is None


def test_the_per_row_score_is_named_for_the_task() -> None:
    assert paired_drops.row_score_name({"accuracy": {}, "macro_f1": {}}) == "accuracy"
    assert paired_drops.row_score_name({"rouge1": {}, "rougeL": {}}) == "ROUGE-L"
    assert paired_drops.row_score_name({"bleu": {}, "chrf": {}}) == "sentence chrF"
