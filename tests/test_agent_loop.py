"""The agent loop over the simulated backend, with injected clocks: cadence, slow and placement
rounds, fault survival, and that a failing part never stops sampling; and, on the real clocks, the rounds of fast
cycles a backend makes between the loop's own."""

from __future__ import annotations

import threading
import time

from collector.agent import Agent
from collector.records import GpuSample, NodeSnapshot
from collector.simulated import SimulatedGpuSource

T0 = 1_767_225_600_000_000_000


class ListSink:
    def __init__(self) -> None:
        self.snapshots: list[NodeSnapshot] = []

    def handle(self, snapshot: NodeSnapshot) -> None:
        self.snapshots.append(snapshot)


class BrokenSink:
    def handle(self, snapshot: NodeSnapshot) -> None:
        raise RuntimeError("sink bug")


class FakeClock:
    def __init__(self) -> None:
        self.ns = T0

    def __call__(self) -> int:
        self.ns += 100_000_000
        return self.ns


def test_cycles_slow_rounds_and_sinks_survive_errors() -> None:
    sink = ListSink()
    agent = Agent("n1", SimulatedGpuSource(4, seed=7), [BrokenSink(), sink], interval_s=0.1, slow_interval_s=1.0,
                  placement_interval_s=0.5, clock_ns=FakeClock())
    assert agent.open() == "ok"
    for _ in range(20):
        agent.cycle()
    assert len(sink.snapshots) == 20  # the broken sink did not stop anything
    assert agent.stats.part_errors["BrokenSink"] == 20
    slow = [i for i, s in enumerate(sink.snapshots)
            if any(r.signal == "pcie_link_gen" for r in s.gpus[0].readings)]
    assert slow == [0, 10]
    with_procs = [i for i, s in enumerate(sink.snapshots) if s.gpus[0].processes]
    assert with_procs == [0, 5, 10, 15]
    times = [s.time_ns for s in sink.snapshots]
    assert times == sorted(times) and len(set(times)) == 20


def test_lost_gpu_and_xid_flow_through() -> None:
    sim = SimulatedGpuSource(2, seed=1)
    sink = ListSink()
    agent = Agent("n1", sim, [sink], clock_ns=FakeClock())
    agent.open()
    agent.cycle()
    sim.lose(1)
    sim.raise_xid(0, 79, T0)
    snap = agent.cycle()
    lost = snap.gpus[1]
    assert lost.lost and [(r.signal, r.value) for r in lost.readings] == [("gpu_lost", 1.0)]
    assert not snap.gpus[0].lost
    assert [(e.gpu_index, e.xid) for e in snap.events] == [(0, 79)]


def test_run_stops_on_event_and_after_max_cycles() -> None:
    agent = Agent("n1", SimulatedGpuSource(1), [ListSink()], interval_s=0.1)
    agent.open()
    agent.run(threading.Event(), max_cycles=3)
    assert agent.stats.cycles == 3
    stop = threading.Event()
    stop.set()
    agent.run(stop)
    assert agent.stats.cycles == 3


# -- rounds: a backend that makes the fast cycles between two of the loop's --------------------------------------
class RoundBackend(SimulatedGpuSource):
    """The simulated node with RoundSampler's methods: a round's ticks are samples made at once (the real backend's
    thread makes them on the grid), ``keep`` of each round kept (an unusual tick ends a round early), ``miss`` of
    them missed; ``hold`` rounds not over until cut."""

    def __init__(self, keep: int = 1000, miss: int = 0, hold: bool = False) -> None:
        super().__init__(2, seed=3)
        self.keep, self.miss, self.hold = keep, miss, hold
        self.asked: list[int] = []
        self.cut = False
        self._ticks = 0

    def start_round(self, first_at: float, period_s: float, ticks: int) -> int:
        self.asked.append(ticks)
        self._ticks = ticks
        return ticks

    def wait_round(self, limit: float) -> bool:
        if self.hold and not self.cut:
            time.sleep(max(0.0, min(limit - time.monotonic(), 0.05)))
            return False
        return True

    def end_round(self) -> None:
        self.cut = True

    def round_samples(self) -> tuple[list[tuple[int, tuple[GpuSample, ...]]], int]:
        kept = min(self.keep, self._ticks - self.miss) if not self.cut else 1
        missed = min(self.miss, self._ticks - kept)
        now = time.time_ns()
        return [(now + k, self.sample(now + k, False, False)) for k in range(kept)], missed


def _run(backend: RoundBackend, cycles: int, **kwargs: object) -> tuple[Agent, ListSink]:
    sink = ListSink()
    agent = Agent("n1", backend, [sink], interval_s=0.005, slow_interval_s=0.05, placement_interval_s=0.05,
                  host_interval_s=0.05, **kwargs)  # type: ignore[arg-type]
    agent.open()
    agent.run(threading.Event(), max_cycles=cycles)
    return agent, sink


def test_rounds_make_the_cycles_between_the_loops_own() -> None:
    """The loop makes the cycles that read the slow tier, placement or host signals (every 10th); the backend the
    ones between, as rounds, handed to the sinks in order as fast cycles (no host, placement or events)."""
    backend = RoundBackend()
    agent, sink = _run(backend, 25)
    assert backend.asked == [9, 9, 4]  # up to the next cycle of the loop's, and to max_cycles
    assert len(sink.snapshots) == 25 and agent.stats.cycles == 25 and agent.stats.round_cycles == 22
    own = [i for i, s in enumerate(sink.snapshots) if s.placements is not None]
    assert own == [0, 10, 20]
    assert all(s.host is None and s.events == () for i, s in enumerate(sink.snapshots) if i not in own)
    times = [s.time_ns for s in sink.snapshots]
    assert times == sorted(times)


def test_a_round_that_ends_early_leaves_the_rest_to_the_loop() -> None:
    """A round that ends at its third tick (an unusual one): the loop makes the next cycle itself, then asks for a
    round of what is left."""
    backend = RoundBackend(keep=3)
    agent, sink = _run(backend, 10)
    # after cycle 0: 1-9 asked, 3 kept; cycle 4 the loop's; then 5-9, 3 kept; 8 and 9 the loop's (one left: no round)
    assert backend.asked == [9, 5]
    assert len(sink.snapshots) == 10 and agent.stats.round_cycles == 6


def test_missed_ticks_count_as_cycles_and_an_overrun() -> None:
    backend = RoundBackend(miss=2)
    agent, sink = _run(backend, 10)
    assert backend.asked == [9]
    assert len(sink.snapshots) == 8 and agent.stats.cycles == 10 and agent.stats.round_cycles == 7
    assert agent.stats.overruns >= 1


def test_stop_cuts_a_round_short_and_keeps_what_it_made() -> None:
    backend = RoundBackend(hold=True)
    sink = ListSink()
    agent = Agent("n1", backend, [sink], interval_s=0.005)
    agent.open()
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    time.sleep(0.1)
    stop.set()
    runner.join(timeout=5)
    assert not runner.is_alive() and backend.cut
    assert len(sink.snapshots) == 2 and agent.stats.round_cycles == 1  # the loop's first cycle, the tick being made


def test_no_rounds_on_injected_clocks() -> None:
    backend = RoundBackend()
    _, sink = _run(backend, 12, clock_ns=FakeClock())
    assert backend.asked == [] and len(sink.snapshots) == 12
