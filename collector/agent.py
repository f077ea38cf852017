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

from collector.backend import GpuBackend, RoundSampler
from collector.host import HostSource
from collector.placement.resolver import PlacementResolver
from collector.records import GpuSample, HostSample, NodeSnapshot, Placement

log = logging.getLogger(__name__)

T = TypeVar("T")

# Backends in these states may come back (driver loading, permissions fixed): retry opening them.
_RETRYABLE_STATUS = {"driver_not_loaded", "no_permission", "error"}
# waits up to this long between cycles are sleeps, longer ones wait on the stop event
_SLEEP_MAX_S = 0.25
# while the backend makes a round of cycles, the loop looks at the stop event at least this often
_ROUND_WAIT_S = 1.0


class SnapshotSink(Protocol):
    def handle(self, snapshot: NodeSnapshot) -> None: ...


@dataclass(slots=True)
class AgentStats:
    cycles: int = 0
    overruns: int = 0  # cycles that took longer than the interval
    last_cycle_s: float = 0.0
    cycle_cpu_s_total: float = 0.0
    round_cycles: int = 0  # cycles the backend's thread made (in rounds), counted in cycles too
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
        # the backend makes the fast cycles between two of the loop's (on the real clocks only: its thread keeps them)
        self._rounds: RoundSampler | None = (
            backend if isinstance(backend, RoundSampler) and clock_ns is time.time_ns
            and monotonic is time.monotonic else None)

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
            next_at = self._next_tick(next_at + self.interval_s)
            ticks = self._round_ticks(max_cycles)
            if ticks:
                next_at = self._next_tick(next_at + self._round(next_at, ticks, stop) * self.interval_s)
                if max_cycles is not None and self.stats.cycles >= max_cycles:
                    return
            delay = next_at - self._monotonic()
            if delay <= 0.0:
                continue
            if delay <= _SLEEP_MAX_S:
                # a sleep costs CPython a fraction of the CPU of a lock wait with a timeout (Event.wait),
                # which matters ten times a second; a stop is then seen within one short interval
                time.sleep(delay)
            else:
                stop.wait(delay)

    def _next_tick(self, next_at: float) -> float:
        """``next_at``, or the first tick of the grid still ahead when it has passed (the ticks missed skipped)."""
        now = self._monotonic()
        if now > next_at:
            missed = int((now - next_at) / self.interval_s) + 1
            self.stats.overruns += 1
            next_at += missed * self.interval_s
        return next_at

    def _round_ticks(self, max_cycles: int | None) -> int:
        """How many of the next cycles the backend may make as a round: those up to the next one that reads the slow
        tier, placement or host signals (the loop's own), two at least; 0 for none."""
        if self._rounds is None or self.backend.status != "ok":
            return 0
        n, ticks = self.stats.cycles, 0
        limit = 1000 if max_cycles is None else max_cycles - n
        while (ticks < limit and (n + ticks) % self._slow_every and (n + ticks) % self._placement_every
               and (n + ticks) % self._host_every):
            ticks += 1
        return ticks if ticks >= 2 else 0

    def _round(self, first_at: float, ticks: int, stop: threading.Event) -> int:
        """Up to ``ticks`` of the next cycles made by the backend (its thread samples at each tick while this one
        sleeps), then handed to the sinks as the loop's own cycles would be; how many ticks it took (kept or missed):
        fewer when the backend makes fewer (it stops before its next medium cycle), the round ended at a tick it had
        to judge in Python or the stop came, and 0 when it could not start."""
        rounds = self._rounds
        assert rounds is not None
        ticks = self._guard("gpu", rounds.start_round, first_at, self.interval_s, ticks) or 0
        if not ticks:
            return 0
        # one wake-up a round: when the loop's next cycle is due (sooner if the round ended at a tick to judge)
        cut = False
        while not rounds.wait_round(self._monotonic() + _ROUND_WAIT_S):
            if stop.is_set() and not cut:
                rounds.end_round()
                cut = True
        cpu0 = time.thread_time()
        made = self._guard("gpu", rounds.round_samples)
        if made is None:  # its ticks are lost; the loop's schedule goes on after them
            self.stats.cycles += ticks
            return ticks
        samples, missed = made
        backend = self.backend
        for time_ns, gpus in samples:
            snapshot = NodeSnapshot(node=self.node, time_ns=time_ns, gpus=gpus, host=None, placements=None,
                                    events=(), gpu_status=backend.status, driver_version=backend.driver_version)
            for sink in self.sinks:
                self._guard(type(sink).__name__, sink.handle, snapshot)
        self.stats.cycles += len(samples) + missed
        self.stats.round_cycles += len(samples)
        if missed:
            self.stats.overruns += 1
        self.stats.cycle_cpu_s_total += time.thread_time() - cpu0
        return len(samples) + missed

    def close(self) -> None:
        self._guard("close", self.backend.close)
