"""Where the incident starts: the change point of a latency percentile series.

Requests are bucketed (30 s), a percentile of each bucket forms a series (computed in DuckDB by
:mod:`correlator.analysis.request_stats`), and the split that maximises the robust shift of the median
(after − before, over the before-part's MAD) is the onset.
Binary segmentation would find several; one is what ``why`` needs: the most recent large step up.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class ChangePoint:
    onset_ns: int
    score: float  # robust shift, in units of the before-part's spread
    before: float
    after: float


def best_step(t: np.ndarray, x: np.ndarray, min_segment: int = 4, min_score: float | None = None
              ) -> ChangePoint | None:
    """The split of the series ``x`` (at times ``t``) that maximises the robust shift of its median: the
    onset of the largest step up, where it is one; a ramp (a queue building up) puts the split halfway up
    and :func:`refine_onset` walks it back to where the series left its baseline.

    Every split is scored at once (numpy over a block of splits x the series); the medians are the same
    order statistics, averaged the same way, as ``np.median`` of each part, so the split, its score and
    the medians are those of scoring the splits one by one (:func:`_best_step_loop`).

    ``min_score``: None as well when no split can score that much, which the medians alone can prove (the
    spread is never below 2 % of the median before the split), before the costly spreads are computed."""
    n = len(x)
    if n < 2 * min_segment:
        return None
    xf = np.asarray(x, dtype=np.float64)
    if not np.isfinite(xf).all():
        return _best_step_loop(t, x, min_segment)
    ks = np.arange(min_segment, n - min_segment + 1)
    prefix = _prefix_medians(xf)  # prefix[k - 1]: median of x[:k]
    suffix = _prefix_medians(xf[::-1])  # suffix[m - 1]: median of the last m values
    mb_all = prefix[ks - 1]
    ma_all = suffix[n - ks - 1]
    weight = np.sqrt(ks * (n - ks) / n) / 2.0
    if min_score is not None:
        bound = np.maximum(ma_all - mb_all, 0.0) / np.maximum(0.02 * np.abs(mb_all), 1e-6) * weight
        if float(bound.max()) < min_score:
            return None
    mad = np.empty(len(ks))
    cols = np.arange(n)
    block = max(1, 2_000_000 // n)
    for s0 in range(0, len(ks), block):
        kb = ks[s0:s0 + block]
        centre = np.where(cols[None, :] < kb[:, None], mb_all[s0:s0 + block, None], ma_all[s0:s0 + block, None])
        mad[s0:s0 + block] = np.median(np.abs(xf[None, :] - centre), axis=1)
    # pooled robust spread, and the sqrt(k(n-k)/n) of a two-sample statistic so that a split a few
    # buckets from either end needs a larger step to win
    scale = np.maximum(np.maximum(1.4826 * mad, 0.02 * np.abs(mb_all)), 1e-6)
    scores = (ma_all - mb_all) / scale * weight
    i = int(np.argmax(scores))
    return _refined(t, x, int(ks[i]), float(scores[i]), float(mb_all[i]), float(ma_all[i]), min_segment)


def _refined(t: np.ndarray, x: np.ndarray, k: int, score: float, before: float, after: float, min_segment: int
             ) -> ChangePoint:
    """The best split ``k``, its onset walked back by :func:`refine_onset`."""
    return ChangePoint(int(t[refine_onset(x, k, min_segment)]), score, before, after)


def _prefix_medians(x: np.ndarray) -> np.ndarray:
    """``out[k - 1]`` = ``np.median(x[:k])`` for every k (kept sorted by insertion: for the series' lengths
    here, ~150 buckets, cheaper than sorting every prefix in numpy)."""
    out = np.empty(len(x))
    ordered: list[float] = []
    for k, v in enumerate(x.tolist(), 1):
        bisect.insort(ordered, v)
        h = k // 2
        out[k - 1] = ordered[h] if k % 2 else (ordered[h - 1] + ordered[h]) / 2  # as np.mean of the two
    return out


def _best_step_loop(t: np.ndarray, x: np.ndarray, min_segment: int = 4) -> ChangePoint | None:
    """:func:`best_step` one split at a time (the reference it must agree with)."""
    n = len(x)
    if n < 2 * min_segment:
        return None
    best: ChangePoint | None = None
    best_k = 0
    for k in range(min_segment, n - min_segment + 1):
        before, after = x[:k], x[k:]
        mb, ma = float(np.median(before)), float(np.median(after))
        mad = float(np.median(np.concatenate([np.abs(before - mb), np.abs(after - ma)])))
        scale = max(1.4826 * mad, 0.02 * abs(mb), 1e-6)
        score = (ma - mb) / scale * math.sqrt(k * (n - k) / n) / 2.0
        if best is None or score > best.score:
            best, best_k = ChangePoint(int(t[k]), score, mb, ma), k
    if best is None:
        return None
    return _refined(t, x, best_k, best.score, best.before, best.after, min_segment)


_ONSET_PERSISTENCE = 0.35


def refine_onset(x: np.ndarray, k: int, min_segment: int = 4) -> int:
    """The earliest bucket j <= k from which the series stays above its baseline in at least 35 % of the
    buckets of every stretch [j, m]: an isolated spike does not qualify, the intermittent start of a
    queue that builds up does. The baseline is the part before the split (its median and MAD: the
    start of a ramp in it moves neither much)."""
    before = x[:k]
    mb = float(np.median(before))
    scale = max(1.4826 * float(np.median(np.abs(before - mb))), 0.02 * abs(mb), 1e-6)
    exceed = x > mb + 3.0 * scale
    n = len(x)
    for j in range(min_segment, k + 1):
        if not exceed[j]:
            continue
        frac = np.cumsum(exceed[j:]) / np.arange(1, n - j + 1)
        if float(frac.min()) >= _ONSET_PERSISTENCE:
            return j
    return k


def rate_step(edges: np.ndarray, counts: np.ndarray, min_segment: int = 4) -> ChangePoint | None:
    """The largest step up of an arrival rate, from request ``counts`` per bucket between ``edges``."""
    if len(edges) < 2 * min_segment + 1:
        return None
    bucket_s = float(edges[1] - edges[0]) / 1e9
    return best_step(edges[:-1], counts.astype(float) / bucket_s, min_segment)
