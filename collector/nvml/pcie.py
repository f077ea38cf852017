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
comes later than the counter's wrap time at the link's maximum rate is logged and counted.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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


class PcieCounterPoller:
    """Reads fields 197/198 of some GPUs every ``period_s`` and keeps 64-bit totals. With ``per_cycle`` = k > 1
    the agent's cycle, every k periods, polls through :meth:`cycle_poll` and the thread polls the k-1 times
    between; polls are serialised (a lock), whoever makes them."""

    # the schedule's state (class defaults: a poller that nobody's cycle polls runs on its own grid)
    per_cycle = 1
    late_after_s: float | None = None  # a gap longer than this is a late poll (default: period_s / _MARGIN)
    _anchor: float | None = None  # monotonic time of the cycle's latest poll
    _last_poll_at: float | None = None  # monotonic time of the latest poll, the cycle's or the thread's

    def __init__(self, access: NvmlAccess, devices: list[tuple[int, Any]], period_s: float,
                 monotonic: Callable[[], float] = time.monotonic, per_cycle: int = 1,
                 late_after_s: float | None = None) -> None:
        self._access = access
        self._devices = devices
        self.period_s = period_s
        self._monotonic = monotonic
        self.per_cycle = per_cycle
        self.late_after_s = late_after_s
        self._state: dict[tuple[int, int], _Unwrapped] = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # the cycle's and the thread's polls share the reader's array
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stacklens-pcie-counters", daemon=True)
        self.polls = 0
        self.cycle_polls = 0  # the polls made by the agent's cycle
        self.late_polls = 0  # polls that came after more than the wrap time at the maximum rate
        request = tuple((fid, 0) for fid in PCIE_BYTE_FIELDS)
        # every GPU's two counters in one array, checked and unpacked at once (~20 polls a second)
        self._reader = MultiFieldReader(access, devices, request)
        self._keys = [(index, fid) for index, _ in devices for fid, _ in request]
        # per row: NVML time (us), value type, raw value (FIELD_ROW without field, scope, latency, return code)
        self._unpack = struct.Struct("<" + "8xq8xI4xQ" * len(self._keys)).unpack_from
        self._fields_of = {index: tuple((fid, (index, fid)) for fid, _ in request) for index, _ in devices}

    def start(self) -> None:
        self._last_poll_at = self._monotonic()
        self.poll_once()
        self._thread.start()

    def cycle_poll(self) -> None:
        """The cycle's poll, one of the k per interval: the thread polls the k-1 between this one and the next."""
        now = self._monotonic()
        self._note_gap(now, self._last_poll_at)
        self._anchor = self._last_poll_at = now
        self.cycle_polls += 1
        self.poll_once()

    def _note_gap(self, now: float, previous: float | None) -> None:
        """Count (and log once) a poll later than the counter's wrap time at the link's maximum rate."""
        if previous is None or now - previous <= (self.late_after_s or self.period_s / _MARGIN):
            return
        self.late_polls += 1
        if self.late_polls == 1:
            log.warning("PCIe counter poll came %.0f ms after the previous one (wrap-safe period %.0f ms): "
                        "a byte counter at line rate may have wrapped unseen (logged once)",
                        (now - previous) * 1e3, self.period_s * 1e3)

    @property
    def latest(self) -> dict[int, tuple[tuple[int, int, int], ...]]:
        """Per GPU: ((field id, 64-bit total bytes, NVML time in ns), ...) as of the latest poll."""
        return {index: view for index in self._fields_of if (view := self.view(index)) is not None}

    def view(self, index: int) -> tuple[tuple[int, int, int], ...] | None:
        """One GPU's ((field id, 64-bit total bytes, NVML time in ns), ...) as of the latest poll; None
        before it was read."""
        fields = self._fields_of.get(index)
        if fields is None:
            return None
        with self._lock:
            state = self._state
            out = tuple((fid, st.total, st.time_ns) for fid, key in fields if (st := state.get(key)) is not None)
        return out or None

    def poll_once(self) -> None:
        with self._poll_lock:  # the cycle's poll and the thread's (normally a period apart) share the array
            result = self._reader.read()
            if result is None:
                self._unwrap_all(self._unpack(self._reader.array))
            else:
                self._unwrap([(index, wanted, FIELD_ROW.iter_unpack(buf)) for index, wanted, buf in result])
            self.polls += 1

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
        # On a fixed grid of period_s, not period_s after each poll ends: the time a poll takes and the wake-up
        # delay must not stretch the interval between reads. time.sleep, not Event.wait: a lock wait with a
        # timeout costs CPython several times the CPU of a sleep; stopping waits at most one period.
        # When the cycle polls (per_cycle > 1), the grid is the cycle's (its earliest phase seen: a cycle is late,
        # never early) and the thread's turns are the k-1 between two of the cycle's: it sleeps through the
        # cycle's turns. A cycle that misses its turn (late by more than a period, or not cycling any more) leaves
        # the thread taking every turn until the cycle polls again.
        period, k, monotonic = self.period_s, self.per_cycle, self._monotonic
        interval = k * period
        previous = self._last_poll_at if self._last_poll_at is not None else monotonic()  # start() polled
        next_at = previous + period
        grid: float | None = None  # the time of one of the cycle's turns
        while not self._stop.is_set():
            delay = next_at - monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._stop.is_set():
                return
            now = monotonic()
            last = self._last_poll_at  # the cycle's poll, when it came after this thread's
            self._note_gap(now, last if last is not None and last > previous else previous)
            if now - next_at > period:  # more than a period behind: the grid starts again from here
                next_at = now
            self._last_poll_at = previous = now
            try:
                self.poll_once()
            except Exception:  # the poller must never die silently and take the rates with it
                log.exception("PCIe counter poll failed; continuing")
            anchor = self._anchor if k > 1 else None
            if anchor is None:  # nobody's cycle polls: every turn is the thread's
                next_at += period
                continue
            if grid is None or (anchor - grid) % interval > period / 2:
                grid = anchor  # earlier than the grid, or a new phase altogether
            latest_turn = grid + math.floor((now - grid) / interval) * interval
            missed = anchor < latest_turn - period / 2  # the cycle did not poll at its latest turn
            turn = math.floor((now - grid) / period + 0.1) + 1  # the turn after the one just taken
            if turn % k == 0 and not missed:
                turn += 1  # the cycle's
            next_at = grid + turn * period

    def totals(self, index: int) -> dict[int, tuple[int, int]]:
        """field id -> (64-bit total bytes, NVML time) for one GPU."""
        with self._lock:
            return {fid: (st.total, st.time_ns) for (i, fid), st in self._state.items() if i == index}

    def stop(self) -> None:
        self._stop.set()
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
