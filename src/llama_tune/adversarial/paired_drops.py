"""Whether one system loses less than another under perturbation, paired on the same rows.

Two drops with overlapping intervals can still differ clearly: both systems are scored on the
same rows, so the per-row difference of their drops, (clean - perturbed) of one minus that of
the other, is resampled as one statistic. It is read from the per-row scores an evaluation
writes next to results.json, so runs evaluated apart can be compared later. The per-row score
is correctness for classification (the mean is accuracy), ROUGE-L for summaries and sentence
chrF for translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_tune.jsonfiles import read_jsonl
from llama_tune.uncertainty import Interval, bootstrap, mean_of


def row_score_name(metrics: dict) -> str:
    """What a per-row score is, for an evaluation with these metrics."""
    if "accuracy" in metrics:
        return "accuracy"
    return "ROUGE-L" if "rougeL" in metrics else "sentence chrF"


def predictions_file(system: str, first: bool) -> str:
    """Name of a system's clean predictions: the first system scored gets the plain name."""
    return "predictions.jsonl" if first else f"predictions-{system}.jsonl"


def robustness_file(system: str) -> str:
    """Name of a system's predictions on perturbed inputs."""
    return f"robustness-{system}.jsonl"


@dataclass(frozen=True)
class RowScores:
    """One system's per-row scores: on clean inputs, and per (method, strength) perturbed."""

    clean: dict[int, float]
    perturbed: dict[tuple[str, float], dict[int, float]]


def load_row_scores(out_dir: Path, system: str, first: bool) -> RowScores | None:
    """The per-row scores an evaluation wrote for `system`; None if its files are missing."""
    clean_path = out_dir / predictions_file(system, first)
    perturbed_path = out_dir / robustness_file(system)
    if not clean_path.is_file() or not perturbed_path.is_file():
        return None
    clean = {line["row"]: line["score"] for line in read_jsonl(clean_path)}
    perturbed: dict[tuple[str, float], dict[int, float]] = {}
    for line in read_jsonl(perturbed_path):
        perturbed.setdefault((line["method"], line["strength"]), {})[line["row"]] = line["score"]
    return RowScores(clean, perturbed)


def drop_difference(
    system: RowScores,
    reference: RowScores,
    method: str,
    strength: float,
    resamples: int,
    seed: int,
) -> tuple[Interval, int] | None:
    """(Interval of system's drop - reference's drop, rows compared), on the rows both scored.

    Negative means `system` loses less than `reference`. None when they share no scored row.
    """
    key = (method, strength)
    if key not in system.perturbed or key not in reference.perturbed:
        return None
    rows = sorted(
        system.clean.keys()
        & reference.clean.keys()
        & system.perturbed[key].keys()
        & reference.perturbed[key].keys()
    )
    if not rows:
        return None
    differences = [
        (system.clean[row] - system.perturbed[key][row])
        - (reference.clean[row] - reference.perturbed[key][row])
        for row in rows
    ]
    return bootstrap(mean_of(differences), len(rows), resamples, seed), len(rows)
