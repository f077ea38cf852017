"""GPU → process → container → Kubernetes pod, as the join key of every request.

NVML says which pids hold a GPU; /proc/<pid>/cgroup gives the container id (and the pod uid on
Kubernetes); the kubelet pod-resources API says which pod and container the device plugin gave each
GPU to. A GPU given to a pod with no process on it yet is recorded with ``pid=0``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from collector.placement.podresources import PodDevice, PodResourcesClient, PodResourcesUnavailable, gpu_to_pods
from collector.placement.procfs import read_process_cgroup
from collector.records import GpuSample, Placement

log = logging.getLogger(__name__)


class PlacementResolver:
    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        pod_resources: PodResourcesClient | None = None,
        pod_refresh_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc = proc_root
        self._pods = pod_resources
        self._pod_refresh_s = pod_refresh_s
        self._monotonic = monotonic
        self._pod_map: dict[str, list[PodDevice]] = {}
        self._pod_read_at: float | None = None
        self._pod_failed_logged = False

    def _pod_devices(self) -> dict[str, list[PodDevice]]:
        if self._pods is None or not self._pods.available():
            return {}
        now = self._monotonic()
        if self._pod_read_at is not None and now - self._pod_read_at < self._pod_refresh_s:
            return self._pod_map
        self._pod_read_at = now
        try:
            self._pod_map = gpu_to_pods(self._pods.list_gpu_devices())
            self._pod_failed_logged = False
        except PodResourcesUnavailable as exc:
            if not self._pod_failed_logged:
                log.warning("kubelet pod-resources unavailable: %s; placement without pod names", exc)
                self._pod_failed_logged = True
            self._pod_map = {}
        return self._pod_map

    def resolve(self, samples: Iterable[GpuSample], now_ns: int) -> tuple[Placement, ...]:
        pods = self._pod_devices()
        out: list[Placement] = []
        for sample in samples:
            gpu = sample.gpu
            assigned = pods.get(gpu.uuid, [])
            pod = assigned[0] if len(assigned) == 1 else None
            for proc in sample.processes:
                cg = read_process_cgroup(proc.pid, self._proc)
                out.append(Placement(
                    gpu_uuid=gpu.uuid, gpu_index=gpu.index, pid=proc.pid, time_ns=now_ns,
                    used_memory_bytes=proc.used_memory_bytes,
                    container_id=cg.container_id if cg else None,
                    pod_uid=cg.pod_uid if cg else None,
                    pod=pod.pod if pod else None,
                    namespace=pod.namespace if pod else None,
                    container=pod.container if pod else None,
                ))
            if not sample.processes:
                for p in assigned:
                    out.append(Placement(gpu_uuid=gpu.uuid, gpu_index=gpu.index, pid=0, time_ns=now_ns,
                                         pod=p.pod, namespace=p.namespace, container=p.container))
        return tuple(out)
