"""Process → container (→ Kubernetes pod uid) from /proc/<pid>/cgroup, and CFS throttling of that
cgroup from its cpu.stat. Nothing here raises for a process that exits mid-read or a malformed file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# A container id is 64 hex digits, as a whole path segment or in the runtimes' scope names:
#   docker:      /docker/<id>, docker-<id>.scope
#   containerd:  cri-containerd-<id>.scope, /kubepods/<qos>/pod<uid>/<id>
#   CRI-O:       crio-<id>.scope (crio-conmon-<id>.scope is the monitor, not the container)
#   podman:      libpod-<id>.scope (libpod-conmon-<id>.scope is the monitor)
# The lookahead leaves the closing "/" for a nested id's match, so the innermost one can be taken
# (kind and docker-in-docker nest a pod's container inside the node's container).
_CONTAINER = re.compile(r"(?:^|/|docker-|cri-containerd-|crio-|libpod-)([0-9a-f]{64})(?:\.scope)?(?=/|$)")
_CONMON = re.compile(r"conmon-[0-9a-f]{64}")
# pod uid: /kubepods/burstable/pod<uid>/... or kubepods-burstable-pod<uid_with_underscores>.slice;
# a static (mirror) pod's uid is a 32-hex hash of its manifest rather than a UUID.
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})(?=\.slice|/|$)")
# cgroup v2 marks the path of a cgroup removed under a still-listed (exiting) task
_DELETED = " (deleted)"


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


def _last_container_id(path: str) -> str | None:
    if _CONMON.search(path):
        return None
    found = None
    for m in _CONTAINER.finditer(path):
        found = m.group(1)
    return found


def _last_pod_uid(path: str) -> str | None:
    found = None
    for m in _POD_UID.finditer(path):
        found = m.group(1).replace("_", "-")
    return found


def parse_cgroup_file(pid: int, text: str) -> ProcessCgroup:
    """Parse the contents of /proc/<pid>/cgroup (v1 ``id:controllers:path`` and v2 ``0::path``).

    The container id and pod uid are taken from the v1 cpu path first, then the unified path, then any
    other controller's path; within a path, the innermost match wins."""
    unified: str | None = None
    cpu_v1: str | None = None
    paths: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if path.endswith(_DELETED):
            path = path[: -len(_DELETED)]
        if not path.startswith("/"):
            continue
        paths.append(path)
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "cpu" in controllers.split(","):
            cpu_v1 = path
    ordered = [p for p in (cpu_v1, unified) if p is not None] + paths
    container_id = next((c for c in map(_last_container_id, ordered) if c is not None), None)
    pod_uid = next((u for u in map(_last_pod_uid, ordered) if u is not None), None)
    return ProcessCgroup(pid, container_id, cpu_v1 if cpu_v1 is not None else unified, pod_uid)


def read_process_cgroup(pid: int, proc_root: Path = Path("/proc")) -> ProcessCgroup | None:
    """The cgroup of a running process, or None if it has exited or cannot be read."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text(errors="replace")
    except (OSError, ValueError):  # FileNotFoundError, ProcessLookupError (ESRCH), PermissionError, ...
        return None
    return parse_cgroup_file(pid, text)


def _read_kv(path: Path) -> dict[str, int]:
    """``key value`` lines of a cgroup stat file; a malformed line is skipped, an unreadable file is empty."""
    out: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except (OSError, ValueError):
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isascii():
            continue
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            continue
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()
    except (OSError, ValueError):
        return None
    if not text.isascii():
        return None
    try:
        return int(text)
    except ValueError:
        return None


def read_cgroup_cpu_throttling(cg: ProcessCgroup, cgroup_root: Path = Path("/sys/fs/cgroup")
                               ) -> CgroupCpuThrottling | None:
    """CFS throttling of the process's cgroup, None if unavailable.

    v2: ``<root>/<path>/cpu.stat`` (``throttled_usec``, ``usage_usec``); it has ``nr_periods`` only where
    the cpu controller is enabled, and without it there is nothing to report. v1: ``cpu.stat``
    (``throttled_time`` in ns) under the cpu controller's mount (``cpu,cpuacct`` or ``cpu``), and
    ``cpuacct.usage`` (ns) beside it or under a separately mounted ``cpuacct``."""
    if cg.cgroup_path is None:
        return None
    rel = cg.cgroup_path.lstrip("/")
    if "\x00" in rel or ".." in Path(rel).parts:
        return None
    v2 = _read_kv(cgroup_root / rel / "cpu.stat")
    if "nr_periods" in v2 and "throttled_usec" in v2:
        usage = v2.get("usage_usec")
        return CgroupCpuThrottling(v2["nr_periods"], v2.get("nr_throttled", 0), v2["throttled_usec"] / 1e6,
                                   usage / 1e6 if usage is not None else None)
    for controller in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        v1 = _read_kv(cgroup_root / controller / rel / "cpu.stat")
        if "nr_periods" in v1 and "throttled_time" in v1:
            usage_ns = _read_int(cgroup_root / controller / rel / "cpuacct.usage")
            if usage_ns is None:
                usage_ns = _read_int(cgroup_root / "cpuacct" / rel / "cpuacct.usage")
            return CgroupCpuThrottling(v1["nr_periods"], v1.get("nr_throttled", 0), v1["throttled_time"] / 1e9,
                                       usage_ns / 1e9 if usage_ns is not None else None)
    return None
