"""The compiled fast path of span decoding: a serialized ``ExportTraceServiceRequest`` → request rows,
exactly as :func:`correlator.ingest.otlp_spans.decode_spans` makes them, without building the protobuf
message or a dict per span.

``_fastspans.c`` (compiled at install time, loaded here with ctypes) reads the wire format and applies
decode_spans' rules (``_f``, ``_i``, ``_s``, ``node_of``, ``is_request_span``, the derivations and the
start repair, in the same double arithmetic) into column buffers, already in the store's form (ids as
64-bit words, request ids split, latencies that equal their derivation flagged: what the store's
``request_rows`` makes of decode_spans' rows), and hands them over as Arrow arrays through Arrow's C data
interface: this module imports that one table without a copy (``StoredRequests``: the store writes it as it
is, without a Python object per value or a second pass; whoever reads ``data`` gets the same lists as
decode_spans'), and Arrow frees the C's buffers when the table goes. Whatever the C does not handle
exactly (malformed or unusual wire data, a value that needs Python to convert, ...) it declines, and
:func:`decode` returns None: the caller then takes the reference path (upb parse + decode_spans) with the
same bytes, which also gives the same error for a bad body.

``STACKLENS_PURE_PYTHON=1`` turns the fast path off (the library is not loaded).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pyarrow as pa

from correlator.ingest import compiled
from correlator.ingest.batch import STORED_REQUEST_COLUMNS, IngestBatch, StoredRequests
from correlator.store.duckdb_store import REQUEST_ROW_TYPES

_ABI = 7  # _fastspans.c's FS_ABI: the struct's layout and the functions
# the C's columns (its enum A_*: STORED_REQUEST_COLUMNS' order), of request_rows' types
STORED_REQUEST_SCHEMA = pa.schema([(c, REQUEST_ROW_TYPES.get(c, pa.string())) for c in STORED_REQUEST_COLUMNS])


class _ArrowArray(ctypes.Structure):
    """Arrow's C data interface ``struct ArrowArray``."""

    _fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.c_void_p),
                ("children", ctypes.c_void_p), ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                ("private_data", ctypes.c_void_p)]


class _Out(ctypes.Structure):
    """The public head of the C struct fs_out (the columns the array is made from follow, private)."""

    _fields_ = [("status", ctypes.c_int64), ("n", ctypes.c_int64), ("ignored", ctypes.c_int64),
                ("arrow", _ArrowArray)]


def library_path() -> Path | None:
    """Where the compiled library is (next to this file, as setup.py builds it), or None."""
    return compiled.library_path("_fastspans")


def _load(path: Path | None) -> Any:
    """The library, or None: not built, or not the one this file was written for (a stale build)."""
    return compiled.load(path, _bind)


def _bind(lib: Any) -> Any:
    lib.fs_abi.restype = ctypes.c_int
    lib.fs_abi.argtypes = []
    if lib.fs_abi() != _ABI:
        return None
    lib.fs_init.restype = None
    lib.fs_init.argtypes = []
    lib.fs_init()  # at import (under the import lock): the key tables, before any thread decodes
    lib.fs_decode.restype = ctypes.POINTER(_Out)
    lib.fs_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.fs_free.restype = None
    lib.fs_free.argtypes = [ctypes.POINTER(_Out)]
    return lib


_LIB: Any = None if compiled.PURE_PYTHON else _load(library_path())


def available() -> bool:
    """True when the compiled fast path is loaded (and not turned off by STACKLENS_PURE_PYTHON=1)."""
    return _LIB is not None


def decode(body: bytes) -> IngestBatch | None:
    """The request rows of a serialized ExportTraceServiceRequest, or None where the fast path does not
    apply (not built, turned off, or a message it declines): then use the reference path."""
    lib = _LIB
    if lib is None:
        return None
    return compiled.run(lib.fs_decode, lib.fs_free, body, _batch)


def _batch(o: _Out) -> IngestBatch:
    """The C's rows as one table in the store's form (``StoredRequests``), imported without a copy: Arrow
    frees the C's buffers when the table goes."""
    batch = IngestBatch()
    batch.ignored = int(o.ignored)
    if int(o.n) == 0:
        return batch
    rows = pa.RecordBatch._import_from_c(ctypes.addressof(o.arrow), STORED_REQUEST_SCHEMA)
    batch.requests = StoredRequests(pa.Table.from_batches([rows]))
    return batch
