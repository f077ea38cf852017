"""Host signals of the node: CPU utilisation, steal and iowait, run queue, load, memory, and the CFS
throttling of the cgroups whose processes hold GPUs (a throttled serving process stalls its GPU).

Reads /proc directly (root injectable for tests); ratios come from deltas of /proc/stat between two
samples, so the first sample has none (missing, not 0).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from collector.placement.procfs import read_cgroup_cpu_throttling, read_process_cgroup
from collector.records import HostSample, Reading


@dataclass(frozen=True, slots=True)
class _CpuTimes:
    total: int
    idle: int
    iowait: int
    steal: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def parse_proc_stat(text: str) -> tuple[_CpuTimes | None, int | None]:
    """The aggregate ``cpu`` line and ``procs_running`` of /proc/stat."""
    cpu: _CpuTimes | None = None
    running: int | None = None
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "cpu" and len(parts) >= 5:
            try:
                v = [int(x) for x in parts[1:]]
            except ValueError:
                continue
            v += [0] * (8 - len(v))
            # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
            total = sum(v[:8])
            cpu = _CpuTimes(total=total, idle=v[3] + v[4], iowait=v[4], steal=v[7])
        elif parts[0] == "procs_running" and len(parts) == 2 and parts[1].isdigit():
            running = int(parts[1])
    return cpu, running


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo fields in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            out[name.strip()] = int(fields[0]) * scale
    return out


class HostSource:
    """Samples host signals; keeps the previous /proc/stat to turn counters into ratios."""

    def __init__(self, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
        self._proc = proc_root
        self._cgroup = cgroup_root
        self._prev_cpu: _CpuTimes | None = None

    def sample(self, now_ns: int, gpu_pids: Iterable[int] = ()) -> HostSample:
        readings: list[Reading] = []
        add = readings.append
        stat = _read(self._proc / "stat")
        if stat is not None:
            cpu, running = parse_proc_stat(stat)
            if running is not None:
                add(Reading("host_run_queue", float(running), now_ns))
            if cpu is not None:
                prev, self._prev_cpu = self._prev_cpu, cpu
                dt = cpu.total - prev.total if prev is not None else 0
                if prev is not None and dt > 0:
                    add(Reading("host_cpu_util_ratio", 1.0 - (cpu.idle - prev.idle) / dt, now_ns))
                    add(Reading("host_cpu_steal_ratio", (cpu.steal - prev.steal) / dt, now_ns))
                    add(Reading("host_cpu_iowait_ratio", (cpu.iowait - prev.iowait) / dt, now_ns))
                else:
                    for name in ("host_cpu_util_ratio", "host_cpu_steal_ratio", "host_cpu_iowait_ratio"):
                        add(Reading(name, None, now_ns))
        loadavg = _read(self._proc / "loadavg")
        if loadavg is not None:
            try:
                add(Reading("host_load1", float(loadavg.split()[0]), now_ns))
            except (IndexError, ValueError):
                add(Reading("host_load1", None, now_ns))
        meminfo = _read(self._proc / "meminfo")
        if meminfo is not None:
            mem = parse_meminfo(meminfo)
            total, available = mem.get("MemTotal"), mem.get("MemAvailable")
            if total is not None:
                add(Reading("host_memory_total_bytes", float(total), now_ns))
                add(Reading("host_memory_used_bytes",
                            float(total - available) if available is not None else None, now_ns))
        if self._proc == Path("/proc"):
            count = os.cpu_count()
            if count:
                add(Reading("host_cpu_count", float(count), now_ns))
        readings.extend(self._cgroup_throttling(now_ns, gpu_pids))
        return HostSample(now_ns, tuple(readings))

    def _cgroup_throttling(self, now_ns: int, pids: Iterable[int]) -> list[Reading]:
        out: list[Reading] = []
        seen: set[str] = set()
        for pid in sorted(set(pids)):
            cg = read_process_cgroup(pid, self._proc)
            if cg is None or cg.cgroup_path is None or cg.cgroup_path in seen:
                continue
            seen.add(cg.cgroup_path)
            stats = read_cgroup_cpu_throttling(cg, self._cgroup)
            if stats is None:
                continue
            labels = (("cgroup", cg.cgroup_path), ("container_id", cg.container_id or ""))
            out.append(Reading("cgroup_cpu_throttled_s", stats.throttled_s, now_ns, labels))
            out.append(Reading("cgroup_cpu_throttled_periods", float(stats.nr_throttled), now_ns, labels))
            out.append(Reading("cgroup_cpu_periods", float(stats.nr_periods), now_ns, labels))
        return out
