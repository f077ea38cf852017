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


def best_step(t: np.ndarray, x: np.ndarray, min_segment: int = 4) -> ChangePoint | None:
    """The split of the series ``x`` (at times ``t``) that maximises the robust shift of its median: the
    onset of the largest step up, where it is one; a ramp (a queue building up) puts the split halfway up
    and :func:`refine_onset` walks it back to where the series left its baseline."""
    n = len(x)
    if n < 2 * min_segment:
        return None
    best: ChangePoint | None = None
    best_k = 0
    for k in range(min_segment, n - min_segment + 1):
        before, after = x[:k], x[k:]
        mb, ma = float(np.median(before)), float(np.median(after))
        # pooled robust spread, and the sqrt(k(n-k)/n) of a two-sample statistic so that a split a few
        # buckets from either end needs a larger step to win
        mad = float(np.median(np.concatenate([np.abs(before - mb), np.abs(after - ma)])))
        scale = max(1.4826 * mad, 0.02 * abs(mb), 1e-6)
        score = (ma - mb) / scale * math.sqrt(k * (n - k) / n) / 2.0
        if best is None or score > best.score:
            best, best_k = ChangePoint(int(t[k]), score, mb, ma), k
    if best is None:
        return None
    j = refine_onset(x, best_k, min_segment)
    return ChangePoint(int(t[j]), best.score, best.before, best.after) if j != best_k else best


_ONSET_PERSISTENCE = 0.35


def refine_onset(x: np.ndarray, k: int, min_segment: int = 4) -> int:
    """The earliest bucket j <= k from which the series stays above its baseline in at least 35 % of the
    buckets of every stretch [j, m]: an isolated spike does not qualify, the intermittent start of a
    queue that builds up does. The baseline is the first half of the part before the split."""
    head = x[: max(min_segment, k // 2)]
    mb = float(np.median(head))
    scale = max(1.4826 * float(np.median(np.abs(head - mb))), 0.02 * abs(mb), 1e-6)
    exceed = x > mb + 3.0 * scale
    n = len(x)
    for j in range(min_segment, k + 1):
        if not exceed[j]:
            continue
        frac = np.cumsum(exceed[j:]) / np.arange(1, n - j + 1)
        if float(frac.min()) >= _ONSET_PERSISTENCE:
            return j
    return k


def detect_onset(requests: pl.DataFrame, value: str, bucket_ns: int = 30 * 10**9,
                 min_segment: int = 4, q: float = 0.9) -> ChangePoint | None:
    """The most significant step up of the bucketed ``q`` quantile of ``value``; None when there are too few
    buckets. The fleet uses p90 (where a tail grows); one replica's few requests per bucket use the median."""
    t, x = bucket_series(requests, value, bucket_ns, q)
    return best_step(t, x, min_segment)


def rate_step(start_ns: np.ndarray, t0_ns: int, t1_ns: int, bucket_ns: int = 30 * 10**9,
              min_segment: int = 4) -> ChangePoint | None:
    """The largest step up of the arrival rate (requests per second per bucket) between t0 and t1."""
    edges = np.arange(t0_ns, t1_ns + 1, bucket_ns, dtype=np.int64)
    if len(edges) < 2 * min_segment + 1:
        return None
    counts, _ = np.histogram(start_ns, bins=edges)
    cp = best_step(edges[:-1], counts.astype(float) / (bucket_ns / 1e9), min_segment)
    return cp
