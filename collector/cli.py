"""``stacklens-agent``: the node agent's command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from collector import __version__
from collector.agent import Agent, SnapshotSink
from collector.backend import GpuBackend
from collector.config import AgentSettings, ConfigError, resolve_settings
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.export.otlp_transport import OtlpConfig, config_from_env, make_transport
from collector.export.prometheus import PrometheusExposition, serve_metrics
from collector.export.queue import ExportQueue
from collector.host import HostSource
from collector.placement.podresources import PodResourcesClient
from collector.placement.resolver import PlacementResolver
from collector.records import NodeSnapshot
from collector.signals import decode_clock_event_reasons

log = logging.getLogger("stacklens.agent")


class OtlpSink:
    """Collects the snapshots of one export interval and queues them as one request (one ``Metric``
    per signal with the points of every cycle); never blocks the sampling loop."""

    def __init__(self, encoder: OtlpMetricsEncoder, queue: ExportQueue, snapshots_per_request: int = 1) -> None:
        self.encoder = encoder
        self.queue = queue
        self._per_request = max(1, snapshots_per_request)
        self._batch: list[NodeSnapshot] = []

    def handle(self, snapshot: NodeSnapshot) -> None:
        self._batch.append(snapshot)
        if len(self._batch) >= self._per_request:
            self.flush()

    def flush(self) -> None:
        """Queue what has been collected (at shutdown: the last, partial interval)."""
        if self._batch:
            batch, self._batch = self._batch, []
            self.queue.put(self.encoder.encode_batch(batch), len(batch))


class PrometheusSink:
    def __init__(self, exposition: PrometheusExposition) -> None:
        self.exposition = exposition

    def handle(self, snapshot: NodeSnapshot) -> None:
        self.exposition.update(snapshot)


class JsonLinesSink:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def handle(self, snapshot: NodeSnapshot) -> None:
        self.out.write(json.dumps(snapshot_to_json(snapshot)) + "\n")
        self.out.flush()


def snapshot_to_json(snapshot: NodeSnapshot) -> dict[str, Any]:
    """A snapshot as plain JSON: per GPU a ``signals`` object (labelled readings keyed
    ``name{label=value}``), missing values as null."""
    def readings(rs: Sequence[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in rs:
            key = r.signal + ("{" + ",".join(f"{k}={v}" for k, v in r.labels) + "}" if r.labels else "")
            out[key] = r.value
        return out

    gpus = []
    for gs in snapshot.gpus:
        entry: dict[str, Any] = {**asdict(gs.gpu), "time_ns": gs.time_ns, "lost": gs.lost,
                                 "signals": readings(gs.readings),
                                 "processes": [asdict(p) for p in gs.processes]}
        mask = next((r.value for r in gs.readings if r.signal == "clock_event_reasons"), None)
        entry["clock_event_reasons_decoded"] = list(decode_clock_event_reasons(int(mask))) if mask is not None else None
        gpus.append(entry)
    return {
        "node": snapshot.node,
        "time_ns": snapshot.time_ns,
        "gpu_status": snapshot.gpu_status,
        "driver_version": snapshot.driver_version,
        "gpus": gpus,
        "host": readings(snapshot.host.readings) if snapshot.host else None,
        "placements": None if snapshot.placements is None else [asdict(p) for p in snapshot.placements],
        "xid_events": [asdict(e) for e in snapshot.events],
    }


def print_table(snapshot: NodeSnapshot, out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
        return "—" if value is None else f"{value * scale:.{digits}f}"

    console = Console(file=out, no_color=bool(os.environ.get("NO_COLOR")), width=160)
    table = Table(title=f"{snapshot.node}: {len(snapshot.gpus)} GPU(s), NVML {snapshot.gpu_status}"
                  + (f", driver {snapshot.driver_version}" if snapshot.driver_version else ""))
    for col in ("GPU", "model", "power W", "temp °C", "SM MHz", "util %", "mem busy %", "FB used GiB",
                "PCIe rx/tx MB/s", "NVLink rx/tx GB/s", "clock events", "pids"):
        table.add_column(col, overflow="fold")
    for gs in snapshot.gpus:
        v = {r.signal: r.value for r in gs.readings if not r.labels}
        if gs.lost:
            table.add_row(str(gs.gpu.index), gs.gpu.name, *["lost"] + [""] * 9)
            continue
        mask = v.get("clock_event_reasons")
        table.add_row(
            str(gs.gpu.index), gs.gpu.name,
            f"{fmt(v.get('power_w'))}/{fmt(v.get('power_limit_w'))}",
            fmt(v.get("gpu_temp_c")), fmt(v.get("sm_clock_hz"), 1e-6), fmt(v.get("gpu_util_ratio"), 100),
            fmt(v.get("memory_busy_ratio"), 100), fmt(v.get("fb_used_bytes"), 1 / 2**30, 1),
            f"{fmt(v.get('pcie_rx_bytes_per_s'), 1e-6)}/{fmt(v.get('pcie_tx_bytes_per_s'), 1e-6)}",
            f"{fmt(v.get('nvlink_rx_total_bytes_per_s'), 1e-9, 1)}/"
            f"{fmt(v.get('nvlink_tx_total_bytes_per_s'), 1e-9, 1)}",
            ",".join(decode_clock_event_reasons(int(mask))) if mask is not None else "—",
            " ".join(str(p.pid) for p in gs.processes) or "—",
        )
    console.print(table)
    if snapshot.host is not None:
        h = {r.signal: r.value for r in snapshot.host.readings if not r.labels}
        console.print(f"host: CPU {fmt(h.get('host_cpu_util_ratio'), 100)} %, steal "
                      f"{fmt(h.get('host_cpu_steal_ratio'), 100, 1)} %, run queue {fmt(h.get('host_run_queue'))}, "
                      f"load1 {fmt(h.get('host_load1'), 1, 2)}, memory used "
                      f"{fmt(h.get('host_memory_used_bytes'), 1 / 2**30, 1)} GiB")
    for ev in snapshot.events:
        console.print(f"XID {ev.xid} on GPU {ev.gpu_index} ({ev.gpu_uuid})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stacklens-agent", description="stacklens node agent: GPU, host and "
                                "placement telemetry over OTLP and Prometheus.")
    p.add_argument("--version", action="version", version=f"stacklens-agent {__version__}")
    p.add_argument("--config", type=Path, help="TOML config file (settings at top level or under [agent])")
    p.add_argument("--simulate", action="store_true", default=None, help="simulated GPUs instead of NVML")
    p.add_argument("--simulate-gpus", type=int, help="simulated GPUs (default 8)")
    p.add_argument("--simulate-model", help="simulated GPU model: H100-SXM, A100-80GB, L40S")
    p.add_argument("--simulate-scenario", help="one node of a simulated fleet with its engines and faults "
                                               "(a scenario TOML, docs/simulator.md) instead")
    p.add_argument("--simulate-node", type=int, help="which node of the scenario (from 0)")
    p.add_argument("--seed", type=int, help="seed of the simulation")
    p.add_argument("--once", action="store_true", help="print one sample and exit")
    p.add_argument("-o", "--output", choices=("table", "json"),
                   help="with --once: the format; otherwise print every sample as a JSON line")
    p.add_argument("--interval", dest="interval_s", help="sample cadence, 100ms to 1h (default 1s)")
    p.add_argument("--otlp-endpoint", help="OTLP endpoint (default: $OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT; "
                   "none: no OTLP export)")
    p.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"), help="default http/protobuf")
    p.add_argument("--otlp-headers", help="k=v,k2=v2 (default: $OTEL_EXPORTER_OTLP_HEADERS)")
    p.add_argument("--prometheus-port", type=int, help="/metrics port, 0 to disable (default 9400)")
    p.add_argument("--prometheus-address", help="/metrics bind address (default 0.0.0.0)")
    p.add_argument("--node-name", help="host.name to report (default: $NODE_NAME or the hostname)")
    p.add_argument("--pod-resources-socket", help="kubelet pod-resources socket")
    p.add_argument("--no-xid-events", dest="xid_events", action="store_false", default=None)
    p.add_argument("--cycles", type=int, help="exit after this many samples (for tests and benchmarks)")
    p.add_argument("--log-level", help="debug, info, warning, error")
    return p


def make_backend(settings: AgentSettings) -> GpuBackend:
    if settings.simulate_scenario:
        from collector.simfleet import FleetNodeBackend, load_scenario

        return FleetNodeBackend(load_scenario(settings.simulate_scenario), settings.simulate_node)
    if settings.simulate:
        from collector.simulated import SimulatedGpuSource

        return SimulatedGpuSource(settings.simulate_gpus, settings.simulate_model, settings.seed)
    from collector.nvml.source import NvmlGpuSource

    return NvmlGpuSource(xid_events=settings.xid_events, interval_s=settings.interval_s,
                         pcie_counter_poll=settings.pcie_counter_poll, medium_interval_s=settings.medium_interval_s)


class SelfMetrics:
    """The agent's own health on /metrics: cycles, overruns, cycle CPU time, export queue, NVML errors."""

    def __init__(self, agent: Agent, queue: ExportQueue | None) -> None:
        self.agent = agent
        self.queue = queue

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.agent.stats
        yield CounterMetricFamily("stacklens_agent_cycles", "Sample cycles run.", value=s.cycles)
        yield CounterMetricFamily("stacklens_agent_overruns", "Cycles that overran the interval.", value=s.overruns)
        yield CounterMetricFamily("stacklens_agent_round_cycles",
                                  "Fast cycles made by the compiled sampler's thread between two of the loop's.",
                                  value=s.round_cycles)
        yield CounterMetricFamily("stacklens_agent_cycle_cpu_seconds", "CPU time spent in sample cycles.",
                                  value=s.cycle_cpu_s_total)
        errors = CounterMetricFamily("stacklens_agent_part_errors", "Unexpected errors by agent part.",
                                     labels=["part"])
        for part, n in s.part_errors.items():
            errors.add_metric([part], n)
        yield errors
        access = getattr(self.agent.backend, "access", None)
        nvml = CounterMetricFamily("stacklens_agent_nvml_errors", "NVML errors by call and error.",
                                   labels=["call", "error"])
        for (call, err), n in (access.errors.items() if access is not None else []):
            nvml.add_metric([call, err], n)
        yield nvml
        if self.queue is not None:
            q = self.queue.stats
            yield CounterMetricFamily("stacklens_agent_export_sent_snapshots", "Samples exported over OTLP.",
                                      value=q.sent_snapshots)
            yield CounterMetricFamily("stacklens_agent_export_batches", "OTLP export calls (samples are merged).",
                                      value=q.sent_batches)
            yield CounterMetricFamily("stacklens_agent_export_failed_attempts", "OTLP export attempts that failed.",
                                      value=q.failed_attempts)
            yield CounterMetricFamily("stacklens_agent_dropped_samples",
                                      "Samples dropped: export buffer full or rejected.", value=q.dropped_requests)
            yield GaugeMetricFamily("stacklens_agent_export_queue_bytes", "Bytes waiting for export.",
                                    value=q.queued_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items()
             if k not in ("config", "once", "output", "cycles") and v is not None}
    try:
        settings = resolve_settings(flags, os.environ, args.config)
        otlp: OtlpConfig | None = None
        if not args.once:
            otlp = config_from_env(os.environ, settings.otlp_endpoint or None, settings.otlp_protocol or None,
                                   settings.otlp_headers)
    except ConfigError as exc:
        print(f"stacklens-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.cycles is not None and args.cycles < 1:
        print("stacklens-agent: --cycles must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = make_backend(settings)
    host = HostSource()
    pods = PodResourcesClient(Path(settings.pod_resources_socket))
    placement = PlacementResolver(pod_resources=pods)
    if args.once:
        # every signal, slow tier included, in both reads
        agent = Agent(settings.node_name, backend, [], host, placement, interval_s=settings.interval_s,
                      slow_interval_s=settings.interval_s, host_interval_s=settings.interval_s)
        agent.open()
        agent.cycle()  # rates and CPU ratios need a previous read
        time.sleep(min(settings.interval_s, 0.5))
        snapshot = agent.cycle()
        agent.close()
        if args.output == "json":
            print(json.dumps(snapshot_to_json(snapshot), indent=2))
        else:
            print_table(snapshot, sys.stdout)
        return 0
    return run_daemon(settings, otlp, backend, host, placement, args.output, args.cycles)


def run_daemon(settings: AgentSettings, otlp: OtlpConfig | None, backend: GpuBackend, host: HostSource,
               placement: PlacementResolver, output: str | None, cycles: int | None) -> int:
    from prometheus_client import CollectorRegistry

    sinks: list[SnapshotSink] = []
    queue: ExportQueue | None = None
    otlp_sink: OtlpSink | None = None
    if otlp is not None:
        queue = ExportQueue(make_transport(otlp), max_bytes=settings.export_buffer_bytes,
                            export_interval_s=settings.export_interval_s)
        queue.start()
        resource = ResourceInfo(settings.node_name, settings.k8s_node_name or None)
        # the cycles of one export interval are encoded together, once, into one request
        otlp_sink = OtlpSink(OtlpMetricsEncoder(resource), queue,
                             snapshots_per_request=round(settings.export_interval_s / settings.interval_s))
        sinks.append(otlp_sink)
        log.info("exporting OTLP metrics to %s (%s)", otlp.endpoint, otlp.protocol)
    else:
        log.info("no OTLP endpoint configured (--otlp-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT): OTLP export off")
    if output == "json":
        sinks.append(JsonLinesSink(sys.stdout))
    agent = Agent(settings.node_name, backend, sinks, host, placement, interval_s=settings.interval_s,
                  slow_interval_s=settings.slow_interval_s, placement_interval_s=settings.placement_interval_s,
                  host_interval_s=settings.host_interval_s)
    server = None
    if settings.prometheus_port:
        registry = CollectorRegistry()
        registry.register(SelfMetrics(agent, queue))
        exposition = PrometheusExposition(settings.node_name)
        try:
            server = serve_metrics(settings.prometheus_address, settings.prometheus_port, exposition, registry)
        except OSError as exc:
            print(f"stacklens-agent: cannot serve /metrics on {settings.prometheus_address}:"
                  f"{settings.prometheus_port}: {exc}", file=sys.stderr)
            if queue is not None:
                queue.stop(0)
            return 1
        agent.sinks.append(PrometheusSink(exposition))
        log.info("serving /metrics on %s:%d", settings.prometheus_address, settings.prometheus_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    status = agent.open()
    log.info("GPU backend: %s", status)
    # What start-up made (modules, NVML bindings, the field plans) lives as long as the process: kept out
    # of the collector's full passes, which would otherwise walk all of it (~10-17 ms each on the 2-core CI
    # machine). The youngest generation is collected when the tracked objects have grown by the threshold:
    # at 700 that is every cycle or two at 100 ms, walking the readings that wait for the next OTLP request;
    # at 10,000 it is rarely, as those are released once a second (there are no reference cycles to find).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    try:
        agent.run(stop, max_cycles=cycles)
    finally:
        agent.close()
        import resource as rusage

        st = agent.stats
        log.info("stopped after %d cycles (%d made by the sampler's thread): %.3f ms CPU per cycle, %d overruns, "
                 "peak RSS %.1f MB", st.cycles, st.round_cycles, 1e3 * st.cycle_cpu_s_total / max(1, st.cycles),
                 st.overruns,
                 rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 1024)
        if otlp_sink is not None:
            otlp_sink.flush()
        if queue is not None:
            queue.stop(flush_timeout_s=5.0)
        if server is not None:
            server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
