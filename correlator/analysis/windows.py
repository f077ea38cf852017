"""Where the incident starts: the change point of a latency percentile series.

Requests are bucketed (30 s by default), the p90 of each bucket forms a series, and the split that
maximises the robust shift of the median (after − before, over the before-part's MAD) is the onset.
Binary segmentation would find several; one is what ``why`` needs: the most recent large step up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True, slots=True)
class ChangePoint:
    onset_ns: int
    score: float  # robust shift, in units of the before-part's spread
    before: float
    after: float


def bucket_series(requests: pl.DataFrame, value: str, bucket_ns: int, q: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    df = (requests.filter(pl.col(value).is_not_null())
          .with_columns((pl.col("start_ns") // bucket_ns * bucket_ns).alias("b"))
          .group_by("b").agg(pl.col(value).quantile(q).alias("v"), pl.len().alias("n"))
          .filter(pl.col("n") >= 5).sort("b"))
    return df["b"].to_numpy(), df["v"].to_numpy().astype(float)


def detect_onset(requests: pl.DataFrame, value: str, bucket_ns: int = 30 * 10**9,
                 min_segment: int = 4) -> ChangePoint | None:
    """The most significant step up of the bucketed p90 of ``value``; None when there are too few buckets."""
    t, x = bucket_series(requests, value, bucket_ns)
    n = len(x)
    if n < 2 * min_segment:
        return None
    best: ChangePoint | None = None
    for k in range(min_segment, n - min_segment + 1):
        before, after = x[:k], x[k:]
        mb, ma = float(np.median(before)), float(np.median(after))
        # pooled robust spread, and the sqrt(k(n-k)/n) of a two-sample statistic so that a split a few
        # buckets from either end needs a larger step to win
        mad = float(np.median(np.concatenate([np.abs(before - mb), np.abs(after - ma)])))
        scale = max(1.4826 * mad, 0.02 * abs(mb), 1e-6)
        score = (ma - mb) / scale * math.sqrt(k * (n - k) / n) / 2.0
        if best is None or score > best.score:
            best = ChangePoint(int(t[k]), score, mb, ma)
    return best
