"""Helpers of the compiled decoders' tests: the bit-exact comparison of two batches, and protobuf wire data
written by hand (for shapes no SDK writes)."""

from __future__ import annotations

import struct

from correlator.ingest.batch import IngestBatch


# -- the comparison ------------------------------------------------------------------------------------
def _same_value(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # bit-exact (-0.0, and NaN never occurs)
    return a == b


def assert_same_batch(fast: IngestBatch, ref: IngestBatch) -> None:
    assert fast.ignored == ref.ignored
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
