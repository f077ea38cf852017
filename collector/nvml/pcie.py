"""PCIe byte counters that cannot alias.

NVML's PCIe TX/RX byte counters (fields 197 and 198) are 32-bit on the H100: they wrap every 4.3 GB,
which a gen5 x16 link moves in about 68 ms. Read once a second, the counter wraps many times between
reads and the rate is unknowable. When the agent's interval is longer than the wrap-safe period of a
GPU's link, :class:`PcieCounterPoller` reads the two counters on a thread of its own at that period
(one batched NVML call, ~0.1-0.2 ms on an H100), unwraps them into 64-bit totals and hands the
sampler the latest totals with NVML's timestamps; rates are then exact at any agent cadence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from collector.nvml.access import FIELD_ROW, GpuLost, NvmlAccess, decode_value
from collector.nvml.fields import PCIE_BYTE_FIELDS

log = logging.getLogger(__name__)

# Usable bytes per second per lane and direction, by PCIe generation (after line encoding).
_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
_WRAP = 1 << 32
_Row = tuple[int, int, int, int, int, int, int]  # FIELD_ROW: field, scope, time us, latency, type, return code, bits


def link_bytes_per_s(gen: int | None, width: int | None) -> float:
    """Maximum bytes/s one direction of a PCIe link carries; unknown gen or width: assume gen5 x16."""
    return _LANE_BYTES_PER_S.get(gen or 5, _LANE_BYTES_PER_S[5]) * (width or 16)


def wrap_safe_period_s(gen: int | None, width: int | None, margin: float = 0.8) -> float:
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

    def __init__(self, access: NvmlAccess, devices: list[tuple[int, Any]], period_s: float) -> None:
        self._access = access
        self._devices = devices
        self.period_s = period_s
        self._state: dict[tuple[int, int], _Unwrapped] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stacklens-pcie-counters", daemon=True)
        self.polls = 0
        # per GPU: ((field id, 64-bit total bytes, NVML time in ns), ...) as of the latest poll
        self.latest: dict[int, tuple[tuple[int, int, int], ...]] = {}
        request = tuple((fid, 0) for fid in PCIE_BYTE_FIELDS)
        self._readers = [(index, access.field_reader(index, handle, request)) for index, handle in devices]

    def start(self) -> None:
        self.poll_once()
        self._thread.start()

    def poll_once(self) -> None:
        # ~20 polls a second: the raw rows of the batched read, no per-value objects
        polled: list[tuple[int, Iterable[_Row]]] = []
        for index, reader in self._readers:
            try:
                polled.append((index, FIELD_ROW.iter_unpack(reader.read()[1])))
            except GpuLost:
                continue
        self._unwrap(polled)
        self.polls += 1

    def _unwrap(self, polled: list[tuple[int, Iterable[_Row]]]) -> None:
        with self._lock:
            state = self._state
            for index, rows in polled:
                view = []
                for fid, _scope, ts_us, _latency, vtype, rc, bits in rows:
                    st = state.get((index, fid))
                    if rc == 0:
                        raw = bits & 0xFFFFFFFF if vtype == 1 else int(decode_value(vtype, bits))
                        time_ns = ts_us * 1000 if ts_us > 0 else 0
                        if st is None:
                            st = state[(index, fid)] = _Unwrapped(raw, raw, time_ns)
                        else:
                            delta = raw - st.last_raw if raw >= st.last_raw else raw + _WRAP - st.last_raw
                            st.last_raw, st.total, st.time_ns = raw, st.total + delta, time_ns
                    if st is not None:
                        view.append((fid, st.total, st.time_ns))
                # the sampler's view of this GPU, replaced whole: read without the lock
                self.latest[index] = tuple(view)

    def _run(self) -> None:
        # time.sleep, not Event.wait: a lock wait with a timeout costs CPython several times the CPU of a
        # sleep, and this wakes 20 times a second; stopping waits at most one period
        while not self._stop.is_set():
            time.sleep(self.period_s)
            if self._stop.is_set():
                return
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
