"""The sampler's compiled field decoder (collector/nvml/_fastfields.c) against the Python loops it replaces:
the same readings (signal, value, NVML time, labels; missing as None, NOT_SUPPORTED absent) and the same
counter state, row for row, over seeded random reads with every return code and value type, wraps, resets,
unchanged and out-of-range timestamps and lost GPUs; and the agent through the stand-in, both ways."""

from __future__ import annotations

import ctypes
import random
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from collector.nvml import compiled
from collector.nvml.access import FIELD_ROW, NvmlAccess
from collector.nvml.source import NvmlGpuSource, _decoder, _Device
from collector.records import GpuIdentity, Reading
from tests.nvml_standin.script import build_standin
from tests.test_agent_nvml import h100_node, json_lines, run_agent

LIB = compiled.load()
FN = LIB.decode if LIB is not None else None
needs_build = pytest.mark.skipif(FN is None, reason="collector/nvml/_fastfields is not built (setup.py)")

_Plan = dict[tuple[int, int], tuple[str, str, float, tuple[tuple[str, str], ...], tuple[int, int, int]]]


def _plan(links: int) -> _Plan:
    plan: _Plan = {
        (186, 0): ("power_w", "gauge", 1e-3, (), (0, 186, 0)),
        (197, 0): ("pcie_tx_bytes_per_s", "rate", 1.0, (), (0, 197, 0)),
        (198, 0): ("pcie_rx_bytes_per_s", "rate", 1.0, (), (0, 198, 0)),
        (74, 0): ("power_cap_throttle_s", "counter", 1e-9, (), (0, 74, 0)),
        (82, 0): ("memory_temp_c", "gauge", 1.0, (), (0, 82, 0)),
    }
    for link in range(links):
        plan[(138, link)] = ("nvlink_tx_bytes_per_s", "rate", 1024.0, (("link", str(link)),), (0, 138, link))
        plan[(139, link)] = ("nvlink_rx_bytes_per_s", "rate", 1024.0, (("link", str(link)),), (0, 139, link))
    return plan


def _source(compiled_fn: Any) -> tuple[NvmlGpuSource, _Device]:
    src = NvmlGpuSource(access=NvmlAccess(nvml=object()))  # type: ignore[arg-type]
    src._decode_fn = compiled_fn
    return src, _Device(GpuIdentity(0, "GPU-0", "test", "0", 0), None)


class _Rows:
    """Seeded random rows of one request, read after read: counters that climb, wrap (32 and 64 bits), reset,
    stand still; every value type and return code; timestamps unchanged, zero, negative or out of range."""

    def __init__(self, rng: random.Random, n: int) -> None:
        self.rng, self.n = rng, n
        self.raw = [rng.randrange(2**40) for _ in range(n)]
        self.ts = [0] * n
        self.vtype = [3] * n

    def next(self, tick: int) -> bytes:
        rng = self.rng
        out = []
        for k in range(self.n):
            r = rng.random()
            if r < 0.55:
                self.raw[k] = (self.raw[k] + rng.randrange(2**24)) % 2**64
            elif r < 0.62:
                self.raw[k] = rng.randrange(2**20)  # a drop: a wrap or a reset, by width and height
            elif r < 0.68:
                self.raw[k] = 2**64 - rng.randrange(1, 2**30)  # near the top of 64 bits
            elif r < 0.74:
                self.raw[k] = 2**32 - rng.randrange(1, 2**20)  # near the top of 32 bits
            elif r < 0.78:
                self.raw[k] = rng.randrange(2**64)
            elif r < 0.82:
                self.raw[k] = struct.unpack("<Q", struct.pack("<d", rng.uniform(-1e6, 1e18)))[0]
            if rng.random() < 0.08:
                self.vtype[k] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
            elif rng.random() < 0.3:
                self.vtype[k] = rng.choice([3, 3, 1])
            t = rng.random()
            if t < 0.75:
                self.ts[k] = 1_767_225_600_000_000 + tick * 100_000 + rng.randrange(-300, 300)
            elif t < 0.85:
                pass  # unchanged: the driver has not refreshed it
            elif t < 0.9:
                self.ts[k] = 0
            elif t < 0.93:
                self.ts[k] = -rng.randrange(1, 2**40)
            elif t < 0.96:
                self.ts[k] = rng.choice([2**52 + 1, 2**62, -(2**62), 2**52])
            rc = 0 if rng.random() < 0.85 else rng.choice([1, 2, 3, 3, 15, 999])
            out.append(FIELD_ROW.pack(0, 0, self.ts[k], 0, self.vtype[k], rc, self.raw[k]))
        return b"".join(out)


def _state(src: NvmlGpuSource, dev: _Device, keys: list[Any]) -> list[Any]:
    """Each counter's previous read, wherever it is kept."""
    out: list[Any] = []
    for key in keys:
        slots = dev.slots
        if slots is not None and key in slots.index:
            slot = slots.array[slots.index[key]]
            if slot.has == 1:
                out.append((slot.value, slot.t_ns))
                continue
            if slot.has == 0:
                out.append(None)
                continue
        out.append(src._rates._last.get(key))
    return out


def _decode(src: NvmlGpuSource, dev: _Device, tier: str, wanted: Any, decoder: Any, medium: bool, buf: Any,
            now_ns: int) -> tuple[list[str], str | None]:
    readings: list[Reading] = []
    try:
        if src._decode_fn is None:
            src._decode_loops(dev, decoder, medium, buf, None, None, now_ns, readings.append)
        else:
            src._decode_compiled(dev, tier, wanted, decoder, medium, buf, now_ns, readings)
    except (ValueError, OverflowError) as exc:  # int() of a NaN or infinite double counter, both ways
        return [], type(exc).__name__
    # repr: 1 and 1.0, 0.0 and -0.0, nan and None all told apart
    return [repr(tuple(r)) for r in readings], None


@needs_build
@pytest.mark.parametrize("seed", range(40))
def test_compiled_decoder_equals_the_python_loops(seed: int) -> None:
    rng = random.Random(seed)
    links = rng.choice([1, 2, 4, 18])
    plan = _plan(links)
    singles = [(186, 0), (197, 0), (198, 0), (74, 0), (82, 0)]
    tx, rx = [(138, k) for k in range(links)], [(139, k) for k in range(links)]
    # the links' rows one run per field (as the field plan orders them), or interleaved (not a run)
    link_rows = tx + rx if seed % 4 else [row for pair in zip(tx, rx, strict=True) for row in pair]
    wanted = tuple(rng.sample(singles, rng.randint(0, len(singles)))) + tuple(link_rows)
    decoder = _decoder(plan, wanted)
    py, py_dev = _source(None)
    c, c_dev = _source(FN)
    refused = rng.sample(list(wanted), min(3, len(wanted)))
    for src in (py, c):  # NVML refused some fields: their failed rows are absent, the others' missing
        src.access._unsupported.update(("field", 0, key) for key in refused)
    keys = [entry[4] for entry in plan.values()] + [g.total_key for g in decoder.links]
    rows = _Rows(rng, len(wanted))
    for tick in range(60):
        buf = rows.next(tick)
        medium = rng.random() < 0.4
        tier = "medium" if medium else "fast"
        now_ns = rng.choice([1_767_225_600_000_000_000 + tick * 100_000_000, 2**62])
        # the in-place array NVML wrote, or the rows as bytes
        c_buf: Any = buf if rng.random() < 0.5 else (ctypes.c_char * len(buf)).from_buffer_copy(buf)
        expected, py_error = _decode(py, py_dev, tier, wanted, decoder, medium, buf, now_ns)
        got, c_error = _decode(c, c_dev, tier, wanted, decoder, medium, c_buf, now_ns)
        assert c_error == py_error
        if py_error is not None:
            break  # the cycle failed both ways (the Python path's own behaviour)
        assert got == expected, (tick, medium)
        assert _state(c, c_dev, keys) == _state(py, py_dev, keys), tick
        if rng.random() < 0.03:  # the GPU was lost: every counter's baseline goes
            py._rates.forget(0)
            c._rates.forget(0)
            assert c_dev.slots is not None
            c_dev.slots.forget()


@needs_build
def test_compiled_decoder_follows_counter_rates() -> None:
    """The hand-checked cases of CounterRates: first read, unchanged time, a 32-bit wrap, a 64-bit reset, a
    64-bit wrap near the top, a link failing (total missing, not smaller)."""
    plan = _plan(2)
    wanted = ((197, 0), (138, 0), (138, 1))
    decoder = _decoder(plan, wanted)
    c, dev = _source(FN)
    t0 = 1_767_225_600_000_000

    def read(tick: int, pcie: int, links: tuple[int, int], ts_shift: int = 0, link_rc: int = 0) -> list[Any]:
        ts = t0 + tick * 100_000 + ts_shift
        buf = (FIELD_ROW.pack(197, 0, ts, 0, 1, 0, pcie) + FIELD_ROW.pack(138, 0, ts, 0, 3, link_rc, links[0])
               + FIELD_ROW.pack(138, 1, ts, 0, 3, 0, links[1]))
        readings: list[Reading] = []
        c._decode_compiled(dev, "fast", wanted, decoder, False, buf, 0, readings)
        return [(r.signal, r.value) for r in readings]

    assert read(0, 2**32 - 1000, (10, 20)) == [("pcie_tx_bytes_per_s", None), ("nvlink_tx_total_bytes_per_s", None)]
    assert read(1, 3000, (20, 40)) == [("pcie_tx_bytes_per_s", 40000.0),
                                       ("nvlink_tx_total_bytes_per_s", 30 * 10 * 1024.0)]
    assert read(1, 5000, (30, 60)) == [("pcie_tx_bytes_per_s", None), ("nvlink_tx_total_bytes_per_s", None)]
    assert read(2, 5000, (5, 5)) == [("pcie_tx_bytes_per_s", 20000.0), ("nvlink_tx_total_bytes_per_s", None)]
    assert read(3, 5000, (2**64 - 100, 50), link_rc=999) == [("pcie_tx_bytes_per_s", 0.0),
                                                             ("nvlink_tx_total_bytes_per_s", None)]
    total = (2**64 - 60) * 1e9 / 200_000_000 * 1024  # over two ticks: the failed read kept the baseline
    assert read(4, 5000, (2**64 - 100, 50)) == [("pcie_tx_bytes_per_s", 0.0), ("nvlink_tx_total_bytes_per_s", total)]
    # near the top of 64 bits and then small: a wrap, not a reset
    assert read(5, 5000, (10, 30)) == [("pcie_tx_bytes_per_s", 0.0), ("nvlink_tx_total_bytes_per_s", 90 * 10 * 1024.0)]
    # past 2**64 the sum is Python's, and so is the total's counter from then on
    assert read(6, 5000, (2**64 - 10, 2**64 - 10))[1] == ("nvlink_tx_total_bytes_per_s",
                                                          (2**65 - 20 - 40) * 1e9 / 100_000_000 * 1024)
    assert dev.slots is not None and dev.slots.array[dev.slots.index[decoder.links[0].total_key]].has == 2
    assert read(7, 5000, (2**64 - 5, 2**64 - 5))[1] == ("nvlink_tx_total_bytes_per_s", 10 * 10 * 1024.0)


def test_slots_grow_and_keep_their_reads() -> None:
    slots = compiled.Slots(capacity=2)
    job = compiled.DecodeJob(slots, [(compiled.K_RATE, 0, 1, ("a",), 1.0), (compiled.K_RATE, 0, 1, ("b",), 1.0)],
                             ["x", "y"], [(), ()], [None, None], 1)
    slots.array[0].value, slots.array[0].has = 7, 1
    assert slots.slot(("c",)) == 2 and len(slots.array) == 4
    assert (slots.array[0].value, slots.array[0].has) == (7, 1)
    assert (job.job.slots, job.job.nslots) == (ctypes.addressof(slots.array), 4)
    slots.forget()
    assert slots.array[0].has == 0


def test_pure_python_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKLENS_PURE_PYTHON", "1")
    assert compiled.load() is None
    assert NvmlGpuSource(access=NvmlAccess(nvml=object()))._decode_fn is None  # type: ignore[arg-type]
    assert compiled.load(Path("/nonexistent/_fastfields.so")) is None


@pytest.fixture(scope="module")
def standin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_standin(tmp_path_factory.mktemp("nvml") / "lib")


@needs_build
@pytest.mark.parametrize("scenario", ["counters", "getters", "steady"])
def test_agent_through_the_standin_the_same_both_ways(standin_lib: Path, tmp_path: Path, scenario: str) -> None:
    """The agent at 100 ms (fast cycles read by sl_sample, every third a medium one) makes the same NVML calls
    and reports the same values compiled and in pure Python: counters that wrap, reset, fail and are refused;
    getters that fail, are refused mid-run, and a GPU lost mid-run. Compiled, the two fast cycles between two
    medium ones are made by the sampler's thread (rounds) once the first fast cycle prepared the reads; a tick with
    a failure in it ends its round and is judged as the live cycle judges it."""
    top = 2**32 - 1000
    script = h100_node(gpus=3)
    if scenario == "counters":
        (script.set(0, "field.197", "u32:0", f"u32:{top - 4000}", f"u32:{top}", "u32:3000", "u32:9000", "ERR:999")
         .set(0, "field.198", "0", "5000000000", "5000100000", "10", "20010", "NS")
         .set(1, "field.186", "u32:1", "u32:612000", "ERR:999", "u32:700000", "d:650.5")
         .set(1, "field.138.3", 100, 200, "ERR:2", 400, 10, 20)  # a link failing, then reset
         .set(None, "field.139.0", 2**64 - 5000, 2**64 - 1000, 3000, 9000))  # a 64-bit wrap
    elif scenario == "getters":
        # cycle c reads tick c + 1; cycles 0, 3, 6, ... are medium ones, the fast ones from cycle 2 on sl_sample's
        ok = ["u32:612000"] * 5
        (script.set(0, "clock.sm", *[1980] * 5, "ERR:999", 1755, 1755, "ERR:999", 1410, 1410, 1410, "NS", 1980)
         .set(0, "field.186", *ok, "ERR:999", "u32:650000", "ERR:999", "u32:700000")
         .set(1, "reasons", *[0] * 6, "ERR:999", 4, 4, "ERR:999", 4, "NS", 4)
         .set(2, "util.gpu", *[97] * 8, "ERR:999", 95, 95, "ERR:3", 95)
         .set(2, "field.186", *ok, *ok, "u32:1", "u32:1", "u32:2", "ERR:15", "u32:700000")  # GPU_IS_LOST in a field
         .set(1, "lost_at_tick", 12))
    else:  # nothing unusual: each of the 4 links sends 1000 KiB a tick (100 ms of NVML time)
        for link in range(4):
            script.set(None, f"field.138.{link}", *[1000 * tick for tick in range(16)])
        script.set(None, "field.186", *[f"u32:{600_000 + 1000 * tick}" for tick in range(16)])  # power, per tick
    outputs, logs, round_cycles = [], [], []
    for pure in ("1", "0"):
        run_dir = tmp_path / pure
        run_dir.mkdir()
        proc, calls = run_agent(standin_lib, script, run_dir, "--interval", "100ms", "--cycles", "14", "-o", "json",
                                "--prometheus-port", "0", "--no-xid-events", "--log-level", "info", call_log=True,
                                extra_env={"STACKLENS_PURE_PYTHON": pure, "STACKLENS_AGENT_MEDIUM_INTERVAL": "300ms"})
        assert proc.returncode == 0, proc.stderr
        outputs.append([[(g["lost"], g["signals"]) for g in line["gpus"]] for line in json_lines(proc.stdout)])
        logs.append(calls)
        made = re.search(r"stopped after 14 cycles \((\d+) made by the sampler's thread\)", proc.stderr)
        assert made is not None, proc.stderr
        round_cycles.append(int(made.group(1)))
    # cycles 4-5 and 7-8 can be rounds (10 reads host signals, 12 is a medium one), each ended by its first unusual tick
    assert round_cycles == [0, {"counters": 1, "getters": 2, "steady": 4}[scenario]]
    assert len(outputs[0]) == 14
    assert outputs[1] == outputs[0]
    assert logs[1] == logs[0]
    if scenario == "counters":
        signals = outputs[0][3][0][1]
        assert signals["nvlink_rx_total_bytes_per_s"] is not None and signals["pcie_tx_bytes_per_s"] is not None
    elif scenario == "getters":
        assert outputs[0][-1][1][0] and outputs[0][-1][2][0]  # both lost by the end
    else:  # every cycle's rate and power, rounds' included, is the script's (cycle c reads tick c + 1)
        rates = {gpu[1]["nvlink_tx_total_bytes_per_s"] for cycle in outputs[1][1:] for gpu in cycle}
        assert rates == {4e3 * 1024 / 0.1}
        assert [cycle[0][1]["power_w"] for cycle in outputs[1]] == [601.0 + cycle for cycle in range(14)]
