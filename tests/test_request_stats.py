"""``why``'s request statistics, computed in DuckDB, against a plain numpy reference over the same requests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from correlator.analysis.request_stats import RequestScope
from correlator.ingest.batch import IngestBatch
from correlator.store.duckdb_store import Store

T0 = 1_795_000_000 * 10**9
S = 10**9
B = 30 * S


def _requests(seed: int = 5) -> tuple[IngestBatch, list[dict[str, object]]]:
    """Three replicas over 20 minutes: pid 11 on node-1 (some of its spans also carry a container id: two join
    keys, one replica), pid 12 on node-1, pid 21 on node-2 (slower after minute 12), and a few spans
    without TTFT."""
    rng = random.Random(seed)
    b = IngestBatch()
    rows: list[dict[str, object]] = []
    for node, pid, gpu in (("node-1", 11, "GPU-11"), ("node-1", 12, "GPU-12"), ("node-2", 21, "GPU-21")):
        for s in range(0, 20 * 60, 30):
            b.placements.append(T0 + s * S, node, gpu, pid, None, None, None, None, None, 1e9)
    k = 0
    t = T0
    while True:
        t += rng.randrange(50_000_000, 150_000_000)
        if t >= T0 + 20 * 60 * S:
            break
        node, pid = rng.choice([("node-1", 11), ("node-1", 12), ("node-2", 21)])
        slow = 3.0 if pid == 21 and t >= T0 + 12 * 60 * S else 1.0
        queue, prefill = rng.expovariate(20.0), rng.uniform(0.05, 0.2) * slow
        out = rng.randrange(1, 300)
        decode = out * rng.uniform(0.01, 0.02)
        ttft = None if rng.random() < 0.03 else queue + prefill
        tpot = decode / (out - 1) if out > 1 else None
        container = "c-11" if pid == 11 and rng.random() < 0.5 else None
        prompt = rng.choice([0, 1, 50, 400])
        k += 1
        b.requests.append(t, t + int((queue + prefill + decode) * S), node, "vllm", "m", "vllm", f"{k:032x}",
                          f"{k:016x}", f"req-{k}", ttft, tpot, queue + prefill + decode, queue, prefill, decode,
                          prefill + decode, prompt, out, "stop", pid, container, None, None, None, None)
        rows.append({"start": t, "unit": f"{node}/pid{pid}", "ttft": ttft, "tpot": tpot, "queue": queue,
                     "pf": prefill / max(prompt, 1), "out": out})
    return b, rows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, list[dict[str, object]]]]:
    batch, rows = _requests()
    s = Store(Path(tmp_path_factory.mktemp("rs")) / "s.duckdb")
    s.write(batch)
    yield s, rows
    s.close()


def _vals(rows: list[dict[str, object]], col: str) -> np.ndarray:
    return np.array([float(r[col]) for r in rows if r[col] is not None])  # type: ignore[arg-type]


def test_units_join_keys_of_one_replica(store: tuple[Store, list[dict[str, object]]]) -> None:
    s, _ = store
    with s.reader() as cur:
        scope = RequestScope(cur, T0, T0 + 20 * 60 * S)
    # pid 11 with and without a container id is one replica: its statistics span both join keys
    assert sorted(scope.units) == ["node-1/pid11", "node-1/pid12", "node-2/pid21"]
    assert scope._joined


def test_bucket_series_match_numpy(store: tuple[Store, list[dict[str, object]]]) -> None:
    s, rows = store
    with s.reader() as cur:
        series = RequestScope(cur, T0, T0 + 20 * 60 * S).bucket_series(["ttft", "tpot"], B, fleet_q=0.9, unit_q=0.5)
    for m in ("ttft", "tpot"):
        (ft, fx), per_unit = series[m]
        buckets = sorted({int(r["start"]) // B * B for r in rows})  # type: ignore[call-overload]
        ref_t, ref_x = [], []
        for bk in buckets:
            v = _vals([r for r in rows if int(r["start"]) // B * B == bk], m)  # type: ignore[call-overload]
            if len(v) >= 5:
                ref_t.append(bk)
                ref_x.append(float(np.quantile(v, 0.9)))
        assert ft.tolist() == ref_t
        np.testing.assert_allclose(fx, ref_x, rtol=1e-12)
        for unit, (ut, ux) in per_unit.items():
            mine = [r for r in rows if r["unit"] == unit]
            ref = [(bk, float(np.median(v))) for bk in buckets
                   if len(v := _vals([r for r in mine if int(r["start"]) // B * B == bk], m)) >= 5]  # type: ignore[call-overload]
            assert ut.tolist() == [t for t, _ in ref]
            np.testing.assert_allclose(ux, [x for _, x in ref], rtol=1e-12)


def test_window_stats_match_numpy(store: tuple[Store, list[dict[str, object]]]) -> None:
    s, rows = store
    b0, b1, i0, i1 = T0, T0 + 12 * 60 * S, T0 + 12 * 60 * S, T0 + 20 * 60 * S - 1
    with s.reader() as cur:
        fleet, per_unit = RequestScope(cur, b0, i1).window_stats({"base": (b0, b1, False), "inc": (i0, i1, True)},
                                                                0.95)
    for w, (lo, hi) in {"base": (b0, b1), "inc": (i0, i1 + 1)}.items():
        win = [r for r in rows if lo <= int(r["start"]) < hi]  # type: ignore[call-overload]
        assert fleet[w].n == len(win)
        assert fleet[w].q("ttft", 0.95) == pytest.approx(float(np.quantile(_vals(win, "ttft"), 0.95)), rel=1e-12)
        assert fleet[w].count("ttft") == len(_vals(win, "ttft"))
        for unit, st in per_unit.items():
            mine = [r for r in win if r["unit"] == unit]
            x = st[w]
            assert x.n == len(mine) and x.count("tpot") == len(_vals(mine, "tpot"))
            for m in ("ttft", "tpot"):
                for q in (0.5, 0.95, 0.99):
                    assert x.q(m, q) == pytest.approx(float(np.quantile(_vals(mine, m), q)), rel=1e-12)
                assert x.mean(m) == pytest.approx(float(np.mean(_vals(mine, m))), rel=1e-12)
            assert x.queue_p90_s == pytest.approx(float(np.quantile(_vals(mine, "queue"), 0.9)), rel=1e-12)
            assert x.prefill_per_token_p50_s == pytest.approx(float(np.median(_vals(mine, "pf"))), rel=1e-12)
            assert x.output_tokens == sum(int(r["out"]) for r in mine)  # type: ignore[call-overload]
    # the slow replica shows in its own statistics
    slow = per_unit["node-2/pid21"]
    assert (slow["inc"].q("ttft", 0.5) or 0) > 1.5 * (slow["base"].q("ttft", 0.5) or 1)


def test_arrival_counts_match_numpy_histogram(store: tuple[Store, list[dict[str, object]]]) -> None:
    s, rows = store
    t0, t1 = T0 + 7 * S, T0 + 20 * 60 * S
    with s.reader() as cur:
        edges, counts = RequestScope(cur, T0, t1).arrival_counts(t0, t1, B)
    ref_edges = np.arange(t0, t1 + 1, B, dtype=np.int64)
    assert edges.tolist() == ref_edges.tolist()
    for unit, c in counts.items():
        ref, _ = np.histogram([int(r["start"]) for r in rows if r["unit"] == unit], bins=ref_edges)  # type: ignore[call-overload]
        assert c.tolist() == ref.tolist()


def test_filters_are_bound_and_select(store: tuple[Store, list[dict[str, object]]]) -> None:
    s, rows = store
    with s.reader() as cur:
        one = RequestScope(cur, T0, T0 + 20 * 60 * S, node="node-2")
        none = RequestScope(cur, T0, T0 + 20 * 60 * S, node="x' OR '1'='1")
        fleet, _ = one.window_stats({"all": (T0, T0 + 20 * 60 * S, True)}, 0.99)
    assert list(one.units) == ["node-2/pid21"] and not one._joined
    assert fleet["all"].n == sum(1 for r in rows if r["unit"] == "node-2/pid21")
    assert none.empty and none.units == {}
