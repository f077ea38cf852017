"""The agent's Prometheus /metrics: DCGM-compatible names and labels, so dashboards built for
dcgm-exporter keep working, plus what DCGM lacks under ``stacklens_``.

:class:`PrometheusExposition` renders the text exposition from the latest snapshot at scrape time;
the agent's own health metrics come from a prometheus_client registry (injected, so each test builds
its own) appended to the same page. DCGM counters keep DCGM's exposition (a ``counter`` TYPE with no
``_total`` suffix). Missing values are left out, never written as 0.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from collector.records import GpuIdentity, HostSample, NodeSnapshot, Placement, Reading
from collector.signals import SIGNALS, clock_event_flags

DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "container", "namespace", "pod")


def escape_label_value(value: str) -> str:
    """A label value as the text exposition format wants it (backslash, newline and quote escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)


def format_value(value: float) -> str:
    """A sample value as Prometheus clients write it: ``1.0``, ``NaN``, ``+Inf``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


_SIGNAL_OF = operator.itemgetter(0)
_LABELS_OF = operator.itemgetter(3)
# snapshots held before they are folded into the latest values, when no scrape comes
_FOLD_EVERY = 64


class _Families:
    """The families of one scrape as exposition text, in first-use order. Written directly: the
    prometheus_client renderer took ~16 ms for an 8-GPU node, this takes a tenth of that."""

    def __init__(self) -> None:
        self.by_name: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, family: str, doc: str, kind: str, sample: str, labels: str, value: float) -> None:
        self.add_lines(family, doc, kind, [f"{sample}{{{labels}}} {format_value(value)}\n"])

    def add_lines(self, family: str, doc: str, kind: str, lines: list[str]) -> None:
        entry = self.by_name.get(family)
        if entry is None:
            entry = self.by_name[family] = (doc, kind, [])
        entry[2].extend(lines)

    def text(self) -> str:
        out: list[str] = []
        for name, (doc, kind, lines) in self.by_name.items():
            help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            out.extend(lines)
        return "".join(out)


class PrometheusExposition:
    """Renders the Prometheus text exposition of the latest :class:`NodeSnapshot` (and of the slowly
    read signals of earlier ones) handed to :meth:`update`."""

    def __init__(self, hostname: str, stale_after_s: float = 60.0) -> None:
        self._hostname = hostname
        self._stale_after_ns = int(stale_after_s * 1e9)
        # last reading per GPU and (signal, labels): slow-tier signals are read every 10 s, and a scrape
        # in between must still see them. Staleness is measured on the agent's clock (when stored), not
        # on the reading's own (NVML's) timestamp.
        self._latest: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Reading, int]]] = {}
        self._lock = threading.Lock()
        self._snapshot: NodeSnapshot | None = None
        self._xid_counts: dict[tuple[str, int], int] = {}
        self._xid_last: dict[str, int] = {}
        self._placements: tuple[Placement, ...] = ()
        # host signals are read on their own cadence (every second): the last sample and when it was stored
        self._host: tuple[HostSample, int] | None = None
        # per (label text of the GPU or host, signal, labels): (family, help, type, "name{labels} ", scale);
        # per (label text, clock-event bitmask): the lines of the decoded flags. Built at the first scrape
        # that needs them: a scrape then writes one line per sample from a kept prefix.
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[str, str, str, str, float]] = {}
        self._flag_lines: dict[tuple[str, int], list[str]] = {}
        # snapshots not yet folded into _latest (see update), and the GPUs of the last one applied
        self._pending: list[NodeSnapshot] = []
        self._uuids: tuple[str, ...] = ()

    def update(self, snapshot: NodeSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            uuids = tuple(gs.gpu.uuid for gs in snapshot.gpus)
            if uuids != self._uuids or any(gs.lost for gs in snapshot.gpus):
                # a GPU came, went or is lost: what came before is applied first, this snapshot at once
                self._fold()
                self._uuids = uuids
                self._apply([(gs.gpu.uuid, gs.readings, snapshot.time_ns, gs.lost) for gs in snapshot.gpus])
                for gone in set(self._latest) - set(uuids):
                    del self._latest[gone]
            else:
                # the readings are folded in at the next scrape (or every _FOLD_EVERY snapshots), where only
                # the newest sample of each shape counts: ten 100 ms cycles cost about two folds, not ten
                self._pending.append(snapshot)
                if len(self._pending) >= _FOLD_EVERY:
                    self._fold()
            if snapshot.host is not None:
                self._host = (snapshot.host, snapshot.time_ns)
            if snapshot.placements is not None:  # placement runs on its own cadence: keep the last known
                self._placements = snapshot.placements
            for ev in snapshot.events:
                self._xid_counts[(ev.gpu_uuid, ev.xid)] = self._xid_counts.get((ev.gpu_uuid, ev.xid), 0) + 1
                self._xid_last[ev.gpu_uuid] = ev.xid

    def _fold(self) -> None:
        """Apply the pending snapshots (under the lock). A GPU sample whose readings have the same series
        in the same order as a newer pending one (same GPU) is skipped: every value it holds is replaced
        by the newer one. The samples kept are applied oldest first, so for each series the newest
        reading wins, with the time its snapshot was stored."""
        pending, self._pending = self._pending, []
        chosen: list[tuple[str, tuple[Reading, ...], int, bool]] = []
        seen: set[tuple[str, tuple[str, ...], tuple[tuple[tuple[str, str], ...], ...]]] = set()
        for snapshot in reversed(pending):
            for gs in snapshot.gpus:
                readings = gs.readings
                shape = (gs.gpu.uuid, tuple(map(_SIGNAL_OF, readings)), tuple(map(_LABELS_OF, readings)))
                if shape not in seen:
                    seen.add(shape)
                    chosen.append((gs.gpu.uuid, readings, snapshot.time_ns, gs.lost))
        chosen.reverse()
        self._apply(chosen)

    def _apply(self, samples: list[tuple[str, tuple[Reading, ...], int, bool]]) -> None:
        """Store each GPU sample's readings as the latest of their series (under the lock)."""
        for uuid, readings, at, lost in samples:
            latest = self._latest.setdefault(uuid, {})
            if lost:
                latest.clear()  # nothing it said before holds for a GPU that fell off the bus
            latest.update({(r[0], r[3]): (r, at) for r in readings})  # (signal, labels)

    def _gpu_labels(self, gpu: GpuIdentity, pod: Placement | None) -> list[tuple[str, str]]:
        values = [str(gpu.index), gpu.uuid, gpu.pci_bus_id, gpu.device, gpu.name, self._hostname,
                  (pod.container or "") if pod else "", (pod.namespace or "") if pod else "",
                  (pod.pod or "") if pod else ""]
        return list(zip(DCGM_LABELS, values, strict=True))

    def render(self) -> str:
        """The exposition text (format 0.0.4)."""
        with self._lock:
            self._fold()
            snapshot = self._snapshot
            xid_counts = dict(self._xid_counts)
            xid_last = dict(self._xid_last)
            placements = self._placements
            now = snapshot.time_ns if snapshot is not None else 0
            if self._host is not None and now - self._host[1] > self._stale_after_ns:
                self._host = None
            host = self._host[0] if self._host is not None else None
            for readings in self._latest.values():  # stale values are swept at scrapes, not every cycle
                for key in [k for k, (_, at) in readings.items() if now - at > self._stale_after_ns]:
                    del readings[key]
            latest = {uuid: [r for r, _ in readings.values()] for uuid, readings in self._latest.items()}
        families = _Families()
        families.add("stacklens_agent_gpu_status", "1 for the agent's current GPU backend status.", "gauge",
                     "stacklens_agent_gpu_status",
                     label_text([("status", snapshot.gpu_status if snapshot else "starting")]), 1.0)
        if snapshot is None:
            return families.text()
        # pod labels: the pod that holds the GPU, when exactly one does (as dcgm-exporter does)
        pods: dict[str, Placement] = {}
        for p in placements:
            if p.pod:
                pods.setdefault(p.gpu_uuid, p)
        for gs in snapshot.gpus:
            pairs = self._gpu_labels(gs.gpu, pods.get(gs.gpu.uuid))
            labels = label_text(pairs)  # escaped once per GPU and scrape
            self._add_all(families, latest.get(gs.gpu.uuid, gs.readings), labels)
            families.add("stacklens_gpu_info", "GPU identity; always 1.", "gauge", "stacklens_gpu_info",
                         labels + "," + label_text([("driver_version", snapshot.driver_version or "")]), 1.0)
            if gs.gpu.uuid in xid_last:
                families.add("DCGM_FI_DEV_XID_ERRORS", SIGNALS["xid_last"].description, "gauge",
                             "DCGM_FI_DEV_XID_ERRORS", labels, float(xid_last[gs.gpu.uuid]))
            for (uuid, number), count in sorted(xid_counts.items()):
                if uuid == gs.gpu.uuid:
                    families.add("stacklens_xid_events_total", "XID events by number.", "counter",
                                 "stacklens_xid_events_total", labels + f',xid="{number}"', float(count))
        if host is not None:
            host_labels = label_text([("Hostname", self._hostname)])
            self._add_all(families, host.readings, host_labels)
        by_uuid = {gs.gpu.uuid: gs.gpu for gs in snapshot.gpus}
        sig = SIGNALS["gpu_process_memory_bytes"]
        for p in placements:
            gpu = by_uuid.get(p.gpu_uuid)
            if gpu is None or p.used_memory_bytes is None:
                continue
            families.add(sig.prometheus_name, sig.description, "gauge", sig.prometheus_name, label_text([
                ("gpu", str(gpu.index)), ("UUID", gpu.uuid), ("Hostname", self._hostname), ("pid", str(p.pid)),
                ("container_id", p.container_id or ""), ("pod", p.pod or ""), ("namespace", p.namespace or ""),
                ("container", p.container or "")]), float(p.used_memory_bytes))
        return families.text()

    def _add_all(self, families: _Families, readings: Iterable[Reading], labels: str) -> None:
        """One line per reading with a value, from the kept "name{labels} " prefix of its series (the
        scrape's inner loop: ~700 samples on an 8-GPU node)."""
        heads, by_name = self._heads, families.by_name
        for signal, value, _, extra in readings:
            if value is None:
                continue
            head = heads.get((labels, signal, extra))
            if head is None:
                head = self._head((labels, signal, extra))
            family, doc, kind, prefix, scale = head
            v = value * scale
            line = prefix + (repr(float(v)) if v - v == 0 else format_value(v)) + "\n"  # finite: repr as format_value
            entry = by_name.get(family)
            if entry is None:
                entry = by_name[family] = (doc, kind, [])
            entry[2].append(line)
            if signal == "clock_event_reasons":
                self._add_flags(families, int(value), labels)

    def _add_flags(self, families: _Families, mask: int, labels: str) -> None:
        """The decoded clock-event reasons, one flag each: the lines are kept per GPU and bitmask."""
        flag = SIGNALS["clock_event_reason_active"]
        lines = self._flag_lines.get((labels, mask))
        if lines is None:
            lines = [f'{flag.prometheus_name}{{{labels},reason="{reason}"}} {format_value(active)}\n'
                     for reason, active in clock_event_flags(mask)]
            if len(self._flag_lines) < 10_000:
                self._flag_lines[(labels, mask)] = lines
        families.add_lines(flag.prometheus_name, flag.description, "gauge", lines)

    def _head(self, key: tuple[str, str, tuple[tuple[str, str], ...]]) -> tuple[str, str, str, str, float]:
        labels, signal, extra = key
        sig = SIGNALS[signal]
        if sig.dcgm is not None and not extra:
            # DCGM's exposition: its own units, and counters keep their bare names
            name, scale, all_labels = sig.dcgm.name, sig.dcgm.scale, labels
        else:
            name, scale = sig.prometheus_name, 1.0
            if sig.kind == "counter" and not name.endswith("_total"):
                name += "_total"
            all_labels = labels + "," + label_text(extra) if extra else labels
        head = (name, sig.description, sig.kind, f"{name}{{{all_labels}}} ", scale)
        if len(self._heads) < 100_000:  # bounded: pod labels and cgroups come and go
            self._heads[key] = head
        return head


class _MetricsHandler(BaseHTTPRequestHandler):
    exposition: PrometheusExposition
    registry: CollectorRegistry | None

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        text = self.exposition.render()
        if self.registry is not None:
            text += generate_latest(self.registry).decode()
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve_metrics(address: str, port: int, exposition: PrometheusExposition,
                  registry: CollectorRegistry | None = None) -> ThreadingHTTPServer:
    """Serve /metrics on a daemon thread: the snapshot's exposition, then the agent's own metrics."""
    handler = type("MetricsHandler", (_MetricsHandler,), {"exposition": exposition, "registry": registry})
    server = ThreadingHTTPServer((address, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="stacklens-metrics", daemon=True).start()
    return server
