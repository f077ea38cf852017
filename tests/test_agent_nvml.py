"""The agent through the real pynvml against our C stand-in for libnvidia-ml.so.1.

Each test runs the agent in a subprocess whose LD_LIBRARY_PATH names the stand-in (pynvml loads the
library by name when Python starts using it). NVML timestamps come from the script's clock, so
values and times are exact.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from collector.signals import SIGNALS
from tests.nvml_standin.script import StandinScript, build_standin, read_call_log, standin_env

REPO = Path(__file__).resolve().parent.parent
BASE_US = 1_767_225_600_000_000
STEP_US = 100_000
MIB = 1 << 20


@pytest.fixture(scope="session")
def standin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_standin(tmp_path_factory.mktemp("nvml") / "lib")


def h100_node(gpus: int = 8, driver: str = "580.82.07") -> StandinScript:
    """An 8x H100 SXM node where every field the agent reads is supported."""
    s = StandinScript().driver(driver).gpus(gpus).system("clock_base_us", BASE_US).system("clock_step_us", STEP_US)
    getters: dict[str, list[object]] = {
        "name": ["NVIDIA H100 80GB HBM3"], "temp.gpu": [55, 56, 57, 58], "clock.sm": [1980, 1755, 1410],
        "clock.mem": [2619], "clock_max.sm": [1980], "reasons": [0, 4, 0x44], "mem.total": [80 * 1024 * MIB],
        "mem.used": [60 * 1024 * MIB], "mem.free": [20 * 1024 * MIB], "util.gpu": [97], "util.mem": [61],
        "pcie.gen": [5], "pcie.width": [16], "pcie.max_gen": [5], "pcie.max_width": [16],
        "procs.compute": ["4120:1073741824"], "procs.graphics": ["-"],
    }
    for key, values in getters.items():
        s.set(None, key, *values)
    fields: dict[int, list[object]] = {
        186: ["u32:612000", "u32:650000", "u32:700000"],  # power, mW
        190: ["u32:700000"],  # power limit, mW
        83: [1_000_000, 1_065_000, 1_135_000, 1_205_000],  # energy, mJ
        82: ["u32:48"],  # memory temperature
        94: ["u32:0", "u32:2"],  # PCIe replays
        197: ["u32:1000000000", "u32:1500000000", "u32:2500000000", "u32:3000000000"],
        198: ["u32:0", "u32:200000000", "u32:400000000", "u32:600000000"],
        38: [0], 45: [0], 52: [3], 59: [0],  # NVLink error totals
        3: [5], 4: [0], 5: [17], 6: [1],  # ECC
        29: [0], 30: [0], 31: [0], 142: [2], 143: [1], 144: [0], 145: [0],
        74: [0, 50_000_000, 150_000_000], 75: [0], 76: [0], 77: [0], 78: [0], 79: [0],  # ns held down
        269: [0], 270: [0], 271: [0], 91: ["u32:4"],
    }
    for fid, values in fields.items():
        s.set(None, f"field.{fid}", *values)
    for link in range(4):
        s.set(None, f"field.138.{link}", *[(link + 1) * k * 1024 * 1000 for k in range(1, 5)])  # KiB
        s.set(None, f"field.139.{link}", *[(link + 1) * k * 2048 * 1000 for k in range(1, 5)])
        s.set(None, f"nvlink.state.{link}", 1)
    for i in range(gpus):
        s.set(i, "uuid", f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}")
    return s


# every per-GPU signal the NVML backend produces on an H100 node with NVLink (not: profiling-only
# signals such as DRAM or SM active, which need DCGM, and XIDs, which need an event)
NVML_GPU_SIGNALS = sorted(
    name for name, sig in SIGNALS.items()
    if sig.scope in ("gpu", "gpu_link", "gpu_reason", "gpu_process")
    and name not in {"dram_active_ratio", "sm_active_ratio", "gr_engine_active_ratio", "xid_last", "xid_events_total"}
)


def prometheus_name(signal: str) -> str:
    """Where a signal appears on /metrics: DCGM's name, or stacklens_<name> (counters end in _total)."""
    sig = SIGNALS[signal]
    if sig.dcgm is not None and not sig.label_names:
        return sig.dcgm.name
    return sig.prometheus_name + ("_total" if sig.kind == "counter" and not sig.name.endswith("_total") else "")


def run_agent(lib: Path, script: StandinScript, tmp: Path, *args: str, call_log: bool = False,
              extra_env: dict[str, str] | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str],
                                                                                      dict[tuple[str, int, str], int]]:
    path = script.write(tmp / "script.txt")
    log = tmp / "calls.txt" if call_log else None
    env = standin_env(lib, path, log)
    env["STACKLENS_AGENT_PCIE_COUNTER_POLL"] = "false"  # its own NVML calls would move the script's ticks
    env.update(extra_env or {})
    proc = subprocess.run(  # noqa: PLW1510 - the tests read returncode
        [sys.executable, "-m", "collector.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    calls = read_call_log(log) if log is not None and log.exists() else {}
    return proc, calls


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_once_json_has_every_signal_from_eight_gpus(standin_lib: Path, tmp_path: Path) -> None:
    proc, _ = run_agent(standin_lib, h100_node(), tmp_path, "--once", "-o", "json", "--no-xid-events",
                        "--prometheus-port", "0")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert snap["gpu_status"] == "ok" and snap["driver_version"] == "580.82.07"
    assert [g["index"] for g in snap["gpus"]] == list(range(8))
    assert len({g["uuid"] for g in snap["gpus"]}) == 8
    g = snap["gpus"][0]
    s = g["signals"]
    assert g["name"] == "NVIDIA H100 80GB HBM3" and g["pci_bus_id"] == "00000000:18:00.0"
    # start-up reads the NVLink count (tick 0); the two reads of --once are ticks 1 and 2
    assert s["power_w"] == pytest.approx(700.0)
    assert s["power_limit_w"] == pytest.approx(700.0)
    assert s["energy_j"] == pytest.approx(1135.0)
    assert s["memory_temp_c"] == 48 and s["gpu_temp_c"] == 57
    assert s["sm_clock_hz"] == pytest.approx(1.41e9) and s["memory_clock_hz"] == pytest.approx(2.619e9)
    assert s["clock_event_reasons"] == 0x44 and g["clock_event_reasons_decoded"] == ["sw_power_cap", "hw_thermal"]
    assert s["fb_used_bytes"] == 60 * 1024 * MIB and s["fb_total_bytes"] == 80 * 1024 * MIB
    assert s["gpu_util_ratio"] == pytest.approx(0.97) and s["memory_busy_ratio"] == pytest.approx(0.61)
    # rates over NVML's own timestamps (100 ms apart), not the agent's 0.5 s between reads
    assert s["pcie_tx_bytes_per_s"] == pytest.approx(1e10)
    assert s["pcie_rx_bytes_per_s"] == pytest.approx(2e9)
    assert s["nvlink_tx_bytes_per_s{link=0}"] == pytest.approx(1024 * 1000 * 1024 * 10)
    assert s["nvlink_rx_bytes_per_s{link=3}"] == pytest.approx(4 * 2048 * 1000 * 1024 * 10)
    assert s["nvlink_tx_total_bytes_per_s"] == pytest.approx(sum((k + 1) * 1024 * 1000 * 1024 * 10 for k in range(4)))
    assert s["nvlink_link_up{link=2}"] == 1.0
    assert s["pcie_replay_total"] == 2 and s["nvlink_replay_errors_total"] == 3
    assert s["ecc_sbe_volatile_total"] == 5 and s["ecc_dbe_aggregate_total"] == 1
    assert s["remapped_rows_correctable"] == 2 and s["remapped_rows_uncorrectable"] == 1
    assert s["power_cap_throttle_s"] == pytest.approx(0.15)
    assert s["sw_thermal_throttle_s"] == 0 and s["hw_power_brake_throttle_s"] == 0
    assert s["pcie_link_gen"] == 5 and s["pcie_link_width_max"] == 16
    assert g["processes"] == [{"pid": 4120, "used_memory_bytes": 1073741824, "kind": "compute"}]
    assert snap["host"]["host_run_queue"] is not None


def test_otlp_and_prometheus_carry_nvml_values_times_and_labels(standin_lib: Path, tmp_path: Path,
                                                                otlp_sink: Any, prometheus_factory: Any) -> None:
    from tests.harness.prometheus_server import ScrapeTarget, free_tcp_port

    port = free_tcp_port()
    script = h100_node(gpus=2)
    # a slow series so several cycles land on the same values: timestamps stay exact
    path = script.write(tmp_path / "script.txt")
    env = standin_env(standin_lib, path)
    env["STACKLENS_AGENT_PCIE_COUNTER_POLL"] = "false"
    # every tier on every cycle, so consecutive reads of per-link rates are exact (the tiers' cadences are
    # tested in test_agent_tiers.py)
    env["STACKLENS_AGENT_MEDIUM_INTERVAL"] = "200ms"
    proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "--interval", "200ms", "--otlp-endpoint",
                             otlp_sink.grpc_endpoint, "--otlp-protocol", "grpc", "--prometheus-port", str(port),
                             "--prometheus-address", "127.0.0.1", "--node-name", "gpu-node-3", "--no-xid-events"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        prom = prometheus_factory([ScrapeTarget(f"127.0.0.1:{port}", job="agent")])
        points = otlp_sink.wait_for_points(
            lambda ps: sum(1 for p in ps if p.name == "stacklens.power_w") >= 6, timeout_s=20)
        power = sorted((p for p in points if p.name == "stacklens.power_w"),
                       key=lambda p: (p.attributes["gpu.uuid"], p.time_unix_nano))
        gpu0 = [p for p in power if p.attributes["gpu.uuid"] == "GPU-00000000-aaaa-bbbb-cccc-000000000000"]
        # NVML's own timestamps: tick k is base + k * step; cycles start at tick 1
        assert [p.time_unix_nano for p in gpu0[:3]] == [(BASE_US + k * STEP_US) * 1000 for k in (1, 2, 3)]
        assert [p.value for p in gpu0[:3]] == [650.0, 700.0, 700.0]
        assert {p.unit for p in power} == {"W"}
        assert power[0].resource_attributes["host.name"] == "gpu-node-3"
        assert power[0].resource_attributes["nvidia.driver.version"] == "580.82.07"
        info = [p for p in points if p.name == "stacklens.gpu_info"]
        assert {(p.attributes["gpu.index"], p.attributes["gpu.pci_bus_id"]) for p in info} == {
            (0, "00000000:18:00.0"), (1, "00000000:28:00.0")}
        rx = [p for p in points if p.name == "stacklens.nvlink_rx_bytes_per_s" and p.attributes["link"] == "1"]
        assert rx and rx[0].unit == "By/s"
        series = prom.wait_for('DCGM_FI_DEV_POWER_USAGE{job="agent"}', predicate=lambda r: len(r) == 2)
        labels = {s["metric"]["gpu"]: s["metric"] for s in series}
        assert labels["1"]["UUID"] == "GPU-00000001-aaaa-bbbb-cccc-000000000001"
        assert labels["1"]["pci_bus_id"] == "00000000:28:00.0" and labels["1"]["device"] == "nvidia1"
        assert labels["0"]["Hostname"] == "gpu-node-3" and labels["0"]["modelName"] == "NVIDIA H100 80GB HBM3"
        fb = prom.wait_for('DCGM_FI_DEV_FB_USED{job="agent",gpu="0"}')
        assert float(fb[0]["value"][1]) == 60 * 1024  # MiB
        tx3 = [p for p in points if p.name == "stacklens.nvlink_tx_bytes_per_s" and p.attributes["link"] == "3"
               and p.attributes["gpu.uuid"].endswith("000000000001")]
        assert math.isnan(tx3[0].value)  # first read: no rate yet, sent flagged as missing, not as 0
        assert [p.value for p in tx3[1:3]] == [pytest.approx(4 * 1024 * 1000 * 1024 * 10)] * 2  # KiB deltas / NVML time
        link = prom.wait_for('stacklens_nvlink_tx_bytes_per_s{job="agent",gpu="1",link="3"}')
        assert link[0]["metric"]["UUID"] == "GPU-00000001-aaaa-bbbb-cccc-000000000001"
        ecc = prom.wait_for('DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{job="agent"}')
        assert {float(s["value"][1]) for s in ecc} == {5.0}
        procs = prom.wait_for('stacklens_gpu_process_memory_bytes{job="agent",pid="4120"}')
        assert len(procs) == 2
        # every GPU signal the agent measures reaches both exports, under the catalog's names
        otlp_names = {p.name for p in otlp_sink.metric_points()}
        assert {SIGNALS[n].otlp_name for n in NVML_GPU_SIGNALS} <= otlp_names, \
            sorted({SIGNALS[n].otlp_name for n in NVML_GPU_SIGNALS} - otlp_names)
        prom.wait_for('DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{job="agent"}')  # a slow-tier signal, between reads
        prom_names = set(prom.label_values("__name__"))
        expected = {prometheus_name(n) for n in NVML_GPU_SIGNALS}
        assert expected <= prom_names, sorted(expected - prom_names)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "Traceback" not in err, err


def test_not_supported_is_asked_once(standin_lib: Path, tmp_path: Path) -> None:
    script = h100_node(gpus=2).set(None, "field.82", "NS").set(None, "util.gpu", "NS")
    proc, calls = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "12", "-o", "json",
                            "--prometheus-port", "0", "--no-xid-events", call_log=True)
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert len(lines) == 12
    assert all("memory_temp_c" not in g["signals"] for line in lines for g in line["gpus"])
    assert calls[("field", 0, "field.82.0")] == 1  # asked once, never again
    assert calls[("field", 0, "field.186.0")] >= 12
    assert calls[("nvmlDeviceGetUtilizationRates", 1, "-")] == 1
    # GPU temperature is on the medium tier: once a second at this cadence (cycles 0 and 10)
    assert calls[("nvmlDeviceGetTemperature", 1, "temp.gpu")] == 2


def test_gpu_lost_mid_run_and_xid_event(standin_lib: Path, tmp_path: Path) -> None:
    script = h100_node(gpus=4).set(3, "lost_at_tick", 3).set(1, "xid", "79@2")
    proc, _ = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "8", "-o", "json",
                        "--prometheus-port", "0")
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert len(lines) == 8  # the agent went on
    lost_flags = [line["gpus"][3]["lost"] for line in lines]
    assert lost_flags[:2] == [False] * 2 and all(lost_flags[2:])  # cycles read ticks 1, 2, 3, ...
    last = lines[-1]
    assert last["gpus"][3]["signals"] == {"gpu_lost": 1.0}
    assert all(not g["lost"] and g["signals"]["power_w"] is not None for g in last["gpus"][:3])
    events = [e for line in lines for e in line["xid_events"]]
    assert [(e["gpu_index"], e["xid"]) for e in events] == [(1, 79)]
    assert "GPU 3 is lost" in proc.stderr


def test_cpu_only_node_says_so_once_and_exports_host_signals(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    proc = subprocess.run(  # noqa: PLW1510 - the tests read returncode
        [sys.executable, "-m", "collector.cli", "--interval", "100ms", "--cycles", "11", "-o",
                           "json", "--prometheus-port", "0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    assert [line["gpu_status"] for line in lines] == ["library_not_found"] * 11
    assert all(line["gpus"] == [] for line in lines)
    # host signals are read once a second: cycles 0 and 10 at this cadence
    assert [i for i, line in enumerate(lines) if line["host"] is not None] == [0, 10]
    assert lines[-1]["host"]["host_cpu_util_ratio"] is not None
    assert proc.stderr.count("NVML unavailable") == 1


def test_counters_wrap_and_reset(standin_lib: Path, tmp_path: Path) -> None:
    top = 2**32 - 1000
    script = (h100_node(gpus=1)
              # tick 0 is start-up's read; cycles read ticks 1-4
              .set(0, "field.197", "u32:0", f"u32:{top - 4000}", f"u32:{top}", "u32:3000", "u32:9000")  # wrap
              .set(0, "field.198", "0", "5000000000", "5000100000", "10", "20010"))  # 64-bit reset
    proc, _ = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "4", "-o", "json",
                        "--prometheus-port", "0", "--no-xid-events")
    assert proc.returncode == 0, proc.stderr
    tx = [line["gpus"][0]["signals"]["pcie_tx_bytes_per_s"] for line in json_lines(proc.stdout)]
    rx = [line["gpus"][0]["signals"]["pcie_rx_bytes_per_s"] for line in json_lines(proc.stdout)]
    assert tx[0] is None  # first read: no rate, missing (not 0)
    assert tx[1] == pytest.approx(4000 * 10)
    assert tx[2] == pytest.approx((1000 + 3000) * 10)  # across the wrap
    assert tx[3] == pytest.approx(6000 * 10)
    assert rx[1] == pytest.approx(100000 * 10)
    assert rx[2] is None  # a reset: missing for that interval, never a negative or huge rate
    assert rx[3] == pytest.approx(20000 * 10)


@pytest.mark.parametrize(("driver", "expected"), [("580.82.07", {269, 270, 271}), ("575.51.02", {251, 252, 253}),
                                                  ("570.86.10", set())])
def test_renumbered_throttle_fields_follow_the_driver(standin_lib: Path, tmp_path: Path, driver: str,
                                                      expected: set[int]) -> None:
    script = h100_node(gpus=1, driver=driver)
    for fid in (251, 252, 253):
        script.set(None, f"field.{fid}", 1)
    proc, calls = run_agent(standin_lib, script, tmp_path, "--once", "-o", "json", "--no-xid-events",
                            "--prometheus-port", "0", call_log=True)
    assert proc.returncode == 0, proc.stderr
    asked = {int(key.split(".")[1]) for (sym, _, key) in calls if sym == "field"}
    assert asked & {251, 252, 253, 269, 270, 271} == expected


def test_transient_error_is_missing_not_zero(standin_lib: Path, tmp_path: Path) -> None:
    script = h100_node(gpus=1).set(0, "field.186", "u32:1", "u32:612000", "ERR:999", "u32:700000")
    proc, _ = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "3", "-o", "json",
                        "--prometheus-port", "0", "--no-xid-events")
    assert proc.returncode == 0, proc.stderr
    power = [line["gpus"][0]["signals"].get("power_w", "absent") for line in json_lines(proc.stdout)]
    assert power == [612.0, None, 700.0]


def test_malformed_script_or_driver_error_keeps_the_agent_alive(standin_lib: Path, tmp_path: Path) -> None:
    script = h100_node(gpus=1).system("init_error", 9)  # NVML_ERROR_DRIVER_NOT_LOADED
    proc, _ = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "2", "-o", "json",
                        "--prometheus-port", "0")
    assert proc.returncode == 0, proc.stderr
    assert [line["gpu_status"] for line in json_lines(proc.stdout)] == ["driver_not_loaded"] * 2


def test_pcie_throughput_fallback_runs_off_the_sampling_path(standin_lib: Path, tmp_path: Path) -> None:
    """A driver without the PCIe byte-counter fields: the slow (20 ms) throughput call runs on its own
    thread and its values (KiB/s) reach the samples; the sampling cadence does not suffer."""
    script = (h100_node(gpus=2).set(None, "field.197", "NS").set(None, "field.198", "NS")
              .set(None, "pcie.tx_kbps", 1_000_000).set(None, "pcie.rx_kbps", 250_000))
    proc, _ = run_agent(standin_lib, script, tmp_path, "--interval", "100ms", "--cycles", "25", "-o", "json",
                        "--prometheus-port", "0", "--no-xid-events")
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stdout)
    tx = [line["gpus"][1]["signals"].get("pcie_tx_bytes_per_s") for line in lines]
    rx = [line["gpus"][1]["signals"].get("pcie_rx_bytes_per_s") for line in lines]
    assert 1_000_000 * 1024.0 in tx and 250_000 * 1024.0 in rx
    times = [line["time_ns"] for line in lines]
    span_s = (times[-1] - times[0]) / 1e9
    assert span_s < 24 * 0.1 * 1.5  # 40 ms of blocking calls per poll did not stretch the 100 ms cycles


def test_demo_sends_this_machines_real_gpus_through_the_agent_path(standin_lib: Path, tmp_path: Path) -> None:
    """`stacklens demo --nvml`: beside the simulated fleet, the GPUs NVML reports (here the stand-in's) go
    through the agent's NVML access layer and OTLP encoder into the demo's correlator."""
    path = h100_node(2).write(tmp_path / "script.txt")
    scenario = tmp_path / "s.toml"
    scenario.write_text("nodes = 1\ngpus_per_node = 2\nduration_s = 240.0\nseed = 3\nworkload = 'synthetic'\n")
    db = tmp_path / "demo.duckdb"
    proc = subprocess.run(  # noqa: PLW1510 - the test reads returncode
        [sys.executable, "-m", "correlator.cli", "demo", "--nvml", "--scenario", str(scenario), "--db", str(db)],
        cwd=REPO, env=standin_env(standin_lib, path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "adding this machine's real GPUs" in proc.stderr
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(
        "SELECT g.uuid, g.model, count(*) FROM gpu_samples JOIN gpus g USING (gpu_id) JOIN nodes n "
        "ON n.node_id = g.node_id WHERE n.name = ? GROUP BY ALL ORDER BY 1", [socket.gethostname()]).fetchall()
    con.close()
    assert [r[0] for r in rows] == [f"GPU-{i:08x}-aaaa-bbbb-cccc-{i:012x}" for i in range(2)]
    assert all(r[1] == "NVIDIA H100 80GB HBM3" and r[2] > 10 for r in rows)
