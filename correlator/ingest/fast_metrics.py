"""The compiled fast path of metric decoding: a serialized ``ExportMetricsServiceRequest`` → GPU samples,
host samples, placements and GPU identity rows, exactly as :func:`correlator.ingest.otlp_metrics.decode_metrics`
makes them, without building the protobuf message or a dict per point.

``_fastmetrics.c`` (compiled at install time, loaded here with ctypes) reads the wire format and applies
decode_metrics' rules for the agent's own metrics (``stacklens.*`` gauges and sums) and for dcgm-exporter's
series as an OpenTelemetry Collector forwards them (``DCGM_FI_*``, in any case); which names it may meet
and what becomes of their points it learns here, once, from the same catalog and rules (:func:`name_actions`).
This module turns its column buffers into one Arrow table per table (``ArrowRows``: strings as dictionary
arrays, so the store maps names to ids once per distinct name; whoever reads ``data`` gets the same lists as
decode_metrics'). Whatever the C does not handle exactly (serving-engine and hw.* names, histograms,
malformed or unusual wire data, a value that needs Python to convert) it declines, and :func:`decode` returns
None: the caller then takes the reference path (upb parse + decode_metrics) with the same bytes, which also
gives the same error for a bad body.

``STACKLENS_PURE_PYTHON=1`` turns the fast path off (the library is not loaded).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from collector.signals import resolve_engine, source_names
from correlator.ingest import compiled
from correlator.ingest.batch import (
    GPU_COLUMNS,
    GPU_INFO_COLUMNS,
    HOST_COLUMNS,
    PLACEMENT_COLUMNS,
    ArrowRows,
    IngestBatch,
)
from correlator.ingest.otlp_metrics import _OTEL_HW, _SKIPPED, _SUB_LABEL, _resolve_cached

_ABI = 3  # _fastmetrics.c's FM_ABI: the struct's layout and the functions
# the C file's tables (T_*) and their columns' kinds (KINDS): i int64, f float64, s string
TABLES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("gpu_samples", GPU_COLUMNS, "ississf"),
    ("host_samples", HOST_COLUMNS, "isssf"),
    ("placements", PLACEMENT_COLUMNS, "ississsssf"),
    ("gpu_info", GPU_INFO_COLUMNS, "ississs"),
)
_NT, _NC = 4, 10
_I64_NONE = -(2**63)
# fm_add_name's actions and labels (A_*, L_*)
A_GPU, A_HOST, A_PROCESS, A_INFO, A_SKIP, A_DECLINE, A_DCGM = 1, 2, 3, 4, 5, 6, 7
_LABELS = {None: 0, "link": 1, "reason": 2, "xid": 3}
_DECLINED = (A_DECLINE, 0, "", 1.0)  # name_actions' entry for a name the C leaves to the reference path
_INT32_TYPES = frozenset({"gpu_index", "pid"})


class _Out(ctypes.Structure):
    """The public head of the C struct fm_out."""

    _fields_ = [("status", ctypes.c_int64), ("ignored", ctypes.c_int64), ("n", ctypes.c_int64 * _NT),
                ("cap", ctypes.c_int64 * _NT), ("col", ctypes.c_void_p * (_NT * _NC)),
                ("blob", compiled.Blob * (_NT * _NC))]


def name_actions() -> dict[str, tuple[int, int, str, float]]:
    """What add_points does with the points of each name it may meet, as (action, label, signal stored, factor
    to the catalog's unit): the table the C decodes by. A name left out is one nobody knows (its points are
    counted as ignored). The C reads a DCGM name in another case in upper case, as ``_resolve_cached`` does."""
    out: dict[str, tuple[int, int, str, float]] = {}
    for name in sorted(source_names() | {"stacklens.gpu_info"}):
        if name == "stacklens.gpu_info":
            out[name] = (A_INFO, 0, "", 1.0)
            continue
        if resolve_engine(name) is not None or name in _OTEL_HW:
            out[name] = _DECLINED  # engine rows; hw.* resolved by the points' attributes
            continue
        r = _resolve_cached(name)
        if r is None:
            continue
        sig = r.signal
        label = _SUB_LABEL.get(sig.scope) or ("xid" if sig.name == "xid_events_total" else None)
        if r.source not in ("stacklens", "dcgm") or (r.source == "stacklens" and r.factor != 1.0):
            out[name] = _DECLINED
        elif sig.name in _SKIPPED:
            out[name] = (A_SKIP, 0, sig.name, 1.0)
        elif r.source == "dcgm":  # a GPU sample scaled, and what its labels say (identity, pod)
            gpu_sample = sig.scope not in ("host", "cgroup", "gpu_process") and label in _LABELS
            out[name] = (A_DCGM, _LABELS[label], sig.name, r.factor) if gpu_sample else _DECLINED
        elif sig.scope in ("host", "cgroup"):
            out[name] = (A_HOST, 0, sig.name, 1.0)
        elif sig.scope == "gpu_process":
            out[name] = (A_PROCESS, 0, sig.name, 1.0)
        else:
            out[name] = (A_GPU, _LABELS[label], sig.name, 1.0) if label in _LABELS else _DECLINED
    return out


def library_path() -> Path | None:
    """Where the compiled library is (next to this file, as setup.py builds it), or None."""
    return compiled.library_path("_fastmetrics")


def _bind(lib: Any) -> Any:
    lib.fm_abi.restype = ctypes.c_int
    lib.fm_abi.argtypes = []
    if lib.fm_abi() != _ABI:
        return None
    lib.fm_init.restype = ctypes.c_int
    lib.fm_init.argtypes = []
    lib.fm_add_name.restype = ctypes.c_int
    lib.fm_add_name.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                ctypes.c_size_t, ctypes.c_double]
    lib.fm_decode.restype = ctypes.POINTER(_Out)
    lib.fm_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.fm_free.restype = None
    lib.fm_free.argtypes = [ctypes.POINTER(_Out)]
    # at import (under the import lock), before any thread decodes: the key tables and the names
    if not lib.fm_init():
        return None
    for name, (action, label, signal, factor) in name_actions().items():
        n, s = name.encode(), signal.encode()
        if not lib.fm_add_name(n, len(n), action, label, s, len(s), factor):
            return None
    return lib


def _load(path: Path | None) -> Any:
    """The library, or None: not built, or not the one this file was written for (a stale build)."""
    return compiled.load(path, _bind)


_LIB: Any = None if compiled.PURE_PYTHON else _load(library_path())


def available() -> bool:
    """True when the compiled fast path is loaded (and not turned off by STACKLENS_PURE_PYTHON=1)."""
    return _LIB is not None


def decode(body: bytes) -> IngestBatch | None:
    """The rows of a serialized ExportMetricsServiceRequest, or None where the fast path does not apply
    (not built, turned off, or a message it declines): then use the reference path."""
    lib = _LIB
    if lib is None:
        return None
    return compiled.run(lib.fm_decode, lib.fm_free, body, _batch)


def _column(o: _Out, t: int, c: int, kind: str, name: str, n: int) -> pa.Array:
    k = t * _NC + c
    if kind == "i":
        a = np.array(compiled.array(o.col[k], ctypes.c_int64, np.int64, n))  # a copy: the C frees its own
        if name not in _INT32_TYPES:
            return pa.array(a, pa.int64())  # time_ns: never None
        missing = a == _I64_NONE
        return pa.array(np.where(missing, 0, a).astype(np.int32), pa.int32(), mask=missing if missing.any() else None)
    if kind == "f":
        a = np.array(compiled.array(o.col[k], ctypes.c_double, np.float64, n))
        missing = np.isnan(a)  # None: _value never gives NaN
        return pa.array(a, pa.float64(), mask=missing if missing.any() else None)
    idx = np.array(compiled.array(o.col[k], ctypes.c_int32, np.int32, n))
    missing = idx < 0
    values = pa.array(compiled.entries(o.blob[k]), pa.string())
    indices = pa.array(idx, pa.int32(), mask=missing if missing.any() else None)
    return pa.DictionaryArray.from_arrays(indices, values)


def _batch(o: _Out) -> IngestBatch:
    batch = IngestBatch()
    batch.ignored = int(o.ignored)
    for t, (table, columns, kinds) in enumerate(TABLES):
        n = int(o.n[t])
        if n:
            cols = {name: _column(o, t, c, kind, name, n) for c, (name, kind) in enumerate(zip(columns, kinds,
                                                                                               strict=True))}
            setattr(batch, table, ArrowRows(columns, pa.table(cols)))
    return batch
