"""Process → container (→ Kubernetes pod uid) from /proc/<pid>/cgroup, and CFS throttling of that
cgroup from its cpu.stat. Nothing here raises for a process that exits mid-read or a malformed file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A container id is 64 hex digits, in the runtimes' cgroup path forms:
#   docker:      /docker/<id>, docker-<id>.scope
#   containerd:  cri-containerd-<id>.scope, /kubepods/<qos>/pod<uid>/<id>
#   CRI-O:       crio-<id>.scope (crio-conmon-<id>.scope is the monitor, not the container)
#   podman:      libpod-<id>.scope
_CONTAINER = re.compile(r"(?:^|/|docker-|cri-containerd-|crio-|libpod-)([0-9a-f]{64})(?:\.scope)?(?:/|$)")
_CONMON = re.compile(r"crio-conmon-[0-9a-f]{64}")
# pod uid: /kubepods/burstable/pod<uid>/... or kubepods-burstable-pod<uid_with_underscores>.slice
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True, slots=True)
class ProcessCgroup:
    pid: int
    container_id: str | None
    cgroup_path: str | None  # the unified (v2) path, or the v1 cpu controller's path
    pod_uid: str | None = None


@dataclass(frozen=True, slots=True)
class CgroupCpuThrottling:
    nr_periods: int
    nr_throttled: int
    throttled_s: float
    usage_s: float | None


def parse_cgroup_file(pid: int, text: str) -> ProcessCgroup:
    """Parse the contents of /proc/<pid>/cgroup (v1 ``id:controllers:path`` and v2 ``0::path``)."""
    unified: str | None = None
    cpu_v1: str | None = None
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        paths.append(path)
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "cpu" in controllers.split(","):
            cpu_v1 = path
    container_id = pod_uid = None
    for path in ([cpu_v1] if cpu_v1 else []) + ([unified] if unified else []) + paths:
        if container_id is None and not _CONMON.search(path):
            m = _CONTAINER.search(path)
            if m:
                container_id = m.group(1)
        if pod_uid is None:
            m = _POD_UID.search(path)
            if m:
                pod_uid = m.group(1).replace("_", "-")
    return ProcessCgroup(pid, container_id, cpu_v1 or unified, pod_uid)


def read_process_cgroup(pid: int, proc_root: Path = Path("/proc")) -> ProcessCgroup | None:
    """The cgroup of a running process, or None if it has exited or cannot be read."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text(errors="replace")
    except (OSError, ValueError):
        return None
    return parse_cgroup_file(pid, text)


def _read_kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except (OSError, ValueError):
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def read_cgroup_cpu_throttling(cg: ProcessCgroup, cgroup_root: Path = Path("/sys/fs/cgroup")
                               ) -> CgroupCpuThrottling | None:
    """CFS throttling of the process's cgroup (v2 cpu.stat, or v1 cpu/cpuacct), None if unavailable."""
    if cg.cgroup_path is None:
        return None
    rel = cg.cgroup_path.lstrip("/")
    v2 = _read_kv(cgroup_root / rel / "cpu.stat")
    if "nr_periods" in v2 and "throttled_usec" in v2:
        usage = v2.get("usage_usec")
        return CgroupCpuThrottling(v2["nr_periods"], v2.get("nr_throttled", 0), v2["throttled_usec"] / 1e6,
                                   usage / 1e6 if usage is not None else None)
    for controller in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        v1 = _read_kv(cgroup_root / controller / rel / "cpu.stat")
        if "nr_periods" in v1 and "throttled_time" in v1:
            usage_ns: int | None = None
            try:
                usage_ns = int((cgroup_root / controller / rel / "cpuacct.usage").read_text().strip())
            except (OSError, ValueError):
                usage_ns = None
            return CgroupCpuThrottling(v1["nr_periods"], v1.get("nr_throttled", 0), v1["throttled_time"] / 1e9,
                                       usage_ns / 1e9 if usage_ns is not None else None)
    return None
