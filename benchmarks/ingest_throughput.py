"""Figures of the correlator's ingest: spans/s and GPU metric points/s per core of the correlator process,
bytes on disk per GPU sample and per request (DuckDB after CHECKPOINT: the file less an empty store's, the
same compacted, the measured table's own blocks; and the Parquet export), and the correlator's peak resident
memory during full-rate ingest.

Each phase starts ``stacklens serve`` as its own process over a fresh DuckDB file and sends it real OTLP
payloads prepared beforehand (so that the sender's work is not the correlator's):

- spans: vLLM V1 ``llm_request`` spans (12 attributes, random ids and latencies), made by the OpenTelemetry
  SDK and encoded by its OTLP encoder, 512 per export as the SDK's batch processor sends them; over
  OTLP/HTTP (protobuf) and over OTLP/gRPC;
- GPU metrics: the agent's own OTLP payloads (``OtlpMetricsEncoder``) of a simulated 8-GPU node, 10 cycles
  per export as the agent's queue merges them;
- DCGM: dcgm-exporter's default counters of an 8-GPU node scraped every second by an OpenTelemetry Collector's
  Prometheus receiver, forwarded in ~8k-point exports (``dcgm_bodies``; its labels make a placement and an
  identity row per GPU and scrape, as the reference decoder makes them).

Every export is answered only once it is durable (its body fsynced on the spool, its rows committed within
about a second; with ``--serve-args --no-spool``, once its rows are committed), and the rows are counted in
the file afterwards. The rate per core is rows / CPU seconds (user + system) of the correlator process
over the sending and the 1.5 s after it (``SETTLE_S``: the spool's commits of the last second included), not
wall time: the sender shares this machine's cores. Peak RSS is the process' own
high-water mark (VmHWM).

    python -m benchmarks.ingest_throughput            # ~2 minutes on 2 cores
    python -m benchmarks.ingest_throughput --quick    # a smaller run

The span decoder's compiled fast path (``correlator/ingest/fast_spans.py``) is on when built; the report
also gives in-process decode rates, fast and pure Python. ``--compare pure`` (the same tree with
``STACKLENS_PURE_PYTHON=1``) or ``--compare PATH`` (``stacklens serve`` of another tree, e.g. HEAD's from
``git archive HEAD | tar -x -C /tmp/base``, with this tree's ``correlator/ingest/_fastspans*.so`` copied
there when the C file is the same: without it that tree decodes in pure Python) runs only the span phases,
this tree and the baseline alternating for ``--rounds`` rounds on the same payloads, and reports both per
round and their medians.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import math
import os
import queue
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import grpc
import psutil

from benchmarks.nvml_call_overhead import REPO, machine

TARGETS = {"spans_per_core_s": 100_000.0, "points_per_core_s": 500_000.0, "bytes_per_gpu_sample": 15.0,
           "bytes_per_request": 60.0, "peak_rss_mb": 1536.0}
T0 = 1_790_000_000_000_000_000
TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


# -- payloads --------------------------------------------------------------------------------------
def span_bodies(n_spans: int, per_export: int = 512, seed: int = 1) -> list[bytes]:
    """vLLM V1 request spans through the OpenTelemetry SDK and its OTLP protobuf encoder."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from collector.engine_spans import FinishedRequest, engine_resource, vllm_v1_attributes

    rng = random.Random(seed)
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=engine_resource("vllm", "node-1", 4242, model="llama-3-70b",
                                                       gpu_uuids=[f"GPU-{i}" for i in range(4)]))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("vllm.llm_engine")
    bodies: list[bytes] = []
    t = T0
    for start in range(0, n_spans, per_export):
        exporter.clear()
        for _ in range(min(per_export, n_spans - start)):
            t += rng.randrange(200_000, 2_000_000)  # ~1k requests/s arriving
            queue_s, prefill_s = rng.expovariate(50.0), rng.uniform(0.02, 0.4)
            out = rng.randrange(1, 1024)
            decode_s = out * rng.uniform(0.01, 0.03)
            e2e = queue_s + prefill_s + decode_s
            r = FinishedRequest(f"cmpl-{rng.getrandbits(128):032x}", t, t + int(e2e * 1e9), queue_s, prefill_s,
                                decode_s, rng.randrange(16, 4096), out, rng.choice(("stop", "length")))
            span = tracer.start_span("llm_request", kind=SpanKind.SERVER, start_time=r.arrival_ns,
                                     attributes=vllm_v1_attributes(r, max_tokens=1024))
            span.end(end_time=r.end_ns)
        bodies.append(encode_spans(exporter.get_finished_spans()).SerializeToString())
    provider.shutdown()
    return bodies


def metric_bodies(n_cycles: int, gpus: int = 8, cycles_per_export: int = 10) -> tuple[list[bytes], int]:
    """The agent's OTLP payloads of a simulated node at a 1 s cadence (slow tier every 10 s). Returns the
    bodies and the number of data points they hold."""
    from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
    from collector.records import NodeSnapshot
    from collector.simulated import SimulatedGpuSource

    src = SimulatedGpuSource(gpus, seed=7)
    enc = OtlpMetricsEncoder(ResourceInfo("node-1"))
    bodies: list[bytes] = []
    chunk: list[bytes] = []
    for i in range(n_cycles):
        t = T0 + i * 10**9
        chunk.append(enc.encode(NodeSnapshot("node-1", t, src.sample(t, slow=i % 10 == 0, processes=False))))
        if len(chunk) == cycles_per_export:
            bodies.append(b"".join(chunk))  # concatenated messages are one message with all the resources
            chunk = []
    if chunk:
        bodies.append(b"".join(chunk))
    return bodies, gpu_samples(bodies[:1]) * len(bodies)  # approximate: every export holds the same cycles' shape


# dcgm-exporter's default counters (etc/default-counters.csv): gauges, and the counters its Prometheus text
# marks as such (sums once the Collector has read them); a few the catalog does not know (their points are
# ignored, as a real deployment's are)
DCGM_GAUGES = ("DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
               "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL",
               "DCGM_FI_DEV_DEC_UTIL", "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED",
               "DCGM_FI_DEV_VGPU_LICENSE_STATUS", "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
               "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE",
               "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE",
               "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES")
DCGM_COUNTERS = ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
                 "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL")


def _dcgm_value(name: str, scrape: int, gpu: int, rng: random.Random) -> int | float:
    """A plausible reading of a busy H100: clocks at their set values, temperatures and utilisation moving,
    the energy and NVLink counters growing, error counters and the last XID at 0 (an XID is an event)."""
    if name == "DCGM_FI_DEV_SM_CLOCK":
        return 1980
    if name == "DCGM_FI_DEV_MEM_CLOCK":
        return 2619
    if name.endswith("_TEMP"):
        return rng.randrange(38, 72)
    if name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL"):
        return rng.randrange(0, 101)
    if name == "DCGM_FI_DEV_FB_USED":
        return 71_000 + rng.randrange(0, 4_000)
    if name == "DCGM_FI_DEV_FB_FREE":
        return 81_559 - 71_000 - rng.randrange(0, 4_000)
    if name == "DCGM_FI_DEV_POWER_USAGE":
        return 350.0 + rng.random() * 350.0
    if name == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION":
        return 9_000_000_000 + scrape * 520_000 + gpu  # mJ
    if name == "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL":
        return scrape * 40_000_000_000 + gpu
    if name.startswith("DCGM_FI_PROF_PCIE"):
        return rng.random() * 2.0e10
    if name.startswith("DCGM_FI_PROF"):
        return rng.random()
    return 0  # ENC/DEC utilisation, vGPU licence, XID, remapped rows, replays


def gpu_samples(bodies: Sequence[bytes]) -> int:
    """The GPU samples the reference decoder makes of metric ``bodies``."""
    from correlator.ingest.payload import decode

    return sum(len(decode("metrics", b, "application/x-protobuf").gpu_samples) for b in bodies)


DCGM_SCRAPES_PER_EXPORT = 40  # 40 scrapes of 24 series of 8 GPUs: 7,680 points, a Collector's batch


def dcgm_bodies(n_scrapes: int, gpus: int = 8,
                scrapes_per_export: int = DCGM_SCRAPES_PER_EXPORT) -> tuple[list[bytes], int]:
    """dcgm-exporter's series of one node scraped every second by an OpenTelemetry Collector's Prometheus
    receiver and forwarded over OTLP in the batch processor's ~8k-point exports: a resource per scrape target,
    the exporter's labels as point attributes, every GPU serving a pod. Returns the bodies and the GPU
    samples they make."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    rng = random.Random(3)
    labels = [[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in (
        ("gpu", str(i)), ("UUID", f"GPU-{i:08x}-5a1e-4c3b-9f1d-00000000{i:04x}"), ("device", f"nvidia{i}"),
        ("modelName", "NVIDIA H100 80GB HBM3"), ("Hostname", "node-1"), ("DCGM_FI_DRIVER_VERSION", "550.54.15"),
        ("pci_bus_id", f"00000000:{0x18 + 16 * i:02X}:00.0"), ("container", "vllm"), ("namespace", "serving"),
        ("pod", f"vllm-llama-{i // 2}"))] for i in range(gpus)]
    resource = [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in (
        ("service.name", "dcgm-exporter"), ("service.instance.id", "10.0.3.7:9400"), ("server.address", "10.0.3.7"),
        ("server.port", "9400"), ("url.scheme", "http"))]
    bodies: list[bytes] = []
    for first in range(0, n_scrapes, scrapes_per_export):
        msg = ExportMetricsServiceRequest()
        scrapes = range(first, min(n_scrapes, first + scrapes_per_export))
        for s in scrapes:
            rm = msg.resource_metrics.add()
            rm.resource.attributes.extend(resource)
            sm = rm.scope_metrics.add()
            sm.scope.name = "github.com/open-telemetry/opentelemetry-collector-contrib/receiver/prometheusreceiver"
            t = T0 + s * 10**9
            for name in (*DCGM_GAUGES, *DCGM_COUNTERS):
                m = sm.metrics.add(name=name)
                if name in DCGM_COUNTERS:
                    m.sum.aggregation_temporality = 2  # type: ignore[assignment]  # CUMULATIVE
                    m.sum.is_monotonic = True
                    points = m.sum.data_points
                else:
                    points = m.gauge.data_points
                for g in range(gpus):
                    p = points.add(time_unix_nano=t, start_time_unix_nano=T0)
                    p.attributes.extend(labels[g])
                    value = _dcgm_value(name, s, g, rng)
                    if isinstance(value, int):
                        p.as_int = value
                    else:
                        p.as_double = value
        bodies.append(msg.SerializeToString())
    return bodies, gpu_samples(bodies[:1]) * len(bodies)  # approximate: every export holds the same scrapes' shape


# -- the correlator under test ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, db: Path, tree: Path = REPO, env_extra: dict[str, str] | None = None,
                 serve_args: Sequence[str] = ()) -> None:
        self.db = db
        self.grpc_port, self.http_port = _free_port(), _free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "correlator.cli", "serve", "--db", str(db), "--otlp-grpc",
             f"127.0.0.1:{self.grpc_port}", "--otlp-http", f"127.0.0.1:{self.http_port}", "--api", "off",
             *serve_args],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        for port in (self.grpc_port, self.http_port):
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"stacklens serve exited: {err}")
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("stacklens serve did not start") from None
                    time.sleep(0.05)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float(self.ps.memory_info().rss) / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- senders -----------------------------------------------------------------------------------------
def send_http(port: int, path: str, bodies: Sequence[bytes], concurrency: int, gzipped: bool = False) -> None:
    """POST ``bodies`` (``gzipped``: each already compressed, sent with Content-Encoding: gzip)."""
    headers = {"Content-Type": "application/x-protobuf", **({"Content-Encoding": "gzip"} if gzipped else {})}
    work: queue.Queue[bytes | None] = queue.Queue()
    for b in bodies:
        work.put(b)
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            try:
                body = work.get_nowait()
            except queue.Empty:
                break
            if body is None:
                break
            for _attempt in range(20):
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    break
                if resp.status != 503:
                    errors.append(f"HTTP {resp.status}")
                    break
                time.sleep(0.2)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} exports failed: {errors[:3]}")


def send_grpc(port: int, method: str, bodies: Sequence[bytes], concurrency: int, gzip_: bool = False) -> None:
    """Unary exports of ``bodies`` (``gzip_``: compressed by gRPC, as an OpenTelemetry Collector's otlp exporter
    does by default)."""
    compression = grpc.Compression.Gzip if gzip_ else grpc.Compression.NoCompression
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)],
                               compression=compression) as ch:
        export: Callable[..., Any] = ch.unary_unary(method)
        pending: list[Any] = []
        for b in bodies:
            pending.append(export.future(b, timeout=120))  # type: ignore[attr-defined]
            if len(pending) >= concurrency:
                pending.pop(0).result()
        for f in pending:
            f.result()


# -- one phase -----------------------------------------------------------------------------------------
def _parquet_bytes(directory: Path, table: str) -> int:
    return sum(f.stat().st_size for f in (directory / table).rglob("*.parquet"))


def _own_bytes(db: Path, workdir: Path, table: str) -> int:
    """Bytes of the blocks that ``table`` alone holds: the store's used blocks less those still used once the
    table is dropped (in a copy). What a row of it costs beyond the store's fixed part (schema, the id tables
    and their indexes, which take a 256 KiB block each however few rows they have)."""
    copy = workdir / f"{db.stem}-without-{table}.duckdb"
    shutil.copyfile(db, copy)
    con = duckdb.connect(str(copy))
    try:
        def used() -> int:
            row = con.execute("PRAGMA database_size").fetchone()
            assert row is not None
            return int(row[2]) * int(row[4])  # block_size * used_blocks

        before = used()
        for (view,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall():
            con.execute(f"DROP VIEW {view}")
        con.execute(f"DROP TABLE {table}")
        con.execute("CHECKPOINT")
        return before - used()
    finally:
        con.close()
        copy.unlink(missing_ok=True)


# the spool commits what it acknowledged within a second (correlator/store/spool.py): the CPU is read this long
# after the warm-up and after the load, so that the load's own commits are in its figure and the warm-up's not
SETTLE_S = 1.5


def phase(name: str, workdir: Path, table: str, send: Callable[[int, int], None], concurrency: int,
          tree: Path = REPO, env_extra: dict[str, str] | None = None, sizes: bool = True,
          warmup: Callable[[int, int], None] | None = None, warm_rows: int = 0,
          serve_args: Sequence[str] = ()) -> dict[str, Any]:
    """One server, one load. ``warmup`` (if any, storing ``warm_rows`` rows) is sent first and left out of the
    figures: the process' one-time costs (imports and first calls on the first exports) then do not count."""
    db = workdir / f"{name}.duckdb"
    server = Server(db, tree, env_extra, serve_args)
    try:
        cold0 = server.cpu_s()
        if warmup is not None:
            warmup(server.grpc_port if "grpc" in name else server.http_port, concurrency)
            time.sleep(SETTLE_S)
        cpu0, t0 = server.cpu_s(), time.perf_counter()
        send(server.grpc_port if "grpc" in name else server.http_port, concurrency)
        wall = time.perf_counter() - t0
        time.sleep(SETTLE_S)
        cpu = server.cpu_s() - cpu0
        cold_cpu = server.cpu_s() - cold0
        peak = server.peak_rss_mb()
    finally:
        server.stop()
    con = duckdb.connect(str(db))
    stored = int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
    rows = stored - warm_rows
    rates = {"rows_per_cpu_s": round(rows / cpu) if cpu else None,
             # the same from the first export: the process' one-time costs (imports, first calls) included
             "cold_rows_per_cpu_s": round(stored / cold_cpu) if cold_cpu else None}
    if not sizes:
        con.close()
        db.unlink()
        return {"phase": name, "rows": rows, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **rates,
                "rows_per_wall_s": round(rows / wall), "cpu_cores_used": round(cpu / wall, 2),
                "peak_rss_mb": round(peak, 1)}
    con.execute("CHECKPOINT")
    # the same data written afresh in one go (what a compaction would leave)
    compact = workdir / f"{name}-compact.duckdb"
    con.execute(f"ATTACH '{compact}' AS compact")
    con.execute(f"COPY FROM DATABASE \"{db.stem}\" TO compact")
    con.execute("DETACH compact")
    con.close()
    size, compact_size, base = db.stat().st_size, compact.stat().st_size, _empty_store_bytes(workdir)
    from correlator.store.schema import READ_AS

    stored_as = {v: k for k, v in READ_AS.items()}.get(table, table)  # requests: the view over request_rows
    own = _own_bytes(db, workdir, stored_as)
    from correlator.store.duckdb_store import Store

    store = Store(db)
    out = workdir / f"{name}-parquet"
    store.export_parquet(out)
    store.close()

    def per_row(n_bytes: float) -> float | None:
        return round(n_bytes / stored, 2) if stored else None

    return {"phase": name, "rows": rows, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **rates,
            "rows_per_wall_s": round(rows / wall),
            "cpu_cores_used": round(cpu / wall, 2), "peak_rss_mb": round(peak, 1),
            "duckdb_file_bytes": size, "duckdb_bytes_per_row": per_row(size - base),
            "duckdb_compacted_bytes_per_row": per_row(compact_size - base), "table_bytes_per_row": per_row(own),
            "parquet_bytes_per_row": per_row(_parquet_bytes(out, table))}


def grown_bytes_per_sample(workdir: Path, cycles: int = 2000) -> dict[str, Any]:
    """What the file grows by per GPU sample as a store fills: the agent's payloads of ``cycles`` cycles of an
    8-GPU node written (in-process, as ``serve``'s writer writes them, summaries included) into a store that
    already holds the ``cycles`` before them, file sizes after CHECKPOINT. The store's fixed part (schema,
    the id tables and their indexes: a 256 KiB block each) is in both sizes and cancels out; DuckDB grows the
    file by 256 KiB blocks, so the load is large enough (~950k samples, some 15 blocks) for that step to be
    small against it."""
    from correlator.ingest.payload import decode_protobuf
    from correlator.store.duckdb_store import Store

    bodies, _ = metric_bodies(2 * cycles)
    db = workdir / "grown.duckdb"
    sizes: list[tuple[int, int]] = []
    for part in (bodies[: len(bodies) // 2], bodies[len(bodies) // 2:]):
        store = Store(db)
        for fut in [store.submit(decode_protobuf("metrics", b)) for b in part]:
            fut.result(120)
        store.catch_up_rollups()
        store.close()
        con = duckdb.connect(str(db))
        con.execute("CHECKPOINT")
        row = con.execute("SELECT count(*) FROM gpu_samples").fetchone()
        con.close()
        assert row is not None
        sizes.append((db.stat().st_size, int(row[0])))
    (b0, r0), (b1, r1) = sizes
    db.unlink()
    return {"samples_before": r0, "samples_added": r1 - r0, "file_bytes_before": b0, "file_bytes_after": b1,
            "bytes_per_sample": round((b1 - b0) / (r1 - r0), 2)}


def _empty_store_bytes(workdir: Path) -> int:
    """The file of a store with no rows (schema and metadata): subtracted before dividing by rows."""
    from correlator.store.duckdb_store import Store

    path = workdir / "empty.duckdb"
    if not path.exists():
        Store(path).close()
        con = duckdb.connect(str(path))
        con.execute("CHECKPOINT")
        con.close()
    return path.stat().st_size


def decode_rates(signal: str, bodies: Sequence[bytes], repeat: int = 3) -> dict[str, Any]:
    """In-process decode of span or metric bodies, rows (request spans, GPU samples) per second on one core:
    the compiled fast path (as the servers call it: body → rows), the reference path (upb parse + the Python
    decoder) and upb's parse alone."""
    from correlator.ingest import fast_metrics, fast_spans
    from correlator.ingest.otlp_metrics import decode_metrics
    from correlator.ingest.otlp_spans import decode_spans
    from correlator.ingest.payload import parse_message

    spans = signal == "traces"
    fast_module: Any = fast_spans if spans else fast_metrics
    decode_ref: Callable[[Any], Any] = decode_spans if spans else decode_metrics

    def rows(b: bytes) -> int:
        batch = decode_ref(parse_message(signal, b, "protobuf"))  # type: ignore[arg-type]
        return len(batch.requests if spans else batch.gpu_samples)

    n = sum(rows(b) for b in bodies)
    paths: dict[str, Callable[[bytes], Any]] = {
        "pure": lambda b: decode_ref(parse_message(signal, b, "protobuf")),  # type: ignore[arg-type]
        "upb_parse_only": lambda b: parse_message(signal, b, "protobuf"),  # type: ignore[arg-type]
    }
    if fast_module.available():
        paths["fast"] = fast_module.decode
    best = {k: math.inf for k in paths}
    for _ in range(repeat):  # alternating, the best of each
        for k, f in paths.items():
            t = time.process_time()
            for b in bodies:
                f(b)
            best[k] = min(best[k], time.process_time() - t)
    unit = "spans" if spans else "points"
    out: dict[str, Any] = {f"{k}_{unit}_per_s": round(n / v) for k, v in best.items() if v > 0}
    out["fast_path"] = fast_module.available()
    if "fast" in best and best["fast"] > 0:
        out["speedup"] = round(best["pure"] / best["fast"], 1)
    return out


def _span_count(body: bytes) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    msg = ExportTraceServiceRequest.FromString(body)
    return sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans)


def compare(n_spans: int, n_cycles: int, concurrency: int, baseline: str, rounds: int, warmup_exports: int = 0,
            signals: Sequence[str] = ("traces", "metrics"), spans_per_export: int = 512,
            serve_args: Sequence[str] = (), baseline_serve_args: Sequence[str] = (),
            gzip_: bool = False) -> dict[str, Any]:
    """The span and/or metric phases of this tree and of a baseline (``pure``: this tree without the fast
    paths; else a path to another tree), alternating, on the same payloads; the first ``warmup_exports``
    exports of each phase sent before the measurement (left out of it). ``serve_args`` and
    ``baseline_serve_args``: options of each side's ``stacklens serve`` (e.g. ``--db-threads 1``; the baseline may
    be this tree too, ``.``). ``gzip_``: every export gzip-compressed (the OpenTelemetry Collector's default for
    both of its OTLP exporters)."""

    loads: dict[str, tuple[str, str, str, list[bytes], list[bytes], int]] = {}  # phase → path, method, table, ...
    if "traces" in signals:
        spans = span_bodies(n_spans, spans_per_export)
        warm = spans[:warmup_exports]
        # each a request span, none twice: each stored once
        loads["spans"] = ("/v1/traces", TRACES, "requests", warm, spans[warmup_exports:],
                          sum(_span_count(b) for b in warm))
    if "metrics" in signals:
        metrics, _ = metric_bodies(n_cycles)
        warm = metrics[:warmup_exports]
        loads["metrics"] = ("/v1/metrics", METRICS, "gpu_samples", warm, metrics[warmup_exports:], gpu_samples(warm))
    if "dcgm" in signals:
        dcgm, _ = dcgm_bodies(DCGM_SCRAPES + DCGM_WARMUP_EXPORTS * DCGM_SCRAPES_PER_EXPORT)
        warm = dcgm[:DCGM_WARMUP_EXPORTS]
        loads["dcgm"] = ("/v1/metrics", METRICS, "gpu_samples", warm, dcgm[DCGM_WARMUP_EXPORTS:], gpu_samples(warm))
    # another tree runs as it is: its compiled decoders too where it has them built (copy or build them there)
    base_tree, base_env = (REPO, {"STACKLENS_PURE_PYTHON": "1"}) if baseline == "pure" else (
        Path(baseline).resolve(), {})
    runs: dict[str, list[dict[str, Any]]] = {}

    def sender(path: str, method: str, bodies: list[bytes], grpc: bool) -> Callable[[int, int], None]:
        if grpc:
            return lambda port, c: send_grpc(port, method, bodies, c, gzip_)
        if gzip_:  # compressed here, before the measurement, at Go's default level
            bodies = [gzip.compress(b, 6) for b in bodies]
        return lambda port, c: send_http(port, path, bodies, c, gzip_)

    with tempfile.TemporaryDirectory(prefix="stacklens-ingest-cmp-") as tmp:
        work = Path(tmp)
        for r in range(rounds):
            order = [("this", REPO, {}, serve_args), ("baseline", base_tree, base_env, baseline_serve_args)]
            for who, tree, env, extra in order if r % 2 == 0 else order[::-1]:
                for load, (path, method, table, warm, bodies, warm_rows) in loads.items():
                    for transport in ("http", "grpc"):
                        grpc = transport == "grpc"
                        res = phase(f"{who}-{load}_{transport}-{r}", work, table, sender(path, method, bodies, grpc),
                                    concurrency, tree, env, sizes=False,
                                    warmup=sender(path, method, warm, grpc) if warm else None, warm_rows=warm_rows,
                                    serve_args=extra)
                        runs.setdefault(f"{who} {load}_{transport}", []).append(res)
    medians = {k: statistics.median(x["rows_per_cpu_s"] for x in v) for k, v in runs.items()}
    decode_figures = {}
    if "spans" in loads:
        decode_figures["traces"] = decode_rates("traces", loads["spans"][4][: max(1, 20_000 // 512)])
    if "metrics" in loads:
        decode_figures["metrics"] = decode_rates("metrics", loads["metrics"][4][:10])
    if "dcgm" in loads:
        decode_figures["dcgm"] = decode_rates("metrics", loads["dcgm"][4][:2])
    return {"baseline": baseline, "serve_args": list(serve_args), "baseline_serve_args": list(baseline_serve_args),
            "rounds": rounds, "loads": {k: sum(1 for _ in v[4]) for k, v in loads.items()},
            "spans_per_export": spans_per_export, "concurrency": concurrency,
            "warmup_exports": warmup_exports, "gzip": gzip_, "runs": runs, "median_rows_per_cpu_s": medians,
            "decode": decode_figures}


def compare_report(doc: dict[str, Any]) -> str:
    lines = [f"this tree vs baseline {doc['baseline']!r}, exports per phase {doc['loads']} ({doc['spans_per_export']}"
             f" spans an export, {doc['concurrency']} in flight), {doc['rounds']} rounds"
             " alternating; rows (request spans, GPU samples) per CPU-second of the correlator process"
             + (f" (after {doc['warmup_exports']} warm-up exports, left out)" if doc.get("warmup_exports") else "")
             + ("; every export gzip-compressed" if doc.get("gzip") else "")
             + "".join(f"; {who} serve {' '.join(doc[k])}" for who, k in (("this", "serve_args"),
                                                                         ("baseline", "baseline_serve_args"))
                       if doc.get(k)),
             ""]
    for k, v in doc["runs"].items():
        lines.append(f"{k:<24}" + "".join(f"{x['rows_per_cpu_s']:>10,}" for x in v)
                     + f"   median {doc['median_rows_per_cpu_s'][k]:>10,.0f}")
    for signal, d in doc["decode"].items():
        lines += ["", f"in-process {signal} decode, rows/s on one core: " + ", ".join(
            f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}" for k, v in d.items())]
    return "\n".join(lines)


# exports sent first in each phase of the main run, left out of the sustained rate (a fresh ``serve`` spends
# ~0.3-0.5 s of CPU on its first exports: imports, first calls, the first plans of each statement)
WARMUP_SPAN_EXPORTS, WARMUP_METRIC_EXPORTS = 20, 5
# dcgm-exporter's series as a Collector forwards them: 1,600 scrapes of 8 GPUs (~240k GPU samples, 40 exports of
# ~2.5 MB), after 2 warm-up exports
DCGM_SCRAPES, DCGM_WARMUP_EXPORTS = 1600, 2


def run(n_spans: int, n_cycles: int, concurrency: int) -> dict[str, Any]:
    from correlator.ingest.payload import upb_active

    t = time.perf_counter()
    spans = span_bodies(n_spans)
    metrics, points = metric_bodies(n_cycles)
    dcgm, dcgm_samples = dcgm_bodies(DCGM_SCRAPES + DCGM_WARMUP_EXPORTS * DCGM_SCRAPES_PER_EXPORT)
    prep_s = time.perf_counter() - t
    warm_spans, warm_metrics = spans[:WARMUP_SPAN_EXPORTS], metrics[:WARMUP_METRIC_EXPORTS]
    warm_dcgm = dcgm[:DCGM_WARMUP_EXPORTS]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stacklens-ingest-bench-") as tmp:
        work = Path(tmp)
        for name, path, method, table, warm, rest, warm_rows, sizes in (
                ("spans", "/v1/traces", TRACES, "requests", warm_spans, spans[WARMUP_SPAN_EXPORTS:],
                 sum(_span_count(b) for b in warm_spans), True),
                ("metrics", "/v1/metrics", METRICS, "gpu_samples", warm_metrics, metrics[WARMUP_METRIC_EXPORTS:],
                 gpu_samples(warm_metrics), True),
                # the bytes on disk of DCGM input are not a figure: the agent's samples give it
                ("dcgm", "/v1/metrics", METRICS, "gpu_samples", warm_dcgm, dcgm[DCGM_WARMUP_EXPORTS:],
                 gpu_samples(warm_dcgm), False)):
            for transport in ("http", "grpc"):
                def send(bodies: list[bytes], grpc: bool = transport == "grpc", path: str = path,
                         method: str = method) -> Callable[[int, int], None]:
                    if grpc:
                        return lambda port, c: send_grpc(port, method, bodies, c)
                    return lambda port, c: send_http(port, path, bodies, c)

                results.append(phase(f"{name}_{transport}", work, table, send(rest), concurrency, sizes=sizes,
                                     warmup=send(warm), warm_rows=warm_rows))
        grown = grown_bytes_per_sample(work)
    span_bytes = sum(map(len, spans)) / n_spans
    return {"machine": {**machine(), "duckdb": duckdb.__version__, "upb": upb_active()},
            "decode": decode_rates("traces", spans[: max(1, 20_000 // 512)]),
            "decode_metrics": decode_rates("metrics", metrics[:10]),
            "decode_dcgm": decode_rates("metrics", dcgm[:2]),
            "load": {"spans": n_spans, "span_exports": len(spans), "span_bytes_on_wire": round(span_bytes, 1),
                     "metric_cycles_8_gpus": n_cycles, "metric_exports": len(metrics), "points_approx": points,
                     "dcgm_scrapes_8_gpus": DCGM_SCRAPES, "dcgm_exports": len(dcgm),
                     "dcgm_samples_approx": dcgm_samples,
                     "warmup_exports": {"spans": len(warm_spans), "metrics": len(warm_metrics)},
                     "concurrency": concurrency, "prepare_s": round(prep_s, 1)},
            "phases": results, "grown": grown}


def report(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, DuckDB {m['duckdb']}, "
             f"protobuf upb backend {'active' if m['upb'] else 'NOT active (pure Python: ~20x slower)'}",
             f"load: {json.dumps(doc['load'])}",
             f"in-process span decode (one core): {json.dumps(doc['decode'])}",
             f"in-process metric decode (one core): {json.dumps(doc['decode_metrics'])}",
             f"in-process DCGM decode (one core): {json.dumps(doc['decode_dcgm'])}", "",
             f"{'phase':<14}{'rows':>10}{'wall s':>8}{'CPU s':>8}{'rows/CPU-s':>12}{'rows/wall-s':>12}"
             f"{'cores':>7}{'peak RSS MB':>13}{'B/row duckdb':>14}{'compacted':>11}{'table':>8}{'parquet':>9}"]
    for p in doc["phases"]:
        lines.append(f"{p['phase']:<14}{p['rows']:>10}{p['wall_s']:>8}{p['cpu_s']:>8}{p['rows_per_cpu_s']:>12,}"
                     f"{p['rows_per_wall_s']:>12,}{p['cpu_cores_used']:>7}{p['peak_rss_mb']:>13}"
                     f"{p.get('duckdb_bytes_per_row', '')!s:>14}{p.get('duckdb_compacted_bytes_per_row', '')!s:>11}"
                     f"{p.get('table_bytes_per_row', '')!s:>8}{p.get('parquet_bytes_per_row', '')!s:>9}")
    by = {p["phase"]: p for p in doc["phases"]}

    def best(*names: str, key: str, low: bool = False) -> float:
        vals = [by[n][key] for n in names if by[n][key] is not None]
        return float(min(vals) if low else max(vals))

    # both transports must reach the target
    spans = best("spans_http", "spans_grpc", key="rows_per_cpu_s", low=True)
    points = best("metrics_http", "metrics_grpc", key="rows_per_cpu_s", low=True)
    dcgm_points = best("dcgm_http", "dcgm_grpc", key="rows_per_cpu_s", low=True)
    b_req = best("spans_http", "spans_grpc", key="duckdb_bytes_per_row", low=True)
    b_req_c = best("spans_http", "spans_grpc", key="duckdb_compacted_bytes_per_row", low=True)
    b_req_pq = best("spans_http", "spans_grpc", key="parquet_bytes_per_row", low=True)
    b_gpu = best("metrics_http", "metrics_grpc", key="duckdb_bytes_per_row", low=True)
    b_gpu_c = best("metrics_http", "metrics_grpc", key="duckdb_compacted_bytes_per_row", low=True)
    b_gpu_pq = best("metrics_http", "metrics_grpc", key="parquet_bytes_per_row", low=True)
    b_req_t = best("spans_http", "spans_grpc", key="table_bytes_per_row", low=True)
    b_gpu_t = best("metrics_http", "metrics_grpc", key="table_bytes_per_row", low=True)
    rss = max(p["peak_rss_mb"] for p in doc["phases"])
    rows = [
        ("spans/s per core, sustained (HTTP | gRPC)", f"≥ {TARGETS['spans_per_core_s']:,.0f}",
         f"{by['spans_http']['rows_per_cpu_s']:,} | {by['spans_grpc']['rows_per_cpu_s']:,}",
         spans >= TARGETS["spans_per_core_s"]),
        ("  the same from a fresh process' first export", "",
         f"{by['spans_http']['cold_rows_per_cpu_s']:,} | {by['spans_grpc']['cold_rows_per_cpu_s']:,}", None),
        ("GPU points/s per core, sustained (HTTP | gRPC)", f"≥ {TARGETS['points_per_core_s']:,.0f}",
         f"{by['metrics_http']['rows_per_cpu_s']:,} | {by['metrics_grpc']['rows_per_cpu_s']:,}",
         points >= TARGETS["points_per_core_s"]),
        ("  the same from a fresh process' first export", "",
         f"{by['metrics_http']['cold_rows_per_cpu_s']:,} | {by['metrics_grpc']['cold_rows_per_cpu_s']:,}", None),
        ("DCGM samples/s per core, via a Collector (HTTP | gRPC)",
         f"≥ {TARGETS['points_per_core_s']:,.0f}",
         f"{by['dcgm_http']['rows_per_cpu_s']:,} | {by['dcgm_grpc']['rows_per_cpu_s']:,}",
         dcgm_points >= TARGETS["points_per_core_s"]),
        ("bytes per GPU sample (DuckDB | compacted | table | Parquet)", f"≤ {TARGETS['bytes_per_gpu_sample']:.0f}",
         f"{b_gpu} | {b_gpu_c} | {b_gpu_t} | {b_gpu_pq}", b_gpu <= TARGETS["bytes_per_gpu_sample"]),
        (f"bytes per GPU sample as the store grows ({doc['grown']['samples_added']:,} added)",
         f"≤ {TARGETS['bytes_per_gpu_sample']:.0f}", f"{doc['grown']['bytes_per_sample']}",
         doc["grown"]["bytes_per_sample"] <= TARGETS["bytes_per_gpu_sample"]),
        ("bytes per request (DuckDB | compacted | table | Parquet)", f"≤ {TARGETS['bytes_per_request']:.0f}",
         f"{b_req} | {b_req_c} | {b_req_t} | {b_req_pq}", b_req <= TARGETS["bytes_per_request"]),
        ("peak RSS during ingest, MB", f"≤ {TARGETS['peak_rss_mb']:.0f}", f"{rss}", rss <= TARGETS["peak_rss_mb"]),
    ]
    lines += ["", f"{'figure':<60}{'target':>12}  {'measured':<36}met"]
    lines += [f"{f:<60}{t:>12}  {v:<36}{'' if ok is None else 'yes' if ok else 'NO'}" for f, t, v, ok in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=150_000, help="request spans per span phase")
    ap.add_argument("--cycles", type=int, default=2000, help="agent cycles of an 8-GPU node per metrics phase "
                    "(2000: ~950k points, ~2 s of the correlator's CPU, enough for its 10 ms CPU clock)")
    ap.add_argument("--concurrency", type=int, default=4, help="exports in flight")
    ap.add_argument("--quick", action="store_true", help="a small run (20k spans, 100 cycles)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    ap.add_argument("--compare", metavar="pure|TREE", help="ingest phases against this tree without the fast "
                    "paths (pure) or another tree's stacklens serve, alternating")
    ap.add_argument("--signals", default="traces,metrics", help="--compare: the phases, traces, metrics (the "
                    "agent's) and/or dcgm (dcgm-exporter's series as an OpenTelemetry Collector forwards them)")
    ap.add_argument("--spans-per-export", type=int, default=512, help="--compare: spans in each export (512: the "
                    "SDK's batch processor; 8192: the OpenTelemetry Collector's batch processor)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    ap.add_argument("--warmup", type=int, default=0, metavar="EXPORTS",
                    help="--compare: send the first EXPORTS exports of each phase before measuring (the process' "
                    "one-time costs left out: steady state); 0, the default, measures from the first export")
    ap.add_argument("--serve-args", default="", help="--compare: options of this tree's stacklens serve, e.g. "
                    "'--db-threads 1'")
    ap.add_argument("--baseline-serve-args", default="", help="--compare: options of the baseline's stacklens serve")
    ap.add_argument("--gzip", action="store_true", help="--compare: gzip every export (Content-Encoding over HTTP, "
                    "gRPC's own compression), as an OpenTelemetry Collector's exporters do by default")
    args = ap.parse_args(argv)
    if args.quick:
        args.spans, args.cycles = 20_000, 100
    if args.compare:
        cmp = compare(args.spans, args.cycles, args.concurrency, args.compare, args.rounds, args.warmup,
                      tuple(args.signals.split(",")), args.spans_per_export, shlex.split(args.serve_args),
                      shlex.split(args.baseline_serve_args), args.gzip)
        print(compare_report(cmp))
        if args.json:
            print(json.dumps(cmp, indent=2))
        return 0
    doc = run(args.spans, args.cycles, args.concurrency)
    print(report(doc))
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
