"""The change-point search: the vectorised split scoring gives exactly what scoring each split does."""

from __future__ import annotations

import numpy as np
import pytest

from correlator.analysis.windows import _best_step_loop, _prefix_medians, best_step, rate_step


@pytest.mark.parametrize("n", [1, 2, 3, 10, 151])
def test_prefix_medians_are_numpys(n: int) -> None:
    x = np.random.default_rng(n).normal(size=n)
    assert np.array_equal(_prefix_medians(x), np.array([np.median(x[:k]) for k in range(1, n + 1)]))


def test_best_step_agrees_with_the_split_by_split_reference() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        before, after = rng.integers(8, 120), rng.integers(8, 80)
        x = np.concatenate([rng.normal(size=before), rng.normal(loc=rng.uniform(-1, 4), size=after)])
        x[rng.integers(0, len(x))] += 10  # a spike
        t = np.arange(len(x), dtype=np.int64) * 30
        assert best_step(t, x) == _best_step_loop(t, x)


def test_rate_step_finds_the_arrival_step() -> None:
    s = 10**9
    edges = np.arange(0, 3600 * s + 1, 30 * s, dtype=np.int64)
    counts = np.random.default_rng(1).poisson(np.where(edges[:-1] >= 2400 * s, 90.0, 30.0)).astype(float)
    cp = rate_step(edges, counts)
    assert cp is not None and abs(cp.onset_ns - 2400 * s) <= 60 * s and cp.after > 2.5 * cp.before
    assert rate_step(edges[:5], counts[:4]) is None  # too few buckets
