"""The sampler's compiled field decoder (``_fastfields.c``: plain C built by setup.py next to this module,
loaded with ctypes) and how a request's rows are handed to it.

One call per GPU and cycle decodes every row of the batched field read that the Python loops of
:mod:`collector.nvml.source` would: gauges scaled, counter rates with CounterRates' wrap and reset rules,
each GPU's NVLink totals from its links' counters, NVML's own timestamps. The counters' previous reads are
kept per GPU in a C slot array; a counter the C cannot follow exactly (a signed or double counter, a sum
past 2**64, a timestamp out of range) is handed to the Python code for good, its state moved into
:class:`~collector.counters.CounterRates`. On fast cycles ``sl_sample`` also makes every GPU's NVML calls of
the cycle (the batched field read and the three getters, through the function pointers pynvml resolved), in
one ctypes call; the sampler hands their return codes to the access layer as if it had made them itself.

Without the library (not built, not loadable, a stale build, a big-endian machine) or with
``STACKLENS_PURE_PYTHON=1`` nothing is loaded and the sampler decodes in Python."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from collector.native import built_library, load_library, pure_python

ABI = 2

K_GAUGE, K_RATE, K_LINKS, K_PY = 0, 1, 2, 3
ST_VALUE, ST_NONE, ST_RC, ST_PY = 0, 1, 2, 3


class Item(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("pos", ctypes.c_int32), ("n", ctypes.c_int32), ("slot", ctypes.c_int32),
                ("scale", ctypes.c_double)]


class Slot(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("t_ns", ctypes.c_int64), ("has", ctypes.c_int32), ("pad", ctypes.c_int32)]


class Job(ctypes.Structure):
    _fields_ = [("items", ctypes.c_void_p), ("nitems", ctypes.c_int64), ("nrows", ctypes.c_int64),
                ("slots", ctypes.c_void_p), ("nslots", ctypes.c_int64), ("values", ctypes.c_void_p),
                ("times", ctypes.c_void_p), ("status", ctypes.c_void_p),
                # sl_sample: the GPU's fast-tier calls, and their answers
                ("field_fn", ctypes.c_void_p), ("clock_fn", ctypes.c_void_p), ("reasons_fn", ctypes.c_void_p),
                ("util_fn", ctypes.c_void_p), ("handle", ctypes.c_void_p), ("array", ctypes.c_void_p),
                ("rets", ctypes.c_int32 * 4), ("ncalled", ctypes.c_int32), ("state", ctypes.c_int32),
                ("reasons", ctypes.c_uint64), ("sm_clock", ctypes.c_uint32), ("util_gpu", ctypes.c_uint32),
                ("util_mem", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Library(NamedTuple):
    decode: Any  # sl_decode(job address, rows, now_ns) -> 0, or -1 when the plan does not fit the rows
    sample: Any  # sl_sample(array of job addresses, count, now_ns): the fast-tier reads of those GPUs


def library_path() -> Path | None:
    """Where setup.py builds ``_fastfields`` (next to this module), or None."""
    return built_library(Path(__file__).parent, "_fastfields")


def load(path: Path | None = None) -> Library | None:
    """The decoder's functions bound, or None (pure Python): off, not built, not loadable, or stale."""
    if pure_python() or sys.byteorder != "little":
        return None
    return load_library(path or library_path(), _bind)


def _bind(lib: Any) -> Library | None:
    if lib.sl_abi() != ABI:
        return None
    decode, sample = lib.sl_decode, lib.sl_sample
    decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    decode.restype = ctypes.c_int
    sample.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    sample.restype = None
    return Library(decode, sample)


class Slots:
    """One GPU's counter slots: counter key -> slot, and the C array they live in (grown as needed)."""

    def __init__(self, capacity: int = 64) -> None:
        self.index: dict[Hashable, int] = {}
        self.keys: list[Hashable] = []
        self.array: Any = (Slot * capacity)()
        self.jobs: list[DecodeJob] = []

    def slot(self, key: Hashable) -> int:
        s = self.index.get(key)
        if s is None:
            s = self.index[key] = len(self.keys)
            self.keys.append(key)
            if s >= len(self.array):
                bigger = (Slot * (2 * len(self.array)))()
                ctypes.memmove(bigger, self.array, ctypes.sizeof(self.array))
                self.array = bigger
                for job in self.jobs:
                    job.job.slots, job.job.nslots = ctypes.addressof(bigger), len(bigger)
        return s

    def forget(self) -> None:
        """Every counter's previous read dropped (a lost GPU)."""
        ctypes.memset(self.array, 0, ctypes.sizeof(self.array))


class DecodeJob:
    """How one request's rows are decoded on a fast (``medium`` False) or medium cycle: the C plan, its
    output arrays, and per output the signal, labels and what the Python fallback needs."""

    __slots__ = ("_items", "_status", "_times", "_values", "addr", "job", "labels", "meta", "n", "signals",
                 "status_mv", "times_mv", "values_mv", "zeros")

    def __init__(self, slots: Slots, items: Sequence[tuple[int, int, int, Hashable | None, float]],
                 signals: Sequence[str], labels: Sequence[tuple[tuple[str, str], ...]], meta: Sequence[Any],
                 nrows: int) -> None:
        n = self.n = len(items)
        self._items = (Item * max(1, n))()
        for j, (kind, pos, count, key, scale) in enumerate(items):
            it = self._items[j]
            it.kind, it.pos, it.n, it.scale = kind, pos, count, scale
            it.slot = slots.slot(key) if key is not None else -1
        self._values = (ctypes.c_double * max(1, n))()
        self._times = (ctypes.c_int64 * max(1, n))()
        self._status = (ctypes.c_char * max(1, n))()
        self.values_mv = memoryview(self._values).cast("B").cast("d")[:n]
        self.times_mv = memoryview(self._times).cast("B").cast("q")[:n]
        self.status_mv = memoryview(self._status).cast("B")[:n]
        self.zeros = bytes(n)
        self.signals, self.labels, self.meta = tuple(signals), tuple(labels), tuple(meta)
        self.job = Job(ctypes.addressof(self._items), n, nrows, ctypes.addressof(slots.array), len(slots.array),
                       ctypes.addressof(self._values), ctypes.addressof(self._times), ctypes.addressof(self._status))
        self.addr = ctypes.addressof(self.job)  # what sl_decode is given: the job, kept alive by self
        slots.jobs.append(self)
