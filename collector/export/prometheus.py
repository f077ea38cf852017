"""The agent's Prometheus /metrics: DCGM-compatible names and labels, so dashboards built for
dcgm-exporter keep working, plus what DCGM lacks under ``stacklens_``.

A :class:`SnapshotCollector` yields families from the latest snapshot at scrape time (the
prometheus_client ``Collector`` protocol); the registry is injected so each test builds its own.
DCGM counters keep DCGM's exposition (a ``counter`` TYPE with no ``_total`` suffix). Missing values
are left out of the exposition, never written as 0.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from collector.records import GpuIdentity, NodeSnapshot, Placement, Reading
from collector.signals import CLOCK_EVENT_REASONS, SIGNALS

DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "container", "namespace", "pod")


class _Families:
    """Families of one scrape, created on first use, in first-use order."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}

    def get(self, name: str, doc: str, kind: str) -> Metric:
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = Metric(name, doc, kind)
        return fam


class SnapshotCollector(Collector):
    """Exposes the most recent :class:`NodeSnapshot` handed to :meth:`update`."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname
        self._lock = threading.Lock()
        self._snapshot: NodeSnapshot | None = None
        self._xid_counts: dict[tuple[str, int], int] = {}
        self._xid_last: dict[str, int] = {}
        self._placements: tuple[Placement, ...] = ()

    def update(self, snapshot: NodeSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            if snapshot.placements is not None:  # placement runs on its own cadence: keep the last known
                self._placements = snapshot.placements
            for ev in snapshot.events:
                self._xid_counts[(ev.gpu_uuid, ev.xid)] = self._xid_counts.get((ev.gpu_uuid, ev.xid), 0) + 1
                self._xid_last[ev.gpu_uuid] = ev.xid

    def _gpu_labels(self, gpu: GpuIdentity, pod: Placement | None) -> list[str]:
        return [str(gpu.index), gpu.uuid, gpu.pci_bus_id, gpu.device, gpu.name, self._hostname,
                (pod.container or "") if pod else "", (pod.namespace or "") if pod else "",
                (pod.pod or "") if pod else ""]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = self._snapshot
            xid_counts = dict(self._xid_counts)
            xid_last = dict(self._xid_last)
            placements = self._placements
        status = Metric("stacklens_agent_gpu_status", "1 for the agent's current GPU backend status.", "gauge")
        status.add_sample("stacklens_agent_gpu_status",
                          {"status": snapshot.gpu_status if snapshot else "starting"}, 1.0)
        yield status
        if snapshot is None:
            return
        families = _Families()

        # pod labels: the pod that holds the GPU, when exactly one does (as dcgm-exporter does)
        pods: dict[str, Placement] = {}
        for p in placements:
            if p.pod:
                pods.setdefault(p.gpu_uuid, p)
        for gs in snapshot.gpus:
            labels = dict(zip(DCGM_LABELS, self._gpu_labels(gs.gpu, pods.get(gs.gpu.uuid)), strict=True))
            for r in gs.readings:
                self._add(families, r, labels)
            info = families.get("stacklens_gpu_info", "GPU identity; always 1.", "gauge")
            info.add_sample("stacklens_gpu_info", {**labels, "driver_version": snapshot.driver_version or ""}, 1.0)
            if gs.gpu.uuid in xid_last:
                xid = families.get("DCGM_FI_DEV_XID_ERRORS", SIGNALS["xid_last"].description, "gauge")
                xid.add_sample("DCGM_FI_DEV_XID_ERRORS", labels, float(xid_last[gs.gpu.uuid]))
            for (uuid, number), count in sorted(xid_counts.items()):
                if uuid == gs.gpu.uuid:
                    fam = families.get("stacklens_xid_events", "XID events by number.", "counter")
                    fam.add_sample("stacklens_xid_events_total", {**labels, "xid": str(number)}, float(count))
        host_labels = {"Hostname": self._hostname}
        if snapshot.host is not None:
            for r in snapshot.host.readings:
                self._add(families, r, host_labels)
        by_uuid = {gs.gpu.uuid: gs.gpu for gs in snapshot.gpus}
        for p in placements:
            gpu = by_uuid.get(p.gpu_uuid)
            if gpu is None or p.used_memory_bytes is None:
                continue
            sig = SIGNALS["gpu_process_memory_bytes"]
            fam = families.get(sig.prometheus_name, sig.description, "gauge")
            fam.add_sample(sig.prometheus_name, {
                "gpu": str(gpu.index), "UUID": gpu.uuid, "Hostname": self._hostname, "pid": str(p.pid),
                "container_id": p.container_id or "", "pod": p.pod or "", "namespace": p.namespace or "",
                "container": p.container or "",
            }, float(p.used_memory_bytes))
        yield from families.by_name.values()

    @staticmethod
    def _add(families: _Families, r: Reading, labels: dict[str, str]) -> None:
        if r.value is None:
            return
        sig = SIGNALS[r.signal]
        extra = dict(r.labels)
        if sig.dcgm is not None and not extra:
            name = sig.dcgm.name
            fam = families.get(name, sig.description, sig.kind)
            fam.add_sample(name, labels, r.value * sig.dcgm.scale)
        else:
            name = sig.prometheus_name
            kind = sig.kind
            fam = families.get(name, sig.description, kind)
            sample_name = name + "_total" if kind == "counter" and not name.endswith("_total") else name
            fam.add_sample(sample_name, {**labels, **extra}, r.value)
        if r.signal == "clock_event_reasons":
            mask = int(r.value)
            flag = SIGNALS["clock_event_reason_active"]
            fam = families.get(flag.prometheus_name, flag.description, "gauge")
            for bit, reason in CLOCK_EVENT_REASONS.items():
                fam.add_sample(flag.prometheus_name, {**labels, "reason": reason}, 1.0 if mask & bit else 0.0)
