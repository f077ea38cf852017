"""Arrival rates in a window that ends at the edge of what is known: spans arrive when their requests end,
so such a window misses the requests still in flight and its arrival rate reads low (a one-minute window of
12 s requests by a fifth). ``WindowStat.edge_visible_n`` reads the baseline the same way, so that a steady
load compares as steady."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from correlator.analysis.request_stats import RequestScope
from correlator.analysis.why import Windows, WindowStats, unit_latency
from correlator.ingest.batch import IngestBatch
from correlator.store.duckdb_store import Store

T0 = 1_795_000_000 * 10**9
S = 10**9


def _steady_store(path: Path, seconds: int, duration_s: float, rate_per_s: float, seed: int = 3) -> list[int]:
    """One replica at a steady Poisson rate, every request ``duration_s`` long; returns the starts."""
    rng = random.Random(seed)
    b = IngestBatch()
    b.placements.append(T0, "node-1", "GPU-1", 7, None, None, None, None, None, 1e9)
    starts: list[int] = []
    t = T0
    while True:
        t += int(rng.expovariate(rate_per_s) * S)
        if t >= T0 + seconds * S:
            break
        k = len(starts) + 1
        starts.append(t)
        b.requests.append(t, t + int(duration_s * S), "node-1", "vllm", "m", "vllm", f"{k:032x}", f"{k:016x}",
                          f"req-{k}", 0.1, 0.01, duration_s, 0.0, 0.1, duration_s - 0.1, duration_s, 100, 200,
                          "stop", 7, None, None, None, None, None)
    store = Store(path)
    try:
        store.write(b)
    finally:
        store.close()
    return starts


def test_the_incident_arrival_rate_is_read_as_the_baseline_would_have_been(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    starts = _steady_store(path, 40 * 60, duration_s=12.0, rate_per_s=5.0)
    known = T0 + 40 * 60 * S  # now: what has ended by then is known
    i0, i1 = known - 60 * S, known
    w = Windows(known - 3600 * S if known - 3600 * S > T0 else T0, i0, i0, i1, False, censored_end=True)
    store = Store(path, read_only=True)
    try:
        with store.reader() as cur:
            scope = RequestScope(cur, w.b0, w.i1, known_by_ns=known)
            st = WindowStats.of(scope, w, 0.99)
            base = st.base["node-1/pid7"]
            # every baseline request is 12 s long: a 60 s window ending at the edge sees 48/60 of them
            n_base = sum(1 for t in starts if w.b0 <= t < w.b1)
            assert base.n == n_base and base.edge_visible_n == pytest.approx(n_base * 48 / 60)
            lat = unit_latency(scope.units, w, "ttft", st, scope)["node-1/pid7"]
            # the incident's own count misses its last 12 s (those requests have not ended): ~0.8 of the rate
            inc = sum(1 for t in starts if i0 <= t <= i1 - 12 * S)
            assert st.inc["node-1/pid7"].n == inc
            expected = (inc / 60) / (n_base * 48 / 60 / ((w.b1 - w.b0) / S))
            assert lat.arrival_ratio == pytest.approx(expected)
            assert 0.8 < lat.arrival_ratio < 1.25  # a steady load reads as steady, not 20 % down
            # a window that does not end at the edge is counted as it is (nothing is in flight there)
            w_past = Windows(w.b0, w.b1 - 600 * S, w.b1 - 600 * S, w.b1, False)
            st_past = WindowStats.of(scope, w_past, 0.99)
            assert st_past.base["node-1/pid7"].edge_visible_n is None
            raw = unit_latency(scope.units, w_past, "ttft", st_past, scope)["node-1/pid7"].arrival_ratio
            b, i = st_past.base["node-1/pid7"], st_past.inc["node-1/pid7"]
            assert raw == pytest.approx((i.n / 600) / (b.n / ((w_past.b1 - w_past.b0) / S)))
    finally:
        store.close()
