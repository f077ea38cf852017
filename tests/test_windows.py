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


def test_min_score_skips_only_series_that_cannot_reach_it() -> None:
    rng = np.random.default_rng(5)
    skipped = 0
    for i in range(300):
        n = int(rng.integers(8, 160))
        x = rng.normal(loc=1.0, scale=rng.choice([0.002, 0.01, 0.05, 0.3]), size=n)
        if i % 4 == 0:
            x[int(rng.integers(4, n - 3)):] *= rng.uniform(1.0, 1.3)
        if i % 9 == 0:
            x = -x  # negative medians
        t = np.arange(n, dtype=np.int64) * 30
        full = best_step(t, x)
        bounded = best_step(t, x, min_score=4.0)
        assert full is not None
        if bounded is None:
            skipped += 1
            assert full.score < 4.0, (i, full)
        else:
            assert repr(bounded) == repr(full)
    assert skipped > 50  # the bound does skip the flat series
