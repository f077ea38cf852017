"""Long windows' request statistics from the per-minute and per-hour summaries (``request_rollups``): the same
answer as from the raw requests whatever the roll-up has done, within 0.5 % of the exact percentiles."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from correlator.analysis.request_stats import RequestScope, WindowStat
from correlator.ingest.batch import IngestBatch
from correlator.store import request_rollups
from correlator.store.duckdb_store import Store

T0 = 1_795_000_000 * 10**9 + 17 * 60 * 10**9  # not on an hour: windows have ragged edges
S = 10**9
HOURS = 5.5
REPLICAS = (("node-1", 11, "GPU-11"), ("node-1", 12, "GPU-12"), ("node-2", 21, "GPU-21"))


def _batch(rng: random.Random, t_from: int, t_to: int, rows: list[dict[str, Any]], step_s: float = 1.5
           ) -> IngestBatch:
    b = IngestBatch()
    t = t_from
    while True:
        t += int(rng.uniform(0.5, 1.5) * step_s * S)
        if t >= t_to:
            break
        node, pid, _ = rng.choice(REPLICAS)
        queue, prefill = (0.0 if rng.random() < 0.2 else rng.expovariate(20.0)), rng.uniform(0.05, 0.2)
        out = rng.randrange(1, 300)
        decode = out * rng.uniform(0.01, 0.02)
        ttft = None if rng.random() < 0.03 else queue + prefill
        tpot = decode / (out - 1) if out > 1 else None
        container = "c-11" if pid == 11 and rng.random() < 0.5 else None  # two join keys, one replica
        prompt = rng.choice([0, 1, 50, 400])
        k = len(rows) + 1
        e2e = queue + prefill + decode
        b.requests.append(t, t + int(e2e * S), node, "vllm", "m", "vllm", f"{k:032x}", f"{k:016x}", f"req-{k}",
                          ttft, tpot, e2e, queue, prefill, decode, prefill + decode, prompt, out, "stop", pid,
                          container, None, None, None, None)
        rows.append({"start": t, "end": t + int(e2e * S), "unit": f"{node}/pid{pid}", "ttft": ttft, "tpot": tpot,
                     "queue": queue, "pf": prefill / max(prompt, 1), "out": out})
    return b


def _placements(t_from: int, t_to: int) -> IngestBatch:
    b = IngestBatch()
    for node, pid, gpu in REPLICAS:
        for t in range(t_from, t_to, 60 * S):
            b.placements.append(t, node, gpu, pid, None, None, None, None, None, 1e9)
    return b


def _store(path: Path, rolled: bool, seed: int = 3) -> tuple[Store, list[dict[str, Any]]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    s = Store(path)
    s.roll_up_enabled = rolled
    end = T0 + int(HOURS * 3600 * S)
    s.write(_placements(T0, end))
    s.write(_batch(rng, T0, end, rows))
    if rolled:
        s.catch_up_rollups()
    return s, rows


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Store, list[dict[str, Any]]]:
    d = Path(tmp_path_factory.mktemp("rr"))
    rolled, rows = _store(d / "rolled.duckdb", True)
    raw, rows2 = _store(d / "raw.duckdb", False)
    assert rows == rows2
    return rolled, raw, rows


def _stats(s: Store, lo: int, hi: int, known: int | None = None
           ) -> tuple[dict[str, WindowStat], dict[str, dict[str, WindowStat]]]:
    with s.reader() as cur:
        scope = RequestScope(cur, lo, hi, known_by_ns=known)
        return scope.window_stats({"long": (lo, hi, False)}, 0.95)


def _same(a: WindowStat, b: WindowStat) -> None:
    assert (a.n, a.n_ttft, a.n_tpot, a.output_tokens) == (b.n, b.n_ttft, b.n_tpot, b.output_tokens)
    assert a.ttft_q == b.ttft_q and a.tpot_q == b.tpot_q
    assert (a.queue_p90_s, a.prefill_per_token_p50_s) == (b.queue_p90_s, b.prefill_per_token_p50_s)
    for x, y in ((a.ttft_mean_s, b.ttft_mean_s), (a.tpot_mean_s, b.tpot_mean_s)):
        assert (x is None) == (y is None)
        assert x is None or y is None or math.isclose(x, y, rel_tol=1e-9)


def test_summaries_were_written(stores: tuple[Store, Store, list[dict[str, Any]]]) -> None:
    rolled, raw, rows = stores
    with rolled.reader() as cur:
        until = request_rollups.watermark(cur)
        n = cur.execute("SELECT sum(n) FROM request_minutes").fetchall()[0][0]
    assert until is not None and until > T0 + 3 * 3600 * S
    assert n == sum(1 for r in rows if int(r["start"]) < until)
    with raw.reader() as cur:
        assert request_rollups.watermark(cur) is None


def test_long_window_equals_raw_and_exact_within_half_a_percent(
        stores: tuple[Store, Store, list[dict[str, Any]]]) -> None:
    rolled, raw, rows = stores
    lo, hi = T0 + 7 * 60 * S + 123, T0 + int(5.2 * 3600 * S)
    fleet_r, units_r = _stats(rolled, lo, hi)
    fleet_x, units_x = _stats(raw, lo, hi)
    assert sorted(units_r) == sorted(units_x) == ["node-1/pid11", "node-1/pid12", "node-2/pid21"]
    _same(fleet_r["long"], fleet_x["long"])
    for u in units_r:
        _same(units_r[u]["long"], units_x[u]["long"])
    # against numpy's exact quantiles (``quantile_cont`` is numpy's linear method)
    inside = [r for r in rows if lo <= int(r["start"]) < hi]
    for unit in units_r:
        mine = [r for r in inside if r["unit"] == unit]
        st = units_r[unit]["long"]
        assert st.n == len(mine)
        ttft = np.array([float(r["ttft"]) for r in mine if r["ttft"] is not None])
        assert st.n_ttft == len(ttft)
        assert st.ttft_mean_s == pytest.approx(float(ttft.mean()), rel=1e-9)
        for q in (0.5, 0.95, 0.99):
            assert st.ttft_q[q] == pytest.approx(float(np.quantile(ttft, q)), rel=0.005)
        queue = np.array([float(r["queue"]) for r in mine])
        assert st.queue_p90_s == pytest.approx(float(np.quantile(queue, 0.9)), rel=0.005)
        pf = np.array([float(r["pf"]) for r in mine])
        assert st.prefill_per_token_p50_s == pytest.approx(float(np.median(pf)), rel=0.005)
    all_tpot = np.array([float(r["tpot"]) for r in inside if r["tpot"] is not None])
    assert fleet_r["long"].tpot_q[0.95] == pytest.approx(float(np.quantile(all_tpot, 0.95)), rel=0.005)


def test_short_windows_stay_exact(stores: tuple[Store, Store, list[dict[str, Any]]]) -> None:
    rolled, _, rows = stores
    lo, hi = T0 + 3600 * S, T0 + 2 * 3600 * S  # one hour: exact quantile_cont, summaries or not
    fleet, _ = _stats(rolled, lo, hi)
    ttft = np.array([float(r["ttft"]) for r in rows
                     if lo <= int(r["start"]) < hi and r["ttft"] is not None])
    assert fleet["long"].ttft_q[0.95] == pytest.approx(float(np.quantile(ttft, 0.95)), rel=1e-12)


def test_as_of_a_time_uses_only_what_had_ended(stores: tuple[Store, Store, list[dict[str, Any]]]) -> None:
    rolled, raw, rows = stores
    lo, hi = T0, T0 + int(5.4 * 3600 * S)
    with rolled.reader() as cur:
        known = int(cur.execute("SELECT max(max_end_ns) FROM request_minutes WHERE minute_ns < $t",
                                {"t": T0 + 2 * 3600 * S}).fetchall()[0][0]) - 1
    fleet_r, units_r = _stats(rolled, lo, hi, known)
    fleet_x, units_x = _stats(raw, lo, hi, known)
    _same(fleet_r["long"], fleet_x["long"])
    assert fleet_r["long"].n == sum(1 for r in rows if lo <= int(r["start"]) < hi
                                    and int(r["end"]) <= known)
    for u in units_r:
        _same(units_r[u]["long"], units_x[u]["long"])


def test_late_requests_and_retention_keep_summaries_true(tmp_path: Path) -> None:
    rolled, rows = _store(tmp_path / "a.duckdb", True, seed=9)
    raw, _ = _store(tmp_path / "b.duckdb", False, seed=9)
    try:
        # a buffered export after an outage: requests of the second hour, long summarised, arrive now
        late_rows: list[dict[str, Any]] = []
        for s in (rolled, raw):
            late_rows.clear()
            s.write(_batch(random.Random(1), T0 + 3600 * S, T0 + 3600 * S + 600 * S, late_rows, step_s=0.5))
        assert rolled.stats.late_request_rollups == 1
        lo, hi = T0, T0 + int(5.3 * 3600 * S)
        _same(_stats(rolled, lo, hi)[0]["long"], _stats(raw, lo, hi)[0]["long"])
        # retention cuts an hour in two: what is left of it is summarised again
        cut = T0 + int(1.5 * 3600 * S)
        rolled.prune(cut)
        raw.prune(cut)
        lo = cut
        a, b = _stats(rolled, lo, hi)[0]["long"], _stats(raw, lo, hi)[0]["long"]
        _same(a, b)
        assert a.n == sum(1 for r in rows if lo <= int(r["start"]) < hi) + sum(
            1 for r in late_rows if lo <= int(r["start"]) < hi)
    finally:
        rolled.close()
        raw.close()


def test_quantiles_from_bins_match_numpy_within_half_a_percent() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        x = rng.lognormal(-2.0, 1.5, size=rng.integers(1, 400))
        x[rng.random(len(x)) < 0.1] = 0.0
        bins = np.where(x == 0, request_rollups.ZERO_BIN, np.round(np.log(np.where(x > 0, x, 1.0)) * 100))
        ub, counts = np.unique(bins.astype(np.int64), return_counts=True)
        _, q = request_rollups.quantiles_from_bins(np.zeros(len(ub), dtype=np.int64), ub, counts,
                                                   [0.0, 0.5, 0.9, 0.99, 1.0])
        for j, p in enumerate((0.0, 0.5, 0.9, 0.99, 1.0)):
            exact = float(np.quantile(x, p))
            # between two neighbours each within 0.5 % of its value: the interpolation is too
            assert q[0, j] == pytest.approx(exact, rel=0.0051, abs=1e-12)


def test_arrivals_over_a_long_range_count_every_request_once(
        stores: tuple[Store, Store, list[dict[str, Any]]]) -> None:
    rolled, raw, rows = stores
    t0, t1, bucket = T0 + 7 * 60 * S + 5 * S, T0 + int(5.2 * 3600 * S), 5 * 60 * S
    out = []
    for s in (rolled, raw):
        with s.reader() as cur:
            out.append(RequestScope(cur, t0, t1).arrival_counts(t0, t1, bucket))
    (edges, counts), (edges_raw, counts_raw) = out
    assert edges[0] == t0 // (60 * S) * 60 * S < t0  # the minute t0 falls in
    assert np.array_equal(edges, edges_raw) and sorted(counts) == sorted(counts_raw)
    for unit, c in counts.items():
        assert np.array_equal(c, counts_raw[unit])
        starts = [int(r["start"]) for r in rows if r["unit"] == unit]
        expected, _ = np.histogram([t for t in starts if t0 <= t <= edges[-1]], bins=edges)
        assert np.array_equal(c, expected)
