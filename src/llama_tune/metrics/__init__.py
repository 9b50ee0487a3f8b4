"""The package's own `evaluate` metric modules, loaded by local path (no Hub access needed).

`evaluate.load("rouge")` fetches its script from the Hub; these folders hold equivalent
modules built on rouge-score, sacrebleu and scikit-learn.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

METRIC_MODULES = ("classification", "rouge", "bleu_chrf")


@cache
def load(name: str) -> evaluate.EvaluationModule:
    """One of METRIC_MODULES, loaded from this package's folder."""
    if name not in METRIC_MODULES:
        raise ValueError(f"unknown metric module {name!r}; known: {', '.join(METRIC_MODULES)}")
    # Imported here, not above: evaluate (pandas, scipy) adds a second or two to the start of
    # every run, and most runs score no metric.
    import evaluate

    return evaluate.load(str(Path(__file__).parent / name))
