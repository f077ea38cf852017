"""The NVML stand-in (tests/nvml_standin) through the real pynvml.

pynvml loads ``libnvidia-ml.so.1`` by name, so every check runs in a subprocess whose
LD_LIBRARY_PATH names the stand-in's build folder. Each subprocess runs PRELUDE plus a body that
fills ``out``, which comes back as JSON.
"""

from __future__ import annotations

import ctypes.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.nvml_standin import script as standin_script
from tests.nvml_standin.script import SOURCE, StandinScript, build_standin, read_call_log, standin_env

BASE_US = 1_767_225_600_000_000
STEP_US = 250_000
LOST = "NVMLError_GpuIsLost"
NS = "NVMLError_NotSupported"

# every function the stand-in exports, and nothing else
EXPORTED_NAMES = """
    nvmlInit nvmlInit_v2 nvmlInitWithFlags nvmlShutdown nvmlErrorString nvmlSystemGetDriverVersion
    nvmlSystemGetNVMLVersion nvmlSystemGetCudaDriverVersion nvmlSystemGetCudaDriverVersion_v2
    nvmlDeviceGetCount nvmlDeviceGetCount_v2 nvmlDeviceGetHandleByIndex nvmlDeviceGetHandleByIndex_v2
    nvmlDeviceGetHandleByUUID nvmlDeviceGetUUID nvmlDeviceGetName nvmlDeviceGetPciInfo_v3
    nvmlDeviceGetPciInfo_v2 nvmlDeviceGetPciInfo nvmlDeviceGetIndex nvmlDeviceGetMinorNumber
    nvmlDeviceGetFieldValues nvmlDeviceGetTemperature nvmlDeviceGetClockInfo nvmlDeviceGetMaxClockInfo
    nvmlDeviceGetCurrentClocksEventReasons nvmlDeviceGetCurrentClocksThrottleReasons
    nvmlDeviceGetPowerUsage nvmlDeviceGetEnforcedPowerLimit nvmlDeviceGetTotalEnergyConsumption
    nvmlDeviceGetMemoryInfo nvmlDeviceGetMemoryInfo_v2 nvmlDeviceGetUtilizationRates
    nvmlDeviceGetPcieThroughput nvmlDeviceGetPcieReplayCounter nvmlDeviceGetCurrPcieLinkGeneration
    nvmlDeviceGetCurrPcieLinkWidth nvmlDeviceGetMaxPcieLinkGeneration nvmlDeviceGetMaxPcieLinkWidth
    nvmlDeviceGetNvLinkState nvmlDeviceGetComputeRunningProcesses_v3
    nvmlDeviceGetGraphicsRunningProcesses_v3 nvmlDeviceGetMPSComputeRunningProcesses_v3
    nvmlDeviceGetTotalEccErrors nvmlDeviceGetRemappedRows nvmlEventSetCreate nvmlDeviceRegisterEvents
    nvmlDeviceGetSupportedEventTypes nvmlEventSetWait nvmlEventSetWait_v2 nvmlEventSetFree
"""
EXPORTED = set(EXPORTED_NAMES.split())

PRELUDE = """
import ctypes, json, os, threading, time
import pynvml as N

out = {}

def err(fn, *args):
    try:
        fn(*args)
    except N.NVMLError as e:
        return type(e).__name__
    return "ok"

def advance(h):
    return N.nvmlDeviceGetFieldValues(h, [83])

def text(x):
    return x.decode() if isinstance(x, bytes) else x
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_standin(tmp_path_factory.mktemp("nvml_standin") / "lib")


def run_nvml(lib: Path, tmp: Path, script: StandinScript | str, body: str, call_log: Path | None = None,
             env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Runs PRELUDE + body under the stand-in; returns ``out`` and stderr."""
    path = tmp / "script.txt"
    path.write_text(script if isinstance(script, str) else script.text())
    code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env or standin_env(lib, path, call_log),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def test_builds_warning_free_and_exports_exactly_the_nvml_functions(tmp_path: Path, lib: Path) -> None:
    so = tmp_path / "strict.so"
    strict = [*standin_script.GCC_FLAGS, "-Wpedantic", "-Wshadow", "-Wformat=2"]
    proc = subprocess.run(["gcc", *strict, "-o", str(so), str(SOURCE)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # up to date: not rebuilt
    before = (lib / "libnvidia-ml.so.1").stat().st_mtime_ns
    assert build_standin(lib) == lib and (lib / "libnvidia-ml.so.1").stat().st_mtime_ns == before
    if shutil.which("nm") is None:
        pytest.skip("no nm to list the exported symbols")
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib / "libnvidia-ml.so.1")], capture_output=True,
                        text=True, check=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.split()[1] == "T"}
    assert exported == EXPORTED


def test_a_failed_build_says_what_gcc_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return undeclared_thing; }\n")
    monkeypatch.setattr(standin_script, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="undeclared_thing"):
        build_standin(tmp_path / "out")
    assert not (tmp_path / "out" / "libnvidia-ml.so.1").exists()


def test_eight_gpus_with_their_own_identity(lib: Path, tmp_path: Path) -> None:
    script = (StandinScript().driver("580.82.07").nvml("13.580.82").cuda(13000).gpus(8)
              .set(None, "name", "NVIDIA H100 80GB HBM3").set(5, "name", "NVIDIA H200")
              .set(2, "uuid", "GPU-5d3c0a1e-0000-4a4a-8b8b-00000000beef")
              .set(6, "pci_bus_id", "00000001:DB:00.0"))
    out, _ = run_nvml(lib, tmp_path, script, """
        N.nvmlInit()
        out["system"] = [N.nvmlSystemGetDriverVersion(), N.nvmlSystemGetNVMLVersion(),
                         N.nvmlSystemGetCudaDriverVersion(), N.nvmlSystemGetCudaDriverVersion_v2()]
        out["gpus"] = []
        for i in range(N.nvmlDeviceGetCount()):
            h = N.nvmlDeviceGetHandleByIndex(i)
            pci = N.nvmlDeviceGetPciInfo(h)
            uuid = N.nvmlDeviceGetUUID(h)
            out["gpus"].append({
                "uuid": uuid, "name": N.nvmlDeviceGetName(h), "bus_id": text(pci.busId),
                "legacy": text(pci.busIdLegacy), "domain": pci.domain, "bus": pci.bus, "device": pci.device,
                "pci_device_id": pci.pciDeviceId, "index": N.nvmlDeviceGetIndex(h),
                "minor": N.nvmlDeviceGetMinorNumber(h),
                "by_uuid": N.nvmlDeviceGetIndex(N.nvmlDeviceGetHandleByUUID(uuid)),
            })
        h0 = N.nvmlDeviceGetHandleByIndex(0)
        out["beyond"] = err(N.nvmlDeviceGetHandleByIndex, 8)
        out["unknown_uuid"] = err(N.nvmlDeviceGetHandleByUUID, "GPU-not-here")
        out["board_id"] = err(N.nvmlDeviceGetBoardId, h0)  # not exported, as on an older driver
        out["fan"] = err(N.nvmlDeviceGetFanSpeed, h0)
        out["error_string"] = text(N.nvmlErrorString(N.NVML_ERROR_GPU_IS_LOST))
        N.nvmlShutdown()
    """)
    assert out["system"] == ["580.82.07", "13.580.82", 13000, 13000]
    gpus = out["gpus"]
    for key in ("index", "minor", "by_uuid"):
        assert [g[key] for g in gpus] == list(range(8))
    assert len({g["uuid"] for g in gpus}) == 8 and len({g["bus_id"] for g in gpus}) == 8
    assert gpus[0]["uuid"] == "GPU-00000000-0000-0000-0000-000000000000"
    assert gpus[7]["uuid"] == "GPU-00000000-0000-0000-0000-000000000007"
    assert gpus[2]["uuid"] == "GPU-5d3c0a1e-0000-4a4a-8b8b-00000000beef"
    h100 = "NVIDIA H100 80GB HBM3"
    assert [g["name"] for g in gpus] == [h100] * 5 + ["NVIDIA H200"] + [h100] * 2
    for i, g in enumerate(gpus):
        if i != 6:
            bus = 0x18 + 0x10 * i
            expected = (f"00000000:{bus:02X}:00.0", 0, bus, 0)
            assert (g["bus_id"], g["domain"], g["bus"], g["device"]) == expected, i
        assert g["pci_device_id"] == 0x233010DE  # the fields after busIdLegacy line up
    assert (gpus[6]["bus_id"], gpus[6]["legacy"], gpus[6]["domain"], gpus[6]["bus"]) == (
        "00000001:DB:00.0", "0001:DB:00.0", 1, 0xDB)
    assert out["beyond"] == "NVMLError_InvalidArgument"
    assert out["unknown_uuid"] == "NVMLError_NotFound"
    assert out["board_id"] == out["fan"] == "NVMLError_FunctionNotFound"
    assert out["error_string"] == "GPU is lost"


FIELD_BODY = """
N.nvmlInit()
h0, h1 = N.nvmlDeviceGetHandleByIndex(0), N.nvmlDeviceGetHandleByIndex(1)
ask = [83, 186, 82, 200, 94, 190, 999, (138, 0), (138, 1), (138, 2), (138, 3)]
VALUE = {0: "dVal", 1: "uiVal", 3: "ullVal", 4: "sllVal"}
def row(v):
    value = getattr(v.value, VALUE[v.valueType]) if v.nvmlReturn == 0 else None
    return [v.fieldId, v.scopeId, v.timestamp, v.latencyUsec, v.valueType, v.nvmlReturn, value]
out["temp"] = [N.nvmlDeviceGetTemperature(h0, N.NVML_TEMPERATURE_GPU)]
out["batches"] = []
for _ in range(4):
    out["batches"].append([row(v) for v in N.nvmlDeviceGetFieldValues(h0, ask)])
    out["temp"].append(N.nvmlDeviceGetTemperature(h0, N.NVML_TEMPERATURE_GPU))
out["gpu1"] = [row(v) for v in N.nvmlDeviceGetFieldValues(h1, [83, 186])]
N.nvmlShutdown()
"""


def test_field_values_types_errors_scopes_and_timestamps(lib: Path, tmp_path: Path) -> None:
    script = (StandinScript().gpus(2).clock(BASE_US, STEP_US)
              .set(None, "field.83", 1000, 2000, 3000)
              .set(None, "field.186", "d:350.5", "d:351.25")
              .set(None, "field.82", "u32:48")
              .set(None, "field.200", "i64:-5")
              .set(None, "field.94", "NS")
              .set(None, "field.190", "u32:700000", "ERR:999", "u32:710000")
              .set(1, "field.83", "u64:18446744073709551615")  # GPU 1's own value over the default
              .set(None, "field.138.0", 10, 20).set(None, "field.138.1", 11, 21).set(None, "field.138.3", 13)
              .set(None, "temp.gpu", 45, 46, 47))
    out, _ = run_nvml(lib, tmp_path, script, FIELD_BODY)
    u64, dbl, u32, i64 = 3, 0, 1, 4
    for k, batch in enumerate(out["batches"]):
        tick = min(k, 2)
        ts = BASE_US + k * STEP_US
        assert [r[:2] for r in batch] == [[83, 0], [186, 0], [82, 0], [200, 0], [94, 0], [190, 0], [999, 0],
                                          [138, 0], [138, 1], [138, 2], [138, 3]]
        assert {(r[2], r[3]) for r in batch} == {(ts, 0)}, f"batch {k}: timestamps"
        assert batch[0][4:] == [u64, 0, [1000, 2000, 3000][tick]]
        assert batch[1][4:] == [dbl, 0, [350.5, 351.25, 351.25][tick]]
        assert batch[2][4:] == [u32, 0, 48]
        assert batch[3][4:] == [i64, 0, -5]
        assert batch[4][5:] == [3, None]  # NS: NOT_SUPPORTED for this entry only
        assert batch[5][5:] == [[0, 999, 0][tick], [700000, None, 710000][tick]]
        assert batch[6][5] == 3  # not in the script
        links = [[0, [10, 20, 20][tick]], [0, [11, 21, 21][tick]], [3, None], [0, 13]]  # link 2: not scripted
        assert [r[5:] for r in batch[7:]] == links
    # getters read the tick of the batch before them (before any batch: tick 0)
    assert out["temp"] == [45, 45, 46, 47, 47]
    # each GPU keeps its own tick; a GPU's own setting wins over gpu.*
    assert out["gpu1"] == [[83, 0, BASE_US, 0, u64, 0, 2**64 - 1], [186, 0, BASE_US, 0, dbl, 0, 350.5]]


GETTER_BODY = """
N.nvmlInit()
h = N.nvmlDeviceGetHandleByIndex(0)
def reads():
    r = {}
    for name, fn, args in [
        ("sm", N.nvmlDeviceGetClockInfo, (N.NVML_CLOCK_SM,)),
        ("mem", N.nvmlDeviceGetClockInfo, (N.NVML_CLOCK_MEM,)),
        ("graphics", N.nvmlDeviceGetClockInfo, (N.NVML_CLOCK_GRAPHICS,)),
        ("video", N.nvmlDeviceGetClockInfo, (N.NVML_CLOCK_VIDEO,)),
        ("bad_clock", N.nvmlDeviceGetClockInfo, (9,)),
        ("max_sm", N.nvmlDeviceGetMaxClockInfo, (N.NVML_CLOCK_SM,)),
        ("max_mem", N.nvmlDeviceGetMaxClockInfo, (N.NVML_CLOCK_MEM,)),
        ("reasons", N.nvmlDeviceGetCurrentClocksEventReasons, ()),
        ("throttle", N.nvmlDeviceGetCurrentClocksThrottleReasons, ()),
        ("power", N.nvmlDeviceGetPowerUsage, ()), ("limit", N.nvmlDeviceGetEnforcedPowerLimit, ()),
        ("energy", N.nvmlDeviceGetTotalEnergyConsumption, ()),
        ("util", lambda h: (lambda u: [u.gpu, u.memory])(N.nvmlDeviceGetUtilizationRates(h)), ()),
        ("mem_v1", lambda h: (lambda m: [m.total, m.free, m.used])(N.nvmlDeviceGetMemoryInfo(h)), ()),
        ("mem_v2", lambda h: (lambda m: [m.version, m.total, m.reserved, m.free, m.used])(
            N.nvmlDeviceGetMemoryInfo(h, version=N.nvmlMemory_v2)), ()),
        ("mem_v2_bad_version", N.nvmlDeviceGetMemoryInfo, (1,)),
        ("gen", N.nvmlDeviceGetCurrPcieLinkGeneration, ()), ("width", N.nvmlDeviceGetCurrPcieLinkWidth, ()),
        ("max_gen", N.nvmlDeviceGetMaxPcieLinkGeneration, ()),
        ("max_width", N.nvmlDeviceGetMaxPcieLinkWidth, ()),
        ("replay", N.nvmlDeviceGetPcieReplayCounter, ()),
        ("link0", N.nvmlDeviceGetNvLinkState, (0,)), ("link1", N.nvmlDeviceGetNvLinkState, (1,)),
        ("link5", N.nvmlDeviceGetNvLinkState, (5,)),
        ("ecc_unc_vol", N.nvmlDeviceGetTotalEccErrors, (1, 0)),
        ("ecc_cor_agg", N.nvmlDeviceGetTotalEccErrors, (0, 1)),
        ("ecc_cor_vol", N.nvmlDeviceGetTotalEccErrors, (0, 0)),
        ("remap", N.nvmlDeviceGetRemappedRows, ()),
        ("temp", N.nvmlDeviceGetTemperature, (N.NVML_TEMPERATURE_GPU,)),
    ]:
        try:
            r[name] = fn(h, *args)
        except N.NVMLError as e:
            r[name] = type(e).__name__
    return r
out["tick0"] = reads()
advance(h)
advance(h)
out["tick1"] = reads()
advance(h)
out["tick2"] = reads()
t = time.monotonic()
out["pcie"] = [N.nvmlDeviceGetPcieThroughput(h, N.NVML_PCIE_UTIL_TX_BYTES),
               N.nvmlDeviceGetPcieThroughput(h, N.NVML_PCIE_UTIL_RX_BYTES)]
out["pcie_s"] = time.monotonic() - t
N.nvmlShutdown()
"""


def test_getters_read_the_current_tick(lib: Path, tmp_path: Path) -> None:
    gib = 1 << 30
    script = StandinScript().gpus(1).set(None, "field.83", 1)
    getters: dict[str, list[object]] = {
        "clock.sm": [1980, 1410], "clock.mem": [2619], "clock.graphics": [1755], "clock_max.sm": [1980],
        "clock_max.mem": [2619], "reasons": [0x44, 4], "power_mw": [612000, "NS", "ERR:999"],
        "power_limit_mw": [700000], "energy_mj": [5_000_000_000, 5_000_070_000],
        "util.gpu": [97], "util.mem": [61],
        "mem.total": [80 * gib], "mem.used": [60 * gib], "mem.free": [19 * gib], "mem.reserved": [gib],
        "pcie.gen": [5, 4], "pcie.width": [16, 8], "pcie.max_gen": [5], "pcie.max_width": [16],
        "pcie.replay": [7],
        "nvlink.state.0": [1], "nvlink.state.1": [0], "ecc.1.0": [17], "ecc.0.1": [5], "remap.cor": [1],
        "remap.unc": [2], "remap.pending": [0], "remap.failure": [0], "temp.gpu": [55, 56],
        "pcie.tx_kbps": [1200], "pcie.rx_kbps": [3400],
    }
    for key, values in getters.items():
        script.set(None, key, *values)
    out, _ = run_nvml(lib, tmp_path, script, GETTER_BODY)
    t0, t1, t2 = out["tick0"], out["tick1"], out["tick2"]
    assert [t0[k] for k in ("sm", "mem", "graphics", "max_sm", "max_mem")] == [1980, 2619, 1755, 1980, 2619]
    assert t0["video"] == NS and t0["bad_clock"] == "NVMLError_InvalidArgument"
    assert [t0["reasons"], t0["throttle"], t1["reasons"], t1["throttle"]] == [0x44, 0x44, 4, 4]
    assert [t0["power"], t1["power"], t2["power"]] == [612000, NS, "NVMLError_Unknown"]
    assert t0["limit"] == 700000
    assert [t0["energy"], t1["energy"]] == [5_000_000_000, 5_000_070_000]  # 64 bits
    assert t0["util"] == [97, 61]
    assert t0["mem_v1"] == [80 * gib, 19 * gib, 60 * gib]
    assert t0["mem_v2"] == [0x02000028, 80 * gib, gib, 19 * gib, 60 * gib]
    assert t0["mem_v2_bad_version"] == "NVMLError_ArgumentVersionMismatch"
    assert [t0["gen"], t0["width"], t1["gen"], t1["width"]] == [5, 16, 4, 8]
    assert [t0["max_gen"], t0["max_width"]] == [5, 16]
    assert t0["replay"] == 7
    assert [t0["link0"], t0["link1"], t0["link5"]] == [1, 0, "NVMLError_InvalidArgument"]
    assert [t0["ecc_unc_vol"], t0["ecc_cor_agg"], t0["ecc_cor_vol"]] == [17, 5, NS]
    assert t0["remap"] == [1, 2, 0, 0]
    assert [t0["temp"], t1["temp"], t2["temp"]] == [55, 56, 56]
    assert out["pcie"] == [1200, 3400]
    assert out["pcie_s"] >= 0.038  # 20 ms per call, like the real one


def test_running_processes_and_the_size_query_protocol(lib: Path, tmp_path: Path) -> None:
    script = (StandinScript().gpus(2)
              .set(None, "procs.compute", "4120:1073741824", "4121:2048", "4122")
              .set(None, "procs.graphics", "-").set(1, "procs.compute", "NS"))
    out, _ = run_nvml(lib, tmp_path, script, """
        N.nvmlInit()
        h0, h1 = N.nvmlDeviceGetHandleByIndex(0), N.nvmlDeviceGetHandleByIndex(1)
        out["compute"] = [[p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId]
                          for p in N.nvmlDeviceGetComputeRunningProcesses(h0)]
        out["graphics"] = N.nvmlDeviceGetGraphicsRunningProcesses(h0)
        out["mps"] = err(N.nvmlDeviceGetMPSComputeRunningProcesses, h0)
        out["gpu1"] = err(N.nvmlDeviceGetComputeRunningProcesses, h1)
        fn = N.nvmlLib.nvmlDeviceGetComputeRunningProcesses_v3
        protocol = []
        for n, with_array in [(0, False), (2, True), (3, True), (8, True)]:
            count = ctypes.c_uint(n)
            arr = (N.c_nvmlProcessInfo_v3_t * max(n, 1))() if with_array else None
            rc = fn(h0, ctypes.byref(count), arr)
            protocol.append([rc, count.value, arr[n - 1].pid if rc == 0 else None])
        out["protocol"] = protocol
        count = ctypes.c_uint(0)
        rc = N.nvmlLib.nvmlDeviceGetGraphicsRunningProcesses_v3(h0, ctypes.byref(count), None)
        out["graphics_raw"] = [rc, count.value]
        N.nvmlShutdown()
    """)
    none = 0xFFFFFFFF
    assert out["compute"] == [[4120, 1 << 30, none, none], [4121, 2048, none, none], [4122, None, none, none]]
    assert out["graphics"] == []
    assert out["mps"] == out["gpu1"] == NS
    # no array or too small: INSUFFICIENT_SIZE (7) and the count needed; large enough: SUCCESS and the count
    assert out["protocol"] == [[7, 3, None], [7, 3, None], [0, 3, 4122], [0, 3, 0]]
    assert out["graphics_raw"] == [0, 0]


def test_a_gpu_lost_at_tick_two_fails_its_third_batch_and_every_call_after(lib: Path, tmp_path: Path) -> None:
    script = (StandinScript().gpus(4).set(None, "field.83", 1, 2, 3, 4).set(None, "temp.gpu", 50)
              .set(None, "mem.total", 8).set(None, "mem.used", 4).set(None, "mem.free", 4)
              .set(2, "lost_at_tick", 2))
    out, _ = run_nvml(lib, tmp_path, script, """
        N.nvmlInit()
        hs = [N.nvmlDeviceGetHandleByIndex(i) for i in range(4)]
        out["batches"] = [[], [], [], []]
        for _ in range(4):
            for i, h in enumerate(hs):
                try:
                    out["batches"][i].append(advance(h)[0].value.ullVal)
                except N.NVMLError as e:
                    out["batches"][i].append(type(e).__name__)
        h2 = hs[2]
        out["gpu2"] = [err(N.nvmlDeviceGetTemperature, h2, 0), err(N.nvmlDeviceGetName, h2),
                       err(N.nvmlDeviceGetUUID, h2), err(N.nvmlDeviceGetMemoryInfo, h2),
                       err(N.nvmlDeviceGetPciInfo, h2), err(N.nvmlDeviceGetIndex, h2),
                       err(N.nvmlDeviceGetComputeRunningProcesses, h2), err(N.nvmlDeviceGetHandleByIndex, 2),
                       err(N.nvmlDeviceGetHandleByUUID, "GPU-00000000-0000-0000-0000-000000000002")]
        try:
            advance(h2)
        except N.NVMLError as e:
            out["message"] = str(e)
        out["others"] = [[N.nvmlDeviceGetTemperature(h, 0), N.nvmlDeviceGetMemoryInfo(h).used]
                         for h in hs if h is not h2]
        N.nvmlShutdown()
    """)
    assert out["batches"][2] == [1, 2, LOST, LOST]
    assert out["batches"][0] == out["batches"][1] == out["batches"][3] == [1, 2, 3, 4]
    assert out["gpu2"] == [LOST] * 9
    assert out["message"] == "GPU is lost"
    assert out["others"] == [[50, 4]] * 3


XID_BODY = """
N.nvmlInit()
hs = [N.nvmlDeviceGetHandleByIndex(i) for i in range(3)]
out["supported"] = [N.nvmlDeviceGetSupportedEventTypes(h) for h in hs]
es = N.nvmlEventSetCreate()
out["register"] = [err(N.nvmlDeviceRegisterEvents, h, N.nvmlEventTypeXidCriticalError, es) for h in hs]
t = time.monotonic()
out["early"] = err(N.nvmlEventSetWait, es, 60)
out["early_s"] = time.monotonic() - t
advance(hs[1])  # batch 0: tick 0
out["tick0"] = err(N.nvmlEventSetWait, es, 0)
advance(hs[1])  # tick 1: XID 79 is due
d = N.nvmlEventSetWait_v2(es, 0)
out["first"] = [N.nvmlDeviceGetIndex(d.device), d.eventType, d.eventData,
                d.gpuInstanceId, d.computeInstanceId]
out["again"] = err(N.nvmlEventSetWait, es, 0)
# a waiter in another thread sees the tick this thread moves; the wait must not hold the lock
got = {}
def waiter():
    t = time.monotonic()
    try:
        got["xid"] = N.nvmlEventSetWait(es, 5000).eventData
    except N.NVMLError as e:
        got["xid"] = type(e).__name__
    got["s"] = time.monotonic() - t
th = threading.Thread(target=waiter)
th.start()
time.sleep(0.1)
t = time.monotonic()
advance(hs[1])  # tick 2: XID 48
out["advance_s"] = time.monotonic() - t
th.join()
out["threaded"] = got
advance(hs[0])
advance(hs[0])
out["gpu0_batch"] = err(advance, hs[0])  # tick 2: lost
out["lost"] = err(N.nvmlEventSetWait, es, 0)
out["lost_again"] = err(N.nvmlEventSetWait, es, 0)
out["free"] = err(N.nvmlEventSetFree, es)
N.nvmlShutdown()
"""


def test_xid_events_are_delivered_once_with_their_data(lib: Path, tmp_path: Path) -> None:
    script = (StandinScript().gpus(3).set(None, "field.83", 1).set(1, "xid", "79@1", "48@2")
              .set(2, "events_unsupported", 1).set(2, "xid", "13@0").set(0, "lost_at_tick", 2))
    out, _ = run_nvml(lib, tmp_path, script, XID_BODY)
    xid = 0x8
    assert out["supported"] == [xid, xid, 0]
    assert out["register"] == ["ok", "ok", NS]
    assert out["early"] == "NVMLError_Timeout" and 0.055 <= out["early_s"] < 1.0
    assert out["tick0"] == "NVMLError_Timeout"  # XID 79 is for tick 1; GPU 2's XID: not registered
    assert out["first"] == [1, xid, 79, 0xFFFFFFFF, 0xFFFFFFFF]
    assert out["again"] == "NVMLError_Timeout"  # once
    assert out["threaded"]["xid"] == 48 and out["threaded"]["s"] < 2.0
    assert out["advance_s"] < 1.0  # not held up by the waiter (5 s)
    assert out["gpu0_batch"] == LOST
    assert [out["lost"], out["lost_again"]] == [LOST, "NVMLError_Timeout"]
    assert out["free"] == "ok"


def test_init_error_refcount_and_reread_script(lib: Path, tmp_path: Path) -> None:
    script = StandinScript().gpus(1).init_error(9)  # NVML_ERROR_DRIVER_NOT_LOADED
    out, _ = run_nvml(lib, tmp_path, script, """
        out["init"] = err(N.nvmlInit)
        out["count_after_failed_init"] = err(N.nvmlDeviceGetCount)
        path = os.environ["NVML_STANDIN_SCRIPT"]
        with open(path, "w") as f:
            f.write("driver 575.51.02\\ngpus 2\\nclock_base_us 5000\\ngpu.*.field.83 1\\n")
        N.nvmlInit()  # the script is read again
        N.nvmlInit()
        out["driver"] = N.nvmlSystemGetDriverVersion()
        h = N.nvmlDeviceGetHandleByIndex(1)
        out["ts"] = [advance(h)[0].timestamp, advance(h)[0].timestamp]
        N.nvmlShutdown()
        out["count_after_one_shutdown"] = N.nvmlDeviceGetCount()
        N.nvmlShutdown()
        out["count_after_both"] = err(N.nvmlDeviceGetCount)
        out["shutdown_again"] = err(N.nvmlShutdown)
        with open(path, "w") as f:
            f.write("gpus 3\\ngpu.*.field.83 1\\n")
        N.nvmlInit()
        out["count_after_reinit"] = N.nvmlDeviceGetCount()
        out["ts_after_reinit"] = advance(N.nvmlDeviceGetHandleByIndex(1))[0].timestamp
        N.nvmlShutdown()
    """)
    assert out["init"] == "NVMLError_DriverNotLoaded"
    assert out["count_after_failed_init"] == "NVMLError_Uninitialized"
    assert out["driver"] == "575.51.02"
    assert out["ts"] == [5000, 105000]  # default step 100 ms
    assert out["count_after_one_shutdown"] == 2
    assert out["count_after_both"] == out["shutdown_again"] == "NVMLError_Uninitialized"
    assert out["count_after_reinit"] == 3
    assert out["ts_after_reinit"] == BASE_US  # ticks start again; default base


BAD_LINES = [
    "gpu.0.tmep.gpu 45",           # unknown key
    "gpu.0.temp.gpu 4x",           # not a number
    "gpus 65",                     # too many
    "gpu.64.name X",               # index out of range
    "gpu.0.xid 79",                # no @tick
    "gpu.*.field.83 u32:5000000000",  # over 32 bits
    "gpu.*.field.83.x 1",          # bad scope
    "gpu.0.pci_bus_id 1B:00.0",    # no domain
    "gpu.*.procs.compute 4120:x",  # bad bytes
    "bogus 1",                     # unknown system setting
    "gpu.0.lost_at_tick 1 2",      # one number
    "gpu.0.power_mw ERR:x",        # bad error code
]


def test_a_bad_script_line_fails_init_and_names_the_line(lib: Path, tmp_path: Path) -> None:
    out, stderr = run_nvml(lib, tmp_path, "gpus 1\n", f"""
        path = os.environ["NVML_STANDIN_SCRIPT"]
        out["results"] = []
        for bad in {BAD_LINES!r}:
            with open(path, "w") as f:
                f.write("# a comment\\ngpus 1\\n\\n" + bad + "  # trailing comment\\n")
            out["results"].append(err(N.nvmlInit))
        with open(path, "w") as f:
            f.write("gpus 1\\n")
        out["good"] = err(N.nvmlInit)
    """)
    assert out["results"] == ["NVMLError_Unknown"] * len(BAD_LINES)
    assert out["good"] == "ok"
    messages = [line for line in stderr.splitlines() if line.startswith("nvml stand-in:")]
    assert len(messages) == len(BAD_LINES), stderr
    assert all("line 4:" in m for m in messages), stderr
    assert "tmep.gpu" in messages[0] and "4x" in messages[1] and "bogus" in messages[9]


def test_call_log_counts_every_call_at_shutdown_and_exit(lib: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    script = (StandinScript().gpus(2).set(None, "field.82", "NS").set(None, "field.186", "u32:1")
              .set(None, "temp.gpu", 50).set(None, "util.gpu", "NS").set(None, "util.mem", 1))
    out, _ = run_nvml(lib, tmp_path, script, """
        N.nvmlInit()
        h0, h1 = N.nvmlDeviceGetHandleByIndex(0), N.nvmlDeviceGetHandleByIndex(1)
        for _ in range(3):
            N.nvmlDeviceGetFieldValues(h0, [82, 186, (138, 1)])
        N.nvmlDeviceGetTemperature(h1, 0)
        N.nvmlDeviceGetTemperature(h1, 0)
        out["util"] = err(N.nvmlDeviceGetUtilizationRates, h1)
        N.nvmlSystemGetDriverVersion()
        N.nvmlShutdown()
        log = os.environ["NVML_STANDIN_CALL_LOG"]
        out["at_shutdown"] = open(log).read()
        os.remove(log)
        N.nvmlInit()  # counts go on; this process exits without nvmlShutdown
        N.nvmlDeviceGetTemperature(N.nvmlDeviceGetHandleByIndex(1), 0)
    """, call_log=log)
    assert out["util"] == NS
    at_shutdown = log.with_suffix(".shutdown")
    at_shutdown.write_text(out["at_shutdown"])
    first = read_call_log(at_shutdown)
    assert first[("field", 0, "field.82.0")] == 3  # per entry, NOT_SUPPORTED or not
    assert first[("field", 0, "field.186.0")] == 3
    assert first[("field", 0, "field.138.1")] == 3
    assert first[("nvmlDeviceGetFieldValues", 0, "-")] == 3
    assert first[("nvmlDeviceGetTemperature", 1, "temp.gpu")] == 2
    assert first[("nvmlDeviceGetUtilizationRates", 1, "-")] == 1
    assert first[("nvmlSystemGetDriverVersion", -1, "driver")] == 1
    assert first[("nvmlInit", -1, "-")] == first[("nvmlShutdown", -1, "-")] == 1
    assert first[("nvmlDeviceGetHandleByIndex", 0, "-")] == first[("nvmlDeviceGetHandleByIndex", 1, "-")] == 1
    assert ("nvmlDeviceGetTemperature", 0, "temp.gpu") not in first
    final = read_call_log(log)  # written at unload
    assert final[("nvmlInit", -1, "-")] == 2
    assert final[("nvmlDeviceGetTemperature", 1, "temp.gpu")] == 3
    assert final[("field", 0, "field.82.0")] == 3


def test_no_library_is_library_not_found(lib: Path, tmp_path: Path) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real libnvidia-ml")
    env = standin_env(lib, tmp_path / "script.txt")
    env["LD_LIBRARY_PATH"] = str(tmp_path)  # an empty folder
    out, _ = run_nvml(lib, tmp_path, "gpus 1\n", """
        out["init"] = err(N.nvmlInit)
    """, env=env)
    assert out["init"] == "NVMLError_LibraryNotFound"
