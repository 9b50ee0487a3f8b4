"""Bootstrap intervals: they contain the estimate, narrow with more rows, repeat exactly."""

from __future__ import annotations

import numpy

from llama_tune.uncertainty import bootstrap, mean_of, paired_difference


def test_bootstrap_contains_the_estimate_and_narrows_with_n() -> None:
    generator = numpy.random.default_rng(3)
    small = generator.random(50) < 0.7
    large = generator.random(2000) < 0.7
    narrow = bootstrap(mean_of(large), len(large), resamples=500)
    wide = bootstrap(mean_of(small), len(small), resamples=500)
    assert wide.low <= wide.value <= wide.high
    assert narrow.low <= narrow.value <= narrow.high
    assert narrow.high - narrow.low < (wide.high - wide.low) / 3
    assert bootstrap(mean_of(large), len(large), resamples=500) == narrow
    same = paired_difference(mean_of(large), mean_of(large), len(large), resamples=200)
    assert (same.low, same.value, same.high) == (0.0, 0.0, 0.0)
