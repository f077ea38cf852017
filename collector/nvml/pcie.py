"""PCIe byte counters that cannot alias.

NVML's PCIe TX/RX byte counters (fields 197 and 198) are 32-bit on the H100: they wrap every 4.3 GB,
which a gen5 x16 link moves in about 68 ms. Read once a second, the counter wraps many times between
reads and the rate is unknowable. When the agent's interval is longer than the wrap-safe period of a
GPU's link, :class:`PcieCounterPoller` reads the two counters ``k = ceil(interval / wrap-safe period)``
times an interval, evenly spaced (one batched NVML call per GPU, ~0.1-0.2 ms on an H100; every GPU's rows
land in one shared array, checked and unpacked at once), unwraps them into 64-bit totals and hands the
sampler the latest totals with NVML's timestamps; rates are then exact at any agent cadence. The agent's
cycle does one of the k polls itself (it is awake anyway: :meth:`PcieCounterPoller.cycle_poll`), a thread
of the poller the k-1 between two cycles (at 100 ms: one at mid-cycle, 10 wake-ups a second instead of 20);
when the cycle does not poll (or misses its turn) the thread polls on a fixed grid of its own. A poll that
comes later than the counter's wrap time at the link's maximum rate is logged and counted. Where built, the
thread and the polls are C's (:mod:`collector.nvml.pcie_native`), with this module's schedule and arithmetic.
"""

from __future__ import annotations

import ctypes
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from collector.nvml import pcie_native
from collector.nvml.access import FIELD_ROW, MultiFieldReader, NvmlAccess, decode_value
from collector.nvml.fields import PCIE_BYTE_FIELDS

log = logging.getLogger(__name__)

# Usable bytes per second per lane and direction, by PCIe generation (after line encoding).
_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
_WRAP = 1 << 32
_Row = tuple[int, int, int, int, int, int, int]  # FIELD_ROW: field, scope, time us, latency, type, return code, bits


def link_bytes_per_s(gen: int | None, width: int | None) -> float:
    """Maximum bytes/s one direction of a PCIe link carries; unknown gen or width: assume gen5 x16."""
    return _LANE_BYTES_PER_S.get(gen or 5, _LANE_BYTES_PER_S[5]) * (width or 16)


# the wrap-safe period is this share of the time the counter takes to wrap at the link's maximum rate. 81 %
# (it was 80 %) so that gen5 x16 (62 ms to wrap) is polled every 50 ms, twice per 100 ms cycle: the cycle's own
# poll and one at mid-cycle. Real traffic on an H100 peaked at about half the line rate (>= 130 ms to wrap).
_MARGIN = 0.81


def wrap_time_s(gen: int | None, width: int | None) -> float:
    """The time a 32-bit byte counter takes to wrap at the link's maximum rate (counters include protocol
    headers: allow 10 % more than the payload rate)."""
    return _WRAP / (link_bytes_per_s(gen, width) * 1.1)


def wrap_safe_period_s(gen: int | None, width: int | None, margin: float = _MARGIN) -> float:
    """How often a 32-bit byte counter must be read so it cannot wrap twice between reads, with a
    margin for scheduling delay."""
    return margin * wrap_time_s(gen, width)


def poll_plan(interval_s: float, safe_period_s: float) -> tuple[int, float]:
    """(k, period): ``k = ceil(interval / safe period)`` polls per agent interval, ``period = interval / k``
    apart; the cycle does one of them, the poller's thread the k-1 between (k == 1: the cycle's own read is
    often enough, no poller needed)."""
    k = max(1, math.ceil(interval_s / safe_period_s - 1e-9))
    return k, interval_s / k


@dataclass(slots=True)
class _Unwrapped:
    last_raw: int
    total: int
    time_ns: int


class _PythonSchedule:
    """When the poller's thread polls (times in seconds of ``time.monotonic``): a fixed grid of ``period``, and with
    ``per_cycle`` = k > 1 the cycle's grid, the thread taking the k-1 turns between the cycle's polls. The compiled
    thread follows the same steps (``_pcie_poller.c``, :class:`~collector.nvml.pcie_native.NativeSchedule`).

    The thread calls :meth:`begin` once, then for each poll :meth:`wake` (before it) and :meth:`plan` (after it);
    the cycle calls :meth:`cycle_mark` for its own. ``wake`` and ``cycle_mark`` say whether the poll was late:
    longer after the one before than ``late_after`` (the counter's wrap time at the link's maximum rate)."""

    def __init__(self, period_s: float, per_cycle: int, late_after_s: float) -> None:
        self.period, self.k, self.late_after = period_s, per_cycle, late_after_s
        self.interval = per_cycle * period_s
        self.previous = self.next_at = 0.0
        self.grid: float | None = None  # the time of one of the cycle's turns
        self.anchor: float | None = None  # the cycle's latest poll
        self.last_poll_at: float | None = None  # the latest poll, the cycle's or the thread's
        self.late_polls = 0
        self.last_gap = 0.0

    def _note_gap(self, now: float, previous: float | None) -> bool:
        if previous is None or now - previous <= self.late_after:
            return False
        self.late_polls += 1
        self.last_gap = now - previous
        return True

    def started(self, now: float) -> None:
        """Start-up's poll (before the thread starts)."""
        self.last_poll_at = now

    def begin(self, now: float) -> None:
        """The thread starts: its grid from the latest poll (start-up's, or a cycle's since), else from now."""
        self.previous = self.last_poll_at if self.last_poll_at is not None else now
        self.next_at = self.previous + self.period
        self.grid = None

    def cycle_mark(self, now: float) -> bool:
        late = self._note_gap(now, self.last_poll_at)
        self.anchor = self.last_poll_at = now
        return late

    def wake(self, now: float) -> bool:
        last = self.last_poll_at  # the cycle's poll, when it came after this thread's
        late = self._note_gap(now, last if last is not None and last > self.previous else self.previous)
        if now - self.next_at > self.period:  # more than a period behind: the grid starts again from here
            self.next_at = now
        self.last_poll_at = self.previous = now
        return late

    def plan(self, now: float) -> None:
        """The thread's next turn after its poll at ``now``. When the cycle polls (k > 1) the grid is the cycle's
        (its earliest phase seen: a cycle is late, never early) and the thread's turns are the k-1 between two of
        the cycle's: it sleeps through the cycle's turns. A cycle that misses its turn (late by more than a period,
        or not cycling any more) leaves the thread taking every turn until the cycle polls again."""
        period, k, anchor = self.period, self.k, self.anchor if self.k > 1 else None
        if anchor is None:  # nobody's cycle polls: every turn is the thread's
            self.next_at += period
            return
        interval = self.interval
        if self.grid is None or (anchor - self.grid) % interval > period / 2:
            self.grid = anchor  # earlier than the grid, or a new phase altogether
        grid = self.grid
        latest_turn = grid + math.floor((now - grid) / interval) * interval
        missed = anchor < latest_turn - period / 2  # the cycle did not poll at its latest turn
        turn = math.floor((now - grid) / period + 0.1) + 1  # the turn after the one just taken
        if turn % k == 0 and not missed:
            turn += 1  # the cycle's
        self.next_at = grid + turn * period


class PcieCounterPoller:
    """Reads fields 197/198 of some GPUs every ``period_s`` and keeps 64-bit totals. With ``per_cycle`` = k > 1
    the agent's cycle, every k periods, polls through :meth:`cycle_poll` and the thread polls the k-1 times
    between; polls are serialised (a lock), whoever makes them.

    With k > 1, the real clock and the compiled poller built (``pcie_native``), the thread and the polls are C's:
    the same schedule, the same arithmetic, no Python between the cycles. The first poll C cannot judge hands
    the poller to Python for good (:meth:`_take_over`)."""

    def __init__(self, access: NvmlAccess, devices: list[tuple[int, Any]], period_s: float,
                 monotonic: Callable[[], float] = time.monotonic, per_cycle: int = 1,
                 late_after_s: float | None = None, native: bool = True) -> None:
        self._access = access
        self._devices = devices
        self.period_s = period_s
        self._monotonic = monotonic
        self.per_cycle = per_cycle
        self._sched: Any = _PythonSchedule(period_s, per_cycle, late_after_s or period_s / _MARGIN)
        self._state: dict[tuple[int, int], _Unwrapped] = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # the cycle's and the thread's polls share the reader's array
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stacklens-pcie-counters", daemon=True)
        self._polls = 0
        self._cycle_polls = 0  # the polls made by the agent's cycle
        self._late_logged = False
        request = tuple((fid, 0) for fid in PCIE_BYTE_FIELDS)
        # every GPU's two counters in one array, checked and unpacked at once (~20 polls a second)
        self._reader = MultiFieldReader(access, devices, request)
        self._keys = [(index, fid) for index, _ in devices for fid, _ in request]
        # per row: NVML time (us), value type, raw value (FIELD_ROW without field, scope, latency, return code)
        self._unpack = struct.Struct("<" + "8xq8xI4xQ" * len(self._keys)).unpack_from
        self._fields_of = {index: tuple((fid, (index, fid)) for fid, _ in request) for index, _ in devices}
        # the compiled poller, its counters' positions per GPU, and the copy of its totals made by the latest poll
        self._native: pcie_native.NativePoll | None = None
        self._native_fields = {index: tuple((fid, self._keys.index((index, fid))) for fid, _ in request)
                               for index, _ in devices}
        self._copy: tuple[list[int], list[int], bytes] = ([], [], b"")
        self._calls_seen = 0
        self._verdicts = access.verdict_counts()
        if native and per_cycle > 1 and monotonic is time.monotonic:
            self._native = self._make_native(len(request))
            if self._native is not None:
                self._sched = self._native.schedule  # the C thread's, read through the same interface

    def _make_native(self, nfields: int) -> pcie_native.NativePoll | None:
        lib = pcie_native.load()
        field_fn = self._access.field_values_address(resolve=True)
        if lib is None or field_fn is None:
            return None
        rows = self._reader.shared_array()
        handles = [ctypes.cast(h, ctypes.c_void_p).value for _, h in self._devices]
        if rows is None or None in handles:
            return None
        sched = self._sched
        try:
            return pcie_native.NativePoll(lib, field_fn, [h or 0 for h in handles], rows, nfields, sched.period,
                                          sched.k, sched.late_after)
        except OSError:
            return None

    # -- counters (the compiled poller's while it runs) -----------------------------------------------------
    @property
    def polls(self) -> int:
        return self._polls + (self._native.p.polls if self._native is not None else 0)

    @property
    def cycle_polls(self) -> int:
        return self._cycle_polls + (self._native.p.cycle_polls if self._native is not None else 0)

    @property
    def late_polls(self) -> int:
        """Polls that came after more than the wrap time at the maximum rate."""
        return int(self._sched.late_polls)

    @property
    def native(self) -> bool:
        """Whether the compiled poller polls (it hands over to Python at the first poll it cannot judge)."""
        return self._native is not None

    def start(self) -> None:
        nat = self._native
        if nat is not None:
            # start-up's poll unusual (judged in the hand-over), or no thread: Python's thread from here
            self._native_polled(nat.start())
            return
        self._sched.started(self._monotonic())
        self.poll_once()
        self._thread.start()

    def cycle_poll(self) -> None:
        """The cycle's poll, one of the k per interval: the thread polls the k-1 between this one and the next."""
        nat = self._native_unless_judged()
        if nat is not None:
            self.cycle_answered(nat.cycle())
            return
        if self._sched.cycle_mark(self._monotonic()):
            self._log_late()
        self._cycle_polls += 1
        self.poll_once()

    def ring_target(self) -> tuple[tuple[int, int], list[tuple[int, int]]] | None:
        """For the sampler's ring (compiled.Ring), which makes the cycle's poll at the ticks between two Python cycles:
        the compiled poller's cycle poll (function and struct addresses) and the memory its totals are copied into;
        None when Python polls (then the cycles stay Python's)."""
        nat = self._native_unless_judged()
        if nat is None:
            return None
        return nat.cycle_target(), nat.out_regions()

    def _native_unless_judged(self) -> pcie_native.NativePoll | None:
        """The compiled poller before a cycle's poll (its own, or the ring's ticks); None when Python polls: also
        when the access layer's verdicts changed about the polled GPUs or their counters since, and Python takes it
        over now."""
        nat = self._native
        if nat is not None and self._access.verdict_counts() != self._verdicts and self._verdicts_touch_us():
            self._take_over()
            return None
        return nat

    def cycle_answered(self, rc: int) -> None:
        """What the compiled poller's cycle poll answered (pp_cycle: the cycle's, or the ring's at a tick, its totals
        then put back where the poll copied them); when it did not poll, Python makes the cycle's own poll (its time
        already marked)."""
        if not self._native_polled(rc) and rc == pcie_native.NOT_POLLED:
            self.poll_once()

    def _verdicts_touch_us(self) -> bool:
        """Whether the access layer's verdicts changed about the polled GPUs or their counters (a GPU lost by the
        sampler's reads, say): then Python's reader decides how to read them."""
        a = self._access
        self._verdicts = a.verdict_counts()
        return any(a.is_lost(index) or any(a.is_unsupported("field", index, (fid, 0)) for fid, _ in fields)
                   for index, fields in self._fields_of.items())

    def _native_polled(self, rc: int) -> bool:
        """What a call into the compiled poller answered: True when it polled; else the poller is handed to Python
        (the unusual poll, this call's or the thread's before it, judged) and False."""
        self._after_native()
        if rc == pcie_native.POLLED:
            return True
        self._take_over()
        return False

    def _after_native(self) -> None:
        """After a call into the compiled poller: its NVML calls counted as the access layer's, the first late poll
        logged, the totals' copy taken."""
        nat = self._native
        assert nat is not None
        p = nat.p
        if p.calls != self._calls_seen:
            self._access.calls += p.calls - self._calls_seen
            self._calls_seen = p.calls
        if p.sched.late_polls and not self._late_logged:  # (C counts them; the log is Python's)
            self._log_late()
        self._copy = (nat.out_total.tolist(), nat.out_time.tolist(), nat.out_has.tobytes())

    def _log_late(self) -> None:
        if self._late_logged:
            return
        self._late_logged = True
        log.warning("PCIe counter poll came %.0f ms after the previous one (wrap-safe period %.0f ms): "
                    "a byte counter at line rate may have wrapped unseen (logged once)",
                    self._sched.last_gap * 1e3, self.period_s * 1e3)

    def _take_over(self) -> None:
        """The compiled poller handed to Python for good: its thread stopped, its totals, schedule and counts
        moved here, the poll it could not judge (if any) judged by the access layer and unwrapped as
        :meth:`poll_once` would have, and Python's thread started in its place."""
        nat = self._native
        assert nat is not None
        state = nat.state()  # stops the thread
        p = nat.p
        with self._lock:
            for key, st in zip(self._keys, state, strict=True):
                if st is not None:
                    self._state[key] = _Unwrapped(*st)
        native_sched = nat.schedule
        sched = _PythonSchedule(self.period_s, self.per_cycle, native_sched.s.late_after)
        sched.last_poll_at, sched.anchor = native_sched.last_poll_at, native_sched.anchor
        sched.late_polls, sched.last_gap = native_sched.late_polls, native_sched.last_gap
        self._polls += p.polls
        self._cycle_polls += p.cycle_polls
        pending = bool(p.unusual)
        self._native, self._sched = None, sched
        if pending:  # the rows and return codes C kept: judged and unwrapped as a Python poll of them
            with self._poll_lock:
                answers = self._reader.answers(list(nat.rets))
                self._unwrap([(index, wanted, FIELD_ROW.iter_unpack(buf)) for index, wanted, buf in answers])
                self._polls += 1
        nat.close()
        log.info("PCIe counters polled by Python from now on (%s)", "an answer to judge" if pending else "verdicts")
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    @property
    def latest(self) -> dict[int, tuple[tuple[int, int, int], ...]]:
        """Per GPU: ((field id, 64-bit total bytes, NVML time in ns), ...) as of the latest poll."""
        return {index: view for index in self._fields_of if (view := self.view(index)) is not None}

    def view(self, index: int) -> tuple[tuple[int, int, int], ...] | None:
        """One GPU's ((field id, 64-bit total bytes, NVML time in ns), ...) as of the latest poll (the compiled
        poller's: the latest the cycle, start-up or :meth:`poll_once` made); None before it was read."""
        if self._native is not None:
            positions = self._native_fields.get(index)
            if positions is None:
                return None
            totals, times, has = self._copy
            return tuple((fid, totals[j], times[j]) for fid, j in positions if has[j]) or None
        fields = self._fields_of.get(index)
        if fields is None:
            return None
        with self._lock:
            state = self._state
            out = tuple((fid, st.total, st.time_ns) for fid, key in fields if (st := state.get(key)) is not None)
        return out or None

    def poll_once(self) -> None:
        nat = self._native
        if nat is not None:
            rc = nat.poll()
            if self._native_polled(rc) or rc == pcie_native.UNUSUAL:  # polled, or this poll judged in the hand-over
                return
        with self._poll_lock:  # the cycle's poll and the thread's (normally a period apart) share the array
            result = self._reader.read()
            if result is None:
                self._unwrap_all(self._unpack(self._reader.array))
            else:
                self._unwrap([(index, wanted, FIELD_ROW.iter_unpack(buf)) for index, wanted, buf in result])
            self._polls += 1

    def _unwrap_all(self, values: tuple[int, ...]) -> None:
        """Every GPU answered both counters: (time, type, bits) per counter in the order of _keys."""
        it = iter(values)
        with self._lock:
            state = self._state
            for key, ts_us, vtype, bits in zip(self._keys, it, it, it, strict=True):
                raw = bits & 0xFFFFFFFF if vtype == 1 else int(decode_value(vtype, bits))
                st = state.get(key)
                if st is None:
                    state[key] = _Unwrapped(raw, raw, ts_us * 1000 if ts_us > 0 else 0)
                    continue
                last = st.last_raw
                st.total += raw - last if raw >= last else raw + _WRAP - last
                st.last_raw, st.time_ns = raw, ts_us * 1000 if ts_us > 0 else 0

    def _unwrap(self, polled: list[tuple[int, tuple[tuple[int, int], ...], Iterable[_Row]]]) -> None:
        """The general way, GPU by GPU: a counter that failed this time keeps its last total (its rate is
        then missing: same time as before); one NVML no longer asked for (NOT_SUPPORTED) is dropped."""
        with self._lock:
            state = self._state
            for index, wanted, rows in polled:
                for fid, _scope, ts_us, _latency, vtype, rc, bits in rows:
                    if rc == 0:
                        _advance(state, (index, fid), vtype, bits, ts_us)
                if wanted:  # NVML answered: what it was not asked for any more is absent from now on
                    for fid, key in self._fields_of[index]:
                        if (fid, 0) not in wanted:
                            state.pop(key, None)

    def _run(self) -> None:
        # On a fixed grid (see _PythonSchedule), not period_s after each poll ends: the time a poll takes and the
        # wake-up delay must not stretch the interval between reads. time.sleep, not Event.wait: a lock wait with
        # a timeout costs CPython several times the CPU of a sleep; stopping waits at most one period.
        sched, monotonic = self._sched, self._monotonic
        sched.begin(monotonic())
        while not self._stop.is_set():
            delay = sched.next_at - monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._stop.is_set():
                return
            now = monotonic()
            if sched.wake(now):
                self._log_late()
            try:
                self.poll_once()
            except Exception:  # the poller must never die silently and take the rates with it
                log.exception("PCIe counter poll failed; continuing")
            sched.plan(now)

    def totals(self, index: int) -> dict[int, tuple[int, int]]:
        """field id -> (64-bit total bytes, NVML time) for one GPU."""
        return {fid: (total, t) for fid, total, t in self.view(index) or ()}

    def stop(self) -> None:
        self._stop.set()
        if self._native is not None:
            self._native.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)


def _advance(state: dict[tuple[int, int], _Unwrapped], key: tuple[int, int], vtype: int, bits: int,
             ts_us: int) -> _Unwrapped:
    """One successful read of a counter: its 64-bit total advanced by the delta since the last read, which
    wrapped once when the raw value went down (the poll period makes twice impossible)."""
    raw = bits & 0xFFFFFFFF if vtype == 1 else int(decode_value(vtype, bits))
    time_ns = ts_us * 1000 if ts_us > 0 else 0
    st = state.get(key)
    if st is None:
        st = state[key] = _Unwrapped(raw, raw, time_ns)
    else:
        last = st.last_raw
        st.total += raw - last if raw >= last else raw + _WRAP - last
        st.last_raw, st.time_ns = raw, time_ns
    return st
