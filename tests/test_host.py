"""Host signals from a fake /proc: ratios from /proc/stat deltas, missing on the first sample,
memory, load, and the CFS throttling of the cgroups of GPU processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.host import HostSource, parse_meminfo, parse_proc_stat


def _stat(user: int, idle: int, iowait: int, steal: int, running: int) -> str:
    return (f"cpu  {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
            f"intr 1 2 3\nprocs_running {running}\nprocs_blocked 0\n")


def test_parse_proc_stat_and_meminfo() -> None:
    cpu, running = parse_proc_stat(_stat(100, 800, 50, 50, 7))
    assert cpu is not None and running == 7
    assert (cpu.total, cpu.idle, cpu.iowait, cpu.steal) == (1000, 850, 50, 50)
    mem = parse_meminfo("MemTotal:       1000 kB\nMemAvailable:    250 kB\nHugePages_Total: 0\n")
    assert mem == {"MemTotal": 1024000, "MemAvailable": 256000, "HugePages_Total": 0}


def test_host_source_ratios_from_deltas(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "loadavg").write_text("3.25 2.00 1.00 5/800 1234\n")
    (proc / "meminfo").write_text("MemTotal: 2000 kB\nMemAvailable: 500 kB\n")
    (proc / "stat").write_text(_stat(100, 800, 50, 50, 3))
    src = HostSource(proc, tmp_path / "cgroup")
    first = {r.signal: r.value for r in src.sample(1).readings}
    assert first["host_cpu_util_ratio"] is None  # needs a previous read: missing, not 0
    assert first["host_run_queue"] == 3 and first["host_load1"] == 3.25
    assert first["host_memory_used_bytes"] == 1500 * 1024
    (proc / "stat").write_text(_stat(400, 1400, 50, 150, 9))  # +300 user, +600 idle, +100 steal
    second = {r.signal: r.value for r in src.sample(2).readings}
    assert second["host_cpu_util_ratio"] == pytest.approx(1 - 600 / 1000)
    assert second["host_cpu_steal_ratio"] == pytest.approx(0.1)
    assert second["host_cpu_iowait_ratio"] == pytest.approx(0.0)


def test_host_source_reads_throttling_of_gpu_processes(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "4120").mkdir(parents=True)
    (proc / "4121").mkdir(parents=True)
    (proc / "stat").write_text(_stat(1, 1, 0, 0, 1))
    for pid in ("4120", "4121"):  # two processes of one container: one cgroup, reported once
        (proc / pid / "cgroup").write_text("0::/kubepods.slice/engine.scope\n")
    (cgroup / "kubepods.slice" / "engine.scope").mkdir(parents=True)
    (cgroup / "kubepods.slice" / "engine.scope" / "cpu.stat").write_text(
        "nr_periods 100\nnr_throttled 25\nthrottled_usec 750000\n")
    readings = HostSource(proc, cgroup).sample(1, gpu_pids=[4120, 4121, 99999]).readings
    throttled = [r for r in readings if r.signal == "cgroup_cpu_throttled_s"]
    assert len(throttled) == 1
    assert throttled[0].value == pytest.approx(0.75)
    assert dict(throttled[0].labels)["cgroup"] == "/kubepods.slice/engine.scope"
    periods = {r.signal: r.value for r in readings if r.signal.startswith("cgroup_cpu_") and r.labels}
    assert periods["cgroup_cpu_throttled_periods"] == 25 and periods["cgroup_cpu_periods"] == 100


def test_unreadable_proc_gives_no_readings_and_no_error(tmp_path: Path) -> None:
    assert HostSource(tmp_path / "nothing").sample(1).readings == ()
