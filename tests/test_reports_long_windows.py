"""``top`` and ``slo`` over windows longer than 3 h read the request summaries (``request_minutes``,
``request_bins``) and the GPUs' per-minute energy counter summaries (``gpu_minutes``): counts, tokens and
energy exact, percentiles within 0.5 %, the excess latency and attainment from the bins within stated
bounds; the same answer whether the summaries are rolled up or not; windows of 3 h or less stay exact."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from correlator.analysis.reports import Slo, slo, top
from correlator.analysis.request_stats import at_most_from_bins, excess_from_bins
from correlator.ingest.batch import IngestBatch
from correlator.store import request_rollups, rollups
from correlator.store.duckdb_store import Store

S = 10**9
T0 = 1_795_000_000 * S + 17 * 60 * S  # not on an hour: windows have ragged edges
HOURS = 4.6
# (node, pid, GPU, models it serves, latency scale, first request after T0 in s)
REPLICAS = (("node-1", 11, "GPU-11", ("m-a",), 1.0, 0.0), ("node-1", 12, "GPU-12", ("m-a", "m-c"), 1.7, 20.0),
            ("node-2", 21, "GPU-21", ("m-b",), 2.6, 2400.0))
COUNTER_GPUS = ("GPU-11", "GPU-12")  # GPU-21 has no energy counter: its power is integrated
LONG = (T0 + 5 * 60 * S + 123, T0 + int(4.5 * 3600 * S))  # [start, end]: 4.4 h
SHORT = (T0 + 3600 * S + 7, T0 + int(3.5 * 3600 * S))  # 2.5 h
SLOS = [Slo("ttft", 0.99, 0.25), Slo("tpot", 0.9, 0.03)]


def _data(seed: int) -> tuple[IngestBatch, list[dict[str, Any]], dict[str, list[tuple[int, str, float]]]]:
    rng = random.Random(seed)
    b = IngestBatch()
    rows: list[dict[str, Any]] = []
    end = T0 + int(HOURS * 3600 * S)
    t = T0
    while True:
        t += int(rng.uniform(0.3, 1.7) * S)
        if t >= end:
            break
        live = [r for r in REPLICAS if t >= T0 + int(r[5] * S)]
        node, pid, _, models, scale, _ = rng.choice(live)
        model = rng.choice(models)
        queue = 0.0 if rng.random() < 0.2 else rng.expovariate(20.0) * scale
        prefill = rng.lognormvariate(-2.5, 0.5) * scale
        out = rng.randrange(1, 300)
        decode = out * rng.uniform(0.01, 0.02) * scale
        ttft = None if rng.random() < 0.03 else queue + prefill
        tpot = decode / (out - 1) if out > 1 else None
        e2e = queue + prefill + decode
        k = len(rows) + 1
        b.requests.append(t, t + int(e2e * S), node, "vllm", model, "vllm", f"{k:032x}", f"{k:016x}", f"req-{k}",
                          ttft, tpot, e2e, queue, prefill, decode, prefill + decode, rng.choice([1, 50, 400]), out,
                          "stop", pid, None, None, None, None, None)
        rows.append({"start": t, "unit": f"{node}/pid{pid}", "node": node, "model": model, "ttft": ttft,
                     "tpot": tpot, "e2e": e2e, "out": out})
    samples: dict[str, list[tuple[int, str, float]]] = {}
    for node, pid, gpu, *_ in REPLICAS:
        for t in range(T0, end, 60 * S):
            b.placements.append(t, node, gpu, pid, None, None, None, None, None, 1e9)
        joules = 1e6
        for t in range(T0 + 3 * S, end, 10 * S):
            watts = rng.uniform(200.0, 600.0)
            joules += watts * 10
            mine = samples.setdefault(gpu, [])
            mine.append((t, "power_w", watts))
            if gpu in COUNTER_GPUS:
                mine.append((t, "energy_j", joules))
            for _, sig, v in mine[-2:] if gpu in COUNTER_GPUS else mine[-1:]:
                b.gpu_samples.append(t, node, gpu, int(gpu[-1]), sig, None, v)
    return b, rows, samples


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Store, list[dict[str, Any]], dict[str, list[tuple[int, str, float]]]]]:
    batch, rows, samples = _data(5)
    s = Store(Path(tmp_path_factory.mktemp("rl")) / "s.duckdb")
    s.write(batch)
    s.catch_up_rollups()
    yield s, rows, samples
    s.close()


def _both(store: Store, fn: Any) -> tuple[Any, Any]:
    """``fn(cur)`` with the summaries, and as if nothing had been rolled up (in a rolled-back transaction)."""
    with store.reader() as cur:
        rolled = fn(cur)
        cur.execute("BEGIN TRANSACTION")
        cur.execute("DELETE FROM meta WHERE key IN (?, ?)", [request_rollups.WATERMARK_KEY, rollups.WATERMARK_KEY])
        assert request_rollups.watermark(cur) is None
        raw = fn(cur)
        cur.execute("ROLLBACK")
    return rolled, raw


def _inside(rows: list[dict[str, Any]], window: tuple[int, int]) -> list[dict[str, Any]]:
    return [r for r in rows if window[0] <= int(r["start"]) <= window[1]]


def _values(rows: list[dict[str, Any]], metric: str) -> np.ndarray:
    return np.array([float(r[metric]) for r in rows if r[metric] is not None])


def _binned_quantile(x: np.ndarray, q: float) -> float:
    """The quantile read off the bins as the summaries store them (the long path's exact expectation)."""
    bins = np.where(x == 0, request_rollups.ZERO_BIN, np.round(np.log(np.where(x > 0, x, 1.0)) * 100))
    ub, counts = np.unique(bins.astype(np.int64), return_counts=True)
    return float(request_rollups.quantiles_from_bins(np.zeros(len(ub), dtype=np.int64), ub, counts, [q])[1][0, 0])


def _energy(samples: dict[str, list[tuple[int, str, float]]], window: tuple[int, int]) -> dict[str, float]:
    """Each GPU's joules in [start, end] as ``energy_by_gpu`` defines them over a short window, from the
    samples: the counter's delta, or the power held from each sample to the next."""
    out = {}
    for gpu, got in samples.items():
        sig = "energy_j" if gpu in COUNTER_GPUS else "power_w"
        pts = [(t, v) for t, s, v in got if s == sig and window[0] <= t <= window[1]]
        if sig == "energy_j":
            out[gpu] = max(v for _, v in pts) - min(v for _, v in pts)
        else:
            out[gpu] = sum(w * (t1 - t0) / 1e9 for (t0, w), (t1, _) in itertools.pairwise(pts))
    return out


def _power_by_minutes(samples: list[tuple[int, str, float]], window: tuple[int, int]) -> float:
    """A counter-less GPU's joules over a long window as the summaries give them: each minute's mean of its
    quantile representatives times the part of [start, end] it covers."""
    minute = rollups.MINUTE_NS
    by: dict[int, list[float]] = {}
    for t, s, v in samples:
        if s == "power_w" and window[0] <= t <= window[1]:
            by.setdefault(t // minute * minute, []).append(v)
    return sum(float(np.mean(np.quantile(v, rollups.QUANTILES).astype(np.float32).astype(np.float64)))
               * (min(m + minute, window[1] + 1) - max(m, window[0])) / 1e9 for m, v in by.items())


def _exact_shares(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    med = float(np.median(_values(rows, metric)))
    ex = {u: float(np.maximum(_values([r for r in rows if r["unit"] == u], metric) - med, 0).sum())
          for u in sorted({r["unit"] for r in rows})}
    total = sum(ex.values())
    return {u: v / total for u, v in ex.items()}


def _rounded(x: float, exact: bool) -> Any:
    """``x`` as the reports round it (4 places): exactly, or (a float sum in another order) to within
    half a unit of the 4th place."""
    return pytest.approx(round(x, 4), abs=1e-12) if exact else pytest.approx(x, abs=5.01e-5)


GPU_OF = {f"{node}/pid{pid}": gpu for node, pid, gpu, *_ in REPLICAS}


def test_the_store_is_summarised_over_the_long_window(data: tuple[Store, Any, Any]) -> None:
    store, _, _ = data
    with store.reader() as cur:
        assert (request_rollups.watermark(cur) or 0) > LONG[0] + 3 * 3600 * S
        assert (rollups.watermark(cur) or 0) > LONG[1] - 10 * 60 * S
    assert LONG[1] - LONG[0] > request_rollups.LONG_WINDOW_NS >= SHORT[1] - SHORT[0]


def test_long_top_from_summaries_matches_the_exact_answer(data: tuple[Store, Any, Any]) -> None:
    store, rows, samples = data
    inside = _inside(rows, LONG)
    energy = _energy(samples, LONG)
    # GPU-21 has no counter: its power by the minute, within 0.5 % of holding each sample to the next
    held = energy["GPU-21"]
    energy["GPU-21"] = _power_by_minutes(samples["GPU-21"], LONG)
    assert energy["GPU-21"] == pytest.approx(held, rel=0.005)
    for metric in ("ttft", "tpot", "e2e"):
        got, unrolled = _both(store, lambda cur, m=metric: top(cur, *LONG, metric=m))
        assert got == unrolled  # the roll-up changes nothing
        shares = _exact_shares(inside, metric)
        # the ranking is the exact one (the replicas' shares are far apart)
        assert [r["gpu"] for r in got] == [GPU_OF[u] for u in sorted(shares, key=lambda u: -shares[u])]
        for r in got:
            mine = [x for x in inside if x["unit"] == r["replica"]]
            assert r["requests"] == len(mine)  # exact, from the per-minute counts
            for m in ("ttft", "tpot"):
                x = _values(mine, m)
                # read off the bins (not a raw scan), within 0.5 % of the exact percentile
                assert r[f"{m}_p99_s"] == pytest.approx(round(_binned_quantile(x, 0.99), 4), abs=1e-12)
                assert r[f"{m}_p99_s"] == pytest.approx(float(np.quantile(x, 0.99)), rel=0.005, abs=1e-4)
            # the excess from the bins: within 0.2 % of the exact share (rounded to 4 places); a fleet median
            # read at its bin's centre (0.45 % off here) put the smallest share 0.9 % off
            assert r["impact_share"] == pytest.approx(shares[r["replica"]], rel=0.002, abs=1e-4)
            tokens = sum(int(x["out"]) for x in mine)
            assert r["energy_per_token_j"] == _rounded(energy[r["gpu"]] / tokens, r["gpu"] in COUNTER_GPUS)


def test_long_slo_from_summaries_matches_the_exact_answer(data: tuple[Store, Any, Any]) -> None:
    store, rows, samples = data
    inside = _inside(rows, LONG)
    slos = [*SLOS, Slo("e2e", 0.99, 3.0)]
    got, unrolled = _both(store, lambda cur: slo(cur, *LONG, slos))
    assert got == unrolled
    # groups in the order of their first request, as the exact scan orders them
    first: dict[tuple[str, str], int] = {}
    for r in inside:
        first.setdefault((r["model"], r["node"]), int(r["start"]))
    order = sorted(first, key=lambda k: first[k])
    assert [(r["model"], r["node"]) for r in got] == [k for k in order for _ in slos]
    assert order[-1] == ("m-b", "node-2")  # a group whose first request is not in the window's first minute
    energy = {**_energy(samples, LONG), "GPU-21": _power_by_minutes(samples["GPU-21"], LONG)}
    for r, s in zip(got, [s for _ in order for s in slos], strict=True):
        mine = [x for x in inside if (x["model"], x["node"]) == (r["model"], r["node"])]
        x = _values(mine, s.metric)
        assert r["requests"] == len(x)
        for name, q in (("p50_s", 0.5), ("p90_s", 0.9), ("p99_s", 0.99), ("percentile_s", s.percentile)):
            assert r[name] == pytest.approx(round(_binned_quantile(x, q), 4), abs=1e-12)
            assert r[name] == pytest.approx(float(np.quantile(x, q)), rel=0.005, abs=1e-4)
        # attainment: off by at most the share of the values in the threshold's 1 %-wide bin
        exact = float(np.mean(x <= s.threshold_s))
        in_bin = float(np.mean(np.round(np.log(x) * 100) == np.round(np.log(s.threshold_s) * 100)))
        assert abs(r["attainment"] - exact) <= in_bin + 5e-5
        assert abs(r["attainment"] - exact) <= 0.002  # the threshold's bin split in log space: far closer
        assert r["met"] == (r["percentile_s"] <= s.threshold_s)
    # energy per token by model: each replica's energy shared among its models by their share of its requests
    by_model: dict[str, list[float]] = {}
    for unit, gpu in GPU_OF.items():
        mine = [x for x in inside if x["unit"] == unit]
        for model in {x["model"] for x in mine}:
            part = [x for x in mine if x["model"] == model]
            acc = by_model.setdefault(model, [0.0, 0.0])
            acc[0] += energy[gpu] * len(part) / len(mine)
            acc[1] += sum(int(x["out"]) for x in part)
    for r in got:
        j, tokens = by_model[r["model"]]
        assert r["energy_per_token_j"] == _rounded(j / tokens, r["model"] != "m-b")  # m-b: on GPU-21


def test_a_store_summarised_before_e2e_bins_scans_e2e_exactly_until_it_gets_them(
        data: tuple[Store, Any, Any], tmp_path: Path) -> None:
    """A store whose hours were summarised before e2e was binned: opened read-only, e2e over a long window is
    scanned exactly; opened for writing, every summarised hour gets its e2e bins, and the answers are those of
    a store that had them from the start."""
    store, rows, _ = data
    inside = _inside(rows, LONG)
    e2e_slo = [Slo("e2e", 0.99, 3.0)]
    with store.reader() as cur:
        want = (top(cur, *LONG, metric="e2e"), slo(cur, *LONG, e2e_slo))
    old = tmp_path / "old.duckdb"
    s = Store(old)
    s.write(_data(5)[0])
    s.catch_up_rollups()
    s.close()
    con = duckdb.connect(str(old))
    con.execute(f"DELETE FROM request_bins WHERE metric = {request_rollups.E2E}")
    con.execute("DELETE FROM meta WHERE key = ?", [request_rollups.E2E_KEY])
    con.close()
    reader = Store(old, read_only=True)
    try:
        with reader.reader() as cur:
            assert not request_rollups.has_e2e_bins(cur)
            got = top(cur, *LONG, metric="e2e")
            slo_rows = slo(cur, *LONG, e2e_slo)
    finally:
        reader.close()
    shares = _exact_shares(inside, "e2e")
    for r in got:
        assert r["impact_share"] == pytest.approx(round(shares[r["replica"]], 4), abs=1e-12)  # exact
    for r in slo_rows:
        x = _values([m for m in inside if (m["model"], m["node"]) == (r["model"], r["node"])], "e2e")
        assert r["p99_s"] == pytest.approx(round(float(np.quantile(x, 0.99)), 4), abs=1e-12)
        assert r["attainment"] == pytest.approx(round(float(np.mean(x <= 3.0)), 4), abs=1e-12)
    Store(old).close()  # opened for writing: the bins of every summarised hour are added
    reader = Store(old, read_only=True)
    try:
        with reader.reader() as cur:
            assert request_rollups.has_e2e_bins(cur)
            assert (top(cur, *LONG, metric="e2e"), slo(cur, *LONG, e2e_slo)) == want
    finally:
        reader.close()


def test_windows_of_three_hours_or_less_stay_exact(data: tuple[Store, Any, Any]) -> None:
    store, rows, samples = data
    inside = _inside(rows, SHORT)
    with store.reader() as cur:
        got = top(cur, *SHORT)
        slo_rows = slo(cur, *SHORT, SLOS)
    shares = _exact_shares(inside, "ttft")
    energy = _energy(samples, SHORT)
    for r in got:
        mine = [x for x in inside if x["unit"] == r["replica"]]
        for m in ("ttft", "tpot"):
            assert r[f"{m}_p99_s"] == pytest.approx(round(float(np.quantile(_values(mine, m), 0.99)), 4), abs=1e-12)
        assert r["impact_share"] == pytest.approx(round(shares[r["replica"]], 4), abs=1e-12)
        tokens = sum(int(x["out"]) for x in mine)
        assert r["energy_per_token_j"] == pytest.approx(round(energy[r["gpu"]] / tokens, 4), abs=1e-12)
    for r, s in zip(slo_rows, [s for _ in range(len(slo_rows) // len(SLOS)) for s in SLOS], strict=True):
        x = _values([m for m in inside if (m["model"], m["node"]) == (r["model"], r["node"])], s.metric)
        assert r["percentile_s"] == pytest.approx(round(float(np.quantile(x, s.percentile)), 4), abs=1e-12)
        assert r["attainment"] == pytest.approx(round(float(np.mean(x <= s.threshold_s)), 4), abs=1e-12)


def _bins_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bins = np.where(x == 0, request_rollups.ZERO_BIN, np.round(np.log(np.where(x > 0, x, 1.0)) * 100))
    ub, counts = np.unique(bins.astype(np.int64), return_counts=True)
    return ub, counts


def test_excess_and_attainment_from_bins_against_numpy() -> None:
    rng = np.random.default_rng(11)
    errors, bounds = 0.0, 0.0
    for _ in range(30):
        x = rng.lognormal(-2.0, rng.uniform(0.2, 1.5), size=int(rng.integers(50, 5000)))
        x[rng.random(len(x)) < 0.05] = 0.0
        ub, counts = _bins_of(x)
        med = float(np.median(x))
        exact = float(np.maximum(x - med, 0).sum())
        # every value within its 1 %-wide bin: the excess is within 0.5 % of the sum of the values above the
        # median's bin (a bound); in practice the errors cancel to far less
        bound = 0.005 * float(x[x >= med * np.exp(-0.005)].sum())
        got = float(excess_from_bins(ub, counts, med).sum())
        assert abs(got - exact) <= bound
        assert got == pytest.approx(exact, rel=0.002)
        for t in (0.0, float(np.quantile(x, 0.3)), med * 1.7, float(x.max()) * 2):
            within = float(at_most_from_bins(ub, counts, t).sum()) / len(x)
            share = float(np.mean(x <= t))
            in_bin = float(np.mean((x > 0) & (np.round(np.log(np.where(x > 0, x, 1.0)) * 100)
                                               == np.round(np.log(t) * 100 if t > 0 else -1e9))))
            assert abs(within - share) <= in_bin + 1e-12
            errors, bounds = errors + abs(within - share), bounds + in_bin
    assert errors <= 0.25 * bounds  # splitting the threshold's bin beats counting it whole or not at all
