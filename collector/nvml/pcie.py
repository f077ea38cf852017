"""PCIe byte counters that cannot alias.

NVML's PCIe TX/RX byte counters (fields 197 and 198) are 32-bit on the H100: they wrap every 4.3 GB,
which a gen5 x16 link moves in about 68 ms. Read once a second, the counter wraps many times between
reads and the rate is unknowable. When the agent's interval is longer than the wrap-safe period of a
GPU's link, :class:`PcieCounterPoller` reads the two counters on a thread of its own at that period
(one batched NVML call per GPU, ~0.1-0.2 ms on an H100; every GPU's rows land in one shared array,
checked and unpacked at once), unwraps them into 64-bit totals and hands the sampler the latest totals
with NVML's timestamps; rates are then exact at any agent cadence. The polls keep a fixed grid, and one
that comes later than the counter's wrap time at the link's maximum rate is logged and counted.
"""

from __future__ import annotations

import logging
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


# the wrap-safe period is this share of the time the counter takes to wrap at the link's maximum rate
_MARGIN = 0.8


def wrap_safe_period_s(gen: int | None, width: int | None, margin: float = _MARGIN) -> float:
    """How often a 32-bit byte counter must be read so it cannot wrap twice between reads, with a
    margin for scheduling delay (counters include protocol headers, so allow for more than payload)."""
    return margin * _WRAP / (link_bytes_per_s(gen, width) * 1.1)


@dataclass(slots=True)
class _Unwrapped:
    last_raw: int
    total: int
    time_ns: int


class PcieCounterPoller:
    """Reads fields 197/198 of some GPUs every ``period_s`` and keeps 64-bit totals."""

    def __init__(self, access: NvmlAccess, devices: list[tuple[int, Any]], period_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._access = access
        self._devices = devices
        self.period_s = period_s
        self._monotonic = monotonic
        self._state: dict[tuple[int, int], _Unwrapped] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stacklens-pcie-counters", daemon=True)
        self.polls = 0
        self.late_polls = 0  # polls that came after more than the wrap time at the maximum rate
        request = tuple((fid, 0) for fid in PCIE_BYTE_FIELDS)
        # every GPU's two counters in one array, checked and unpacked at once (~20 polls a second)
        self._reader = MultiFieldReader(access, devices, request)
        self._keys = [(index, fid) for index, _ in devices for fid, _ in request]
        # per row: NVML time (us), value type, raw value (FIELD_ROW without field, scope, latency, return code)
        self._unpack = struct.Struct("<" + "8xq8xI4xQ" * len(self._keys)).unpack_from
        self._fields_of = {index: tuple((fid, (index, fid)) for fid, _ in request) for index, _ in devices}

    def start(self) -> None:
        self.poll_once()
        self._thread.start()

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
        # On a fixed grid of period_s from the first poll, not period_s after each poll ends: the time a poll
        # takes and the wake-up delay must not stretch the interval between reads. time.sleep, not
        # Event.wait: a lock wait with a timeout costs CPython several times the CPU of a sleep, and this
        # wakes 20 times a second; stopping waits at most one period.
        period, monotonic = self.period_s, self._monotonic
        previous = monotonic()  # start() polled just now
        next_at = previous + period
        while not self._stop.is_set():
            delay = next_at - monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._stop.is_set():
                return
            now = monotonic()
            if now - previous > period / _MARGIN:
                # longer than the counter takes to wrap at the link's maximum rate (a stalled machine)
                self.late_polls += 1
                if self.late_polls == 1:
                    log.warning("PCIe counter poll came %.0f ms after the previous one (wrap-safe period %.0f ms): "
                                "a byte counter at line rate may have wrapped unseen (logged once)",
                                (now - previous) * 1e3, period * 1e3)
            if now - next_at > period:  # more than a period behind: the grid starts again from here
                next_at = now
            next_at += period
            previous = now
            try:
                self.poll_once()
            except Exception:  # the poller must never die silently and take the rates with it
                log.exception("PCIe counter poll failed; continuing")

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
