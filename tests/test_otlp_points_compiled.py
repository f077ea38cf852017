"""The OTLP encoder's compiled per-reading loop (collector/export/_otlp_points.c) against its reference, the
Python loop ``OtlpMetricsEncoder._readings_py``: the same request bytes from seeded random snapshots (GPUs,
NVLink labels, missing values, counters, clock-event bitmasks, host and cgroup readings, placements, XID
events), over batches that grow the encoder's caches, the same caches afterwards, the same exceptions and
partial output on inputs the agent never produces, and no memory growth over many calls. A second or so."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import tracemalloc
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from collector.export import otlp_encode
from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.records import GpuIdentity, GpuSample, HostSample, NodeSnapshot, Placement, Reading, XidEvent
from collector.signals import SIGNALS

if otlp_encode._COMPILED_READINGS is None:
    if os.environ.get("STACKLENS_PURE_PYTHON") != "1" and os.environ.get("STACKLENS_REQUIRE_FASTSPANS") == "1":
        raise RuntimeError("the compiled OTLP encoder loop (collector/export/_otlp_points.c) is not built")
    pytest.skip("the compiled OTLP encoder loop is not built or STACKLENS_PURE_PYTHON=1", allow_module_level=True)

T0 = 1_767_225_600_000_000_000
_GPU_SIGNALS = sorted(n for n, s in SIGNALS.items() if s.scope in ("gpu", "gpu_link") and n not in (
    "clock_event_reason_active", "gpu_process_memory_bytes", "xid_last", "xid_events_total"))
_HOST_SIGNALS = sorted(n for n, s in SIGNALS.items() if s.scope in ("host", "cgroup"))
_MASKS = (0, 1, 4, 32, 36, 0x1FF, 0x100, 1 << 40)


def _encoders() -> tuple[OtlpMetricsEncoder, OtlpMetricsEncoder]:
    """(compiled, Python) encoders of the same resource."""
    resource = ResourceInfo("node-5", "k8s-node-5", (("cluster", "c1"),))
    return OtlpMetricsEncoder(resource), OtlpMetricsEncoder(resource, compiled=False)


def _value(rng: random.Random, signal: str) -> float | int | None:
    if signal == "clock_event_reasons":
        r = rng.random()
        return None if r < 0.05 else math.nan if r < 0.1 else float(rng.choice((*_MASKS, rng.getrandbits(12))))
    r = rng.random()
    if r < 0.08:
        return None
    if r < 0.14:
        return math.nan
    if r < 0.2:
        return rng.choice([0, 1, -7, 2**53 + 1, -(2**63), 10**300, True])  # ints and a bool: packed as doubles
    if r < 0.25:
        return rng.choice([0.0, -0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308])
    return rng.uniform(-1e12, 1e12) if r < 0.5 else round(rng.uniform(0, 500), 1)


def _readings(rng: random.Random, signals: list[str], t: int, n: int) -> tuple[Reading, ...]:
    out: list[Reading] = []
    for _ in range(n):
        signal = rng.choice(signals)
        labels: tuple[tuple[str, str], ...] = ()
        if SIGNALS[signal].scope == "gpu_link":
            labels = (("link", str(rng.randrange(18))),)
        elif SIGNALS[signal].scope == "cgroup":
            labels = (("cgroup", f"/kubepods/pod{rng.randrange(5)}"), ("container.id", f"c{rng.randrange(3)}"))
        time_ns = rng.choice([t + rng.randrange(10**8), t, 0, 2**64 - 1]) if rng.random() < 0.1 else t + 17
        out.append(Reading(signal, _value(rng, signal), time_ns, labels))
        if rng.random() < 0.3:  # runs of one signal, as the NVLink links come
            out.append(Reading(signal, _value(rng, signal), time_ns, (("link", str(rng.randrange(18))),)))
    return tuple(out)


def _snapshot(rng: random.Random, t: int, n_gpus: int) -> NodeSnapshot:
    gpus = tuple(GpuIdentity(i, f"GPU-{i:08x}-0000-0000-0000-{rng.randrange(3):012x}", "NVIDIA H100 80GB HBM3",
                             f"00000000:{0x18 + 16 * i:02X}:00.0", i if i % 3 else None) for i in range(n_gpus))
    samples = tuple(GpuSample(g, t + g.index, _readings(rng, _GPU_SIGNALS, t, rng.randrange(60))) for g in gpus
                    if rng.random() < 0.95)
    host = HostSample(t, _readings(rng, _HOST_SIGNALS, t, rng.randrange(15))) if rng.random() < 0.7 else None
    placements = None
    if gpus and rng.random() < 0.5:
        placements = tuple(Placement(g.uuid, g.index, 4000 + rng.randrange(20), t, rng.choice([None, 2**30, 0]),
                                     rng.choice([None, "c0ffee"]), rng.choice([None, "uid-1"]), "pod-a", "ns",
                                     rng.choice([None, "main"])) for g in rng.sample(gpus, rng.randrange(len(gpus))))
    events = tuple(XidEvent(g.uuid, g.index, rng.choice([13, 48, 79]), t + 5) for g in gpus if rng.random() < 0.05)
    return NodeSnapshot("node-5", t, samples, host, placements, events,
                        rng.choice(["ok"] * 9 + ["partial"]), rng.choice(["580.82.07", None]))


def _assert_same(compiled: OtlpMetricsEncoder, python: OtlpMetricsEncoder, snapshots: list[NodeSnapshot]) -> bytes:
    a, b = compiled.encode_batch(snapshots), python.encode_batch(snapshots)
    assert a == b
    return a


def test_compiled_loop_is_in_use() -> None:
    compiled, python = _encoders()
    assert compiled._compiled is otlp_encode._COMPILED_READINGS is not None and python._compiled is None


@pytest.mark.parametrize("seed", range(12))
def test_random_snapshots_give_the_same_bytes(seed: int) -> None:
    rng = random.Random(seed)
    compiled, python = _encoders()
    snapshots = [_snapshot(rng, T0 + k * 10**8, rng.choice([0, 1, 8, 12])) for k in range(10)]
    payload = _assert_same(compiled, python, snapshots)
    assert len(payload) > 0


def test_caches_evolve_the_same_over_batches() -> None:
    """20 one-second batches through the same two encoders: new series, new masks and counters' start times
    on the way; every payload and every cache the same at the end."""
    rng = random.Random(2026)
    compiled, python = _encoders()
    sizes = set()
    for batch in range(20):
        t = T0 + batch * 10**9
        snapshots = [_snapshot(rng, t + k * 10**8, 8) for k in range(10)]
        _assert_same(compiled, python, snapshots)
        sizes.add((len(compiled._heads), len(compiled._flag_parts)))
    assert len(sizes) > 5  # the caches did grow between batches
    for cache in ("_heads", "_flag_parts", "_start_ns", "_label_attrs", "_xid_counts"):
        assert getattr(compiled, cache) == getattr(python, cache), cache
    assert len(compiled._flag_parts) > 3


def test_any_iterable_of_readings_and_odd_but_valid_values() -> None:
    """Readings as lists, tuples, generators; values numpy and Decimal, times numpy ints and bools: the
    slow paths (the Python expressions' own steps) give the same points."""
    weird: list[object] = [np.float64(3.5), np.float32(1.25), np.int64(7), Decimal("2.5"), False, np.float64("nan"),
                           float("nan"), 12.0]
    for time_ns in (T0, np.uint64(T0), True, 0):
        for value in weird:
            for signal in ("power_w", "clock_event_reasons", "energy_j"):
                compiled, python = _encoders()
                outs = []
                for enc in (compiled, python):
                    by_signal: dict[str, list[bytes]] = {}
                    gen = (r for r in [("power_w", 1.0, T0, ()), [signal, value, time_ns, ()]])
                    enc._readings(by_signal, "GPU-1", b"\x3a\x00", gen)  # type: ignore[arg-type]
                    outs.append(by_signal)
                assert outs[0] == outs[1], (time_ns, value, signal)


def _bad_readings() -> list[tuple[str, list[object]]]:
    class Bad:
        def __ne__(self, other: object) -> bool:
            raise ZeroDivisionError

    class NotIter:
        pass

    class OnlyFloat:  # a double for struct, no int() for the bitmask
        def __float__(self) -> float:
            return 4.0

    ok: list[object] = [Reading("power_w", 1.0, T0), Reading("clock_event_reasons", 4.0, T0)]
    return [
        ("negative time", [*ok, Reading("power_w", 2.0, -1)]),
        ("negative time, missing", [*ok, Reading("power_w", None, -1)]),
        ("time 2**64", [*ok, Reading("power_w", 2.0, 2**64)]),
        ("float time", [*ok, Reading("power_w", 2.0, float(T0))]),  # type: ignore[arg-type]
        ("None time", [*ok, Reading("power_w", 2.0, None)]),  # type: ignore[arg-type]
        ("str value", [*ok, Reading("power_w", "2.0", T0)]),  # type: ignore[arg-type]
        ("int too large for a double", [*ok, Reading("power_w", 10**400, T0)]),
        ("infinite bitmask", [*ok, Reading("clock_event_reasons", math.inf, T0)]),
        ("bitmask without int()", [*ok, Reading("clock_event_reasons", OnlyFloat(), T0)]),  # type: ignore[arg-type]
        ("bitmask of a str", [*ok, Reading("clock_event_reasons", "4", T0)]),  # type: ignore[arg-type]
        ("negative bitmask time", [*ok, Reading("clock_event_reasons", 4.0, -5)]),
        ("unknown signal", [*ok, Reading("no_such_signal", 1.0, T0)]),
        ("empty signal", [*ok, Reading("", 1.0, T0)]),
        ("unhashable labels", [*ok, Reading("power_w", 1.0, T0, [("a", "b")])]),  # type: ignore[arg-type]
        ("three values", [*ok, ("power_w", 1.0, T0)]),
        ("five values", [*ok, ("power_w", 1.0, T0, (), 5)]),
        ("not iterable", [*ok, NotIter()]),
        ("a str reading", [*ok, "abcd"]),  # four one-letter signals
        ("value whose != raises", [*ok, Reading("power_w", Bad(), T0)]),  # type: ignore[arg-type]
    ]


def _run(enc: OtlpMetricsEncoder, readings: list[object]) -> tuple[object, dict[str, list[bytes]]]:
    by_signal: dict[str, list[bytes]] = {}
    try:
        enc._readings(by_signal, "GPU-1", b"\x3a\x00", readings)  # type: ignore[arg-type]
    except Exception as e:  # compared below
        return (type(e), str(e)), by_signal
    return None, by_signal


@pytest.mark.parametrize(("name", "readings"), _bad_readings(), ids=[n for n, _ in _bad_readings()])
def test_bad_input_raises_the_same_after_the_same_points(name: str, readings: list[object]) -> None:
    compiled, python = _encoders()
    got, want = _run(compiled, readings), _run(python, readings)
    assert want[0] is not None  # each of these fails in Python
    assert got == want  # exception type and message, and the points appended before it


def test_exotic_caches_fall_back_to_the_python_loop() -> None:
    """A cache that is not a plain dict: the compiled loop declines before doing anything."""

    class Heads(dict):  # type: ignore[type-arg]
        pass

    compiled, python = _encoders()
    compiled._heads = Heads()
    rng = random.Random(5)
    snapshots = [_snapshot(rng, T0 + k * 10**8, 8) for k in range(3)]
    _assert_same(compiled, python, snapshots)
    assert len(compiled._heads) > 0 and type(compiled._heads) is Heads


def test_no_memory_growth_over_many_calls() -> None:
    """References dropped on every path, errors included: 100k loop calls leave no blocks behind."""
    compiled, _ = _encoders()
    rng = random.Random(9)
    good = [_readings(rng, _GPU_SIGNALS, T0, 12) for _ in range(50)]
    bad = [r for _, r in _bad_readings()]

    def rounds(n: int) -> None:
        for i in range(n):
            by_signal: dict[str, list[bytes]] = {}
            compiled._readings(by_signal, "GPU-1", b"\x3a\x00", good[i % 50])
            if i % 10 == 0:
                _run(compiled, bad[i // 10 % len(bad)])

    rounds(5_000)  # caches filled, free lists warm
    fields = (o for b in bad for r in b if isinstance(r, tuple) for o in r if type(o) in (str, float, int))
    cached = [*compiled._heads.values(), *compiled._flag_parts.values(), *compiled._heads,
              *(o for o in fields if sys.getrefcount(o) < 10**8)]  # not the static small ints and 1-char strs
    refs0 = [sys.getrefcount(o) for o in cached]  # a reference kept or dropped too many: these move
    blocks0 = sys.getallocatedblocks()  # every live object of pymalloc's size (a point, a key, a tuple)
    rounds(100_000)
    assert sys.getallocatedblocks() - blocks0 < 500
    assert [sys.getrefcount(o) for o in cached] == refs0
    tracemalloc.start()  # and anything allocated otherwise, over fewer calls (tracing is slow)
    try:
        traced0, _ = tracemalloc.get_traced_memory()
        rounds(10_000)
        traced1, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert traced1 - traced0 < 20_000, (traced0, traced1)


def test_pure_python_switch_turns_the_compiled_loop_off() -> None:
    code = "from collector.export import otlp_encode as o; print(o._COMPILED_READINGS is not None)"
    for pure, want in (("1", "False"), ("", "True")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "STACKLENS_PURE_PYTHON": pure},
                             capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        assert out.stdout.strip() == want
