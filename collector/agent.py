"""The sampling loop: every interval, one :class:`NodeSnapshot` from the GPU backend, the host and
placement, handed to each sink (OTLP queue, Prometheus collector, stdout).

Nothing in a cycle may stop the loop: an NVML error is the access layer's business, a vanished
process is skipped, and an unexpected exception in a part is logged once per kind and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from collector.backend import GpuBackend
from collector.host import HostSource
from collector.placement.resolver import PlacementResolver
from collector.records import GpuSample, HostSample, NodeSnapshot, Placement

log = logging.getLogger(__name__)

T = TypeVar("T")

# Backends in these states may come back (driver loading, permissions fixed): retry opening them.
_RETRYABLE_STATUS = {"driver_not_loaded", "no_permission", "error"}
# waits up to this long between cycles are sleeps, longer ones wait on the stop event
_SLEEP_MAX_S = 0.25


class SnapshotSink(Protocol):
    def handle(self, snapshot: NodeSnapshot) -> None: ...


@dataclass(slots=True)
class AgentStats:
    cycles: int = 0
    overruns: int = 0  # cycles that took longer than the interval
    last_cycle_s: float = 0.0
    cycle_cpu_s_total: float = 0.0
    part_errors: Counter[str] = field(default_factory=Counter)


class Agent:
    def __init__(
        self,
        node: str,
        backend: GpuBackend,
        sinks: Sequence[SnapshotSink],
        host: HostSource | None = None,
        placement: PlacementResolver | None = None,
        interval_s: float = 1.0,
        slow_interval_s: float = 10.0,
        placement_interval_s: float = 1.0,
        host_interval_s: float = 1.0,
        reopen_interval_s: float = 60.0,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.backend = backend
        self.sinks = list(sinks)
        self.host = host
        self.placement = placement
        self.interval_s = interval_s
        self._slow_every = max(1, round(slow_interval_s / interval_s))
        self._placement_every = max(1, round(placement_interval_s / interval_s))
        # host signals change on the scale of seconds: at a 100 ms cadence they are read every 10th cycle
        self._host_every = max(1, round(host_interval_s / interval_s))
        self._reopen_interval_s = reopen_interval_s
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._opened_at: float | None = None
        self._last_placements: tuple[Placement, ...] = ()
        self.stats = AgentStats()
        self._logged: set[str] = set()

    def open(self) -> str:
        self._opened_at = self._monotonic()
        return self._guard("open", self.backend.open) or "error"

    def _guard(self, part: str, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except Exception:
            self.stats.part_errors[part] += 1
            if part not in self._logged:
                self._logged.add(part)
                log.exception("agent part %r failed; continuing (logged once, counted)", part)
            return None

    def cycle(self) -> NodeSnapshot:
        """Take one sample of everything and hand it to the sinks."""
        cpu0 = time.thread_time()  # the cycle's own thread: the export and poller threads are not its cost
        n = self.stats.cycles
        now_ns = self._clock_ns()
        if (self.backend.status in _RETRYABLE_STATUS and self._opened_at is not None
                and self._monotonic() - self._opened_at >= self._reopen_interval_s):
            self.open()
        slow = n % self._slow_every == 0
        want_placement = n % self._placement_every == 0
        gpus: tuple[GpuSample, ...] = ()
        if self.backend.status == "ok":
            gpus = self._guard("gpu", self.backend.sample, now_ns, slow, want_placement) or ()
        events = self._guard("events", self.backend.drain_events) or []
        placements = self._last_placements
        resolver, host_source = self.placement, self.host
        if want_placement and resolver is not None and gpus:
            placements = self._guard("placement", resolver.resolve, gpus, now_ns) or ()
            self._last_placements = placements
        host: HostSample | None = None
        if host_source is not None and n % self._host_every == 0:
            pids = [p.pid for p in placements if p.pid > 0]
            host = self._guard("host", host_source.sample, now_ns, pids)
        snapshot = NodeSnapshot(
            node=self.node, time_ns=now_ns, gpus=gpus, host=host,
            placements=placements if want_placement else None, events=tuple(events),
            gpu_status=self.backend.status, driver_version=self.backend.driver_version,
        )
        for sink in self.sinks:
            self._guard(type(sink).__name__, sink.handle, snapshot)
        self.stats.cycles += 1
        cpu = time.thread_time() - cpu0
        self.stats.cycle_cpu_s_total += cpu
        return snapshot

    def run(self, stop: threading.Event, max_cycles: int | None = None) -> None:
        """Cycle on a fixed grid until ``stop`` is set; a late cycle skips the ticks it missed."""
        next_at = self._monotonic()
        while not stop.is_set():
            started = self._monotonic()
            self.cycle()
            self.stats.last_cycle_s = self._monotonic() - started
            if max_cycles is not None and self.stats.cycles >= max_cycles:
                return
            next_at += self.interval_s
            now = self._monotonic()
            if now > next_at:
                missed = int((now - next_at) / self.interval_s) + 1
                self.stats.overruns += 1
                next_at += missed * self.interval_s
            delay = max(0.0, next_at - self._monotonic())
            if delay <= _SLEEP_MAX_S:
                # a sleep costs CPython a fraction of the CPU of a lock wait with a timeout (Event.wait),
                # which matters ten times a second; a stop is then seen within one short interval
                time.sleep(delay)
            else:
                stop.wait(delay)

    def close(self) -> None:
        self._guard("close", self.backend.close)
