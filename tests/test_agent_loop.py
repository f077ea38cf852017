"""The agent loop over the simulated backend, with injected clocks: cadence, slow and placement
rounds, fault survival, and that a failing part never stops sampling."""

from __future__ import annotations

import threading

from collector.agent import Agent
from collector.records import NodeSnapshot
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
