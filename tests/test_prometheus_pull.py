"""The Prometheus pull against the real Prometheus server: it scrapes a dcgm-exporter-like exposition (2 GPUs,
dcgm-exporter's labels and units) and a vLLM-like one (current and renamed names, a histogram) every second;
the puller reads the raw samples back into DuckDB through the same normalisation as OTLP, keeps the scrape's
timestamps, never stores a sample twice (not even after a restart) and survives Prometheus being down."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from correlator.cli import app
from correlator.ingest.prometheus_pull import PrometheusPuller, default_selectors, subtract, union
from correlator.server.serve import Correlator, ServeConfig
from correlator.store.duckdb_store import Store
from tests.harness.exposition import StaticExposition
from tests.harness.fixtures import require_prometheus
from tests.harness.prometheus_server import PrometheusServer, ScrapeTarget, free_tcp_port

GPUS = [
    {"gpu": "0", "UUID": "GPU-11111111-aaaa", "pci_bus_id": "00000000:17:00.0", "device": "nvidia0",
     "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a", "container": "vllm", "namespace": "serving",
     "pod": "vllm-0"},
    {"gpu": "1", "UUID": "GPU-22222222-bbbb", "pci_bus_id": "00000000:2A:00.0", "device": "nvidia1",
     "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a"},
]
# per GPU: DCGM name → (value in DCGM's unit, canonical signal, value in the canonical unit)
DCGM = {
    "DCGM_FI_DEV_POWER_USAGE": (312.5, "power_w", 312.5),
    "DCGM_FI_DEV_SM_CLOCK": (1755.0, "sm_clock_hz", 1755e6),
    "DCGM_FI_DEV_FB_USED": (40960.0, "fb_used_bytes", 40960 * 2.0**20),
    "DCGM_FI_DEV_GPU_UTIL": (87.0, "gpu_util_ratio", 0.87),
    "DCGM_FI_PROF_PCIE_RX_BYTES": (2.5e9, "pcie_rx_bytes_per_s", 2.5e9),
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": (4.0, "clock_event_reasons", 4.0),  # the older name
}
# vLLM: name → (value, engine signal); histograms by their _sum and _count
VLLM = {
    "vllm:num_requests_running": (7.0, "engine_requests_running"),
    "vllm:num_requests_waiting": (3.0, "engine_requests_waiting"),
    "vllm:gpu_cache_usage_perc": (0.625, "engine_kv_cache_usage_ratio"),  # renamed kv_cache_usage_perc later
    "vllm:num_preemptions_total": (2.0, "engine_preemptions_total"),
    "vllm:time_to_first_token_seconds_sum": (12.5, "engine_ttft_seconds_sum"),
    "vllm:time_to_first_token_seconds_count": (50.0, "engine_ttft_seconds_count"),
    "vllm:time_per_output_token_seconds_sum": (4.5, "engine_tpot_seconds_sum"),  # now inter_token_latency
    "vllm:time_per_output_token_seconds_count": (300.0, "engine_tpot_seconds_count"),
}


def _labels(d: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in d.items())


def dcgm_exposition(scrape: int) -> str:
    lines = []
    for name, (value, _, _) in DCGM.items():
        lines += [f"# HELP {name} from DCGM", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{_labels(g)}}} {value}" for g in GPUS]
    lines += ["# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION mJ", "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter"]
    lines += [f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{_labels(g)}}} {1000 * scrape}" for g in GPUS]
    lines += ["# TYPE DCGM_FI_DEV_NOT_IN_THE_CATALOG gauge", 'DCGM_FI_DEV_NOT_IN_THE_CATALOG{gpu="0"} 1']
    return "\n".join(lines) + "\n"


def vllm_exposition(scrape: int) -> str:
    model = 'model_name="llama-3-70b",engine="0"'
    lines = []
    for name, (value, _) in VLLM.items():
        if name.endswith(("_sum", "_count")):
            continue
        lines += [f"# TYPE {name} gauge", f"{name}{{{model}}} {value}"]
    for hist in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds"):
        lines.append(f"# TYPE {hist} histogram")
        lines += [f'{hist}_bucket{{{model},le="{le}"}} {n}' for le, n in (("0.1", 10), ("1.0", 40), ("+Inf", 50))]
        lines += [f"{hist}_sum{{{model}}} {VLLM[hist + '_sum'][0]}",
                  f"{hist}_count{{{model}}} {VLLM[hist + '_count'][0]}"]
    lines += ["# TYPE vllm:cache_config_info gauge", f'vllm:cache_config_info{{{model},block_size="16"}} 1']
    return "\n".join(lines) + "\n"



@pytest.fixture(scope="module")
def prom() -> Iterator[tuple[PrometheusServer, StaticExposition, StaticExposition, float]]:
    binary = require_prometheus()
    dcgm, vllm = StaticExposition(dcgm_exposition), StaticExposition(vllm_exposition)
    started = time.time()
    server = PrometheusServer([ScrapeTarget(dcgm.address, job="dcgm-exporter"),
                               ScrapeTarget(vllm.address, job="vllm", labels={"node": "node-a"})],
                              scrape_interval=1.0, binary=binary,
                              # small enough that a pull of the whole test's data must be split
                              extra_args=["--query.max-samples=30"])
    server.start()
    try:
        server.wait_for('count_over_time(DCGM_FI_DEV_POWER_USAGE{gpu="1"}[1m]) >= 5', timeout_s=30)
        server.wait_for('count_over_time({__name__="vllm:num_requests_running"}[1m]) >= 5', timeout_s=30)
        yield server, dcgm, vllm, started
    finally:
        server.close()
        dcgm.close()
        vllm.close()


def _rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    with store.reader() as cur:
        return list(cur.execute(sql).fetchall())


def test_pull_stores_dcgm_and_vllm_series_with_scrape_times_once(
        prom: tuple[PrometheusServer, StaticExposition, StaticExposition, float], tmp_path: Path) -> None:
    server, dcgm, _vllm, started = prom
    store = Store(tmp_path / "p.duckdb")
    try:
        until = time.time() - 1.5  # past the scrape in progress
        puller = PrometheusPuller(server.url, 1.0, store)
        pulled_at = time.time()
        r = puller.pull(started - 1, until)
        assert r.ok, r.errors
        assert r.rows > 0 and r.series >= 2 * (len(DCGM) + 1) + len(VLLM)
        # Prometheus refused the whole window at once (--query.max-samples): it was pulled in parts
        assert r.windows > len(puller.selectors)

        # GPUs, their node and identity from the DCGM labels
        gpus = _rows(store, "SELECT uuid, gpu_index, model, pci_bus_id, device, n.name FROM gpus "
                            "JOIN nodes n USING (node_id) ORDER BY gpu_index")
        assert gpus == [(g["UUID"], int(g["gpu"]), g["modelName"], g["pci_bus_id"], g["device"], "node-a")
                        for g in GPUS]
        # values in canonical units, every sample of every GPU
        got = _rows(store, "SELECT g.uuid, s.name, min(value), max(value), count(*) FROM gpu_samples "
                           "JOIN gpus g USING (gpu_id) JOIN signals s USING (signal_id) GROUP BY ALL")
        by = {(u, s): (lo, hi, n) for u, s, lo, hi, n in got}
        for g in GPUS:
            for _name, (_, signal, canonical) in DCGM.items():
                lo, hi, n = by[(g["UUID"], signal)]
                assert lo == pytest.approx(canonical) and hi == pytest.approx(canonical) and n >= 3
            lo, hi, n = by[(g["UUID"], "energy_j")]
            assert lo >= 1.0 and hi - lo == pytest.approx(n - 1)  # 1000 mJ more each scrape
        assert not any(s == "DCGM_FI_DEV_NOT_IN_THE_CATALOG" for _, s in by)
        # the pod dcgm-exporter names is a placement of GPU 0
        assert _rows(store, "SELECT DISTINCT g.uuid, pod, namespace, container FROM placements "
                            "JOIN gpus g USING (gpu_id)") == [(GPUS[0]["UUID"], "vllm-0", "serving", "vllm")]

        # timestamps: exactly Prometheus' own sample times, which are the scrape's, not the pull's
        raw = server.query('DCGM_FI_DEV_POWER_USAGE{gpu="1"}[10m]', time=until)[0]["values"]
        want = [round(float(ts) * 1000) * 1_000_000 for ts, _ in raw if float(ts) <= until]
        stored = [t for (t,) in _rows(store, "SELECT time_ns FROM gpu_samples JOIN gpus g USING (gpu_id) "
                                             "JOIN signals s USING (signal_id) WHERE g.uuid = 'GPU-22222222-bbbb' "
                                             "AND s.name = 'power_w' ORDER BY time_ns")]
        assert stored == want
        for t in stored:
            assert t < pulled_at * 1e9
            # each sample is stamped when Prometheus started the scrape, just before it reached the target
            assert any(0 <= s - t / 1e9 < 0.9 for s in dcgm.scrapes), t

        # vLLM: current and renamed names, histograms as _sum/_count (no buckets), model and node
        eng = _rows(store, "SELECT s.name, min(value), max(value), min(model), min(service), min(n.name), count(*) "
                           "FROM engine_samples JOIN signals s USING (signal_id) JOIN nodes n USING (node_id) "
                           "GROUP BY ALL")
        e = {row[0]: row[1:] for row in eng}
        assert set(e) == {signal for _, signal in VLLM.values()}
        for value, signal in VLLM.values():
            lo, hi, model, service, node, n = e[signal]
            assert (lo, hi, model, service, node) == (pytest.approx(value), pytest.approx(value), "llama-3-70b",
                                                      "vllm", "node-a") and n >= 3

        # nothing twice: the same window again, a wider one, and a restarted puller over the same store
        counts = _rows(store, "SELECT (SELECT count(*) FROM gpu_samples), (SELECT count(*) FROM engine_samples)")
        assert puller.pull(started - 1, until).rows == 0
        assert PrometheusPuller(server.url, 1.0, store).pull(started - 1, until).rows == 0
        assert _rows(store, "SELECT (SELECT count(*) FROM gpu_samples), (SELECT count(*) FROM engine_samples)") \
            == counts
        time.sleep(1.2)
        later = time.time() - 1.0
        r3 = PrometheusPuller(server.url, 1.0, store).pull(started - 60, later)
        assert r3.ok and r3.rows > 0  # only the scrapes after `until`
        assert _rows(store, "SELECT count(*) - count(DISTINCT (time_ns, gpu_id, signal_id, sub)) FROM gpu_samples") \
            == [(0,)]
        assert _rows(store, "SELECT count(*) - count(DISTINCT (time_ns, signal_id)) FROM engine_samples") == [(0,)]
        newest = _rows(store, "SELECT max(time_ns) FROM gpu_samples")[0][0]
        assert until * 1e9 < newest <= later * 1e9
    finally:
        store.close()


def test_prometheus_down_is_logged_and_retried_never_raised(tmp_path: Path, caplog: Any) -> None:
    dead = f"http://127.0.0.1:{free_tcp_port()}"
    store = Store(tmp_path / "d.duckdb")
    try:
        puller = PrometheusPuller(dead, 0.2, store, timeout_s=1.0)
        now = time.time()
        r = puller.pull(now - 60, now)
        assert not r.ok and "does not answer" in r.errors[0] and r.rows == 0
        assert puller.covered("dcgm") == []  # the window is pulled again next time
        puller.start()
        time.sleep(0.7)
        assert puller._thread is not None and puller._thread.is_alive()
        puller.stop()
        assert any("prometheus pull" in m for m in caplog.messages)
        # one warning per outage, not one per interval
        assert sum("failed, retrying" in m for m in caplog.messages) == 1
    finally:
        store.close()


def test_serve_pulls_periodically_and_import_pulls_a_window(
        prom: tuple[PrometheusServer, StaticExposition, StaticExposition, float], tmp_path: Path) -> None:
    server, _, _, started = prom
    c = Correlator(ServeConfig(db=str(tmp_path / "s.duckdb"), otlp_grpc=None, otlp_http=None, api=None,
                               prometheus_url=server.url, prometheus_interval_s=1.0))
    c.start()
    try:
        assert c.store is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            n = _rows(c.store, "SELECT count(*) FROM gpu_samples")[0][0]
            if n > 0 and c.puller.last is not None and c.puller.last.ok:
                break
            time.sleep(0.2)
        first = _rows(c.store, "SELECT count(*) FROM gpu_samples")[0][0]
        assert first > 0
        time.sleep(2.5)  # more intervals: new samples arrive, none twice
        assert _rows(c.store, "SELECT count(*) FROM gpu_samples")[0][0] > first
        assert _rows(c.store, "SELECT count(*) - count(DISTINCT (time_ns, gpu_id, signal_id, sub)) "
                              "FROM gpu_samples") == [(0,)]
    finally:
        c.stop()

    db = str(tmp_path / "i.duckdb")
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started - 5))
    res = CliRunner().invoke(app, ["import", "--db", db, "--prometheus-url", server.url, "--since", since,
                                   "--until", "2s"])
    assert res.exit_code == 0, res.output
    assert "imported" in res.output
    store = Store(db)
    try:
        assert _rows(store, "SELECT count(DISTINCT gpu_id) FROM gpu_samples") == [(2,)]
    finally:
        store.close()
    bad = CliRunner().invoke(app, ["import", "--db", db, "--prometheus-url", f"http://127.0.0.1:{free_tcp_port()}"])
    assert bad.exit_code == 1


def test_selectors_and_ranges() -> None:
    sel = default_selectors()
    assert "DCGM_FI_DEV_POWER_USAGE" in sel["dcgm"] and "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS" in sel["dcgm"]
    assert "vllm:gpu_cache_usage_perc" in sel["vllm"] and "vllm:kv_cache_usage_perc" in sel["vllm"]
    assert "_bucket" not in sel["vllm"] and "gen_ai" not in sel["vllm"]
    assert subtract((0, 100), []) == [(0, 100)]
    assert subtract((0, 100), [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
    assert subtract((15, 55), [(10, 20), (50, 60)]) == [(20, 50)]
    assert subtract((12, 18), [(10, 20)]) == []
    assert union([(0, 10)], (10, 20)) == [(0, 20)]
    assert union([(0, 10), (30, 40)], (15, 20)) == [(0, 10), (15, 20), (30, 40)]
    assert union([(0, 10), (30, 40)], (5, 35)) == [(0, 40)]
    assert len(union([(i * 10, i * 10 + 1) for i in range(70)], (1000, 1001), keep=64)) == 64


def test_credentials_in_the_url_are_sent_as_basic_auth_and_kept_out_of_errors() -> None:
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            body = b'{"status":"success","data":{"resultType":"matrix","result":[]}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        puller = PrometheusPuller(f"http://ops:s%3Acret@127.0.0.1:{server.server_address[1]}/", 15.0)
        assert "s%3Acret" not in puller.url and "ops@" not in puller.url
        now = time.time()
        r = puller.pull(now - 30, now)
        assert r.ok and r.rows == 0 and r.windows == len(puller.selectors)
        assert set(seen) == {"Basic b3BzOnM6Y3JldA=="}  # ops:s:cret
    finally:
        server.shutdown()
        server.server_close()
    dead = PrometheusPuller(f"http://ops:secret@127.0.0.1:{free_tcp_port()}", 15.0, timeout_s=1.0)
    r = dead.pull(now - 30, now)
    assert r.errors and not any("secret" in e for e in r.errors)
