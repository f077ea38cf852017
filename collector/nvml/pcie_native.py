"""The PCIe counter poller's compiled thread (``_pcie_poller.c``: plain C and POSIX threads built by setup.py next
to this module, loaded with ctypes), for :class:`collector.nvml.pcie.PcieCounterPoller`.

At a 100 ms cadence the poller reads every polled GPU's two byte counters between the agent's cycles, ten times
a second; in Python each of those wake-ups takes the GIL, runs cold bytecode and costs ~0.4 % of a core. The C
thread makes the same reads on the same grid (the schedule functions are the Python schedule's, step for step)
without Python, and the cycle's own poll is one ctypes call that also copies the totals out. What the C cannot
judge (a failed call or field, an odd value type) it leaves untouched for Python, which then takes the poller
over for good: the access layer's verdicts, its own thread.

Without the library (not built, not loadable, a stale build, a big-endian machine) or with
``STACKLENS_PURE_PYTHON=1`` nothing is loaded and the poller is Python's."""

from __future__ import annotations

import atexit
import ctypes
import sys
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from collector.native import built_library, load_library, pure_python

ABI = 1
# what pp_cycle and pp_poll answer
POLLED, UNUSUAL, NOT_POLLED = 0, 1, 2


class Sched(ctypes.Structure):
    _fields_ = [("period", ctypes.c_double), ("interval", ctypes.c_double), ("late_after", ctypes.c_double),
                ("k", ctypes.c_int64), ("previous", ctypes.c_double), ("next_at", ctypes.c_double),
                ("grid", ctypes.c_double), ("anchor", ctypes.c_double), ("last_poll_at", ctypes.c_double),
                ("last_gap", ctypes.c_double), ("has_previous", ctypes.c_int32), ("has_grid", ctypes.c_int32),
                ("has_anchor", ctypes.c_int32), ("has_last", ctypes.c_int32), ("late_polls", ctypes.c_int64)]


class Poller(ctypes.Structure):
    _fields_ = [("sched", Sched), ("field_fn", ctypes.c_void_p), ("ndev", ctypes.c_int64),
                ("nfields", ctypes.c_int64), ("handles", ctypes.c_void_p), ("rows", ctypes.c_void_p),
                ("rets", ctypes.c_void_p), ("last_raw", ctypes.c_void_p), ("total", ctypes.c_void_p),
                ("time_ns", ctypes.c_void_p), ("has", ctypes.c_void_p), ("out_total", ctypes.c_void_p),
                ("out_time", ctypes.c_void_p), ("out_has", ctypes.c_void_p), ("polls", ctypes.c_int64),
                ("cycle_polls", ctypes.c_int64), ("thread_polls", ctypes.c_int64), ("calls", ctypes.c_int64),
                ("unusual", ctypes.c_int32), ("pad", ctypes.c_int32), ("rt", ctypes.c_void_p)]


class Library(NamedTuple):
    begin: Any
    cycle_mark: Any
    wake: Any
    plan: Any
    init: Any
    start: Any
    cycle: Any
    poll: Any
    stop: Any
    free: Any


def library_path() -> Path | None:
    return built_library(Path(__file__).parent, "_pcie_poller")


_loaded: list[Library | None] = []


def load() -> Library | None:
    """The poller's functions bound (loaded once), or None: off, not built, not loadable, or stale."""
    if pure_python() or sys.byteorder != "little":
        return None
    if not _loaded:
        _loaded.append(load_library(library_path(), _bind))
    return _loaded[0]


def _bind(lib: Any) -> Library | None:
    if lib.pp_abi() != ABI:
        return None
    fns = Library(lib.pp_begin, lib.pp_cycle_mark, lib.pp_wake, lib.pp_plan, lib.pp_init, lib.pp_start,
                  lib.pp_cycle, lib.pp_poll, lib.pp_stop, lib.pp_free)
    for fn in (fns.begin, fns.cycle_mark, fns.wake, fns.plan):
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_double], None
    for fn in (fns.init, fns.start, fns.cycle, fns.poll):
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    for fn in (fns.stop, fns.free):
        fn.argtypes, fn.restype = [ctypes.c_void_p], None
    return fns


class NativeSchedule:
    """The C schedule functions on a ``pp_sched``: its own (the tests run the Python schedule's simulations on it) or
    a native poller's (whose thread follows it). The interface of ``pcie._PythonSchedule``."""

    def __init__(self, lib: Library, period_s: float, per_cycle: int, late_after_s: float,
                 sched: Sched | None = None) -> None:
        self._lib = lib
        self.s = sched if sched is not None else Sched()
        self.s.period, self.s.k, self.s.late_after = period_s, per_cycle, late_after_s
        self.s.interval = per_cycle * period_s
        self._addr = ctypes.addressof(self.s)

    period = property(lambda self: self.s.period)
    next_at = property(lambda self: self.s.next_at)
    late_polls = property(lambda self: self.s.late_polls)
    last_gap = property(lambda self: self.s.last_gap)
    last_poll_at = property(lambda self: self.s.last_poll_at if self.s.has_last else None)
    anchor = property(lambda self: self.s.anchor if self.s.has_anchor else None)

    def _late(self, fn: Any, now: float) -> bool:
        before = self.s.late_polls
        fn(self._addr, now)
        return bool(self.s.late_polls != before)

    def started(self, now: float) -> None:
        self.s.last_poll_at, self.s.has_last = now, 1

    def begin(self, now: float) -> None:
        self._lib.begin(self._addr, now)

    def cycle_mark(self, now: float) -> bool:
        return self._late(self._lib.cycle_mark, now)

    def wake(self, now: float) -> bool:
        return self._late(self._lib.wake, now)

    def plan(self, now: float) -> None:
        self._lib.plan(self._addr, now)


_live: weakref.WeakSet[NativePoll] = weakref.WeakSet()


class NativePoll:
    """One compiled poller: its C struct and every array it reads and writes (owned here, so they outlive its
    thread: :meth:`close` joins the thread before they can go), and its thread."""

    def __init__(self, lib: Library, field_fn: int, handles: Sequence[int], rows: Any, nfields: int,
                 period_s: float, per_cycle: int, late_after_s: float) -> None:
        self._lib = lib
        ndev = len(handles)
        n = ndev * nfields
        self.rows = rows  # the MultiFieldReader's shared array: each device's rows in its slice
        self._handles = (ctypes.c_void_p * ndev)(*handles)
        self.rets = (ctypes.c_int32 * ndev)()
        self._last_raw, self._total = (ctypes.c_uint64 * n)(), (ctypes.c_uint64 * n)()
        self._time, self._has = (ctypes.c_int64 * n)(), (ctypes.c_uint8 * n)()
        self._out_total, self._out_time, self._out_has = (ctypes.c_uint64 * n)(), (ctypes.c_int64 * n)(), (
            ctypes.c_uint8 * n)()
        p = self.p = Poller()
        p.field_fn, p.ndev, p.nfields = field_fn, ndev, nfields
        p.handles, p.rows, p.rets = ctypes.addressof(self._handles), ctypes.addressof(rows), ctypes.addressof(
            self.rets)
        p.last_raw, p.total = ctypes.addressof(self._last_raw), ctypes.addressof(self._total)
        p.time_ns, p.has = ctypes.addressof(self._time), ctypes.addressof(self._has)
        p.out_total, p.out_time = ctypes.addressof(self._out_total), ctypes.addressof(self._out_time)
        p.out_has = ctypes.addressof(self._out_has)
        self.schedule = NativeSchedule(lib, period_s, per_cycle, late_after_s, sched=p.sched)
        self._addr = ctypes.addressof(p)
        self.out_total = memoryview(self._out_total).cast("B").cast("Q")
        self.out_time = memoryview(self._out_time).cast("B").cast("q")
        self.out_has = memoryview(self._out_has).cast("B")
        if lib.init(self._addr) != 0:
            raise OSError("the PCIe poller's lock could not be made")
        self._open = True
        _live.add(self)

    def cycle_target(self) -> tuple[int, int]:
        """(address of ``pp_cycle``, address of this poller's struct): the cycle's poll as another C thread makes it
        (the sampler's ring, see compiled.Ring)."""
        fn = ctypes.cast(self._lib.cycle, ctypes.c_void_p).value
        assert fn is not None
        return fn, self._addr

    def out_regions(self) -> list[tuple[int, int]]:
        """(address, size) of the arrays a poll copies the totals into (what the cycle reads, through the copy)."""
        return [(ctypes.addressof(a), ctypes.sizeof(a)) for a in (self._out_total, self._out_time, self._out_has)]

    def start(self) -> int:
        """Start-up's poll, then the thread: POLLED, UNUSUAL (no thread), or -1 (the poll was fine, no thread)."""
        return int(self._lib.start(self._addr))

    def cycle(self) -> int:
        return int(self._lib.cycle(self._addr))

    def poll(self) -> int:
        return int(self._lib.poll(self._addr))

    def state(self) -> list[tuple[int, int, int] | None]:
        """Per counter: (last raw value, 64-bit total, NVML time in ns), None before its first read; the thread
        stopped first (a live thread could move it under the read)."""
        self._lib.stop(self._addr)
        return [(self._last_raw[j], self._total[j], self._time[j]) if self._has[j] else None
                for j in range(len(self._has))]

    def stop(self) -> None:
        if self._open:
            self._lib.stop(self._addr)

    def close(self) -> None:
        """The thread joined, the lock freed; idempotent."""
        if self._open:
            self._open = False
            self._lib.free(self._addr)

    def __del__(self) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    # a poller nobody stopped: its thread must not outlive the arrays and the NVML library it reads
    for poll in list(_live):
        poll.close()
