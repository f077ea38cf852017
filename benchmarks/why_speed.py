"""Speed of the root-cause engine at fleet scale: ``why``, ``top`` and ``slo`` over a synthetic DuckDB store.

The store holds 64 nodes x 8 GPUs (512 GPUs) by default, served by tensor-parallel-2 replicas (256 engine
processes, one pid each), with:

- GPU samples every second of the gauges an agent sends (power, temperatures, clocks, utilisation, memory
  busy, framebuffer, PCIe and NVLink traffic, link generation and width: a superset of
  ``evidence.GPU_SIGNALS``), the clock-event bitmask, the error counters, ``energy_j`` and
  ``nvlink_link_up`` per link: 28 series per GPU, ~64M rows for 75 minutes;
- host samples per node (CPU, run queue, steal, load, the serving cgroup's CFS periods) every second;
- engine samples per engine (KV cache, running, waiting, preemptions and token counters) every second;
- placements (which pid holds which GPU) every 5 s;
- 1k requests/s (4.5M over 75 minutes) with TTFT = queue + prefill and TPOT from decode;
- one fault for the last 15 minutes: PCIe RX near the link's capacity on one GPU (node-33 GPU 3), and
  the TTFT of its replica three times its baseline (prefill is slowed by the transfers).

The first second of every table goes through the store's own write path (``Store.write(IngestBatch)``),
which registers nodes, GPUs and signals with the ids the ingest path gives them; the rest is written in
one-minute Arrow batches with the same ids (``INSERT ... SELECT`` from a registered Arrow table), which is
what ``Store._append`` does too, minus the per-batch name-to-id mapping. The file is cached under
``--data DIR`` (one file per fleet size and duration), so only the first run pays for the generation.

Then each query is run ``--repeat`` times on a fresh cursor: ``why`` finding the onset itself, ``why``
with an explicit incident window and a 1-hour baseline, ``top`` and ``slo`` over the whole store. A fast
wrong answer does not count: the verdict must name the injected GPU and ``interconnect/pcie``.
``--hours 24`` builds a 24-hour store of the same fleet and times ``slo`` and ``top`` over the whole day
and ``why`` with the whole day as its baseline, with the process' peak RSS (``ru_maxrss``; the store is
generated in a child process so that the figure is the queries' own).

    python -m benchmarks.why_speed                          # 512 GPUs, 1k req/s, 75 min (~60 GPU-M rows)
    python -m benchmarks.why_speed --gpus 64 --rate 125     # quick iteration
    python -m benchmarks.why_speed --hours 24               # the 24-hour scan
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from benchmarks.nvml_call_overhead import REPO, machine
from correlator.analysis.evidence import GPU_COUNTERS, GPU_SIGNALS
from correlator.analysis.reports import DEFAULT_SLOS, Slo, slo, top
from correlator.analysis.timeparse import format_ns
from correlator.analysis.why import RootCause, WhyQuery
from correlator.ingest.batch import IngestBatch
from correlator.store.duckdb_store import Store

FORMAT_VERSION = 2  # bump when the generated data changes, so that cached stores are rebuilt
T0_NS = 1_795_000_000 * 10**9
GPUS_PER_NODE = 8
TP = 2
INCIDENT_S = 15 * 60
CHUNK_S = 60
PLACEMENT_EVERY_S = 5
PCIE_CAPACITY = 3.938e9 * 16  # Gen5 x16, usable bytes/s per direction
MODEL, SERVICE, GPU_MODEL = "llama-2-70b", "vllm", "NVIDIA H100 80GB HBM3"
TARGETS_S = {"why_auto": 2.0, "why_window": 2.0, "why_online": 10.0}  # online: within serve's 10 s interval
TARGET_24H_S, TARGET_24H_RSS_MB = 20.0, 4096.0


@dataclass(frozen=True, slots=True)
class Fleet:
    gpus: int = 512
    rate: float = 1000.0  # requests/s over the fleet
    seconds: int = 75 * 60
    links: int = 2  # NVLink links per GPU with a nvlink_link_up series
    seed: int = 7

    @property
    def nodes(self) -> int:
        return self.gpus // GPUS_PER_NODE

    @property
    def engines(self) -> int:
        return self.gpus // TP

    @property
    def onset_ns(self) -> int:
        return T0_NS + (self.seconds - INCIDENT_S) * 10**9

    @property
    def fault_gpu(self) -> int:
        """Fleet index of the faulty GPU: GPU 3 of the middle node (the second GPU of its replica 1)."""
        return (self.nodes // 2) * GPUS_PER_NODE + 3

    @property
    def fault_engine(self) -> int:
        return self.fault_gpu // TP

    def name(self) -> str:
        return f"why_g{self.gpus}_r{self.rate:g}_s{self.seconds}_l{self.links}_seed{self.seed}_v{FORMAT_VERSION}"


def node_name(n: int) -> str:
    return f"node-{n + 1}"


def gpu_uuid(g: int) -> str:
    return f"GPU-{g // GPUS_PER_NODE:08x}-5e1f-4c0a-9d7e-{g % GPUS_PER_NODE:012x}"


def engine_pid(e: int) -> int:
    return 4000 + e % (GPUS_PER_NODE // TP)


# -- the signals: (name, sub, base, per-GPU spread, noise sd, rounding step) -----------------------------
_GPU_GAUGES: dict[str, tuple[float, float, float, float]] = {
    "power_w": (410.0, 15.0, 30.0, 0.01), "power_limit_w": (700.0, 0.0, 0.0, 1.0),
    "gpu_temp_c": (58.0, 2.0, 1.0, 1.0), "memory_temp_c": (64.0, 2.0, 1.0, 1.0),
    "sm_clock_hz": (1980e6, 0.0, 0.0, 15e6), "sm_clock_max_hz": (1980e6, 0.0, 0.0, 1.0),
    "gpu_util_ratio": (0.58, 0.02, 0.06, 0.01), "sm_active_ratio": (0.5, 0.02, 0.05, 0.001),
    "memory_busy_ratio": (0.54, 0.02, 0.05, 0.001), "dram_active_ratio": (0.5, 0.02, 0.05, 0.001),
    "fb_used_bytes": (77309411328.0, 0.0, 0.0, 1.0), "pcie_tx_bytes_per_s": (0.31e9, 0.02e9, 0.05e9, 1e3),
    "pcie_rx_bytes_per_s": (0.82e9, 0.05e9, 0.1e9, 1e3), "pcie_link_gen": (5.0, 0.0, 0.0, 1.0),
    "pcie_link_width": (16.0, 0.0, 0.0, 1.0), "pcie_link_gen_max": (5.0, 0.0, 0.0, 1.0),
    "pcie_link_width_max": (16.0, 0.0, 0.0, 1.0), "nvlink_tx_total_bytes_per_s": (10e9, 0.3e9, 1e9, 1e3),
    "nvlink_rx_total_bytes_per_s": (10e9, 0.3e9, 1e9, 1e3),
}
_HOST: dict[str, tuple[float, float, float]] = {  # base, noise sd, rounding
    "host_cpu_util_ratio": (0.365, 0.01, 0.001), "host_cpu_steal_ratio": (0.002, 0.0, 0.001),
    "host_run_queue": (7.0, 0.7, 1.0), "host_load1": (7.0, 0.3, 0.01), "host_cpu_count": (64.0, 0.0, 1.0),
}
_ENGINE = ("engine_kv_cache_usage_ratio", "engine_requests_waiting", "engine_requests_running",
           "engine_preemptions_total", "engine_prompt_tokens_total", "engine_generation_tokens_total")


def gpu_series(links: int) -> list[tuple[str, str | None]]:
    assert set(GPU_SIGNALS) <= set(_GPU_GAUGES)
    return ([(s, None) for s in _GPU_GAUGES] + [("clock_event_reasons", None), ("energy_j", None)]
            + [(c, None) for c in GPU_COUNTERS] + [("nvlink_link_up", str(k)) for k in range(links)])


@dataclass(slots=True)
class Chunk:
    """Rows of one time span, column by column, with fleet indexes (GPU, node, engine) and series
    indexes instead of the store's ids."""

    gpu: dict[str, np.ndarray]
    host: dict[str, np.ndarray]
    engine: dict[str, np.ndarray]
    placements: dict[str, np.ndarray]
    requests: dict[str, np.ndarray]


class Generator:
    def __init__(self, f: Fleet) -> None:
        self.f = f
        rng = np.random.default_rng(f.seed)
        self.series = gpu_series(f.links)
        self.host_series = [(s, None) for s in _HOST] + [("cgroup_cpu_periods", "c0ffee"),
                                                          ("cgroup_cpu_throttled_periods", "c0ffee")]
        s_n = len(self.series)
        self.base = np.zeros(s_n)
        self.spread = np.zeros(s_n)
        self.noise = np.zeros(s_n)
        self.step = np.ones(s_n)
        for j, (name, _sub) in enumerate(self.series):
            if name in _GPU_GAUGES:
                self.base[j], self.spread[j], self.noise[j], self.step[j] = _GPU_GAUGES[name]
            elif name == "nvlink_link_up":
                self.base[j] = 1.0
        self.offset = rng.normal(0.0, 1.0, (f.gpus, s_n)) * self.spread
        self.idx = {s: j for j, s in enumerate(self.series)}

    def chunk(self, s0: int, s1: int) -> Chunk:
        f = self.f
        rng = np.random.default_rng([f.seed, s0])
        n_t = s1 - s0
        secs = np.arange(s0, s1, dtype=np.int64)
        t_ns = T0_NS + secs * 10**9
        s_n = len(self.series)
        # GPU gauges: base + the GPU's own offset + noise, rounded as the source reports them
        v = self.base + self.offset + rng.standard_normal((n_t, f.gpus, s_n)) * self.noise
        v = np.round(v / self.step) * self.step
        j = self.idx
        clock = j[("sm_clock_hz", None)]
        v[:, :, clock] = np.minimum(v[:, :, clock], 1980e6)
        v[:, :, clock] -= np.where(rng.random((n_t, f.gpus)) < 0.05, 15e6, 0.0)
        v[:, :, j[("clock_event_reasons", None)]] = np.where(rng.random((n_t, f.gpus)) < 0.01, 1.0, 0.0)
        v[:, :, j[("energy_j", None)]] = (1e8 + self.offset[:, 0] * 1e5)[None, :] + 410.0 * secs[:, None]
        # the fault: PCIe RX of one GPU near the link's capacity from the onset
        fault_t = t_ns >= f.onset_ns
        if fault_t.any():
            rx = j[("pcie_rx_bytes_per_s", None)]
            v[fault_t, f.fault_gpu, rx] = np.round(
                PCIE_CAPACITY * 0.85 + rng.normal(0, 1e9, int(fault_t.sum())), -3)
        gpu: dict[str, np.ndarray] = {"time_ns": np.repeat(t_ns, f.gpus * s_n),
               "gpu": np.tile(np.repeat(np.arange(f.gpus, dtype=np.int32), s_n), n_t),
               "series": np.tile(np.arange(s_n, dtype=np.int16), n_t * f.gpus), "value": v.reshape(-1)}

        h_n = len(self.host_series)
        hv = np.zeros((n_t, f.nodes, h_n))
        for k, (name, _sub) in enumerate(self.host_series[:len(_HOST)]):
            base, sd, step = _HOST[name]
            hv[:, :, k] = np.round((base + rng.standard_normal((n_t, f.nodes)) * sd) / step) * step
        periods = 10.0 * secs[:, None] * np.ones(f.nodes)
        hv[:, :, h_n - 2] = periods
        hv[:, :, h_n - 1] = np.floor(periods * 0.01)
        host: dict[str, np.ndarray] = {"time_ns": np.repeat(t_ns, f.nodes * h_n),
                "node": np.tile(np.repeat(np.arange(f.nodes, dtype=np.int32), h_n), n_t),
                "series": np.tile(np.arange(h_n, dtype=np.int16), n_t * f.nodes), "value": hv.reshape(-1)}

        e_n, n_eng = len(_ENGINE), f.engines
        per_engine = f.rate / n_eng
        ev = np.zeros((n_t, n_eng, e_n))
        ev[:, :, 0] = np.round(np.clip(0.22 + rng.normal(0, 0.05, (n_t, n_eng)), 0, 1), 4)
        ev[:, :, 2] = np.maximum(0, np.round(per_engine * 6.5 + rng.normal(0, 3, (n_t, n_eng))))
        ev[:, :, 4] = np.floor(per_engine * 900 * secs)[:, None]
        ev[:, :, 5] = np.floor(per_engine * 130 * secs)[:, None]
        engine: dict[str, np.ndarray] = {"time_ns": np.repeat(t_ns, n_eng * e_n),
                  "engine": np.tile(np.repeat(np.arange(n_eng, dtype=np.int32), e_n), n_t),
                  "series": np.tile(np.arange(e_n, dtype=np.int16), n_t * n_eng), "value": ev.reshape(-1)}

        snaps = t_ns[secs % PLACEMENT_EVERY_S == 0]
        placements: dict[str, np.ndarray] = {"time_ns": np.repeat(snaps, f.gpus),
                      "gpu": np.tile(np.arange(f.gpus, dtype=np.int32), len(snaps))}

        n = int(rng.poisson(f.rate * n_t))
        start = np.sort(T0_NS + s0 * 10**9 + (rng.random(n) * n_t * 1e9).astype(np.int64))
        eng = rng.integers(0, n_eng, n).astype(np.int32)
        prompt = np.clip(rng.lognormal(np.log(800), 0.6, n), 16, 8192).astype(np.int32)
        out = np.clip(rng.lognormal(np.log(120), 0.7, n), 1, 2048).astype(np.int32)
        queue = np.where(rng.random(n) < 0.1, np.round(rng.exponential(0.02, n), 5), 0.0)
        prefill = np.round(prompt * 1.6e-4 * rng.lognormal(0, 0.1, n), 5)
        slow = (eng == f.fault_engine) & (start >= f.onset_ns)
        prefill = np.where(slow, prefill * 3.0, prefill)
        queue = np.where(slow, queue * 3.0, queue)
        tpot = np.round(0.046 * rng.lognormal(0, 0.05, n), 5)
        decode = tpot * np.maximum(out - 1, 0)
        ttft = queue + prefill
        e2e = ttft + decode
        requests: dict[str, np.ndarray] = {
                    "start_ns": start, "end_ns": start + (e2e * 1e9).astype(np.int64), "engine": eng,
                    "ttft_s": ttft, "tpot_s": np.where(out > 1, tpot, np.nan), "e2e_s": e2e, "queue_s": queue,
                    "prefill_s": prefill, "decode_s": decode, "inference_s": prefill + decode,
                    "prompt_tokens": prompt, "output_tokens": out}
        return Chunk(gpu, host, engine, placements, requests)


def _seed_batch(g: Generator, c: Chunk) -> IngestBatch:
    """The first second through the store's own ingest path (per-row Python: 20k rows, once)."""
    f = g.f
    b = IngestBatch()
    for gi in range(f.gpus):
        n = gi // GPUS_PER_NODE
        b.gpu_info.append(int(c.gpu["time_ns"][0]), node_name(n), gpu_uuid(gi), gi % GPUS_PER_NODE, GPU_MODEL,
                          f"00000000:{(gi % GPUS_PER_NODE) * 16 + 24:02x}:00.0", f"nvidia{gi % GPUS_PER_NODE}")
    for t, gi, s, v in zip(*(c.gpu[k].tolist() for k in ("time_ns", "gpu", "series", "value")), strict=True):
        name, sub = g.series[s]
        b.gpu_samples.append(t, node_name(gi // GPUS_PER_NODE), gpu_uuid(gi), gi % GPUS_PER_NODE, name, sub, v)
    for t, n, s, v in zip(*(c.host[k].tolist() for k in ("time_ns", "node", "series", "value")), strict=True):
        name, sub = g.host_series[s]
        b.host_samples.append(t, node_name(n), name, sub, v)
    for t, e, s, v in zip(*(c.engine[k].tolist() for k in ("time_ns", "engine", "series", "value")), strict=True):
        b.engine_samples.append(t, node_name(e // (GPUS_PER_NODE // TP)), SERVICE, MODEL, engine_pid(e), _ENGINE[s], v)
    for t, gi in zip(c.placements["time_ns"].tolist(), c.placements["gpu"].tolist(), strict=True):
        b.placements.append(t, node_name(gi // GPUS_PER_NODE), gpu_uuid(gi), engine_pid(gi // TP), None, None, None,
                            None, None, 73014444032.0)
    r = c.requests
    for i in range(len(r["start_ns"])):
        e = int(r["engine"][i])
        tpot = float(r["tpot_s"][i])
        b.requests.append(int(r["start_ns"][i]), int(r["end_ns"][i]), node_name(e // (GPUS_PER_NODE // TP)),
                          SERVICE, MODEL, "vllm", f"{i:032x}", f"{i:016x}", f"cmpl-{i}", float(r["ttft_s"][i]),
                          None if np.isnan(tpot) else tpot, float(r["e2e_s"][i]), float(r["queue_s"][i]),
                          float(r["prefill_s"][i]), float(r["decode_s"][i]), float(r["inference_s"][i]),
                          int(r["prompt_tokens"][i]), int(r["output_tokens"][i]), "stop", engine_pid(e),
                          None, None, None, None, None)
    return b


class _Ids:
    """The store's ids of the fleet's GPUs, nodes and series, as numpy lookup arrays."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, g: Generator) -> None:
        f = g.f
        sig = dict(cur.execute("SELECT name, signal_id FROM signals").fetchall())
        gid = dict(cur.execute("SELECT uuid, gpu_id FROM gpus").fetchall())
        nid = dict(cur.execute("SELECT name, node_id FROM nodes").fetchall())
        self.gpu = np.array([gid[gpu_uuid(i)] for i in range(f.gpus)], dtype=np.int32)
        self.gpu_node = np.array([nid[node_name(i // GPUS_PER_NODE)] for i in range(f.gpus)], dtype=np.int32)
        self.node = np.array([nid[node_name(i)] for i in range(f.nodes)], dtype=np.int32)
        self.engine_node = np.array([nid[node_name(e // (GPUS_PER_NODE // TP))] for e in range(f.engines)],
                                    dtype=np.int32)
        self.engine_pid = np.array([engine_pid(e) for e in range(f.engines)], dtype=np.int32)
        self.gpu_pid = self.engine_pid[np.arange(f.gpus) // TP]
        self.series = np.array([sig[n] for n, _ in g.series], dtype=np.int16)
        subs = sorted({s for _, s in g.series if s is not None})
        self.subs = pa.array(subs, pa.string())
        self.series_sub = np.array([subs.index(s) if s is not None else -1 for _, s in g.series], dtype=np.int8)
        self.host = np.array([sig[n] for n, _ in g.host_series], dtype=np.int16)
        self.host_sub = np.array([0 if s is not None else -1 for _, s in g.host_series], dtype=np.int8)
        self.host_subs = pa.array(["c0ffee"], pa.string())
        self.engine = np.array([sig[n] for n in _ENGINE], dtype=np.int16)


def _dict(codes: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), values)


def _insert(cur: duckdb.DuckDBPyConnection, table: str, data: pa.Table, select: str | None = None) -> None:
    cur.register("_bulk", data)
    try:
        cols = ", ".join(data.column_names)
        if select is None:
            cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _bulk")
        else:
            cur.execute(f"INSERT INTO {table} {select} FROM _bulk")
    finally:
        cur.unregister("_bulk")


def _write_bulk(cur: duckdb.DuckDBPyConnection, ids: _Ids, c: Chunk) -> int:
    gs = c.gpu["series"]
    _insert(cur, "gpu_samples", pa.table({
        "time_ns": c.gpu["time_ns"], "gpu_id": ids.gpu[c.gpu["gpu"]], "signal_id": ids.series[gs],
        "sub": _dict(ids.series_sub[gs], ids.subs), "value": c.gpu["value"]}))
    hs = c.host["series"]
    _insert(cur, "host_samples", pa.table({
        "time_ns": c.host["time_ns"], "node_id": ids.node[c.host["node"]], "signal_id": ids.host[hs],
        "sub": _dict(ids.host_sub[hs], ids.host_subs), "value": c.host["value"]}))
    e = c.engine["engine"]
    _insert(cur, "engine_samples", pa.table({
        "time_ns": c.engine["time_ns"], "node_id": ids.engine_node[e], "pid": ids.engine_pid[e],
        "signal_id": ids.engine[c.engine["series"]], "value": c.engine["value"]}),
        f"(time_ns, node_id, service, model, pid, signal_id, value) SELECT time_ns, node_id, '{SERVICE}', "
        f"'{MODEL}', pid, signal_id, value")
    pg = c.placements["gpu"]
    _insert(cur, "placements", pa.table({
        "time_ns": c.placements["time_ns"], "node_id": ids.gpu_node[pg], "gpu_id": ids.gpu[pg],
        "pid": ids.gpu_pid[pg]}),
        "(time_ns, node_id, gpu_id, pid, used_memory_bytes) SELECT time_ns, node_id, gpu_id, pid, 73014444032.0")
    r = c.requests
    re_ = r["engine"]
    cols = {k: v for k, v in r.items() if k != "engine"}
    cols["tpot_s"] = pa.array(r["tpot_s"], mask=np.isnan(r["tpot_s"]))
    cols["node_id"] = ids.engine_node[re_]
    cols["pid"] = ids.engine_pid[re_]
    names = list(cols)
    # trace/span/request ids stay NULL: the analysis never reads them, and random hex would only take disk
    _insert(cur, "request_rows", pa.table(cols),
            f"({', '.join(names)}, service, model, engine, finish_reason) SELECT {', '.join(names)}, "
            f"'{SERVICE}', '{MODEL}', 'vllm', 'stop'")
    return _count(c)


def build(f: Fleet, path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generates the store at ``path`` (written as ``path.partial``, renamed when complete)."""
    tmp = path.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    Path(str(tmp) + ".wal").unlink(missing_ok=True)
    t_start = time.perf_counter()
    g = Generator(f)
    store = Store(tmp)
    rows = 0
    try:
        first = g.chunk(0, 1)
        store.write(IngestBatch(), 60)  # nothing; makes sure the writer runs
        store.write(_seed_batch(g, first), 600)
        rows += _count(first)
        cur = store.cursor()
        ids = _Ids(cur, g)
        s = 1
        last_log = time.perf_counter()
        while s < f.seconds:
            s1 = min(f.seconds, (s // CHUNK_S + 1) * CHUNK_S)
            c = g.chunk(s, s1)
            cur.execute("BEGIN TRANSACTION")
            rows += _write_bulk(cur, ids, c)
            cur.execute("COMMIT")
            s = s1
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                el = last_log - t_start
                log(f"  generated {s / f.seconds:5.1%} ({rows / 1e6:.1f}M rows, {el:.0f} s, "
                    f"{rows / el / 1e6:.2f}M rows/s)")
        cur.close()
        # the per-minute GPU summaries the writer keeps as data arrives (here: all at once, timed)
        t_roll = time.perf_counter()
        minutes = store.catch_up_rollups()
        rollup_s = time.perf_counter() - t_roll
        log(f"  summarised {minutes} minutes of GPU series and {store.stats.request_hours_rolled_up} hours of "
            f"requests in {rollup_s:.1f} s")
        store.cursor().execute("CHECKPOINT")
    finally:
        store.close()
    tmp.rename(path)
    took = time.perf_counter() - t_start
    info = {"fleet": asdict(f), "rows": rows, "generate_s": round(took, 1), "rollup_s": round(rollup_s, 1),
            "rollup_minutes": minutes,
            "bytes": path.stat().st_size, "fault_gpu": gpu_uuid(f.fault_gpu),
            "fault_node": node_name(f.fault_gpu // GPUS_PER_NODE), "onset_ns": f.onset_ns}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def _count(c: Chunk) -> int:
    return sum(len(next(iter(x.values()))) for x in (c.gpu, c.host, c.engine, c.placements, c.requests))


def ensure(f: Fleet, data: Path) -> tuple[Path, dict[str, Any]]:
    """The cached store of ``f`` under ``data``, generated in a child process when missing (so that the
    generation's memory does not count in the queries' peak RSS)."""
    data.mkdir(parents=True, exist_ok=True)
    path = data / f"{f.name()}.duckdb"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.why_speed", "--generate-only", "--data", str(data),
                        "--gpus", str(f.gpus), "--rate", str(f.rate), "--seconds", str(f.seconds),
                        "--links", str(f.links), "--seed", str(f.seed)], check=True, cwd=REPO)
    else:
        # a store cached by an older stacklens: the summaries this one keeps, written before anything is timed
        subprocess.run([sys.executable, "-m", "benchmarks.why_speed", "--catch-up-only", str(path)], check=True,
                       cwd=REPO)
    return path, json.loads(path.with_suffix(".json").read_text())


def catch_up(path: Path) -> None:
    """Write the summaries a store lacks (what the writer of ``stacklens serve`` keeps as data arrives)."""
    t = time.perf_counter()
    store = Store(path)
    try:
        minutes = store.catch_up_rollups()
        hours = store.stats.request_hours_rolled_up
        if minutes or hours:
            store.cursor().execute("CHECKPOINT")
            print(f"  summaries caught up: {minutes} minutes of series, {hours} hours of requests in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
    finally:
        store.close()


# -- measuring ---------------------------------------------------------------------------------------
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], list[float], Any]:
    """Wall seconds and CPU seconds (all threads of the process: DuckDB's too) of each call."""
    times, cpu, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu, out


def check_why(doc: dict[str, Any], info: dict[str, Any]) -> tuple[bool, str]:
    fs = doc.get("findings") or []
    if not doc["regression"]["detected"] or not fs:
        return False, f"no regression found: {doc.get('verdict')}"
    f0 = fs[0]
    ok = (f0["cause"], f0["subcause"]) == ("interconnect", "pcie") and f0["culprit"]["gpu"] == info["fault_gpu"]
    return ok, f"{f0['cause']}/{f0['subcause']} on {f0['culprit']['node']} GPU {f0['culprit'].get('gpu_index')}"


QUERIES = ("why", "top", "slo", "top_e2e", "slo_e2e")  # the e2e ones: --queries


def run(f: Fleet, data: Path, repeat: int, day: bool, queries: frozenset[str] = frozenset(QUERIES)
        ) -> dict[str, Any]:
    path, info = ensure(f, data)
    print(f"store: {path} ({info['bytes'] / 2**30:.2f} GiB, {info['rows'] / 1e6:.1f}M rows, generated in "
          f"{info['generate_s']:.0f} s)", flush=True)
    if info.get("rollup_minutes"):
        print(f"per-minute GPU summaries: {info['rollup_minutes']} minutes in {info['rollup_s']:.1f} s "
              f"({1000 * info['rollup_s'] / info['rollup_minutes']:.0f} ms of the store's writer per minute of the "
              "fleet's data)", flush=True)
    results: dict[str, Any] = {"machine": {**machine(), "duckdb": duckdb.__version__, "polars": pl.__version__,
                                           "numpy": np.__version__}, "store": info, "figures": {}}
    rss0 = _rss_mb()
    store = Store(path, read_only=True)
    onset = int(info["onset_ns"])
    first, last = T0_NS, T0_NS + f.seconds * 10**9
    hour = 3600 * 10**9
    checks: list[tuple[str, bool, str]] = []
    try:
        def why(q: WhyQuery) -> Callable[[], dict[str, Any]]:
            def go() -> dict[str, Any]:
                with store.reader() as cur:
                    return RootCause(cur).why(q)
            return go

        def report(name: str, fn: Callable[[], Any]) -> Any:
            times, cpu, out = timed(fn, repeat)
            results["figures"][name] = {"first_s": round(times[0], 3), "best_s": round(min(times), 3),
                                        "cpu_s": round(min(cpu), 3), "peak_rss_mb": round(_rss_mb(), 0)}
            target = TARGETS_S.get(name) if not day else (TARGET_24H_S if name != "why_auto" else None)
            tgt = f"target <= {target:g} s" if target else ""
            print(f"  {name:<18} first {times[0]:7.3f} s  best {min(times):7.3f} s  (CPU {min(cpu):7.3f} s)  {tgt}",
                  flush=True)
            return out

        if not day and "why" in queries:
            doc = report("why_auto", why(WhyQuery()))
            ok, what = check_why(doc, info)
            onset_err = (_parse(doc["query"]["window"][0]) - onset) / 1e9
            checks.append(("why_auto", ok and abs(onset_err) <= 120, f"{what}, onset error {onset_err:+.0f} s"))

            def online() -> dict[str, Any]:
                # one evaluation of serve's online detector at the end of the data: the last minute against
                # the hour before, on one cursor (as serve runs it every 10 s)
                with store.reader() as cur:
                    return RootCause(cur, speculative=False).why(WhyQuery(since="60s", as_of_ns=last))

            doc = report("why_online", online)
            ok, what = check_why(doc, info)
            checks.append(("why_online", ok, what))
            q = WhyQuery(since=format_ns(onset), baseline_since=format_ns(onset - hour))
        else:
            q = WhyQuery(since=format_ns(onset), baseline_since=format_ns(first))
        if "why" in queries:
            doc = report("why_window" if not day else "why_24h_baseline", why(q))
            ok, what = check_why(doc, info)
            checks.append(("why_window", ok, what))

        def do_top() -> list[dict[str, Any]]:
            with store.reader() as cur:
                return top(cur, first, last)

        def do_slo() -> list[dict[str, Any]]:
            with store.reader() as cur:
                return slo(cur, first, last, DEFAULT_SLOS)

        def do_top_e2e() -> list[dict[str, Any]]:
            with store.reader() as cur:
                return top(cur, first, last, metric="e2e")

        def do_slo_e2e() -> list[dict[str, Any]]:
            with store.reader() as cur:
                return slo(cur, first, last, [Slo("e2e", 0.99, 30.0)])

        if "top_e2e" in queries:
            rows = report("top_e2e" if not day else "top_e2e_24h", do_top_e2e)
            checks.append(("top_e2e", bool(rows), f"{len(rows)} rows"))
        if "slo_e2e" in queries:
            rows = report("slo_e2e" if not day else "slo_e2e_24h", do_slo_e2e)
            checks.append(("slo_e2e", len(rows) == f.nodes, f"{len(rows)} rows"))
        if "top" in queries:
            rows = report("top" if not day else "top_24h", do_top)
            checks.append(("top", bool(rows) and rows[0]["gpu"] in _replica(f),
                           f"first: {rows[0]['node']} GPU {rows[0]['gpu_index']}" if rows else "empty"))
        if "slo" in queries:
            rows = report("slo" if not day else "slo_24h", do_slo)
            checks.append(("slo", len(rows) == 2 * f.nodes, f"{len(rows)} rows"))
    finally:
        store.close()
    results["peak_rss_mb"] = round(_rss_mb(), 0)
    results["rss_before_queries_mb"] = round(rss0, 0)
    results["checks"] = [{"name": n, "ok": ok, "what": w} for n, ok, w in checks]
    for n, ok, w in checks:
        print(f"  check {n:<12} {'ok' if ok else 'WRONG'}: {w}")
    rss_t = f"  (target <= {TARGET_24H_RSS_MB:g} MB)" if day else ""
    print(f"  peak RSS {results['peak_rss_mb']:.0f} MB{rss_t}")
    return results


def _replica(f: Fleet) -> set[str]:
    g = f.fault_gpu
    first = g - g % TP
    return {gpu_uuid(x) for x in range(first, first + TP)}


def _parse(text: str) -> int:
    from correlator.analysis.timeparse import parse_time_ns

    return parse_time_ns(text, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="where generated stores are cached (default: a temp dir)")
    ap.add_argument("--gpus", type=int, default=512)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s over the fleet")
    ap.add_argument("--hours", type=float, default=None, help="store span in hours (24: the 24-hour scan)")
    ap.add_argument("--seconds", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--links", type=int, default=2, help="NVLink links per GPU with a link-up series")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--queries", default="why,top,slo",
                    help=f"which of {','.join(QUERIES)} to run (one alone: the peak RSS is that query's own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--catch-up-only", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.catch_up_only:
        catch_up(a.catch_up_only)
        return 0
    if a.gpus % GPUS_PER_NODE:
        ap.error(f"--gpus must be a multiple of {GPUS_PER_NODE}")
    seconds = a.seconds or (int(a.hours * 3600) if a.hours else 75 * 60)
    if seconds < INCIDENT_S + 3600 and not a.generate_only:
        ap.error("the store must hold the 15-minute incident and a 1-hour baseline (>= 75 minutes)")
    f = Fleet(a.gpus, a.rate, seconds, a.links, a.seed)
    data = a.data or Path(tempfile.gettempdir()) / "stacklens-why-speed"
    if a.generate_only:
        info = build(f, data / f"{f.name()}.duckdb")
        print(f"generated {info['rows'] / 1e6:.1f}M rows in {info['generate_s']:.0f} s "
              f"({info['bytes'] / 2**30:.2f} GiB)")
        return 0
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, DuckDB {duckdb.__version__}, "
          f"polars {pl.__version__}, kernel {m['kernel']}")
    print(f"fleet: {f.nodes} nodes x {GPUS_PER_NODE} GPUs = {f.gpus} GPUs, TP-{TP} ({f.engines} engines), "
          f"{f.rate:g} requests/s, {seconds / 3600:.2f} h, incident: the last 15 min", flush=True)
    queries = frozenset(a.queries.split(","))
    if not queries <= set(QUERIES):
        ap.error(f"--queries: choose from {','.join(QUERIES)}")
    res = run(f, data, a.repeat, seconds > 2 * 3600, queries)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
