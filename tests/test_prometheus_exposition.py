"""The /metrics exposition: DCGM names, units and labels, stacklens_ extras, missing left out."""

from __future__ import annotations

import math
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from unittest import mock

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from collector.export.prometheus import PrometheusExposition, serve_metrics
from collector.records import GpuIdentity, GpuSample, HostSample, NodeSnapshot, Placement, Reading, XidEvent

T0 = 1_767_225_600_000_000_000
GPU = GpuIdentity(2, "GPU-aaaa", "NVIDIA H100 80GB HBM3", "00000000:1A:00.0", 2)


def _scrape(snapshot: NodeSnapshot) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    exposition = PrometheusExposition("node-7")
    exposition.update(snapshot)
    text = exposition.render()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return text, samples


def test_dcgm_names_units_and_labels() -> None:
    snap = NodeSnapshot("node-7", T0, (GpuSample(GPU, T0, (
        Reading("power_w", 612.0, T0), Reading("sm_clock_hz", 1.755e9, T0), Reading("fb_used_bytes", 3 * 2**30, T0),
        Reading("energy_j", 1500.0, T0), Reading("gpu_util_ratio", 0.97, T0),
        Reading("clock_event_reasons", float(0x4), T0),
        Reading("nvlink_tx_bytes_per_s", 5e9, T0, (("link", "3"),)),
        Reading("memory_temp_c", None, T0),
    )),), placements=(Placement(GPU.uuid, 2, 4120, T0, 1 << 30, "c1", None, "vllm-0", "serving", "engine"),),
        events=(XidEvent(GPU.uuid, 2, 79, T0),), driver_version="580.82.07")
    text, s = _scrape(snap)
    labels, value = s["DCGM_FI_DEV_POWER_USAGE"][0]
    assert value == 612.0
    assert labels == {"gpu": "2", "UUID": "GPU-aaaa", "pci_bus_id": "00000000:1A:00.0", "device": "nvidia2",
                      "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-7", "container": "engine",
                      "namespace": "serving", "pod": "vllm-0"}
    assert s["DCGM_FI_DEV_SM_CLOCK"][0][1] == 1755.0  # MHz, as DCGM
    assert s["DCGM_FI_DEV_FB_USED"][0][1] == 3072.0  # MiB, as DCGM
    # (prometheus_client's parser renames counter samples to *_total; Prometheus itself does not)
    energy_line = next(x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{"))
    assert float(energy_line.rsplit(" ", 1)[1]) == 1_500_000.0  # mJ, as DCGM
    assert s["DCGM_FI_DEV_GPU_UTIL"][0][1] == 97.0
    # DCGM's own exposition of a counter: a bare name on the TYPE line and on the samples
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{" in text
    assert s["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"][0][1] == 4.0
    flags = {lbl["reason"]: v for lbl, v in s["stacklens_clock_event_reason_active"]}
    assert flags["sw_power_cap"] == 1.0 and flags["hw_thermal"] == 0.0
    (link_labels, link_value), = s["stacklens_nvlink_tx_bytes_per_s"]
    assert link_labels["link"] == "3" and link_value == 5e9
    assert "DCGM_FI_DEV_MEMORY_TEMP" not in s  # missing is left out, not 0
    assert s["DCGM_FI_DEV_XID_ERRORS"][0][1] == 79.0
    assert s["stacklens_xid_events_total"][0][0]["xid"] == "79"
    proc_labels, proc_value = s["stacklens_gpu_process_memory_bytes"][0]
    assert proc_labels["pid"] == "4120" and proc_labels["pod"] == "vllm-0" and proc_value == float(1 << 30)


def test_cpu_only_node_still_exposes_host_signals_and_status() -> None:
    snap = NodeSnapshot("node-7", T0, (), host=HostSample(T0, (Reading("host_run_queue", 3.0, T0),)),
                        gpu_status="library_not_found")
    _, s = _scrape(snap)
    assert s["stacklens_agent_gpu_status"] == [({"status": "library_not_found"}, 1.0)]
    assert s["stacklens_host_run_queue"] == [({"Hostname": "node-7"}, 3.0)]


def test_slow_signals_persist_between_cycles_expire_and_clear_on_loss() -> None:
    collector = PrometheusExposition("node-7", stale_after_s=30)

    def names() -> set[str]:
        return {s.name for fam in text_string_to_metric_families(collector.render()) for s in fam.samples}

    s = 1_000_000_000
    # a slow cycle: energy and link generation; NVML's clock differs from the agent's on purpose
    collector.update(NodeSnapshot("n", T0, (GpuSample(GPU, T0, (
        Reading("power_w", 600.0, 5), Reading("pcie_link_gen", 5.0, 5))),)))
    # fast cycles after it carry power only
    collector.update(NodeSnapshot("n", T0 + 1 * s, (GpuSample(GPU, T0 + s, (Reading("power_w", 610.0, 6),)),)))
    assert {"DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_PCIE_LINK_GEN"} <= names()
    collector.update(NodeSnapshot("n", T0 + 40 * s, (GpuSample(GPU, T0 + 40 * s, (Reading("power_w", 1.0, 7),)),)))
    assert "DCGM_FI_DEV_PCIE_LINK_GEN" not in names()  # not read again for 40 s: stale
    collector.update(NodeSnapshot("n", T0 + 41 * s, (GpuSample(GPU, T0 + 41 * s, (Reading("gpu_lost", 1.0, 8),),
                                                               lost=True),)))
    assert "DCGM_FI_DEV_POWER_USAGE" not in names()  # a lost GPU keeps no old values
    assert "stacklens_gpu_lost" in names()


# -- the /metrics server ---------------------------------------------------------------------------------
def _get(port: int, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        body: bytes = response.read()
    return body


def test_metrics_server_answers_on_its_one_thread_and_sleeps_between_scrapes() -> None:
    """Every scrape is answered on the server's own thread (none started per request), and between scrapes the
    thread blocks without a timeout (no periodic wake-up); shutdown wakes it at once."""
    exposition = PrometheusExposition("node-7")
    exposition.update(NodeSnapshot("node-7", T0, (GpuSample(GPU, T0, (Reading("power_w", 612.0, T0),)),)))
    threads: list[str] = []

    class Who:
        def collect(self) -> Iterator[Any]:
            threads.append(threading.current_thread().name)
            yield GaugeMetricFamily("test_scrapes", "Scrapes seen.", value=len(threads))

    registry = CollectorRegistry()
    registry.register(Who())
    threads.clear()  # register() collected once, on this thread
    timeouts: list[float | None] = []
    real = selectors.DefaultSelector

    class Recording(real):  # type: ignore[misc,valid-type]
        def select(self, timeout: float | None = None) -> Any:
            timeouts.append(timeout)
            return super().select(timeout)

    with mock.patch("collector.export.prometheus.selectors.DefaultSelector", Recording):
        server = serve_metrics("127.0.0.1", 0, exposition, registry)
    try:
        port = server.server_address[1]
        pages = [_get(port).decode() for _ in range(3)]
    finally:
        started = time.monotonic()
        server.shutdown()
        took = time.monotonic() - started
    assert all("DCGM_FI_DEV_POWER_USAGE{" in page and "test_scrapes 1.0" in pages[0] for page in pages)
    assert threads == ["stacklens-metrics"] * 3
    assert timeouts and set(timeouts) == {None}  # blocks until a connection or the shutdown comes
    assert len(timeouts) <= 3 + 1  # one wake-up per scrape, one for the shutdown
    assert took < 1.0 and server.thread is not None and not server.thread.is_alive()


def test_a_slow_client_cannot_hold_the_metrics_server() -> None:
    """A client that trickles its request a byte at a time (each byte well within the socket timeout) is cut
    off when the request's deadline passes; the scrape behind it is then answered."""
    server = serve_metrics("127.0.0.1", 0, PrometheusExposition("node-7"), request_timeout_s=0.5)
    port = server.server_address[1]
    stop = threading.Event()

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 20:
                if stop.wait(0.1):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # cut off
                    return

    slow = threading.Thread(target=trickle, daemon=True)
    slow.start()
    try:
        time.sleep(0.2)  # the slow client is being served
        started = time.monotonic()
        page = _get(port, timeout=10).decode()
        took = time.monotonic() - started
    finally:
        stop.set()
        slow.join(5)
        server.shutdown()
        server.server_close()
    assert "stacklens_agent_gpu_status" in page
    assert took < 3.0  # the trickle alone would have held the server for ~70 s


def test_kept_page_structure_follows_every_change_and_writes_values_as_prometheus_does() -> None:
    """The page is kept as text with a slot per value and built again when its structure changes: a value going
    missing and coming back, a new series, a clock-event mask that changes, NaN and infinities, -0.0 after 0.0, a
    '%' in a label. Each page must equal the one an exposition renders that was given the same cycles and never
    scraped before (its page built from nothing)."""
    def snap(t: int, power: float | None, mask: float, extra: bool) -> NodeSnapshot:
        readings = [Reading("power_w", power, t), Reading("clock_event_reasons", mask, t),
                    Reading("sm_clock_hz", 1.755e9, t)]
        if extra:
            readings.append(Reading("nvlink_tx_bytes_per_s", 5e9, t, (("link", "3"),)))
        return NodeSnapshot("node-7", t, (GpuSample(GPU, t, tuple(readings)),), driver_version="580.82.07")

    cases = [(612.0, 0.0, False), (None, 4.0, False), (612.5, 4.0, True), (float("nan"), 0x44, True),
             (float("inf"), 0.0, True), (0.0, 0.0, False), (-0.0, 0.0, False), (-float("inf"), 4.0, False),
             (612.0, 0.0, False)]
    warm = PrometheusExposition("node%s-7")
    snaps: list[NodeSnapshot] = []
    for k, (power, mask, extra) in enumerate(cases):
        snaps.append(snap(T0 + k * 1_000_000_000, power, mask, extra))
        warm.update(snaps[-1])
        cold = PrometheusExposition("node%s-7")
        for s in snaps:
            cold.update(s)
        page = warm.render()
        assert page == cold.render(), k
        line = next((x for x in page.splitlines() if x.startswith("DCGM_FI_DEV_POWER_USAGE{")), None)
        want = {None: None, 612.0: " 612.0", 612.5: " 612.5", 0.0: " 0.0"}
        if power is None:
            assert line is None  # missing is left out
        elif math.isnan(power):
            assert line is not None and line.endswith(" NaN")
        elif math.isinf(power):
            assert line is not None and line.endswith(" +Inf" if power > 0 else " -Inf")
        elif power == 0.0:
            assert line is not None and line.endswith(" -0.0" if math.copysign(1, power) < 0 else " 0.0")
        else:
            assert line is not None and line.endswith(str(want[power]))
        flags = {x.split('reason="')[1].split('"')[0]: x.rsplit(" ", 1)[1] for x in page.splitlines()
                 if x.startswith("stacklens_clock_event_reason_active{")}
        assert flags["sw_power_cap"] == ("1.0" if int(mask) & 0x4 else "0.0")
        assert ('stacklens_nvlink_tx_bytes_per_s{' in page) == any(e for _, _, e in cases[:k + 1])  # kept once seen
        assert 'Hostname="node%s-7"' in page
