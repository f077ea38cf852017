"""An acknowledged export is durable: kill -9 the correlator process in the middle of heavy ingest,
and every span it answered 200 for is in the database after a restart, none of them twice: with the spool
(the default: answered once on the spool's disk, committed later; the restart commits what the kill left
there) and without it (answered once committed)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

T0 = 1_790_000_000_000_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payload(client: int, seq: int, n: int) -> tuple[bytes, list[str]]:
    spans, ids = [], []
    for i in range(n):
        span_id = f"{client:04x}{seq:06x}{i:06x}"
        ids.append(span_id)
        spans.append(Span(
            trace_id=bytes.fromhex(f"{client:08x}{seq:08x}{i:016x}"), span_id=bytes.fromhex(span_id),
            name="llm_request", start_time_unix_nano=T0 + seq * 10**6 + i,
            end_time_unix_nano=T0 + seq * 10**6 + i + 10**9,
            attributes=[KeyValue(key="gen_ai.latency.time_to_first_token", value=AnyValue(double_value=0.1)),
                        KeyValue(key="gen_ai.usage.completion_tokens", value=AnyValue(int_value=20))]))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[KeyValue(key="host.name", value=AnyValue(string_value="n1"))]),
        scope_spans=[ScopeSpans(spans=spans)])])
    return req.SerializeToString(), ids


def _start(db: Path, port: int, spool: str = "--spool") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "correlator.cli", "serve", "--db", str(db), "--otlp-http", f"127.0.0.1:{port}",
         "--otlp-grpc", "off", "--api", "off", spool],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {proc.stderr.read() if proc.stderr else b''!r}") from None
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve did not start")


@pytest.mark.parametrize("spool", ["--spool", "--no-spool"])
def test_kill_9_during_heavy_ingest_loses_no_acknowledged_span_and_duplicates_none(tmp_path: Path, spool: str) -> None:
    db, port = tmp_path / "d.duckdb", _free_port()
    proc = _start(db, port, spool)
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        seq = 0
        while not stop.is_set():
            body, ids = _payload(c, seq, 200)
            seq += 1
            try:
                conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                return  # the server died under us: this export was not acknowledged
            if resp.status == 200:
                with lock:
                    acked.extend(ids)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 20_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 2_000, "too little was ingested before the kill for the test to mean anything"

    # restart: serve recovers the database (DuckDB replays its WAL; the spool's records past its last commit are
    # committed) and keeps serving
    proc = _start(db, _free_port(), spool)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    con = duckdb.connect(str(db), read_only=True)
    stored = [r[0] for r in con.execute("SELECT span_id FROM requests").fetchall()]
    con.close()
    assert len(stored) == len(set(stored)), "a span was stored twice"
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged spans were lost"
