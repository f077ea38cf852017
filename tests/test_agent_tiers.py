"""The agent's cost-saving paths, each checked against the plain path it replaces: tiered cadences
(fast, medium, slow) through the real pynvml against the C stand-in, NVLink totals from summed link
counters, the PCIe counter poller, OTLP encoded once per export interval, and the /metrics page keeping
host signals between their reads."""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from collector.cli import OtlpSink
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo, merge_requests
from collector.export.prometheus import PrometheusExposition
from collector.export.queue import ExportQueue
from collector.nvml.access import FIELD_ROW
from collector.nvml.source import _decoder, _link_sum
from collector.records import GpuIdentity, GpuSample, HostSample, NodeSnapshot, Reading
from tests.nvml_standin.script import StandinScript, build_standin, standin_env
from tests.test_agent_nvml import BASE_US, STEP_US, h100_node, json_lines, run_agent

REPO = Path(__file__).resolve().parent.parent
T0 = 1_767_225_600_000_000_000
GPU = GpuIdentity(0, "GPU-0000", "NVIDIA H100 80GB HBM3", "00000000:18:00.0", 0)


@pytest.fixture(scope="session")
def standin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_standin(tmp_path_factory.mktemp("nvml") / "lib")


# -- tiers through the stand-in ---------------------------------------------------------------------
def _run_on_standin(code: str, standin_lib: Path, script: Path) -> Any:
    """Run ``code`` in a Python of its own against the stand-in (LD_LIBRARY_PATH set before it starts); the JSON
    it prints."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=standin_env(standin_lib, script),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tiers_at_100ms_fast_every_cycle_medium_and_host_once_a_second(standin_lib: Path, tmp_path: Path) -> None:
    proc, calls = run_agent(standin_lib, h100_node(gpus=2), tmp_path, "--interval", "100ms", "--cycles", "12",
                            "-o", "json", "--prometheus-port", "0", "--no-xid-events", call_log=True)
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert len(lines) == 12

    def cycles_with(name: str) -> list[int]:
        return [c for c, line in enumerate(lines) if name in line["gpus"][1]["signals"]]

    every, once_a_second = list(range(12)), [0, 10]
    for fast in ("power_w", "sm_clock_hz", "clock_event_reasons", "gpu_util_ratio", "memory_busy_ratio",
                 "pcie_tx_bytes_per_s", "nvlink_tx_total_bytes_per_s", "nvlink_rx_total_bytes_per_s"):
        assert cycles_with(fast) == every, fast
    for medium in ("gpu_temp_c", "memory_temp_c", "memory_clock_hz", "fb_used_bytes", "fb_total_bytes",
                   "power_limit_w", "ecc_sbe_volatile_total", "power_cap_throttle_s", "sw_thermal_throttle_s",
                   "nvlink_tx_bytes_per_s{link=2}", "nvlink_rx_bytes_per_s{link=0}"):
        assert cycles_with(medium) == once_a_second, medium
    for slow in ("energy_j", "pcie_link_gen", "nvlink_link_up{link=1}"):
        assert cycles_with(slow) == [0], slow
    assert [c for c, line in enumerate(lines) if line["host"] is not None] == once_a_second
    # one batched field read per GPU and cycle whatever the tier (the stand-in's tick moves with it)
    assert calls[("nvmlDeviceGetFieldValues", 1, "-")] == 1 + 12  # start-up's NVLink count, then the cycles
    assert calls[("nvmlDeviceGetTemperature", 1, "temp.gpu")] == 2
    assert calls[("nvmlDeviceGetClockInfo", 1, "clock.sm")] == 12

    # NVLink: the per-GPU total every cycle (from the summed link counters over NVML's timestamps, 100 ms
    # apart), each link once a second (over the second). Cycle c reads tick c + 1; the scripted counters
    # step k = 1..4 and then stay.
    kib = 1024 * 1000
    totals = [line["gpus"][1]["signals"]["nvlink_tx_total_bytes_per_s"] for line in lines]
    step = sum((link + 1) * kib for link in range(4)) * 1024 / (STEP_US / 1e6)
    assert totals[0] is None  # first read: missing, not 0
    assert totals[1] == pytest.approx(step) and totals[2] == pytest.approx(step)
    assert totals[3:] == [0.0] * 9
    link2 = [lines[c]["gpus"][1]["signals"]["nvlink_tx_bytes_per_s{link=2}"] for c in once_a_second]
    assert link2[0] is None
    assert link2[1] == pytest.approx(3 * kib * (4 - 2) * 1024 / (10 * STEP_US / 1e6))


def test_medium_interval_equal_to_the_interval_reads_everything_every_cycle(standin_lib: Path,
                                                                             tmp_path: Path) -> None:
    proc, _ = run_agent(standin_lib, h100_node(gpus=1), tmp_path, "--interval", "100ms", "--cycles", "4",
                        "-o", "json", "--prometheus-port", "0", "--no-xid-events",
                        extra_env={"STACKLENS_AGENT_MEDIUM_INTERVAL": "100ms",
                                   "STACKLENS_AGENT_HOST_INTERVAL": "100ms"})
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert all("gpu_temp_c" in line["gpus"][0]["signals"] and line["host"] is not None for line in lines)
    rates = [line["gpus"][0]["signals"]["nvlink_rx_bytes_per_s{link=3}"] for line in lines]
    assert rates[0] is None and rates[1] == pytest.approx(4 * 2048 * 1000 * 1024 * 10)


def test_a_failing_link_makes_the_total_missing_not_smaller(standin_lib: Path, tmp_path: Path) -> None:
    script = h100_node(gpus=1).set(0, "field.138.1", 1024, 2048, 3072, "ERR:999", 5120)
    proc, _ = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "4", "-o", "json",
                        "--prometheus-port", "0", "--no-xid-events")
    assert proc.returncode == 0, proc.stderr
    totals = [line["gpus"][0]["signals"]["nvlink_tx_total_bytes_per_s"] for line in json_lines(proc.stdout)]
    assert totals[0] is None and totals[1] is not None
    assert totals[2] is None  # tick 3: link 1 failed this time
    assert totals[3] is not None  # over ticks 2..4 (the failed read kept the earlier baseline)


needs_poller_build = pytest.mark.skipif(
    os.environ.get("STACKLENS_PURE_PYTHON") == "1", reason="the compiled PCIe poller is switched off")
SCHEDULES = ["python", pytest.param("native", marks=needs_poller_build)]


POLLERS = [1, pytest.param(2, marks=needs_poller_build)]  # per_cycle: 1 Python's poller, 2 the compiled one


@pytest.mark.parametrize("per_cycle", POLLERS)
def test_pcie_counter_poller_unwraps_and_feeds_the_sampler(standin_lib: Path, tmp_path: Path, per_cycle: int) -> None:
    """The compiled poller (per_cycle 2) gives what Python's gives, and hands over to it at the NOT_SUPPORTED."""
    top = 2**32 - 1000
    script = (StandinScript().driver("580.82.07").gpus(1).system("clock_base_us", BASE_US)
              .system("clock_step_us", STEP_US)
              .set(0, "field.197", "u32:0", f"u32:{top - 4000}", f"u32:{top}", "u32:3000", "u32:9000")
              .set(0, "field.198", "u32:5", "u32:10", "NS").set(0, "pcie.max_gen", 5).set(0, "pcie.max_width", 16))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import json
        from collector.nvml.access import NvmlAccess
        from collector.nvml.pcie import PcieCounterPoller
        a = NvmlAccess()
        a.init()
        h = a.call("nvmlDeviceGetHandleByIndex", 0, 0)
        poller = PcieCounterPoller(a, [(0, h)], 1.0, per_cycle=PER_CYCLE)
        out, native = [], []
        for _ in range(5):
            poller.poll_once()
            out.append(poller.latest[0])
            native.append(poller.native)
        print(json.dumps({"polls": out, "native": native, "count": poller.polls, "calls": a.calls}))
    """).replace("PER_CYCLE", str(per_cycle))
    result = _run_on_standin(code, standin_lib, path)
    polls = result["polls"]
    assert result["native"] == ([True, True, False, False, False] if per_cycle == 2 else [False] * 5)
    assert result["count"] == 5
    tx = [dict((fid, (total, t)) for fid, total, t in poll)[197] for poll in polls]
    assert [total for total, _ in tx] == [0, top - 4000, top, top + 1000 + 3000, top + 1000 + 9000]  # unwrapped
    assert [t for _, t in tx] == [(BASE_US + k * STEP_US) * 1000 for k in range(5)]  # NVML's times
    rx = [dict((fid, (total, t)) for fid, total, t in poll).get(198) for poll in polls]
    t1 = (BASE_US + STEP_US) * 1000
    assert rx[:3] == [(5, BASE_US * 1000), (10, t1), (10, t1)]  # the read that said NOT_SUPPORTED: last total
    assert rx[3:] == [None, None]  # then absent, as a field NVML lacks


@pytest.mark.parametrize("per_cycle", POLLERS)
def test_pcie_poller_catches_every_wrap_at_the_links_maximum_rate(standin_lib: Path, tmp_path: Path,
                                                                  per_cycle: int) -> None:
    """Three GPUs polled together (one NVML call each, checked and unpacked at once). GPU 0 moves the most
    bytes a gen5 x16 link's wrap-safe period allows, so its 32-bit counter wraps on four polls in five: every
    wrap is counted, the 64-bit totals are exact. GPU 1 fails one read (that poll goes GPU by GPU, the others
    unharmed, and the next poll batched again; the read after the failure spans two periods, so GPU 1 runs at
    half that rate) and GPU 2 falls off the bus at tick 8: the others go on, GPU by GPU."""
    from collector.nvml.pcie import wrap_safe_period_s

    period = wrap_safe_period_s(5, 16)
    step_us = int(period * 1e6)
    per_poll = int(0.81 * 2**32)  # the rate the period is sized for (with headers) times the period (81 %)
    assert per_poll == pytest.approx(3.938e9 * 16 * 1.1 * period, rel=1e-3)
    polls = 12
    tx0 = [(k * per_poll) % 2**32 for k in range(polls)]
    tx1 = [(k * per_poll // 2) % 2**32 for k in range(polls)]
    script = (StandinScript().driver("580.82.07").gpus(3).system("clock_base_us", BASE_US)
              .system("clock_step_us", step_us)
              .set(0, "field.197", *[f"u32:{v}" for v in tx0])
              .set(0, "field.198", *[f"u32:{7 * k}" for k in range(polls)])
              .set(1, "field.197", *[f"u32:{v}" if k != 2 else "ERR:999" for k, v in enumerate(tx1)])
              .set(1, "field.198", "u32:0")
              .set(2, "field.197", *[f"u32:{k}" for k in range(polls)]).set(2, "field.198", "u32:2")
              .set(2, "lost_at_tick", 8))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent(f"""
        import json
        from collector.nvml.access import NvmlAccess
        from collector.nvml.pcie import PcieCounterPoller
        a = NvmlAccess()
        a.init()
        handles = [(i, a.call("nvmlDeviceGetHandleByIndex", i, i)) for i in range(3)]
        poller = PcieCounterPoller(a, handles, {period!r}, per_cycle={per_cycle})
        out, native = [], []
        for _ in range({polls}):
            poller.poll_once()
            out.append({{i: poller.view(i) for i in range(3)}})
            native.append(poller.native)
        print(json.dumps({{"polls": out, "errors": [list(k) + [n] for k, n in a.errors.items()],
                          "lost": sorted(a._lost), "native": native}}))
    """)
    result = _run_on_standin(code, standin_lib, path)
    # the compiled poller until GPU 1's failed read (the third poll), judged by the access layer, Python's after
    assert result["native"] == ([True, True] + [False] * (polls - 2) if per_cycle == 2 else [False] * polls)
    views = result["polls"]
    gpu0 = [dict((fid, (total, t)) for fid, total, t in poll["0"]) for poll in views]
    assert sum(1 for a, b in itertools.pairwise(tx0) if b < a) >= 8  # the raw counter wraps most polls
    assert [v[197][0] for v in gpu0] == [k * per_poll for k in range(polls)]  # every wrap counted
    assert [v[197][1] for v in gpu0] == [(BASE_US + k * step_us) * 1000 for k in range(polls)]  # NVML's times
    assert [v[198][0] for v in gpu0] == [7 * k for k in range(polls)]
    gpu1 = [dict((fid, (total, t)) for fid, total, t in poll["1"])[197] for poll in views]
    assert [total for total, _ in gpu1] == [k * per_poll // 2 if k != 2 else per_poll // 2 for k in range(polls)]
    assert gpu1[2][1] == gpu1[1][1]  # the failed read kept the last total and its time (no rate from it)
    assert sorted(map(tuple, result["errors"])) == [("field 197", "Unknown", 1),
                                                    ("nvmlDeviceGetFieldValues", "GPU_IS_LOST", 1)]
    gpu2 = [poll["2"] for poll in views]
    assert gpu2[7] != gpu2[6] and gpu2[8:] == [gpu2[7]] * (polls - 8)  # lost at tick 8: no new totals from it
    assert result["lost"] == [2]


def _schedule(kind: str, period: float, k: int, late_after: float) -> Any:
    """The poller's schedule: Python's, or the compiled thread's (the same steps in C, through ctypes)."""
    from collector.nvml import pcie_native
    from collector.nvml.pcie import _PythonSchedule

    if kind == "python":
        return _PythonSchedule(period, k, late_after)
    lib = pcie_native.load()
    assert lib is not None, "collector/nvml/_pcie_poller is not built (setup.py)"
    return pcie_native.NativeSchedule(lib, period, k, late_after)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_pcie_poller_polls_on_a_fixed_grid(kind: str) -> None:
    """The poll period is kept between reads, not added after each poll's own time and wake-up delay."""
    from collector.nvml.pcie import PcieCounterPoller

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()

    class Poller(PcieCounterPoller):
        def __init__(self) -> None:
            self.period_s, self._monotonic, self._late_logged = 0.05, clock, False
            self._sched = _schedule(kind, 0.05, 1, 0.05 / 0.81)
            self._stop = threading.Event()
            self.at: list[float] = []

        def poll_once(self) -> None:
            self.at.append(round(clock.now, 6))
            clock.now += 0.004  # each poll takes 4 ms
            if len(self.at) == 5:
                clock.now += 0.2  # a stall of four periods: counted, and the grid starts again
            if len(self.at) == 8:
                self._stop.set()

    p = Poller()

    def sleep(s: float) -> None:
        clock.now += s

    with mock.patch("collector.nvml.pcie.time.sleep", sleep):
        p._run()
    assert p.at[:5] == [0.05, 0.1, 0.15, 0.2, 0.25]
    assert p.late_polls == 1 and p.at[5:] == [0.454, 0.504, 0.554]


class _Simulated:
    """The poller's thread (``_run``) and the agent's cycles on one simulated clock: the thread's sleeps move the
    clock, and each cycle due on the way makes the cycle's poll at its time (plus ``late[c]`` for cycle c), until
    ``cycles_until``. Polls take 1 ms; who made each poll, and when, is recorded."""

    def __init__(self, interval: float, period: float, k: int, cycles_until: float = 99.0,
                 late: dict[int, float] | None = None, thread_polls: int = 40, kind: str = "python") -> None:
        from collector.nvml.pcie import PcieCounterPoller

        self.now = 10.0
        self.polls: list[tuple[str, float]] = []
        self.wakes = 0
        sim = self

        class Poller(PcieCounterPoller):
            def __init__(self) -> None:  # the schedule only: no NVML
                self.period_s, self.per_cycle, self._sched = period, k, _schedule(kind, period, k, 0.062)
                self._monotonic, self._cycle_polls, self._native, self._late_logged = sim.clock, 0, None, False
                self._stop = threading.Event()
                self.who = "thread"

            def poll_once(self) -> None:
                sim.polls.append((self.who, round(sim.now - 10.0, 6)))
                sim.now += 0.001
                if sum(1 for who, _ in sim.polls if who == "thread") >= thread_polls:
                    self._stop.set()

        self.poller = Poller()
        self.interval, self.cycles_until, self.late = interval, cycles_until, late or {}
        self.next_cycle = 0
        self.poller._sched.started(self.now)  # start() polled
        self._cycle()  # the agent's first cycle comes right after start-up

    def clock(self) -> float:
        return self.now

    def _cycle(self) -> None:
        c = self.next_cycle
        self.next_cycle += 1
        self.now = 10.0 + c * self.interval + self.late.get(c, 0.0) + 0.0003  # the poll comes just after the wake
        self.poller.who = "cycle"
        self.poller.cycle_poll()
        self.poller.who = "thread"

    def sleep(self, seconds: float) -> None:
        self.wakes += 1
        until = self.now + seconds
        while True:
            due = 10.0 + self.next_cycle * self.interval + self.late.get(self.next_cycle, 0.0)
            if due > until or due - 10.0 > self.cycles_until:
                break
            self._cycle()
        self.now = max(self.now, until)

    def run(self) -> list[tuple[str, float]]:
        with mock.patch("collector.nvml.pcie.time.sleep", self.sleep):
            self.poller._run()
        return self.polls


@pytest.mark.parametrize("kind", SCHEDULES)
def test_pcie_polls_are_aligned_with_the_cycles(kind: str) -> None:
    """At 100 ms (gen5 x16: two polls an interval, 50 ms apart) each cycle makes one poll and the thread wakes once
    a cycle, at mid-cycle, for the other: every gap between polls is half the interval, none late."""
    from collector.nvml.pcie import poll_plan, wrap_safe_period_s, wrap_time_s

    k, period = poll_plan(0.1, wrap_safe_period_s(5, 16))
    assert (k, period) == (2, 0.05)
    sim = _Simulated(0.1, period, k, thread_polls=20, kind=kind)
    polls = sim.run()
    thread = [t for who, t in polls if who == "thread"]
    cycle = [t for who, t in polls if who == "cycle"]
    assert thread == [round(0.0003 + 0.05 + 0.1 * c, 6) for c in range(20)]  # at mid-cycle, on the cycles' grid
    assert cycle[:20] == [round(0.0003 + 0.1 * c, 6) for c in range(20)]
    assert sim.wakes == 20  # one wake-up a cycle: none at the cycles' own turns
    times = [t for _, t in polls]
    assert all(0.0495 <= b - a <= 0.0505 for a, b in itertools.pairwise(times))  # 50 ms apart, alternating
    assert [who for who, _ in polls][:6] == ["cycle", "thread"] * 3
    assert sim.poller.late_polls == 0 and sim.poller.cycle_polls == len(cycle)
    assert period < 0.81 * wrap_time_s(5, 16) + 1e-9  # the 81 % margin decided for gen5 x16


@pytest.mark.parametrize("kind", SCHEDULES)
def test_pcie_polls_k_per_interval_and_the_thread_between(kind: str) -> None:
    """At 1 s, k = 20 polls an interval: the cycle's, then 19 by the thread, all 50 ms apart."""
    from collector.nvml.pcie import poll_plan, wrap_safe_period_s

    k, period = poll_plan(1.0, wrap_safe_period_s(5, 16))
    assert (k, period) == (20, 0.05)
    assert poll_plan(0.1, wrap_safe_period_s(4, 16)) == (1, 0.1)  # gen4 x16 wraps in 124 ms: the cycle alone
    k3, period3 = poll_plan(0.15, wrap_safe_period_s(5, 16))
    assert k3 == 3 and period3 == pytest.approx(0.05)
    sim = _Simulated(1.0, period, k, thread_polls=19 * 3, kind=kind)
    polls = sim.run()
    times = [t for _, t in polls]
    assert all(0.0495 <= b - a <= 0.0505 for a, b in itertools.pairwise(times))
    assert [t for who, t in polls if who == "cycle"][:3] == [0.0003, 1.0003, 2.0003]
    assert sum(1 for who, _ in polls if who == "thread") == 19 * 3 and sim.wakes == 19 * 3
    assert sim.poller.late_polls == 0


@pytest.mark.parametrize("kind", SCHEDULES)
def test_pcie_poller_after_a_late_cycle_and_when_the_cycles_stop(kind: str) -> None:
    """A cycle 20 ms late makes one late poll (70 ms after the thread's) and the thread keeps the cycles' grid
    (its next poll at mid-cycle, not 20 ms later); when the cycles stop, the thread takes every turn."""
    sim = _Simulated(0.1, 0.05, 2, cycles_until=0.75, late={3: 0.02}, thread_polls=12, kind=kind)
    polls = sim.run()
    thread = [t for who, t in polls if who == "thread"]
    assert [t for who, t in polls if who == "cycle"] == [0.0003, 0.1003, 0.2003, 0.3203, 0.4003, 0.5003, 0.6003,
                                                         0.7003]
    assert thread[:8] == [0.0503, 0.1503, 0.2503, 0.3503, 0.4503, 0.5503, 0.6503, 0.7503]
    # the cycles stopped after 0.7: the thread's turn at 0.85 finds the cycle's at 0.8 missed (late: 100 ms
    # after its last poll), and from there it polls every 50 ms
    assert thread[8:] == [0.8503, 0.9003, 0.9503, 1.0003]
    assert sim.poller.late_polls == 2  # 0.2503 -> 0.3203 and 0.7503 -> 0.8503


@needs_poller_build
def test_compiled_pcie_poller_thread_polls_between_cycles_and_hands_over_at_a_lost_gpu(
        standin_lib: Path, tmp_path: Path) -> None:
    """In real time: the compiled thread polls between the cycles' polls (nothing of Python runs for it), the
    totals stay exact; GPU 1 falls off the bus at its seventh read, whichever thread makes it: the access layer
    judges that answer, Python's thread polls GPU 0 from then on; after stop nothing polls."""
    ticks = 40
    script = (StandinScript().driver("580.82.07").gpus(2).system("clock_base_us", BASE_US)
              .system("clock_step_us", STEP_US)
              .set(0, "field.197", *[f"u32:{(k * 1_500_000_000) % 2**32}" for k in range(ticks)])
              .set(0, "field.198", "u32:7").set(1, "field.197", "u32:1").set(1, "field.198", "u32:2")
              .set(1, "lost_at_tick", 6))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import json, time
        from collector.nvml.access import NvmlAccess
        from collector.nvml.pcie import PcieCounterPoller
        a = NvmlAccess()
        a.init()
        handles = [(i, a.call("nvmlDeviceGetHandleByIndex", i, i)) for i in range(2)]
        poller = PcieCounterPoller(a, handles, 0.05, per_cycle=2)
        poller.start()
        out = {"native": [], "totals": [], "polls": [], "cycle_polls": []}
        for _ in range(8):
            time.sleep(0.1)
            poller.cycle_poll()
            out["native"].append(poller.native)
            out["totals"].append(poller.totals(0)[197][0])
            out["polls"].append(poller.polls)
            out["cycle_polls"].append(poller.cycle_polls)
        poller.stop()
        stopped = poller.polls
        time.sleep(0.15)
        out.update(lost=sorted(a._lost), after_stop=poller.polls - stopped)
        print(json.dumps(out))
    """)
    out = _run_on_standin(code, standin_lib, path)
    assert out["native"][0] is True and out["native"][-1] is False  # handed over at the loss
    assert out["lost"] == [1]
    assert out["cycle_polls"] == list(range(1, 9))
    # the thread's polls: one between each two cycles (on a loaded machine a wake-up may come late, not lost)
    assert out["polls"][-1] >= 1 + 8 + 3
    totals = out["totals"]
    # every read of GPU 0 advances its 32-bit counter by 1.5e9 (it wraps every third read): the 64-bit total is
    # 1.5e9 times the reads so far, whoever made them, in C or in Python
    assert all(t % 1_500_000_000 == 0 for t in totals) and totals == sorted(totals) and totals[-1] >= 11 * 1.5e9
    assert out["after_stop"] == 0


@needs_poller_build
def test_compiled_poller_thread_finding_a_failed_read_leaves_the_cycle_its_own_poll(standin_lib: Path,
                                                                                   tmp_path: Path) -> None:
    """The compiled thread's first poll (50 ms after start-up's) meets a failed read of GPU 0's TX counter: it
    changes nothing and polls no more. The next cycle finds it: the access layer judges that poll's answers (the
    error counted once, the RX counter advanced, the TX total kept), and the cycle's own poll is then made by
    Python (a third read), not skipped: no gap of two periods between reads at the hand-over."""
    script = (StandinScript().driver("580.82.07").gpus(1).system("clock_base_us", BASE_US)
              .system("clock_step_us", STEP_US)
              .set(0, "field.197", "u32:100", "ERR:999", "u32:300").set(0, "field.198", "u32:10", "u32:20", "u32:30"))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import json, time
        from collector.nvml.access import NvmlAccess
        from collector.nvml.pcie import PcieCounterPoller
        a = NvmlAccess()
        a.init()
        poller = PcieCounterPoller(a, [(0, a.call("nvmlDeviceGetHandleByIndex", 0, 0))], 0.05, per_cycle=2)
        poller.start()
        native = poller.native
        deadline = time.monotonic() + 10
        while not poller._native.p.unusual and time.monotonic() < deadline:  # the thread's poll at 50 ms fails
            time.sleep(0.01)
        time.sleep(0.1)  # and it polls no more
        before = poller.polls
        poller.cycle_poll()
        out = {"native": [native, poller.native], "polls": [before, poller.polls], "cycle_polls": poller.cycle_polls,
               "totals": poller.totals(0), "errors": [list(k) + [n] for k, n in a.errors.items()]}
        poller.stop()
        print(json.dumps(out))
    """)
    out = _run_on_standin(code, standin_lib, path)
    assert out["native"] == [True, False]
    assert out["polls"] == [1, 3]  # start-up's; then the thread's (judged at the hand-over) and the cycle's own
    assert out["cycle_polls"] == 1
    assert out["errors"] == [["field 197", "Unknown", 1]]
    assert out["totals"]["197"][0] == 300 and out["totals"]["198"][0] == 30  # the third read: the cycle's


@pytest.mark.parametrize("kind", SCHEDULES)
def test_each_sample_makes_one_of_the_pcie_polls_first(standin_lib: Path, tmp_path: Path, kind: str) -> None:
    """At 100 ms the source plans two polls an interval, 50 ms apart, and each sample makes one of them before it
    reads the GPUs: its PCIe rates are as of its own poll (the thread makes the others: Python's is stopped here,
    the compiled one's polls are counted apart)."""
    path = h100_node(gpus=2).write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import contextlib
        import json
        from unittest import mock
        from collector.nvml import pcie_native
        from collector.nvml.pcie import PcieCounterPoller
        python = KIND == "python"
        with (mock.patch.object(PcieCounterPoller, "_run", lambda self: None),  # no Python thread polls
              mock.patch.object(pcie_native, "load", lambda: None) if python else contextlib.nullcontext()):
            from collector.nvml.source import NvmlGpuSource
            src = NvmlGpuSource(xid_events=False, interval_s=0.1)
            src.open()
            c = src._counters
            thread_polls = (lambda: 0) if python else (lambda: c._native.p.thread_polls)
            out = {"plan": [c.per_cycle, c.period_s], "before": [c.polls - thread_polls(), c.cycle_polls],
                   "samples": [], "native": c.native}
            for k in range(3):
                gpus = src.sample(1_767_225_600_000_000_000 + k * 100_000_000, False, False)
                tx = [r for r in gpus[0].readings if r.signal == "pcie_tx_bytes_per_s"]
                out["samples"].append([c.polls - thread_polls(), c.cycle_polls, [r.time_ns for r in tx],
                                       [t for fid, _, t in c.view(0) if fid == 197]])
            src.close()
        print(json.dumps(out))
    """).replace("KIND", repr(kind))
    out = _run_on_standin(code, standin_lib, path)
    assert out["native"] == (kind == "native")
    assert out["plan"] == [2, 0.05] and out["before"] == [1, 0]  # start-up's poll
    assert [s[:2] for s in out["samples"]] == [[2, 1], [3, 2], [4, 3]]  # one poll per sample, the cycle's
    for _, _, reading_times, poll_times in out["samples"]:
        assert reading_times == poll_times  # the sample's rate is as of the poll it made


@needs_poller_build
def test_a_round_makes_each_ticks_pcie_poll_and_reads_as_sample_does(standin_lib: Path, tmp_path: Path) -> None:
    """The sampler's thread makes a round of fast cycles (compiled.Ring): at each tick the cycle's PCIe counter poll
    (the compiled poller's, counted as the cycle's) and the GPUs' reads; each tick's samples have that tick's own
    poll's rates and times and its own power reading, as a live cycle would have. Afterwards the live cycles go on
    with the counters where the round left them."""
    ticks = 40
    script = (h100_node(gpus=2)
              .set(None, "field.197", *[f"u32:{k * 1000}" for k in range(ticks)])
              .set(None, "field.186", *[f"u32:{600_000 + 1000 * k}" for k in range(ticks)]))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import json, time
        from collector.nvml.source import NvmlGpuSource
        src = NvmlGpuSource(xid_events=False, interval_s=0.1)
        src.open()
        c = src._counters
        def sample():
            return src.sample(time.time_ns(), False, False)
        def pick(gpus, signal):
            return [[r.value, r.time_ns] for r in gpus[0].readings if r.signal == signal]
        for _ in range(3):  # the medium cycle, then two fast ones (the first prepares sl_sample's reads)
            sample()
        before = c.cycle_polls
        first = time.monotonic() + 0.02
        made = src.start_round(first, 0.1, 9)
        while not src.wait_round(time.monotonic() + 5):  # until the next cycle is due
            pass
        samples, missed = src.round_samples()
        out = {"made": made, "missed": missed, "cycle_polls": c.cycle_polls - before, "native": c.native,
               "ticks": [t for t, _ in samples], "tx": [pick(g, "pcie_tx_bytes_per_s") for _, g in samples],
               "power": [pick(g, "power_w") for _, g in samples]}
        after = sample()
        out.update(after_tx=pick(after, "pcie_tx_bytes_per_s"), after_polls=c.cycle_polls - before)
        src.close()
        print(json.dumps(out))
    """)
    out = _run_on_standin(code, standin_lib, path)
    # the cycles up to the next medium one (cycle 10): 3 to 9
    assert out["made"] == 7 and out["missed"] == 0 and out["native"] is True
    assert out["cycle_polls"] == 7 and out["after_polls"] == 8
    gaps = [b - a for a, b in itertools.pairwise(out["ticks"])]
    assert len(out["ticks"]) == 7 and all(0.05e9 < g < 0.15e9 for g in gaps)  # on the 100 ms grid
    rate = 1000 / (STEP_US * 1e-6)  # 1000 bytes a stand-in tick, whoever reads it
    txs = [tx[0] for tx in out["tx"]]
    assert [v for v, _ in txs] == [rate] * 7 and out["after_tx"][0][0] == rate
    poll_times = [t for _, t in txs] + [out["after_tx"][0][1]]
    assert poll_times == sorted(set(poll_times))  # each tick's rate as of its own poll, not an earlier one's
    powers = [p[0][0] for p in out["power"]]
    assert powers == sorted(set(powers))  # each tick's own read


@needs_poller_build
def test_a_round_ends_at_a_tick_python_must_judge_and_wakes_the_loop(standin_lib: Path, tmp_path: Path) -> None:
    """A failed power read at a round's second tick ends the round there and wakes the waiting loop at once (not at
    the next cycle's time): the loop judges that tick as the live cycle would (the power missing, not 0) and
    samples the rest of the interval itself."""
    script = h100_node(gpus=2).set(0, "field.186", *["u32:600000"] * 5, "ERR:999", "u32:610000")
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import json, time
        from collector.nvml.source import NvmlGpuSource
        src = NvmlGpuSource(xid_events=False, interval_s=0.1, pcie_counter_poll=False)  # no other reads move ticks
        src.open()
        for _ in range(3):  # the medium cycle, then two fast ones: the stand-in's fourth tick is next
            src.sample(time.time_ns(), False, False)
        first = time.monotonic() + 0.02
        made = src.start_round(first, 0.1, 9)
        over = src.wait_round(time.monotonic() + 5)
        woke = time.monotonic() - first
        samples, missed = src.round_samples()
        power = [[r.value for r in g[0].readings if r.signal == "power_w"] for _, g in samples]
        print(json.dumps({"made": made, "over": over, "woke": woke, "power": power, "missed": missed,
                          "errors": [list(k) + [n] for k, n in src.access.errors.items()]}))
        src.close()
    """)
    out = _run_on_standin(code, standin_lib, path)
    assert out["made"] == 7 and out["over"] is True and out["missed"] == 0
    assert out["power"] == [[600.0], [None]]  # the second tick's read failed: missing, and the round ended there
    assert out["woke"] < 0.4  # at the failed tick (0.1 s in), not at the next cycle's time (0.7 s)
    assert out["errors"] == [["field 186", "Unknown", 1]]


@needs_poller_build
def test_a_gpu_lost_in_a_round_hands_the_pcie_poller_to_python(standin_lib: Path, tmp_path: Path) -> None:
    """GPU 1 falls off the bus during a round (whichever read meets it first: the ring's, or the compiled poller's
    thread between the ticks): the round ends at that tick, which reports GPU 1 lost; the PCIe poller is Python's from
    then on, so no more rounds are armed (their ticks' polls would be Python's); the live cycles go on, GPU 0 with
    its PCIe rates."""
    script = (h100_node(gpus=2).set(None, "field.197", *[f"u32:{k * 1000}" for k in range(200)])
              .set(1, "lost_at_tick", 14))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import json, time
        from collector.nvml.source import NvmlGpuSource
        src = NvmlGpuSource(xid_events=False, interval_s=0.1)
        src.open()
        c = src._counters
        for _ in range(3):
            src.sample(time.time_ns(), False, False)
        native_before = c.native
        made = src.start_round(time.monotonic() + 0.02, 0.1, 9)
        while not src.wait_round(time.monotonic() + 5):
            pass
        samples, missed = src.round_samples()
        lost = [[g.lost for g in gpus] for _, gpus in samples]
        again = src.start_round(time.monotonic() + 0.02, 0.1, 9)
        live = src.sample(time.time_ns(), False, False)
        tx = [r.value for r in live[0].readings if r.signal == "pcie_tx_bytes_per_s"]
        print(json.dumps({"made": made, "lost": lost, "native": [native_before, c.native], "again": again,
                          "live_lost": [g.lost for g in live], "tx": tx}))
        src.close()
    """)
    out = _run_on_standin(code, standin_lib, path)
    assert out["made"] == 7 and out["native"] == [True, False]
    assert 1 <= len(out["lost"]) < 7 and out["lost"][-1] == [False, True]  # ended at the tick that met the loss
    assert all(ticks == [False, False] for ticks in out["lost"][:-1])
    assert out["again"] == 0 and out["live_lost"] == [False, True]
    assert out["tx"] == [1000 / (STEP_US * 1e-6)]


def test_agent_with_the_pcie_poller_exports_rates(standin_lib: Path, tmp_path: Path) -> None:
    proc, _ = run_agent(standin_lib, h100_node(gpus=2), tmp_path, "--interval", "100ms", "--cycles", "6", "-o",
                        "json", "--prometheus-port", "0", "--no-xid-events",
                        extra_env={"STACKLENS_AGENT_PCIE_COUNTER_POLL": "true"})
    assert proc.returncode == 0, proc.stderr
    assert "polled every 50 ms" in proc.stderr
    lines = json_lines(proc.stdout)
    tx = [line["gpus"][0]["signals"].get("pcie_tx_bytes_per_s") for line in lines]
    assert all(v is None or v >= 0 for v in tx) and any(v is not None for v in tx[1:])


# -- NVLink link sums from the rows' columns -----------------------------------------------------------
_Labels = tuple[tuple[str, str], ...]
_PLAN: dict[tuple[int, int], tuple[str, str, float, _Labels, tuple[int, int, int]]] = {
    (138, link): ("nvlink_tx_bytes_per_s", "rate", 1024.0, (("link", str(link)),), (0, 138, link))
    for link in range(18)}
_PLAN[(186, 0)] = ("power_w", "gauge", 1e-3, (), (0, 186, 0))


@given(rows=st.lists(st.tuples(st.integers(0, 2**62), st.integers(1, 2**40), st.sampled_from([3, 3, 3, 1]),
                               st.sampled_from([0, 0, 0, 15])), min_size=1, max_size=18))
@settings(max_examples=200)
def test_link_sum_from_columns_equals_row_by_row(rows: list[tuple[int, int, int, int]]) -> None:
    wanted = ((186, 0), *[(138, link) for link in range(len(rows))])
    buf = FIELD_ROW.pack(186, 0, 7, 0, 1, 0, 612000) + b"".join(
        FIELD_ROW.pack(138, link, ts, 0, vtype, rc, value) for link, (value, ts, vtype, rc) in enumerate(rows))
    decoder = _decoder(_PLAN, wanted)
    (group,) = decoder.links
    assert [f[1] for f in decoder.fields] == [(186, 0)] and decoder.has_power
    ok, ts, total = _link_sum(buf, group)
    assert ok == all(vtype == 3 and rc == 0 for _, _, vtype, rc in rows)
    assert ts == max(ts for _, ts, _, _ in rows)
    assert total == sum(value for value, _, _, _ in rows)


def test_field_row_layout_is_the_columns_read() -> None:
    row = FIELD_ROW.pack(138, 5, 123456, 9, 3, 15, 2**63 + 7)
    words = memoryview(row).cast("I")
    quads = memoryview(row).cast("Q")
    assert (words[6], words[7]) == (3, 15) and (quads[1], quads[4]) == (123456, 2**63 + 7)
    assert struct.calcsize("<IIqqIIQ") == 40


# -- OTLP once per export interval --------------------------------------------------------------------
def _snap(t: int, power: float | None, host: bool = False, status: str = "ok") -> NodeSnapshot:
    readings = (Reading("power_w", power, t + 1), Reading("energy_j", 10.0 + t % 97, t + 2),
                Reading("clock_event_reasons", float(0x4 if t % 2 else 0), t + 3),
                Reading("nvlink_tx_bytes_per_s", 5.0, t + 4, (("link", "3"),)))
    return NodeSnapshot("n", t, (GpuSample(GPU, t, readings),), gpu_status=status,
                        host=HostSample(t, (Reading("host_load1", 0.5, t),)) if host else None)


def _points(payload: bytes) -> tuple[Counter[tuple[Any, ...]], int, list[int]]:
    """(every point as (resource, metric, unit, kind, attributes, start, time, value or 'missing'), metrics with
    the same name in one scope, resource metrics count)."""
    req = ExportMetricsServiceRequest.FromString(payload)
    out: Counter[tuple[Any, ...]] = Counter()
    duplicates = 0
    per_resource = []
    for rm in req.resource_metrics:
        resource = tuple(sorted((kv.key, kv.value.string_value) for kv in rm.resource.attributes))
        names = [m.name for sm in rm.scope_metrics for m in sm.metrics]
        duplicates += len(names) - len(set(names))
        per_resource.append(len(names))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                assert kind is not None
                for dp in getattr(m, kind).data_points:
                    attrs = tuple(sorted((kv.key, str(getattr(kv.value, kv.value.WhichOneof("value"))))
                                         for kv in dp.attributes))
                    value = dp.as_double if dp.WhichOneof("value") else ("missing", dp.flags)
                    out[(resource, m.name, m.unit, kind, attrs, dp.start_time_unix_nano, dp.time_unix_nano,
                         value)] += 1
    return out, duplicates, per_resource


@given(powers=st.lists(st.one_of(st.none(), st.floats(0, 1000)), min_size=1, max_size=12),
       status_change=st.integers(0, 12))
@settings(max_examples=60, deadline=None)
def test_one_request_per_interval_holds_the_same_points_as_one_per_cycle(powers: list[float | None],
                                                                         status_change: int) -> None:
    snaps = [_snap(T0 + k * 100_000_000, p, host=k % 10 == 0, status="ok" if k < status_change else "error")
             for k, p in enumerate(powers)]
    batched = OtlpMetricsEncoder(ResourceInfo("n")).encode_batch(snaps)
    single = OtlpMetricsEncoder(ResourceInfo("n"))
    merged = merge_requests([single.encode(s) for s in snaps])
    got, duplicates, per_resource = _points(batched)
    want, _, _ = _points(merged)
    assert got == want  # the same points, values, missing flags, times and counter start times
    assert duplicates == 0  # one Metric per signal, with every cycle's points
    assert len(per_resource) == (2 if 0 < status_change < len(snaps) else 1)  # a resource change splits


class _ListTransport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def close(self) -> None:
        return None


def test_otlp_sink_queues_one_request_per_export_interval() -> None:
    transport = _ListTransport()
    queue = ExportQueue(transport)
    sink = OtlpSink(OtlpMetricsEncoder(ResourceInfo("n")), queue, snapshots_per_request=10)
    for k in range(25):
        sink.handle(_snap(T0 + k * 100_000_000, float(k)))
    assert queue.stats.queued_requests == 2
    sink.flush()  # at shutdown: the last, partial interval
    queue.start()
    assert queue.flush(5.0)
    queue.stop()
    assert queue.stats.sent_snapshots == 25
    powers = sorted(p[7] for payload in transport.sent for p in _points(payload)[0]
                    if p[1] == "stacklens.power_w")
    assert powers == [float(k) for k in range(25)]


def test_queue_counts_snapshots_it_drops() -> None:
    class Down(_ListTransport):
        def send(self, payload: bytes) -> None:
            from collector.export.otlp_transport import ExportError

            raise ExportError("down", retryable=True)

    payload = OtlpMetricsEncoder(ResourceInfo("n")).encode_batch([_snap(T0, 1.0)] * 10)
    queue = ExportQueue(Down(), max_bytes=len(payload) * 2)
    for _ in range(5):
        queue.put(payload, snapshots=10)
    assert queue.stats.dropped_requests == 30 and queue.stats.queued_requests == 2


# -- /metrics between host reads ------------------------------------------------------------------------
def test_host_signals_stay_on_the_page_between_their_reads_and_expire() -> None:
    exposition = PrometheusExposition("node-7", stale_after_s=30)

    def host_load() -> list[float]:
        return [s.value for fam in text_string_to_metric_families(exposition.render()) for s in fam.samples
                if s.name == "stacklens_host_load1"]

    exposition.update(_snap(T0, 1.0, host=True))
    exposition.update(_snap(T0 + 100_000_000, 2.0))  # a cycle without host signals
    assert host_load() == [0.5]
    exposition.update(_snap(T0 + 40 * 10**9, 3.0))
    assert host_load() == []  # not read for 40 s: stale


def test_metrics_page_is_unchanged_by_its_caches() -> None:
    """The same snapshot rendered by a fresh exposition and by one that has cached earlier scrapes."""
    warm = PrometheusExposition("node-7")
    for k in range(5):
        warm.update(_snap(T0 + k, float(k), host=True))
        warm.render()
    warm.update(_snap(T0 + 9, 42.0, host=True))
    cold = PrometheusExposition("node-7")
    cold.update(_snap(T0 + 9, 42.0, host=True))
    assert warm.render() == cold.render()
    assert "DCGM_FI_DEV_POWER_USAGE{" in cold.render() and " 42.0\n" in cold.render()


_GPUS = (GPU, GpuIdentity(1, "GPU-0001", "NVIDIA H100 80GB HBM3", "00000000:28:00.0", 1))
# (signal, labels) of the readings a cycle may hold: fast, medium and slow tiers, a per-link signal
_SERIES = (("power_w", ()), ("sm_clock_hz", ()), ("gpu_temp_c", ()), ("energy_j", ()),
           ("nvlink_tx_bytes_per_s", (("link", "0"),)), ("nvlink_tx_bytes_per_s", (("link", "1"),)))


_READINGS = st.lists(st.tuples(st.sampled_from(range(len(_SERIES))), st.one_of(st.none(), st.floats(0, 1e6))),
                     max_size=4)


@given(cycles=st.lists(st.tuples(_READINGS, st.sampled_from([False] * 12 + [True]),
                                 st.one_of(st.none(), _READINGS), st.sampled_from([1] * 8 + [30, 61])),
                       min_size=1, max_size=90),
       scrape_every=st.integers(1, 70))
@settings(max_examples=200, deadline=None)
def test_metrics_page_folded_at_scrapes_equals_updated_every_cycle(
        cycles: list[tuple[list[tuple[int, float | None]], bool, list[tuple[int, float | None]] | None, int]],
        scrape_every: int) -> None:
    """/metrics folds the cycles' readings in at the scrape (newest sample of each shape only): the page must
    be the one a fold at every cycle gives, whatever the mix of tiers, missing values, a GPU that comes, goes
    or is lost, the gaps between cycles (values expire 60 s after they were stored) and the scrape cadence."""
    every_cycle, at_scrapes = PrometheusExposition("n"), PrometheusExposition("n")
    t = T0
    for n, (first, lost, second, gap_s) in enumerate(cycles):
        t += gap_s * 1_000_000_000
        samples: list[GpuSample] = []
        for gpu, readings, gone in ((_GPUS[0], first, lost), (_GPUS[1], second, False)):
            if readings is None:
                continue
            if gone:
                samples.append(GpuSample(gpu, t, (Reading("gpu_lost", 1.0, t),), lost=True))
                continue
            rs = tuple(Reading(_SERIES[k][0], v, t + k, _SERIES[k][1]) for k, v in readings)
            samples.append(GpuSample(gpu, t, (Reading("gpu_lost", 0.0, t), *rs)))
        snapshot = NodeSnapshot("n", t, tuple(samples))
        every_cycle.update(snapshot)
        reference = every_cycle.render()
        at_scrapes.update(snapshot)
        if n % scrape_every == 0 or n == len(cycles) - 1:
            # the same samples and values; the order of the families on the page may differ (it never meant
            # anything: it follows when each series was first stored)
            assert _page(at_scrapes.render()) == _page(reference)


def _page(text: str) -> Counter[tuple[Any, ...]]:
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))  # each family once, its samples together
    return Counter((family.name, family.type, sample.name, tuple(sorted(sample.labels.items())), sample.value)
                   for family in text_string_to_metric_families(text) for sample in family.samples)


def test_prepared_getters_answer_as_access_call(standin_lib: Path, tmp_path: Path) -> None:
    """The per-cycle getters, prepared once, against pynvml's wrappers through NvmlAccess.call: values,
    NOT_SUPPORTED asked once, a transient error counted and missing, a lost GPU raised."""
    script = (StandinScript().driver("580.82.07").gpus(3).set(None, "field.186", 1)
              .set(None, "clock.sm", 1980, 1755, 1410)
              .set(None, "reasons", 0, 4, 0x44).set(None, "util.gpu", 97).set(None, "util.mem", 61)
              .set(1, "util.gpu", "NS").set(1, "clock.sm", 1980, "ERR:999", 1410).set(2, "lost_at_tick", 2))
    path = script.write(tmp_path / "script.txt")
    code = textwrap.dedent("""
        import ctypes, json
        from collector.nvml.access import GpuLost, NvmlAccess
        from collector.nvml.source import NvmlGpuSource, _Device
        from collector.records import GpuIdentity
        out = {}
        for way in ("prepared", "call"):
            a = NvmlAccess()
            a.init()
            src = NvmlGpuSource(a, xid_events=False, pcie_counter_poll=False)
            rows = []
            for i in range(3):
                h = a.call("nvmlDeviceGetHandleByIndex", i, i)
                dev = _Device(GpuIdentity(i, str(i), "x", ""), h)
                sm, reasons, util = src._fast_getters(dev)
                a.field_values(i, h, [(186, 0)])  # tick 0; the stand-in's tick moves with each batched read after
                for tick in range(4):
                    try:
                        if tick:
                            a.field_values(i, h, [(186, 0)])
                        if way == "prepared":
                            u = util()
                            rows.append([sm(), reasons(), None if u is None else list(u)])
                        else:
                            u = a.call("nvmlDeviceGetUtilizationRates", i, h)
                            rows.append([a.call("nvmlDeviceGetClockInfo", i, h, 1, key="sm"),
                                         a.call("nvmlDeviceGetCurrentClocksEventReasons", i, h),
                                         None if u is None else [u.gpu, u.memory]])
                    except GpuLost:
                        rows.append("lost")
            out[way] = {"rows": rows, "errors": sorted(map(list, a.errors.items())),
                        "unsupported": sorted(map(str, a._unsupported))}
            a.shutdown()
        print(json.dumps(out))
    """)
    out = _run_on_standin(code, standin_lib, path)
    assert out["prepared"] == out["call"]
    rows = out["prepared"]["rows"]
    assert rows[:4] == [[1980, 0, [97, 61]], [1755, 4, [97, 61]], [1410, 0x44, [97, 61]], [1410, 0x44, [97, 61]]]
    assert rows[4:8] == [[1980, 0, None], [None, 4, None], [1410, 0x44, None], [1410, 0x44, None]]
    assert rows[8:] == [[1980, 0, [97, 61]], [1755, 4, [97, 61]], "lost", "lost"]
    assert "('nvmlDeviceGetUtilizationRates', 1, None)" in out["prepared"]["unsupported"]
