"""Helpers of the compiled decoders' tests: the bit-exact comparison of a fast path with the reference,
protobuf wire data written by hand (for shapes no SDK writes), and the agent's payloads of a simulated fleet."""

from __future__ import annotations

import struct
from collections.abc import Callable

from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.simfleet import Fleet, fault_scenario
from correlator.ingest.batch import IngestBatch, StoredRequests
from correlator.ingest.otlp_metrics import decode_metrics
from correlator.ingest.otlp_spans import decode_spans
from correlator.ingest.payload import PayloadError, Signal, decode_protobuf, parse_message
from correlator.store import duckdb_store


# -- the comparison ------------------------------------------------------------------------------------
def _same_value(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # bit-exact (-0.0, and NaN never occurs)
    return a == b


def assert_same_batch(fast: IngestBatch, ref: IngestBatch) -> None:
    assert fast.ignored == ref.ignored
    if isinstance(fast.requests, StoredRequests):
        # the compiled span decoder gives the rows in the store's form: exactly what the store makes of the
        # reference's rows (ids as words, request ids split, derived latencies flagged), value for value
        table = fast.requests.table
        assert table is not None
        names = sorted(set(ref.requests.data["node"]), key=str)
        ids = {str(n): i for i, n in enumerate(names)}
        want = duckdb_store._stored_requests(duckdb_store._arrow(ref.requests), ids)
        have = duckdb_store._stored_requests(table, ids)
        assert have.schema == want.schema
        for col in want.column_names:
            assert have[col].equals(want[col]), (col, have[col].to_pylist(), want[col].to_pylist())
    for name, rows in ref.tables().items():
        got = fast.tables()[name]
        for col in rows.columns:
            want, have = rows.data[col], got.data[col]
            assert len(have) == len(want), (name, col)
            for i, (x, y) in enumerate(zip(have, want, strict=True)):
                assert _same_value(x, y), (name, col, i, x, y)


# -- wire data by hand --------------------------------------------------------------------------------
def varint(v: int) -> bytes:
    out = bytearray()
    v &= (1 << 64) - 1
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wt: int) -> bytes:
    return varint(field << 3 | wt)


def ld(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def f64(field: int, v: int) -> bytes:
    return tag(field, 1) + struct.pack("<Q", v)


def kv_bytes(key: str, value: bytes | None) -> bytes:
    return ld(1, key.encode()) + (ld(2, value) if value is not None else b"")


def str_any(s: bytes) -> bytes:
    return ld(1, s)


def dbl_any(x: float) -> bytes:
    return tag(4, 1) + struct.pack("<d", x)


def reference(signal: Signal, raw: bytes) -> IngestBatch | PayloadError:
    """The reference path's rows of a body (upb's parse and the Python decoder), or its error."""
    try:
        msg = parse_message(signal, raw, "protobuf")
        return decode_spans(msg) if signal == "traces" else decode_metrics(msg)
    except PayloadError as e:
        return e


def check(signal: Signal, fast: Callable[[bytes], IngestBatch | None], raw: bytes) -> bool:
    """The fast path and the reference agree on ``raw``, and so does the hook that picks between them
    (``decode_protobuf``: the same rows, or the same error); True when the fast path took it."""
    ref = reference(signal, raw)
    got = fast(raw)
    if got is not None:
        assert isinstance(ref, IngestBatch), f"fast path accepted a body the reference refuses: {ref}"
        assert_same_batch(got, ref)
    try:
        hooked: IngestBatch | PayloadError = decode_protobuf(signal, raw)
    except PayloadError as e:
        hooked = e
    if isinstance(ref, PayloadError):
        assert isinstance(hooked, PayloadError) and (hooked.status, hooked.message) == (ref.status, ref.message)
    else:
        assert isinstance(hooked, IngestBatch)
        assert_same_batch(hooked, ref)
    return got is not None


def fleet_bodies(kind: str = "xid_failure", seconds: int = 40) -> list[bytes]:
    """The agent's encoder over a simulated fleet with a fault from its 5th second: every kind of reading the
    agent sends (XIDs and throttling too: events to derive)."""
    fleet = Fleet(fault_scenario(kind, onset_s=5.0, duration_s=float(seconds)))
    encoders: dict[str, OtlpMetricsEncoder] = {}
    bodies = []
    for tick in fleet.run():
        for snap in tick.snapshots:
            enc = encoders.setdefault(snap.node, OtlpMetricsEncoder(ResourceInfo(snap.node, f"k8s-{snap.node}")))
            bodies.append(enc.encode(snap))
    return bodies
