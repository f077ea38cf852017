"""Rates from cumulative counters, robust to wraps and resets.

NVML's cumulative counters (PCIe bytes, NVLink KiB per link, energy) are read with NVML's own
timestamps; a rate is the delta over the delta of those timestamps, not of the agent's clock, so
sampling jitter in the agent does not show up as traffic jitter.
"""

from __future__ import annotations

from collections.abc import Hashable


class CounterRates:
    """Turns successive (value, time) reads of many counters into per-second rates.

    A 32-bit counter that goes down wrapped once (the caller reads it often enough that it cannot wrap
    twice: see the PCIe counter poller). A 64-bit counter that goes down wrapped if it was within
    ``wrap_window`` of its maximum, else it was reset (driver reload, GPU reset); a wrap yields a rate,
    a reset yields no rate for that interval and re-baselines. The first read yields no rate.
    """

    def __init__(self, wrap_window: float = 0.25) -> None:
        # key -> (last value, its time in ns); tuples: this runs for every counter of every GPU each cycle
        self._last: dict[Hashable, tuple[int, int]] = {}
        self._wrap_window = wrap_window
        self.resets = 0
        self.wraps = 0

    def update(self, key: Hashable, value: int, time_ns: int, width_bits: int = 64) -> float | None:
        """Record a read; return the rate in units per second since the previous read, or None."""
        last = self._last.get(key)
        if last is None:
            self._last[key] = (value, time_ns)
            return None
        last_value, last_ns = last
        dt_ns = time_ns - last_ns
        if dt_ns <= 0:
            # Same NVML timestamp: the driver has not refreshed the counter since the last read.
            # Keep the earlier baseline so the next read spans the whole interval.
            return None
        self._last[key] = (value, time_ns)
        if value >= last_value:
            return (value - last_value) * 1e9 / dt_ns
        modulus = 1 << width_bits
        # A 32-bit counter wraps within seconds under load (NVML's PCIe byte counters do every 4.3 GB),
        # so going down means a wrap; a 64-bit one wraps only near its top, else it was reset.
        near_top = last_value >= modulus * (1 - self._wrap_window) and value < modulus * self._wrap_window
        if width_bits <= 32 or near_top:
            self.wraps += 1
            return (modulus - last_value + value) * 1e9 / dt_ns
        self.resets += 1
        return None

    @property
    def wrap_window(self) -> float:
        return self._wrap_window

    def adopt(self, key: Hashable, value: int, time_ns: int) -> None:
        """Take over a counter's previous read (value, its time in ns) kept elsewhere until now (the compiled
        field decoder's slots, see collector/nvml/compiled.py)."""
        self._last[key] = (value, time_ns)

    def forget(self, key_prefix: Hashable) -> None:
        """Drop every counter whose key is a tuple starting with ``key_prefix`` (a lost GPU)."""
        for key in [k for k in self._last if isinstance(k, tuple) and k and k[0] == key_prefix]:
            del self._last[key]
