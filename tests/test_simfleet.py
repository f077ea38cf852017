"""The simulated fleet's physics: each fault moves the signals it should, on the GPU, replica or node it
was injected on, and leaves the others alone; benign drift moves TTFT/TPOT p99 by less than 5 %.

Each case runs the fleet for six simulated minutes (the fault from minute 3) straight from
``Fleet.run()``, no export path: the evaluation and the demo test the pipeline; this tests the world.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from collector.records import GpuSample
from collector.signals import CLOCK_EVENT_REASONS
from collector.simfleet import (
    DECODE_PER_SEQ_S,
    DECODE_STEP_S,
    FAULT_KINDS,
    GPU_TYPES,
    PREFILL_FIXED_S,
    PREFILL_PER_TOKEN_S,
    Fault,
    Fleet,
    FleetNodeBackend,
    Scenario,
    SimRequest,
    power_share,
    trace_rows,
)

ONSET_S = 180.0
BEFORE = (60.0, ONSET_S)  # after the warm-up, before the fault
AFTER = (ONSET_S + 90.0, 360.0)  # after the thermal transient (tau 45 s)
NODE, GPU, PARTNER = 1, 2, 3  # the culprit GPU and the other GPU of its tensor-parallel replica
_BIT = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}


@dataclass
class World:
    """What happened, by (node, gpu index) and by replica pid, split before/after the fault's onset."""

    start_ns: int
    gpu: dict[tuple[int, int, str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    links_down: dict[tuple[int, int, str], int] = field(default_factory=lambda: defaultdict(int))
    foreign: dict[tuple[int, int, str], set[int]] = field(default_factory=lambda: defaultdict(set))
    host: dict[tuple[int, str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    xids: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    requests: dict[tuple[int, str], list[SimRequest]] = field(default_factory=lambda: defaultdict(list))
    engine: dict[tuple[int, str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    pids: dict[tuple[int, int], int] = field(default_factory=dict)  # replica pid of each GPU

    def phase(self, time_ns: int) -> str | None:
        t = (time_ns - self.start_ns) / 1e9
        if BEFORE[0] <= t < BEFORE[1]:
            return "before"
        if AFTER[0] <= t < AFTER[1]:
            return "after"
        return None

    def med(self, node: int, gpu: int, signal: str, phase: str) -> float:
        return statistics.median(self.gpu[(node, gpu, signal, phase)])

    def change(self, node: int, gpu: int, signal: str) -> float:
        return self.med(node, gpu, signal, "after") - self.med(node, gpu, signal, "before")

    def bits(self, node: int, gpu: int, bit: str, phase: str) -> float:
        vals = self.gpu[(node, gpu, "clock_event_reasons", phase)]
        return sum(1 for v in vals if int(v) & _BIT[bit]) / len(vals)

    def latency(self, node: int, gpu: int, metric: str, phase: str, q: float = 0.5) -> float:
        reqs = self.requests[(self.pids[(node, gpu)], phase)]
        if metric == "ttft":
            vals = sorted(r.ttft_s for r in reqs)
        elif metric == "tpot":
            vals = sorted(r.decode_s / (r.output_tokens - 1) for r in reqs if r.output_tokens > 1)
        else:
            vals = sorted(getattr(r, metric) for r in reqs)
        return vals[min(len(vals) - 1, int(q * len(vals)))]

    def latency_ratio(self, node: int, gpu: int, metric: str, q: float = 0.5) -> float:
        return self.latency(node, gpu, metric, "after", q) / self.latency(node, gpu, metric, "before", q)

    def arrivals(self, node: int, gpu: int, phase: str) -> float:
        span = (BEFORE[1] - BEFORE[0]) if phase == "before" else (AFTER[1] - AFTER[0])
        return len(self.requests[(self.pids[(node, gpu)], phase)]) / span


@cache
def world(kind: str | None, drift: bool = True, seed: int = 5, duration_s: float = 360.0) -> World:
    faults = () if kind is None else (Fault(kind, NODE, GPU, ONSET_S),)
    # the lognormal fit of the trace's token lengths, so that the test sees the same world whether or not
    # ../shared/data is beside the checkout
    fleet = Fleet(Scenario(seed=seed, duration_s=duration_s, drift=drift, faults=faults, workload="synthetic"))
    w = World(fleet.s.start_ns)
    for rep in fleet.replicas:
        for g in rep.gpus:
            w.pids[(rep.node, g.ident.index)] = rep.pid
    engine_pids = {r.pid for r in fleet.replicas}
    for tick in fleet.run():
        for n, snap in enumerate(tick.snapshots):
            ph = w.phase(snap.time_ns)
            for ev in snap.events:
                w.xids[(n, ev.gpu_index)] += 1
            if ph is None:
                continue
            for s in snap.gpus:
                for r in s.readings:
                    if r.signal == "nvlink_link_up":
                        w.links_down[(n, s.gpu.index, ph)] += r.value == 0.0
                    elif not r.labels and r.value is not None:
                        w.gpu[(n, s.gpu.index, r.signal, ph)].append(r.value)
                w.foreign[(n, s.gpu.index, ph)] |= {p.pid for p in s.processes if p.pid not in engine_pids}
            assert snap.host is not None
            for r in snap.host.readings:
                if not r.labels and r.value is not None:
                    w.host[(n, r.signal, ph)].append(r.value)
        for req in tick.finished:
            ph = w.phase(req.arrival_ns)
            if ph is not None:
                w.requests[(req.pid, ph)].append(req)
        for e in tick.engines:
            ph = w.phase(e.time_ns)
            if ph is not None:
                key = int(e.node.split("-")[1]) - 1
                w.engine[(e.pid, "running", ph)].append(e.running)
                w.engine[(e.pid, "kv", ph)].append(e.kv_usage_ratio)
                w.engine[(e.pid, "preemptions", ph)].append(e.preemptions_total)
                w.engine[(e.pid, "node", ph)].append(key)
    return w


OTHERS = [(n, g) for n in range(2) for g in range(4) if (n, g) not in {(NODE, GPU), (NODE, PARTNER)}]
HW_SIGNALS = ("power_limit_w", "pcie_rx_bytes_per_s", "memory_busy_ratio")


def assert_others_untouched(w: World, metrics: tuple[str, ...] = ("ttft", "tpot")) -> None:
    """GPUs outside the culprit's replica: no foreign process, no throttling, no XIDs, links up, hardware
    and latency as before (the fault did not leak)."""
    for n, g in OTHERS:
        assert not w.foreign[(n, g, "after")], (n, g)
        assert w.links_down[(n, g, "after")] == 0
        assert w.xids[(n, g)] == 0
        assert w.bits(n, g, "sw_power_cap", "after") == 0.0
        assert w.bits(n, g, "sw_thermal", "after") == 0.0
        assert w.med(n, g, "power_limit_w", "after") == w.med(n, g, "power_limit_w", "before")
        assert abs(w.change(n, g, "pcie_rx_bytes_per_s")) < 0.3e9
        assert abs(w.change(n, g, "memory_busy_ratio")) < 0.08
        for m in metrics:
            assert 0.9 < w.latency_ratio(n, g, m) < 1.1, (n, g, m, w.latency_ratio(n, g, m))


def test_every_fault_kind_is_covered_here() -> None:
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(FAULT_KINDS) - {"drift"} <= tested


def test_hbm_contention() -> None:
    w = world("hbm_contention")
    assert w.change(NODE, GPU, "memory_busy_ratio") >= 0.2
    assert w.change(NODE, GPU, "memory_busy_ratio") > w.change(NODE, GPU, "gpu_util_ratio")
    assert w.foreign[(NODE, GPU, "after")] and not w.foreign[(NODE, GPU, "before")]
    assert not w.foreign[(NODE, PARTNER, "after")]
    assert w.latency_ratio(NODE, GPU, "tpot") >= 1.2  # decode is memory-bound
    assert abs(w.change(NODE, GPU, "pcie_rx_bytes_per_s")) < 0.5e9
    assert w.bits(NODE, GPU, "sw_power_cap", "after") < 0.05
    assert_others_untouched(w)


def test_kv_pressure() -> None:
    w = world("kv_pressure")
    pid = w.pids[(NODE, GPU)]
    assert statistics.median(w.engine[(pid, "kv", "after")]) >= 0.85
    assert statistics.median(w.engine[(pid, "kv", "before")]) < 0.6
    pre = w.engine[(pid, "preemptions", "after")]
    assert pre[-1] > pre[0] > 0 or pre[-1] > w.engine[(pid, "preemptions", "before")][-1]
    assert w.latency_ratio(NODE, GPU, "ttft") >= 2.0  # long prompts, recomputed after preemption
    for n, g in OTHERS:  # the hardware is not the cause: no GPU signal of the others moves
        assert w.bits(n, g, "sw_power_cap", "after") == 0.0
    assert not w.foreign[(NODE, GPU, "after")]
    assert_others_untouched(w)


def test_pcie_saturation() -> None:
    w = world("pcie_saturation")
    capacity = 3.938e9 * 16  # H100 SXM: PCIe gen 5 x16 per direction
    assert w.med(NODE, GPU, "pcie_rx_bytes_per_s", "after") >= 0.8 * capacity
    assert w.med(NODE, GPU, "pcie_rx_bytes_per_s", "before") < 0.1 * capacity
    assert w.med(NODE, PARTNER, "pcie_rx_bytes_per_s", "after") < 0.1 * capacity
    assert w.latency_ratio(NODE, GPU, "ttft") >= 1.5  # transfers sit in front of prefill
    # decode does not cross PCIe: TPOT moves only as longer prefills keep more requests in the batch
    assert w.latency_ratio(NODE, GPU, "tpot") < 1.2 < w.latency_ratio(NODE, GPU, "ttft")
    assert_others_untouched(w)


def test_nvlink_degraded() -> None:
    w = world("nvlink_degraded")
    assert w.links_down[(NODE, GPU, "after")] > 0 and w.links_down[(NODE, GPU, "before")] == 0
    assert w.links_down[(NODE, PARTNER, "after")] == 0
    # the same traffic over fewer links: the total holds while each remaining link carries more
    assert w.latency_ratio(NODE, GPU, "tpot") >= 1.08  # tensor-parallel all-reduce on every step
    assert_others_untouched(w)


def test_thermal_throttle() -> None:
    w = world("thermal_throttle")
    assert w.change(NODE, GPU, "gpu_temp_c") >= 5.0
    assert w.bits(NODE, GPU, "sw_thermal", "after") >= 0.5 and w.bits(NODE, GPU, "sw_thermal", "before") == 0.0
    assert w.change(NODE, GPU, "sm_clock_hz") <= -100e6
    assert w.bits(NODE, PARTNER, "sw_thermal", "after") == 0.0
    assert w.med(NODE, GPU, "power_limit_w", "after") == w.med(NODE, GPU, "power_limit_w", "before")
    assert w.latency_ratio(NODE, GPU, "ttft") >= 1.05  # prefill is compute-bound, the replica waits for its slowest GPU
    assert_others_untouched(w)


def test_power_cap() -> None:
    w = world("power_cap")
    assert w.change(NODE, GPU, "power_limit_w") <= -100.0
    assert w.bits(NODE, GPU, "sw_power_cap", "after") >= 0.5 and w.bits(NODE, GPU, "sw_power_cap", "before") == 0.0
    assert w.med(NODE, GPU, "power_w", "after") <= w.med(NODE, GPU, "power_limit_w", "after") + 1.0
    assert w.change(NODE, GPU, "sm_clock_hz") <= -100e6
    assert w.bits(NODE, GPU, "sw_thermal", "after") == 0.0
    assert w.latency_ratio(NODE, GPU, "ttft") >= 1.1
    assert_others_untouched(w)


def test_arrival_burst() -> None:
    w = world("arrival_burst")
    assert w.arrivals(NODE, GPU, "after") >= 1.5 * w.arrivals(NODE, GPU, "before")
    assert w.latency(NODE, GPU, "queue_s", "after", 0.9) > w.latency(NODE, GPU, "queue_s", "before", 0.9) + 0.5
    for g in (GPU, PARTNER):  # the hardware is fine: no intruder, no throttling, no fault
        assert not w.foreign[(NODE, g, "after")]
        assert w.bits(NODE, g, "sw_power_cap", "after") == 0.0 and w.xids[(NODE, g)] == 0
    assert_others_untouched(w)


def test_batching_misconfig() -> None:
    w = world("batching_misconfig")
    pid = w.pids[(NODE, GPU)]
    assert max(w.engine[(pid, "running", "after")]) <= 0.5 * 64  # max_num_seqs set too low
    assert max(w.engine[(pid, "running", "before")]) > 0.5 * 64 or \
        statistics.median(w.engine[(pid, "running", "before")]) > statistics.median(w.engine[(pid, "running", "after")])
    assert 0.8 < w.arrivals(NODE, GPU, "after") / w.arrivals(NODE, GPU, "before") < 1.25  # same load
    assert w.latency(NODE, GPU, "queue_s", "after", 0.9) > 1.0  # it queues
    assert w.latency_ratio(NODE, GPU, "tpot") < 1.05  # decode is not slower: the GPU is not the problem
    assert w.change(NODE, GPU, "gpu_util_ratio") < 0.1  # nor much busier
    assert_others_untouched(w)


def test_noisy_neighbor() -> None:
    w = world("noisy_neighbor")
    assert w.foreign[(NODE, GPU, "after")] and not w.foreign[(NODE, GPU, "before")]
    # the intruder computes: utilisation rises on its GPU beyond the partner's, more than memory traffic
    extra_util = w.change(NODE, GPU, "gpu_util_ratio") - w.change(NODE, PARTNER, "gpu_util_ratio")
    extra_busy = w.change(NODE, GPU, "memory_busy_ratio") - w.change(NODE, PARTNER, "memory_busy_ratio")
    assert extra_util >= 0.1 and extra_util > extra_busy  # (utilisation saturates at 1)
    assert w.latency_ratio(NODE, GPU, "ttft") >= 1.2
    assert_others_untouched(w)


def test_cpu_contention() -> None:
    w = world("cpu_contention")
    assert statistics.median(w.host[(NODE, "host_run_queue", "after")]) >= \
        3 * statistics.median(w.host[(NODE, "host_run_queue", "before")])
    assert statistics.median(w.host[(NODE, "host_cpu_steal_ratio", "after")]) > 0.05
    other = 1 - NODE
    assert statistics.median(w.host[(other, "host_run_queue", "after")]) < 10
    for g in range(4):  # every replica of the node decodes slower (the scheduler loop waits for the CPU)
        assert w.latency_ratio(NODE, g, "tpot") >= 1.15
        assert not w.foreign[(NODE, g, "after")] and w.bits(NODE, g, "sw_power_cap", "after") == 0.0
    for g in range(4):
        assert 0.9 < w.latency_ratio(other, g, "tpot") < 1.1


def test_xid_failure() -> None:
    w = world("xid_failure")
    assert w.xids[(NODE, GPU)] >= 5
    assert w.xids[(NODE, PARTNER)] == 0
    assert w.change(NODE, GPU, "sm_clock_hz") <= -300e6  # clock stuck low
    assert w.latency_ratio(NODE, GPU, "ttft") >= 1.2 and w.latency_ratio(NODE, GPU, "tpot") >= 1.2
    assert_others_untouched(w)


def _fleet_p99(drift: bool, seed: int = 11, duration_s: float = 900.0) -> dict[str, float]:
    fleet = Fleet(Scenario(seed=seed, duration_s=duration_s, drift=drift, workload="synthetic"))
    by: dict[str, list[float]] = defaultdict(list)
    for tick in fleet.run():
        for r in tick.finished:
            if r.arrival_ns - fleet.s.start_ns >= 60 * 10**9:  # after the warm-up
                by["ttft"].append(r.ttft_s)
                if r.output_tokens > 1:
                    by["tpot"].append(r.decode_s / (r.output_tokens - 1))
    return {k: sorted(v)[int(0.99 * len(v))] for k, v in by.items()}


def test_benign_drift_moves_p99_by_less_than_5_percent() -> None:
    """Diurnal load (±8 %) and clock wander (±2 %) against the same seed without them: the fleet's TTFT and
    TPOT p99 over 15 minutes."""
    drift, flat = _fleet_p99(True), _fleet_p99(False)
    for metric in ("ttft", "tpot"):
        assert 0.95 < drift[metric] / flat[metric] < 1.05, (metric, drift[metric] / flat[metric])


def test_the_same_seed_gives_the_same_world() -> None:
    a = Fleet(Scenario(seed=3, duration_s=30.0, faults=(Fault("pcie_saturation", 1, 2, 10.0),)))
    b = Fleet(Scenario(seed=3, duration_s=30.0, faults=(Fault("pcie_saturation", 1, 2, 10.0),)))
    ta, tb = list(a.run()), list(b.run())
    assert [t.finished for t in ta] == [t.finished for t in tb]
    assert [t.snapshots for t in ta] == [t.snapshots for t in tb]


def _per_second_arrivals(arrivals: str, workload: str) -> list[int]:
    fleet = Fleet(Scenario(duration_s=600.0, workload=workload, arrivals=arrivals, seed=3))
    counts: dict[int, int] = defaultdict(int)
    first_pid = fleet.replicas[0].pid
    for tick in fleet.run():
        for r in tick.finished:
            if r.pid == first_pid:
                counts[(r.arrival_ns - fleet.s.start_ns) // 10**9] += 1
    return [counts[s] for s in range(60, 540)]


@pytest.mark.skipif(not trace_rows("azure_code"), reason="the Azure traces are not in ../shared/data here")
def test_trace_arrivals_keep_the_traces_burstiness_at_the_scenarios_rate() -> None:
    poisson = _per_second_arrivals("poisson", "azure_code")
    trace = _per_second_arrivals("trace", "azure_code")

    def cv(xs: list[int]) -> float:
        return statistics.pstdev(xs) / statistics.mean(xs)

    assert 0.5 < statistics.mean(trace) / 2.5 < 1.3  # stretched to the scenario's 2.5 requests/s per replica
    assert cv(trace) > 2 * cv(poisson)  # the code-completion service's bursts survive the stretching


def test_scenario_arrivals_are_validated() -> None:
    with pytest.raises(ValueError, match="arrivals must be"):
        Scenario.from_dict({"arrivals": "uniform"})
    with pytest.raises(ValueError, match="needs a trace workload"):
        Scenario.from_dict({"arrivals": "trace", "workload": "synthetic"})


_SPLITWISE = Path(__file__).resolve().parents[2] / "shared" / "data" / "splitwise_perf_model.csv"


@pytest.mark.skipif(not _SPLITWISE.is_file(), reason="the Splitwise table is not in ../shared/data here")
@pytest.mark.parametrize(("hardware", "gpu_type"), [("h100-80gb", "H100-SXM"), ("a100-80gb", "A100-80GB")])
def test_prefill_and_decode_times_match_splitwise_within_10_percent(hardware: str, gpu_type: str) -> None:
    """Llama-2-70B on TP 2: prefill by prompt size (batch 1) and the decode step by batch size, against the
    means of Splitwise's measured rows (docs/simulator.md has the table)."""
    rows = [r for r in csv.DictReader(_SPLITWISE.open()) if r["model"] == "llama2-70b"
            and r["hardware"] == hardware and r["tensor_parallel"] == "2"]
    t = GPU_TYPES[gpu_type]

    def measured(column: str, prompt: int, batch: int) -> float:
        vals = [float(r[column]) / 1e3 for r in rows
                if int(r["prompt_size"]) == prompt and int(r["batch_size"]) == batch]
        assert vals, (prompt, batch)
        return statistics.mean(vals)

    for prompt in (512, 2048, 8192):
        sim = (PREFILL_FIXED_S + prompt * PREFILL_PER_TOKEN_S) / t.speed
        assert 0.9 < sim / measured("prompt_time", prompt, 1) < 1.1, (prompt, sim)
    for batch in (1, 16, 32):
        sim = (DECODE_STEP_S + DECODE_PER_SEQ_S * batch) / t.mem_speed
        assert 0.9 < sim / measured("token_time", 512, batch) < 1.1, (batch, sim)


def test_a_fleet_node_runs_behind_the_agents_backend_interface() -> None:
    """`stacklens-agent --simulate-scenario`: one node of the fleet, stepped by the time the agent gives it."""
    scenario = Scenario(nodes=2, seed=4, workload="synthetic",
                        faults=(Fault("power_cap", 1, 2, 30.0), Fault("xid_failure", 1, 0, 30.0)))
    backend = FleetNodeBackend(scenario, node=1)
    assert backend.open() == "ok"
    t0 = 1_800_000_000 * 10**9

    def value(samples: tuple[GpuSample, ...], gpu: int, signal: str) -> float:
        return next(r.value for r in samples[gpu].readings if r.signal == signal and r.value is not None)

    first = backend.sample(t0, True, True)
    assert [s.gpu.uuid for s in first] == [g.uuid for g in backend.identities()]
    assert all(r.time_ns == t0 for s in first for r in s.readings)  # stamped with the agent's time
    later = backend.sample(t0 + 120 * 10**9, True, True)
    assert value(later, 2, "power_limit_w") < value(first, 2, "power_limit_w")  # the fault, on its GPU only
    assert value(later, 1, "power_limit_w") == value(first, 1, "power_limit_w")
    events = backend.drain_events()
    assert events and {e.gpu_index for e in events} == {0} and backend.drain_events() == []
    assert later[0].processes and not backend.sample(t0 + 121 * 10**9, True, False)[0].processes


def test_the_agent_cli_takes_a_scenario_node(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text("nodes = 2\nworkload = 'synthetic'\n[[faults]]\nkind = 'power_cap'\nnode = 1\ngpu = 3\n"
                        "onset_s = 0.0\n")
    proc = subprocess.run(  # noqa: PLW1510 - the test reads returncode
        [sys.executable, "-m", "collector.cli", "--simulate-scenario", str(scenario), "--simulate-node", "1",
         "--once", "-o", "json"], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    limits = [g["signals"]["power_limit_w"] for g in doc["gpus"]]
    assert len(limits) == 4 and limits[3] < limits[0] == 700.0
    bad = subprocess.run(  # noqa: PLW1510
        [sys.executable, "-m", "collector.cli", "--simulate-scenario", str(scenario), "--simulate-node", "5",
         "--once"], capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert bad.returncode == 2 and "simulate_node" in bad.stderr


@pytest.mark.skipif(not _SPLITWISE.is_file(), reason="the Splitwise table is not in ../shared/data here")
def test_a100_power_draw_matches_splitwise_within_10_percent() -> None:
    """The average draw of a serving A100 (share of its power limit) at batch 1 and 16, at the activity the
    engine model gives those batches (64 slots), against Splitwise's rows that carry a power figure."""
    rows = [r for r in csv.DictReader(_SPLITWISE.open()) if r["model"] == "llama2-70b"
            and r["hardware"] == "a100-80gb" and r["tensor_parallel"] == "2" and float(r["average_power"]) > 0]
    t = GPU_TYPES["A100-80GB"]
    for batch in (1, 16):
        measured = statistics.mean(float(r["average_power"]) for r in rows
                                   if int(r["prompt_size"]) == 512 and int(r["batch_size"]) == batch)
        occupancy = batch / 64
        share = power_share(0.25 + 0.7 * occupancy, 0.3 + 0.55 * occupancy)
        simulated = (t.idle_w + (t.tdp_w - t.idle_w) * share) / t.tdp_w
        assert 0.9 < simulated / measured < 1.1, (batch, simulated, measured)
    assert power_share(1.0, 1.0) < 1.0  # full load stays under TDP: only a fault throttles
