"""Bootstrap confidence intervals for metrics, and for the paired difference of two systems.

A metric is given as a function of example indices, so corpus-level metrics (BLEU, chrF,
macro-F1) are recomputed on each resample from per-example sufficient statistics, not averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy

Statistic = Callable[[numpy.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap(
    statistic: Statistic,
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Percentile interval of `statistic` over `resamples` resamples of n examples."""
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan)
    everything = numpy.arange(n)
    generator = numpy.random.default_rng(seed)
    values = numpy.array(
        [statistic(generator.integers(0, n, n)) for _ in range(resamples)], dtype=float
    )
    tail = (1.0 - confidence) / 2 * 100
    low, high = numpy.percentile(values, [tail, 100 - tail])
    return Interval(float(statistic(everything)), float(low), float(high))


def paired_difference(
    tuned: Statistic,
    base: Statistic,
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Interval of tuned - base, resampling the same examples for both systems."""
    return bootstrap(lambda indices: tuned(indices) - base(indices), n, resamples, seed, confidence)


def mean_of(values: list[float] | numpy.ndarray) -> Statistic:
    """The statistic `mean of per-example values`."""
    array = numpy.asarray(values, dtype=float)
    return lambda indices: float(array[indices].mean())
