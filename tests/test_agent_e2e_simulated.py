"""The agent process end to end on simulated GPUs: OTLP over HTTP and gRPC into a real OTLP receiver,
/metrics scraped by a real Prometheus, and an export outage bridged without loss."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fixtures import PrometheusFactory
from tests.harness.otlp_sink import MetricPoint, OtlpSink
from tests.harness.prometheus_server import ScrapeTarget, free_tcp_port

REPO = Path(__file__).resolve().parent.parent


def start_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "collector.cli", *args], cwd=REPO, env=env or dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[str, str]:
    if proc.poll() is None:
        proc.terminate()
    out, err = proc.communicate(timeout=timeout)
    return out, err


@pytest.fixture
def agent_http(otlp_sink: OtlpSink) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_tcp_port()
    proc = start_agent("--simulate", "--simulate-gpus", "2", "--interval", "200ms", "--otlp-endpoint",
                       otlp_sink.http_endpoint, "--prometheus-port", str(port), "--prometheus-address", "127.0.0.1",
                       "--node-name", "sim-node-1")
    yield proc, port
    stop(proc)


def _names(points: list[MetricPoint]) -> set[str]:
    return {p.name for p in points}


def test_otlp_http_and_prometheus(agent_http: tuple[subprocess.Popen[str], int], otlp_sink: OtlpSink,
                                  prometheus_factory: PrometheusFactory) -> None:
    proc, port = agent_http
    prom = prometheus_factory([ScrapeTarget(f"127.0.0.1:{port}", job="agent")])
    points = otlp_sink.wait_for_points(lambda ps: {"stacklens.power_w", "stacklens.gpu_info"} <= _names(ps)
                                       and len({p.time_unix_nano for p in ps if p.name == "stacklens.power_w"}) >= 3,
                                       timeout_s=20)
    power = [p for p in points if p.name == "stacklens.power_w"]
    assert {p.unit for p in power} == {"W"}
    assert all(70.0 <= p.value <= 700.0 * 1.02 for p in power)
    assert len({p.attributes["gpu.uuid"] for p in power}) == 2
    assert power[0].resource_attributes["host.name"] == "sim-node-1"
    assert power[0].resource_attributes["stacklens.gpu_status"] == "ok"
    energy = [p for p in points if p.name == "stacklens.energy_j"]
    assert energy and all(p.kind == "sum" and p.is_monotonic and p.temporality == "cumulative" for p in energy)
    series = prom.wait_for('DCGM_FI_DEV_POWER_USAGE{job="agent"}',
                           predicate=lambda r: len(r) == 2, timeout_s=30)
    labels = series[0]["metric"]
    assert labels["Hostname"] == "sim-node-1" and labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert {s["metric"]["gpu"] for s in series} == {"0", "1"}
    sm = prom.wait_for('DCGM_FI_DEV_SM_CLOCK{job="agent"}')
    assert 500 <= float(sm[0]["value"][1]) <= 1980  # MHz, as DCGM
    reasons = prom.wait_for('stacklens_clock_event_reason_active{job="agent",reason="sw_power_cap"}')
    assert len(reasons) == 2
    assert proc.poll() is None


def test_otlp_grpc_and_outage_bridged(otlp_sink: OtlpSink) -> None:
    proc = start_agent("--simulate", "--simulate-gpus", "1", "--interval", "100ms", "--otlp-endpoint",
                       otlp_sink.grpc_endpoint, "--otlp-protocol", "grpc", "--prometheus-port", "0")
    try:
        otlp_sink.wait_for_points(lambda ps: "stacklens.power_w" in _names(ps), timeout_s=20)
        otlp_sink.stop()  # the correlator goes away for a while
        import time

        time.sleep(1.5)
        otlp_sink.start()
        otlp_sink.wait_for_points(
            lambda ps: len({p.time_unix_nano for p in ps if p.name == "stacklens.power_w"}) >= 25, timeout_s=30)
    finally:
        _, err = stop(proc)
    times = sorted(p.time_unix_nano for p in otlp_sink.metric_points() if p.name == "stacklens.power_w")
    assert len(times) == len(set(times)), "a sample was delivered twice"
    # samples at 100 ms go out merged, about once a second (the default export interval)
    assert len(otlp_sink.exports(include_rejected=False)) <= len(times) / 4
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
    assert max(gaps) < 0.5, f"samples lost during the outage: largest gap {max(gaps):.2f}s\n{err[-2000:]}"


def test_cpu_only_style_run_without_endpoint_prints_json_lines() -> None:
    proc = start_agent("--simulate", "--simulate-gpus", "1", "--interval", "100ms", "--cycles", "3", "-o", "json",
                       "--prometheus-port", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert "OTLP export off" in err
