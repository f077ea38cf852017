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
:class:`Ring` runs the fast cycles between two Python cycles on the library's own thread (see ``_fastfields.c``).

Without the library (not built, not loadable, a stale build, a big-endian machine) or with
``STACKLENS_PURE_PYTHON=1`` nothing is loaded and the sampler decodes in Python."""

from __future__ import annotations

import atexit
import ctypes
import sys
import weakref
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from collector.native import built_library, load_library, pure_python

ABI = 5

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


class Region(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("len", ctypes.c_int64)]


class RingStruct(ctypes.Structure):
    _fields_ = [("jobs", ctypes.c_void_p), ("njobs", ctypes.c_int64), ("regions", ctypes.c_void_p),
                ("nregions", ctypes.c_int64), ("slot_bytes", ctypes.c_int64), ("cap", ctypes.c_int64),
                ("store", ctypes.c_void_p), ("tick_ns", ctypes.c_void_p), ("pcie_rc", ctypes.c_void_p),
                ("pcie_cycle", ctypes.c_void_p), ("pcie_poller", ctypes.c_void_p), ("first_at", ctypes.c_double),
                ("period", ctypes.c_double), ("due", ctypes.c_double), ("ticks", ctypes.c_int64),
                ("kept", ctypes.c_int64), ("missed", ctypes.c_int64), ("armed", ctypes.c_int32),
                ("unusual", ctypes.c_int32), ("early", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("rounds", ctypes.c_int64), ("rt", ctypes.c_void_p)]


class Library(NamedTuple):
    decode: Any  # sl_decode(job address, rows, now_ns) -> 0, or -1 when the plan does not fit the rows
    sample: Any  # sl_sample(array of job addresses, count, now_ns): the fast-tier reads of those GPUs
    ring_init: Any  # sl_ring_init(ring) -> 0, or -1: its thread started, idle
    ring_arm: Any  # sl_ring_arm(ring, first_at, period, ticks) -> 0, or -1
    ring_wait: Any  # sl_ring_wait(ring, limit) -> 1 the round is over, 0 not yet (see Ring.wait)
    ring_restore: Any  # sl_ring_restore(ring, slot) -> 0, or -1
    ring_cut: Any  # sl_ring_cut(ring): no tick after the one being made
    ring_free: Any  # sl_ring_free(ring): the thread joined


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
    init, arm, wait, restore, cut, free = (lib.sl_ring_init, lib.sl_ring_arm, lib.sl_ring_wait, lib.sl_ring_restore,
                                           lib.sl_ring_cut, lib.sl_ring_free)
    for fn, args, res in ((init, [ctypes.c_void_p], ctypes.c_int),
                          (arm, [ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_int64], ctypes.c_int),
                          (wait, [ctypes.c_void_p, ctypes.c_double], ctypes.c_int),
                          (restore, [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
                          (cut, [ctypes.c_void_p], None), (free, [ctypes.c_void_p], None)):
        fn.argtypes, fn.restype = args, res
    return Library(decode, sample, init, arm, wait, restore, cut, free)


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


_live_rings: weakref.WeakSet[Ring] = weakref.WeakSet()


class Ring:
    """The fast cycles between two Python cycles, made by the library's thread (``sl_ring_*`` in ``_fastfields.c``).

    A round is armed with the grid's ticks; at each, the thread makes the cycle's PCIe counter poll (``pcie``: the
    compiled poller's ``pp_cycle`` and its struct, when it has one) and ``sl_sample`` of ``jobs``, and keeps a copy
    of ``regions`` (every memory range the cycle's answers are in). Once the round is over (:meth:`wait`), each kept
    tick's copy is put back with :meth:`restore` and the sampler makes that cycle's readings as if it had just
    sampled. This object owns every array the thread reads and writes (they outlive it: :meth:`close` joins it)."""

    def __init__(self, lib: Library, job_addresses: Any, njobs: int, regions: Sequence[tuple[int, int]],
                 capacity: int, pcie: tuple[int, int] | None = None) -> None:
        self._lib = lib
        self._jobs = job_addresses  # the ctypes array of job addresses sl_sample takes (kept alive here)
        self._regions = (Region * max(1, len(regions)))(*[Region(addr, size) for addr, size in regions])
        self.slot_bytes = sum(size for _, size in regions)
        self.capacity = capacity
        self._store = (ctypes.c_uint8 * max(1, capacity * self.slot_bytes))()
        self._tick_ns = (ctypes.c_int64 * capacity)()
        self._pcie_rc = (ctypes.c_int32 * capacity)()
        r = self.r = RingStruct()
        r.jobs, r.njobs = ctypes.addressof(job_addresses), njobs
        r.regions, r.nregions = ctypes.addressof(self._regions), len(regions)
        r.slot_bytes, r.cap, r.store = self.slot_bytes, capacity, ctypes.addressof(self._store)
        r.tick_ns, r.pcie_rc = ctypes.addressof(self._tick_ns), ctypes.addressof(self._pcie_rc)
        if pcie is not None:
            r.pcie_cycle, r.pcie_poller = pcie
        self._addr = ctypes.addressof(r)
        if lib.ring_init(self._addr) != 0:
            raise OSError("the sampler's thread could not be started")
        self._open = True
        _live_rings.add(self)

    def arm(self, first_at: float, period_s: float, ticks: int) -> bool:
        """A round of ``ticks`` ticks at ``first_at + k * period_s`` (time.monotonic seconds); False if refused."""
        return bool(self._open and self._lib.ring_arm(self._addr, first_at, period_s, ticks) == 0)

    def wait(self, limit: float) -> bool:
        """Wait (the GIL released) until the round is over and the caller's next cycle is due (``first_at + ticks *
        period_s``), or it ended early (a tick only Python can judge, or :meth:`cut`), or until ``limit``
        (time.monotonic): whether it is over. A round that ends as planned wakes nobody before that cycle is due."""
        return bool(self._lib.ring_wait(self._addr, limit))

    def cut(self) -> None:
        """No tick after the one being made (then :meth:`wait`)."""
        if self._open:
            self._lib.ring_cut(self._addr)

    @property
    def kept(self) -> int:
        return int(self.r.kept)

    @property
    def missed(self) -> int:
        return int(self.r.missed)

    @property
    def unusual(self) -> bool:
        return bool(self.r.unusual)

    def tick(self, slot: int) -> tuple[int, int]:
        """Slot ``slot``'s answers put back where the cycle reads them; (its time in ns, the PCIe poll's answer)."""
        if self._lib.ring_restore(self._addr, slot) != 0:
            raise RuntimeError(f"ring slot {slot} cannot be restored (a round under way, or not kept)")
        return int(self._tick_ns[slot]), int(self._pcie_rc[slot])

    def close(self) -> None:
        """The thread joined (after the tick it is taking, if any); idempotent."""
        if self._open:
            self._open = False
            self._lib.ring_free(self._addr)

    def __del__(self) -> None:
        self.close()


@atexit.register
def _close_rings() -> None:
    # a ring nobody closed: its thread must not outlive the arrays and the NVML library it reads
    for ring in list(_live_rings):
        ring.close()
