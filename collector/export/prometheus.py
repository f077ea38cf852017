"""The agent's Prometheus /metrics: DCGM-compatible names and labels, so dashboards built for
dcgm-exporter keep working, plus what DCGM lacks under ``stacklens_``.

:class:`PrometheusExposition` renders the text exposition from the latest snapshot at scrape time;
the agent's own health metrics come from a prometheus_client registry (injected, so each test builds
its own) appended to the same page. DCGM counters keep DCGM's exposition (a ``counter`` TYPE with no
``_total`` suffix). Missing values are left out, never written as 0.
"""

from __future__ import annotations

import io
import logging
import math
import operator
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, generate_latest

from collector.records import GpuIdentity, HostSample, NodeSnapshot, Placement, Reading
from collector.signals import SIGNALS, clock_event_flags

log = logging.getLogger(__name__)

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


_VALUE_OF = operator.itemgetter(1)


class _Layout:
    """The structure of one page, built when it changes: the families in first-use order, each with its text
    and a slot for each sample value, and which value goes in each slot (see :meth:`PrometheusExposition.render`).
    The prometheus_client renderer took ~16 ms for an 8-GPU node; writing each line took ~2-3 ms; filling the
    kept text takes a fraction of that."""

    def __init__(self) -> None:
        # family -> (help, type, text pieces with None for each slot, value references: (source, position) per slot)
        self.by_name: dict[str, tuple[str, str, list[str | None], list[tuple[int, int]]]] = {}

    def add(self, family: str, doc: str, kind: str, pieces: tuple[str | None, ...],
            refs: tuple[tuple[int, int], ...] = ()) -> None:
        """``pieces``: text, None for each slot, filled by ``refs`` in order."""
        entry = self.by_name.get(family)
        if entry is None:
            entry = self.by_name[family] = (doc, kind, [], [])
        entry[2].extend(pieces)
        entry[3].extend(refs)

    def literal(self, family: str, doc: str, kind: str, text: str) -> None:
        self.add(family, doc, kind, (text,))

    def build(self, offsets: list[int]) -> tuple[list[str], Callable[[list[Any]], Any] | None, int]:
        """(the page's text cut at its slots: text, slot, text, ..., text (slots as ""), a getter of the slots'
        values from the sources' values laid end to end, how many slots)."""
        segments: list[str] = []
        text: list[str] = []
        refs: list[int] = []
        for name, (doc, kind, pieces, value_refs) in self.by_name.items():
            help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
            text.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            for piece in pieces:
                if piece is None:
                    segments += ("".join(text), "")
                    text.clear()
                else:
                    text.append(piece)
            refs.extend(offsets[source] + position for source, position in value_refs)
        segments.append("".join(text))
        return segments, operator.itemgetter(*refs) if refs else None, len(refs)


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
        # per (label text, clock-event bitmask): the text of the decoded flags. Built at the first scrape
        # that needs them (heads: when a page's structure is built, see render).
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[str, str, str, str, float]] = {}
        self._flag_lines: dict[tuple[str, int], str] = {}
        # the last page's structure (see render): its key; its text cut at the value slots, the getter of the
        # slots' values and how many
        self._layout_key: tuple[Any, ...] | None = None
        # the text of each float value written (see render)
        self._texts: dict[Any, str] = {}
        # per (label text, series of a source): each series' scale, and where its clock-event readings are
        self._scales: dict[tuple[str, tuple[Any, ...]], tuple[tuple[float, ...], tuple[int, ...]]] = {}
        self._layout: tuple[list[str], Callable[[list[Any]], Any] | None, int] = ([""], None, 0)
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
        """The exposition text (format 0.0.4).

        The page is a kept text with a slot for each sample value, filled in at each scrape: its
        structure (the GPUs and their labels, the series each holds in order and which are missing, the host's,
        the XID and process lines) is compared with the last scrape's, and the text is built again only
        when it changed. Values are written as :func:`format_value` writes them."""
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
            for stored in self._latest.values():  # stale values are swept at scrapes, not every cycle
                for stale in [k for k, (_, at) in stored.items() if now - at > self._stale_after_ns]:
                    del stored[stale]
            latest = {uuid: ([r for r, _ in stored.values()], tuple(stored)) for uuid, stored in self._latest.items()}
        status = snapshot.gpu_status if snapshot else "starting"
        if snapshot is None:
            key: tuple[Any, ...] = (status,)
            sources: list[tuple[str, list[Reading], tuple[Any, ...]]] = []
            extras: list[tuple[str, ...]] = []
            processes: tuple[str, ...] = ()
        else:
            # pod labels: the pod that holds the GPU, when exactly one does (as dcgm-exporter does)
            pods: dict[str, Placement] = {}
            for p in placements:
                if p.pod:
                    pods.setdefault(p.gpu_uuid, p)
            sources, extras = [], []
            for gs in snapshot.gpus:
                labels = label_text(self._gpu_labels(gs.gpu, pods.get(gs.gpu.uuid)))  # escaped once per GPU and scrape
                got = latest.get(gs.gpu.uuid)
                readings, keys = got if got is not None else (list(gs.readings),
                                                              tuple((r[0], r[3]) for r in gs.readings))
                sources.append((labels, readings, keys))
                uuid = gs.gpu.uuid
                extras.append((
                    labels + "," + label_text([("driver_version", snapshot.driver_version or "")]),
                    format_value(float(xid_last[uuid])) if uuid in xid_last else "",
                    *(f'{labels},xid="{number}"}} {format_value(float(count))}'
                      for (u, number), count in sorted(xid_counts.items()) if u == uuid)))
            if host is not None:
                sources.append((label_text([("Hostname", self._hostname)]), list(host.readings),
                                tuple((r[0], r[3]) for r in host.readings)))
            by_uuid = {gs.gpu.uuid: gs.gpu for gs in snapshot.gpus}
            processes = tuple(
                label_text([("gpu", str(gpu.index)), ("UUID", gpu.uuid), ("Hostname", self._hostname),
                            ("pid", str(p.pid)), ("container_id", p.container_id or ""), ("pod", p.pod or ""),
                            ("namespace", p.namespace or ""), ("container", p.container or "")])
                + "} " + format_value(float(p.used_memory_bytes))
                for p in placements if (gpu := by_uuid.get(p.gpu_uuid)) is not None and p.used_memory_bytes is not None)
            key = (status, len(snapshot.gpus), host is not None)
        # each source's values, missing ones where they are (a missing value has no line)
        values: list[list[Any]] = []
        shapes: list[tuple[Any, ...]] = []
        for labels, readings, keys in sources:
            vals = list(map(_VALUE_OF, readings))
            missing = tuple(i for i, v in enumerate(vals) if v is None) if None in vals else ()
            values.append(vals)
            shapes.append((labels, keys, missing))
        key = (*key, tuple(shapes), tuple(extras), processes)
        if key != self._layout_key:
            self._layout = self._build_layout(status, sources, shapes, extras, processes)
            self._layout_key = key
        segments, getter, count = self._layout
        if getter is None:
            return segments[0]
        flat, finite = self._flat_values(sources, values)
        args = getter(flat)
        if count == 1:
            args = (args,)
        if finite:
            # a float's shortest repr costs ~1 us, most of a scrape: the text of each value seen is kept (most
            # values repeat: limits, temperatures, clocks, counters at rest), so a scrape writes only the new ones
            texts = self._texts
            if len(texts) > 50_000:
                texts.clear()
            out: list[Any] = list(map(texts.get, args))
            if None in out:
                for i, known in enumerate(out):
                    if known is None:
                        a = args[i]
                        out[i] = written = repr(a) if a.__class__ is float else a
                        if a:  # not 0.0: it equals -0.0, which is written differently
                            texts[a] = written
        else:  # NaN or an infinity (or a sum that overflows): written as Prometheus clients write them
            out = [format_value(a) if a.__class__ is float else a for a in args]
        page = segments.copy()
        page[1::2] = out
        return "".join(page)

    def _flat_values(self, sources: list[tuple[str, list[Reading], tuple[Any, ...]]],
                     values: list[list[Any]]) -> tuple[list[Any], bool]:
        """Every source's values scaled to their unit (a missing one as 0.0: no line refers to it), end to end,
        then the decoded clock-event flags of each source's clock-event readings, in source order; and whether
        every value is finite."""
        flat: list[Any] = []
        flags: list[str] = []
        mul = operator.mul
        for (labels, readings, keys), vals in zip(sources, values, strict=True):
            scales = self._scales.get((labels, keys))
            if scales is None:
                scales = self._scales_of(labels, readings, keys)
            for pos in scales[1]:
                if vals[pos] is not None:
                    flags.append(self._flag_text(labels, int(vals[pos])))
            present = [0.0 if v is None else v for v in vals] if None in vals else vals
            flat += map(mul, present, scales[0])
        finite = math.isfinite(sum(flat))
        flat += flags
        return flat, finite

    def _scales_of(self, labels: str, readings: list[Reading], keys: tuple[Any, ...]
                   ) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """Per series of a source: the scale to its unit; and the positions of its clock-event readings."""
        scales = tuple(float(self._head_of(labels, r[0], r[3])[4]) for r in readings)
        flag_positions = tuple(i for i, r in enumerate(readings) if r[0] == "clock_event_reasons")
        entry = (scales, flag_positions)
        if len(self._scales) < 1_000:
            self._scales[(labels, keys)] = entry
        return entry

    def _build_layout(self, status: str, sources: list[tuple[str, list[Reading], tuple[Any, ...]]],
                      shapes: list[tuple[Any, ...]], extras: list[tuple[str, ...]], processes: tuple[str, ...]
                      ) -> tuple[list[str], Callable[[list[Any]], Any] | None, int]:
        """The page's template: the families and their lines in the order they were always written (each GPU's
        readings, its info and XID lines; the host's readings; the processes' memory)."""
        layout = _Layout()
        layout.literal("stacklens_agent_gpu_status", "1 for the agent's current GPU backend status.", "gauge",
                       f"stacklens_agent_gpu_status{{{label_text([('status', status)])}}} 1.0\n")
        offsets: list[int] = []
        total = 0
        for _, readings, _ in sources:
            offsets.append(total)
            total += len(readings)
        n_sources = len(sources)
        flag_index = 0
        for source, ((labels, readings, _), (_, _, missing)) in enumerate(zip(sources, shapes, strict=True)):
            skip = set(missing)
            for pos, (signal, _, _, extra) in enumerate(readings):
                if pos in skip:
                    continue
                family, doc, kind, prefix, _ = self._head_of(labels, signal, extra)
                layout.add(family, doc, kind, (prefix, None, "\n"), ((source, pos),))
                if signal == "clock_event_reasons":
                    flag = SIGNALS["clock_event_reason_active"]
                    layout.add(flag.prometheus_name, flag.description, "gauge", (None,), ((n_sources, flag_index),))
                    flag_index += 1
            if source < len(extras):  # a GPU (the host has none): its info and XID lines
                info, last, *counts = extras[source]
                layout.literal("stacklens_gpu_info", "GPU identity; always 1.", "gauge",
                               f"stacklens_gpu_info{{{info}}} 1.0\n")
                if last:
                    layout.literal("DCGM_FI_DEV_XID_ERRORS", SIGNALS["xid_last"].description, "gauge",
                                   f"DCGM_FI_DEV_XID_ERRORS{{{labels}}} {last}\n")
                for line in counts:
                    layout.literal("stacklens_xid_events_total", "XID events by number.", "counter",
                                   f"stacklens_xid_events_total{{{line}\n")
        sig = SIGNALS["gpu_process_memory_bytes"]
        for line in processes:
            layout.literal(sig.prometheus_name, sig.description, "gauge", f"{sig.prometheus_name}{{{line}\n")
        offsets.append(total)  # the flags come after every source's values
        return layout.build(offsets)

    def _flag_text(self, labels: str, mask: int) -> str:
        """The decoded clock-event reasons, one flag a line: kept per GPU and bitmask."""
        text = self._flag_lines.get((labels, mask))
        if text is None:
            flag = SIGNALS["clock_event_reason_active"]
            text = "".join(f'{flag.prometheus_name}{{{labels},reason="{reason}"}} {format_value(active)}\n'
                           for reason, active in clock_event_flags(mask))
            if len(self._flag_lines) < 10_000:
                self._flag_lines[(labels, mask)] = text
        return text

    def _head_of(self, labels: str, signal: str, extra: tuple[tuple[str, str], ...]
                 ) -> tuple[str, str, str, str, float]:
        head = self._heads.get((labels, signal, extra))
        return head if head is not None else self._head((labels, signal, extra))

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


# the most a request may take to arrive (in all: a client sending a byte at a time cannot hold the server),
# and to be sent its answer
REQUEST_TIMEOUT_S = 5.0
# the most a request's line and headers may hold (a scrape sends a few hundred bytes)
_MAX_REQUEST_HEAD = 65536


def _read_head(conn: socket.socket, deadline: float) -> bytes:
    """The request line and headers (and whatever came with them), read by ``deadline`` (monotonic) at the
    latest: TimeoutError past it, whatever the client trickles in meanwhile."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) <= _MAX_REQUEST_HEAD:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the /metrics request did not arrive in time")
        conn.settimeout(remaining)
        chunk = conn.recv(8192)
        if not chunk:
            break
        data += chunk
    return data


class _MetricsHandler(BaseHTTPRequestHandler):
    exposition: PrometheusExposition
    registry: CollectorRegistry | None
    # HTTP/1.0 (the default): one request per connection, so no idle kept-alive connection holds the one thread.
    # The socket's timeout: sending the answer (one sendall) is bounded by it in all.
    timeout: ClassVar[float | None] = REQUEST_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # the request is read in full here, under one deadline; the handler then parses it from memory
        limit = self.timeout or REQUEST_TIMEOUT_S
        self.rfile.close()
        self.rfile = io.BytesIO(_read_head(self.connection, time.monotonic() + limit))
        self.connection.settimeout(limit)

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


class MetricsServer(HTTPServer):
    """Serves /metrics on one thread that sleeps until a connection comes or :meth:`shutdown` wakes it: no
    periodic poll (``serve_forever``'s default wakes twice a second), and each request answered on that thread
    (no thread started per scrape). A slow client is cut off after ``request_timeout_s`` to send its request and
    as long again to take the answer, so it holds the next scrape up by that much at most."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._wake_r, self._wake_w = socket.socketpair()
        self._closing = False
        self.thread: threading.Thread | None = None

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown` (``poll_interval`` is unused: shutdown wakes the thread itself)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                for key, _ in selector.select():
                    if key.fileobj is self.socket and not self._closing:
                        self._handle_one()

    def _handle_one(self) -> None:
        """Accept the waiting connection and answer it here (socketserver's own steps, no thread)."""
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            self.process_request(request, client_address)  # HTTPServer's: finish, then shut the connection
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve_forever, name="stacklens-metrics", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        """Stop serving (after the request being answered, if any) and wait for the serving thread."""
        self._closing = True
        self._wake_w.send(b"\0")
        if self.thread is not None:
            self.thread.join()

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away or was too slow: not the agent's problem, and not worth a traceback on stderr
        log.debug("/metrics request from %s failed", client_address, exc_info=True)


def serve_metrics(address: str, port: int, exposition: PrometheusExposition,
                  registry: CollectorRegistry | None = None,
                  request_timeout_s: float = REQUEST_TIMEOUT_S) -> MetricsServer:
    """Serve /metrics on a daemon thread: the snapshot's exposition, then the agent's own metrics."""
    handler = type("MetricsHandler", (_MetricsHandler,), {"exposition": exposition, "registry": registry,
                                                          "timeout": request_timeout_s})
    server = MetricsServer((address, port), handler)
    server.start()
    return server
