"""The real GPU backend: samples every GPU through :class:`~collector.nvml.access.NvmlAccess`.

Three tiers (see :mod:`collector.nvml.fields`). Every cycle and GPU: one batched field-values read of
what moves within a second (power, PCIe and NVLink byte counters) plus three cheap getters (SM clock,
clock-event reasons, utilisation). Every medium interval (1 s) the same read also carries the slowly
changing fields (power limit, memory temperature, error totals, throttle time counters) and three more
getters run (GPU temperature, memory clock, framebuffer). Slowly changing state (link generation and
width, NVLink link states, max clocks), the expensive counters and the process list are read when the
agent asks.
``nvmlDeviceGetPcieThroughput`` blocks ~20 ms per call, so where the PCIe byte counters are not
supported it runs on its own thread, off the sampling path.

Semantics of missing values: a field NVML does not support on this GPU is simply absent (asked once);
a field that fails this time, a rate on the first read or after a counter reset, and every signal of a
lost GPU are exported as missing (``None``), never as 0.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from collector.counters import CounterRates
from collector.nvml import compiled
from collector.nvml.access import (
    FIELD_ROW,
    VALUE_TYPES_32,
    FieldReader,
    GpuLost,
    NvmlAccess,
    PreparedCall,
    decode_value,
)
from collector.nvml.events import XidWatcher
from collector.nvml.fields import (
    FI_NVLINK_LINK_COUNT,
    FI_PCIE_COUNT_RX_BYTES,
    FI_PCIE_COUNT_TX_BYTES,
    FI_POWER_CURRENT_LIMIT,
    FI_POWER_INSTANT,
    FI_TOTAL_ENERGY_CONSUMPTION,
    PCIE_BYTE_FIELDS,
    FieldSpec,
    field_plan,
)
from collector.nvml.pcie import PcieCounterPoller, poll_plan, wrap_safe_period_s, wrap_time_s
from collector.records import GpuIdentity, GpuProcess, GpuSample, Reading, XidEvent

log = logging.getLogger(__name__)

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_PCIE_UTIL_TX_BYTES = 0
NVML_PCIE_UTIL_RX_BYTES = 1
MAX_NVLINKS = 18  # NVML_NVLINK_MAX_LINKS is larger, but no GPU so far has more than 18
# where a compiled job's answers start (rets .. util_mem): what a ring tick keeps of the job itself
_JOB_ANSWERS = compiled.Job.rets.offset


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_Labels = tuple[tuple[str, str], ...]
_PlanEntry = tuple[str, str, float, _Labels, tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class _LinkGroup:
    """The per-NVLink rows of one field (TX or RX data) in a request."""

    signal: str  # per link, e.g. nvlink_tx_bytes_per_s
    total_signal: str  # the GPU's total, e.g. nvlink_tx_total_bytes_per_s
    scale: float
    positions: tuple[int, ...]
    keys: tuple[tuple[int, int], ...]
    labels: tuple[_Labels, ...]
    counter_keys: tuple[tuple[int, int, int], ...]
    total_key: tuple[int, str, int, int]  # the summed counter, keyed by how many links it sums
    all_u64: bytes  # the value-type column when every link is unsigned 64-bit
    all_success: bytes  # the return-code column when every link answered


@dataclass(frozen=True, slots=True)
class _Decoder:
    # (row position, field key, signal, treatment, scale, labels, counter key) of the fields not per link
    fields: tuple[tuple[int, tuple[int, int], str, str, float, _Labels, tuple[int, int, int]], ...]
    links: tuple[_LinkGroup, ...]
    has_power: bool  # the power field is read (else, if NVML lacks it, the power getter is the fallback)


_PCIE_SIGNALS = {FI_PCIE_COUNT_TX_BYTES: "pcie_tx_bytes_per_s", FI_PCIE_COUNT_RX_BYTES: "pcie_rx_bytes_per_s"}
_LINK_TOTALS = {"nvlink_tx_bytes_per_s": "nvlink_tx_total_bytes_per_s",
                "nvlink_rx_bytes_per_s": "nvlink_rx_total_bytes_per_s"}


def _decoder(plan: dict[tuple[int, int], _PlanEntry], wanted: tuple[tuple[int, int], ...]) -> _Decoder:
    """How to decode the rows of ``wanted``: the NVLink links' rows as runs, the others one by one."""
    fields = []
    by_link_signal: dict[str, list[tuple[int, tuple[int, int]]]] = {}
    for pos, key in enumerate(wanted):
        signal, treatment, scale, labels, counter_key = plan[key]
        if signal in _LINK_TOTALS and labels:
            by_link_signal.setdefault(signal, []).append((pos, key))
        else:
            fields.append((pos, key, signal, treatment, scale, labels, counter_key))
    links = []
    for signal, members in by_link_signal.items():
        positions = tuple(pos for pos, _ in members)
        entries = [plan[key] for _, key in members]
        index, fid = entries[0][4][0], members[0][1][0]
        links.append(_LinkGroup(signal, _LINK_TOTALS[signal], entries[0][2], positions,
                                tuple(key for _, key in members), tuple(e[3] for e in entries),
                                tuple(e[4] for e in entries), (index, "links", fid, len(members)),
                                struct.pack(f"<{len(members)}I", *[3] * len(members)), bytes(4 * len(members))))
    return _Decoder(tuple(fields), tuple(links), (FI_POWER_INSTANT, 0) in wanted)


_LITTLE_ENDIAN = sys.byteorder == "little"


def _decode_job(slots: compiled.Slots, decoder: _Decoder, medium: bool, nrows: int) -> compiled.DecodeJob:
    """The compiled decoder's plan for ``decoder``'s rows: the outputs of :meth:`NvmlGpuSource._read`'s loops,
    in their order (the fields, then per link group its total and, on medium cycles, each link's rate)."""
    items: list[tuple[int, int, int, Hashable | None, float]] = []
    signals: list[str] = []
    labels: list[_Labels] = []
    meta: list[Any] = []
    for entry in decoder.fields:
        pos, _key, signal, treatment, scale, lab, counter_key = entry
        rate = treatment == "rate"
        items.append((compiled.K_RATE if rate else compiled.K_GAUGE, pos, 1, counter_key if rate else None, scale))
        signals.append(signal)
        labels.append(lab)
        meta.append(entry)
    for group in decoder.links:
        first, count = group.positions[0], len(group.positions)
        contiguous = group.positions == tuple(range(first, first + count))
        items.append((compiled.K_LINKS if contiguous else compiled.K_PY, first, count, group.total_key, group.scale))
        signals.append(group.total_signal)
        labels.append(())
        meta.append(group)
        if medium:
            for pos, key, lab, counter_key in zip(group.positions, group.keys, group.labels, group.counter_keys,
                                                  strict=True):
                items.append((compiled.K_RATE, pos, 1, counter_key, group.scale))
                signals.append(group.signal)
                labels.append(lab)
                meta.append((pos, key, group.signal, "rate", group.scale, lab, counter_key))
    return compiled.DecodeJob(slots, items, signals, labels, meta, nrows)


def _ctypes_value(out: Any) -> Any:
    return out.value


def _utilization(out: Any) -> tuple[int, int]:
    return (out.gpu, out.memory)


def _link_sum(buf: Any, group: _LinkGroup, words: memoryview | None = None,
              quads: memoryview | None = None) -> tuple[bool, int, int]:
    """(every link answered with a 64-bit value, the latest timestamp in us, the sum of the values) of
    one link group's rows. The links' rows are consecutive (the field plan's order): their value types,
    return codes, timestamps and values are strided columns of the array, compared and summed without a
    Python step per link. ``buf``: the rows (bytes, or the ctypes array NVML filled); ``words`` and
    ``quads``: the same memory as 32-bit and 64-bit words, when the caller has them already."""
    first, end = group.positions[0], group.positions[-1] + 1
    if _LITTLE_ENDIAN and end - first == len(group.positions):
        if words is None:
            words = memoryview(buf).cast("B").cast("I")
        if quads is None:
            quads = words.cast("B").cast("Q")
        ok = (words[first * 10 + 6:end * 10:10].tobytes() == group.all_u64
              and words[first * 10 + 7:end * 10:10].tobytes() == group.all_success)
        return ok, max(quads[first * 5 + 1:end * 5:5]), sum(quads[first * 5 + 4:end * 5:5])
    rows = [FIELD_ROW.unpack_from(buf, pos * FIELD_ROW.size) for pos in group.positions]
    return (all(r[4] == 3 and r[5] == 0 for r in rows), max(r[2] for r in rows), sum(r[6] for r in rows))


@dataclass(slots=True)
class _Device:
    ident: GpuIdentity
    handle: Any
    links: tuple[int, ...] = ()
    fast_request: tuple[tuple[int, int], ...] = ()
    medium_request: tuple[tuple[int, int], ...] = ()
    slow_request: tuple[tuple[int, int], ...] = ()
    # the requests of a medium and of a slow cycle: the fast fields first, one NVML call either way
    fast_medium_request: tuple[tuple[int, int], ...] = ()
    full_request: tuple[tuple[int, int], ...] = ()
    specs: dict[tuple[int, int], FieldSpec] = field(default_factory=dict)
    # per requested field: (signal, treatment, scale, labels, counter key), looked up once per field and cycle
    plan: dict[tuple[int, int], _PlanEntry] = field(default_factory=dict)
    # per field request as NVML answers it (what it refused left out): how to decode its rows
    decoders: dict[tuple[tuple[int, int], ...], _Decoder] = field(default_factory=dict)
    readers: dict[str, FieldReader] = field(default_factory=dict)  # per tier: fast, medium, slow
    getters: tuple[PreparedCall, PreparedCall, PreparedCall] | None = None  # SM clock, reasons, utilisation
    last_decoder: dict[str, tuple[tuple[tuple[int, int], ...], _Decoder]] = field(default_factory=dict)
    # the compiled decoder's counter slots, and its plans per (request, medium cycle); the last one per tier
    slots: compiled.Slots | None = None
    jobs: dict[tuple[tuple[tuple[int, int], ...], bool], compiled.DecodeJob] = field(default_factory=dict)
    last_job: dict[str, tuple[tuple[tuple[int, int], ...], compiled.DecodeJob]] = field(default_factory=dict)

    @property
    def request(self) -> tuple[tuple[int, int], ...]:
        return self.full_request

    def set_requests(self, fast: tuple[tuple[int, int], ...]) -> None:
        self.fast_request = fast
        self.fast_medium_request = fast + self.medium_request
        self.full_request = fast + self.medium_request + self.slow_request
        self.readers.clear()


class _PcieThroughputPoller:
    """Polls the slow ``nvmlDeviceGetPcieThroughput`` on its own thread for GPUs without the PCIe
    byte counters; the sampler picks up the latest values."""

    def __init__(self, access: NvmlAccess, devices: list[_Device], clock_ns: Callable[[], int],
                 interval_s: float) -> None:
        self._access = access
        self._devices = devices
        self._clock_ns = clock_ns
        self._interval_s = interval_s
        self._latest: dict[int, tuple[float | None, float | None, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stacklens-pcie", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for dev in self._devices:
                i = dev.ident.index
                try:
                    tx = self._access.call("nvmlDeviceGetPcieThroughput", i, dev.handle, NVML_PCIE_UTIL_TX_BYTES,
                                           key="tx")
                    rx = self._access.call("nvmlDeviceGetPcieThroughput", i, dev.handle, NVML_PCIE_UTIL_RX_BYTES,
                                           key="rx")
                except GpuLost:
                    continue
                # NVML reports KiB/s averaged over a 20 ms window
                with self._lock:
                    self._latest[i] = (
                        None if tx is None else tx * 1024.0,
                        None if rx is None else rx * 1024.0,
                        self._clock_ns(),
                    )
            self._stop.wait(self._interval_s)

    def take(self, index: int) -> tuple[float | None, float | None, int] | None:
        with self._lock:
            return self._latest.pop(index, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


class NvmlGpuSource:
    """:class:`~collector.backend.GpuBackend` over real NVML (pynvml)."""

    def __init__(
        self,
        access: NvmlAccess | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        xid_events: bool = True,
        pcie_poll_interval_s: float = 1.0,
        interval_s: float = 1.0,
        pcie_counter_poll: bool = True,
        medium_interval_s: float = 1.0,
    ) -> None:
        self.access = access or NvmlAccess()
        self._clock_ns = clock_ns
        self._want_xid = xid_events
        self._pcie_poll_interval_s = pcie_poll_interval_s
        self._devices: list[_Device] = []
        self._rates = CounterRates()
        # the compiled field decoder (collector/nvml/compiled.py), None for the Python loops below
        # (its counter rules are CounterRates' with the default wrap window)
        lib = compiled.load() if self._rates.wrap_window == 0.25 else None
        self._decode_fn: Any = lib.decode if lib is not None else None
        self._sample_fn: Any = lib.sample if lib is not None else None
        # the compiled sampler's thread for the fast cycles between two Python cycles (start_round): the library, the
        # ring made for the current batch (the batch, the PCIe poller's cycle poll it makes, the ring), the round armed
        self._ring_lib: compiled.Library | None = lib
        self._ring: tuple[Any, tuple[int, int] | None, compiled.Ring] | None = None
        self._round: compiled.Ring | None = None
        # the fast-tier reads made by one compiled call per cycle (_batch_read): its GPUs' jobs, their addresses,
        # the access layer's verdict counts it was made for, and whether every GPU not lost is in it
        self._batch: tuple[dict[int, compiled.DecodeJob], Any, tuple[int, int, int], bool] | None = None
        self._xid: XidWatcher | None = None
        self._pcie: _PcieThroughputPoller | None = None
        self._interval_s = interval_s
        # medium tier: every this many samples (every sample at a 1 s cadence or longer)
        self._medium_every = max(1, round(medium_interval_s / interval_s))
        self._want_counter_poll = pcie_counter_poll
        self._counters: PcieCounterPoller | None = None
        self._polled: set[int] = set()
        self.counter_poll_errors = 0  # the cycle's PCIe counter polls that raised
        self._status = "closed"
        self._driver: str | None = None
        self._cycles = 0

    @property
    def status(self) -> str:
        return self._status

    @property
    def driver_version(self) -> str | None:
        return self._driver

    def identities(self) -> tuple[GpuIdentity, ...]:
        return tuple(d.ident for d in self._devices)

    def open(self) -> str:
        if self._status != "closed":  # a retry after a failed start: start from scratch
            self._stop_threads()
            self.access.reset()
            self._devices.clear()
        self._batch = None
        result = self.access.init()
        self._status = result.status
        self._driver = result.driver_version
        if result.status != "ok":
            return self._status
        count = self.access.call("nvmlDeviceGetCount", -1) or 0
        plan = field_plan(self._driver)
        for index in range(count):
            try:
                dev = self._open_device(index, plan)
            except GpuLost:
                log.error("GPU %d was lost before it could be opened", index)
                continue
            if dev is not None:
                self._devices.append(dev)
        self._start_counter_poller()
        if self._want_xid and self._devices:
            self._xid = XidWatcher(self.access, [(d.ident, d.handle) for d in self._devices], self._clock_ns)
            if not self._xid.start():
                self._xid = None
        log.info("NVML %s, driver %s: %d GPU(s)", self.access.init().nvml_version, self._driver,
                 len(self._devices))
        return self._status

    def _start_counter_poller(self) -> None:
        """Poll the 32-bit PCIe byte counters at their wrap-safe period where the agent's interval is
        longer than that period (see collector/nvml/pcie.py)."""
        if not self._want_counter_poll:
            return
        chosen: list[tuple[int, Any]] = []
        safe_period = wrap = float("inf")
        for dev in self._devices:
            i, h = dev.ident.index, dev.handle
            values = self.access.field_values(i, h, [(fid, 0) for fid in PCIE_BYTE_FIELDS])
            if len([v for v in values if v.value is not None]) < len(PCIE_BYTE_FIELDS):
                continue
            gen = self.access.call("nvmlDeviceGetMaxPcieLinkGeneration", i, h)
            width = self.access.call("nvmlDeviceGetMaxPcieLinkWidth", i, h)
            safe = wrap_safe_period_s(gen, width)
            if self._interval_s <= safe:
                continue
            chosen.append((i, h))
            safe_period = min(safe_period, safe)
            wrap = min(wrap, wrap_time_s(gen, width))
            dev.set_requests(tuple(f for f in dev.fast_request if f[0] not in PCIE_BYTE_FIELDS))
            self._polled.add(i)
        if chosen:
            # k polls an interval, evenly spaced: each cycle does one (sample), the poller's thread the k-1 between
            k, period = poll_plan(self._interval_s, safe_period)
            self._counters = PcieCounterPoller(self.access, chosen, period, per_cycle=k, late_after_s=wrap)
            self._counters.start()
            log.info("PCIe byte counters of %d GPU(s) polled every %.0f ms (32-bit, wrap-safe; %d a cycle, one of "
                     "them by the cycle)", len(chosen), period * 1e3, k)

    def _open_device(self, index: int, plan: tuple[FieldSpec, ...]) -> _Device | None:
        a = self.access
        handle = a.call("nvmlDeviceGetHandleByIndex", index, index)
        if handle is None:
            return None
        uuid = a.call("nvmlDeviceGetUUID", index, handle)
        name = a.call("nvmlDeviceGetName", index, handle)
        pci = a.call("nvmlDeviceGetPciInfo", index, handle)
        minor = a.call("nvmlDeviceGetMinorNumber", index, handle)
        ident = GpuIdentity(
            index=index,
            uuid=_text(uuid) if uuid is not None else f"GPU-index-{index}",
            name=_text(name) if name is not None else "unknown",
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            minor_number=minor,
        )
        dev = _Device(ident, handle)
        dev.links = self._discover_links(dev)
        tiers: dict[str, list[tuple[int, int]]] = {"fast": [], "medium": [], "slow": []}
        for spec in plan:
            scopes = dev.links if spec.per_link else (0,)
            for scope in scopes:
                tiers[spec.tier].append((spec.field_id, scope))
                dev.specs[(spec.field_id, scope)] = spec
                dev.plan[(spec.field_id, scope)] = (spec.signal, spec.treatment, spec.scale,
                                                    (("link", str(scope)),) if spec.per_link else (),
                                                    (index, spec.field_id, scope))
        dev.medium_request, dev.slow_request = tuple(tiers["medium"]), tuple(tiers["slow"])
        dev.set_requests(tuple(tiers["fast"]))
        return dev

    def _discover_links(self, dev: _Device) -> tuple[int, ...]:
        i = dev.ident.index
        values = self.access.field_values(i, dev.handle, [(FI_NVLINK_LINK_COUNT, 0)])
        count = next((int(v.value) for v in values if v.value is not None), None)
        if count is not None:
            return tuple(range(min(count, MAX_NVLINKS)))
        # no link-count field: ask each link for its state until NVML says there is none
        links = []
        for link in range(MAX_NVLINKS):
            if self.access.call("nvmlDeviceGetNvLinkState", i, dev.handle, link, key=link) is None:
                break
            links.append(link)
        return tuple(links)

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, now_ns: int, slow: bool, processes: bool) -> tuple[GpuSample, ...]:
        """One sample of every GPU: the fast tier, the medium tier on every medium interval's first
        sample (and whenever ``slow``), the slow tier when ``slow``."""
        medium = slow or self._cycles % self._medium_every == 0
        self._cycles += 1
        if self._counters is not None:
            # one of the wrap-safe polls of the PCIe counters is the cycle's own (it is awake anyway), made first so
            # that this sample's rates are as of now; the poller's thread makes the ones between the cycles
            self._cycle_poll(self._counters.cycle_poll)
        # on fast cycles every GPU's batched read and three getters in one compiled call, where they can be made
        batched = self._batch_read(now_ns) if self._sample_fn is not None and not medium else None
        out = self._sample_devices(now_ns, slow, medium, processes, batched)
        if self._pcie is None and self._cycles == 1 and self._devices:
            self._maybe_start_pcie_poller()
        return out

    def _sample_devices(self, now_ns: int, slow: bool, medium: bool, processes: bool,
                        batched: dict[int, compiled.DecodeJob] | None) -> tuple[GpuSample, ...]:
        """Every GPU's sample of the cycle; ``batched``: the jobs whose calls sl_sample made (their answers in them)."""
        out = []
        for dev in self._devices:
            i = dev.ident.index
            if self.access.is_lost(i):
                out.append(self._lost_sample(dev, now_ns))
                continue
            try:
                readings, procs = self._read(dev, now_ns, slow, medium, processes,
                                             batched.get(i) if batched is not None else None)
            except GpuLost:
                self._rates.forget(i)
                if dev.slots is not None:
                    dev.slots.forget()
                out.append(self._lost_sample(dev, now_ns))
                continue
            out.append(GpuSample(dev.ident, now_ns, tuple(readings), procs))
        return tuple(out)

    # -- rounds: the fast cycles between two Python cycles, made by the compiled sampler's thread ---------------
    def start_round(self, first_at: float, period_s: float, ticks: int) -> int:
        """Arm the compiled sampler's thread (compiled.Ring) to make up to ``ticks`` of the next cycles, at
        ``first_at + k * period_s`` (time.monotonic seconds): each tick's PCIe counter poll and fast-tier reads as
        :meth:`sample` makes them, kept for :meth:`round_samples`. Returns how many it will make: the fast cycles
        before the next medium one; 0 (nothing armed: the caller samples as before) when there are fewer than two,
        or they cannot be made in C: no compiled library, an injected clock, a GPU whose reads are not prepared for
        sl_sample (the first fast cycle prepares them) or the PCIe counters polled by Python."""
        lib = self._ring_lib
        if lib is None or self._status != "ok" or self._clock_ns is not time.time_ns:
            return 0
        ticks = min(ticks, -self._cycles % self._medium_every)  # up to the next medium cycle, which is the caller's
        if ticks < 2:
            return 0
        gen = self.access.verdict_counts()
        batch = self._batch
        if batch is None or batch[2] != gen:  # (an incomplete one is made again by the next fast cycle's _batch_read)
            batch = self._batch = self._prepare_batch(gen)
        jobs, addresses, _, complete = batch
        if not complete or not jobs:
            return 0
        pcie: tuple[tuple[int, int], list[tuple[int, int]]] | None = None
        if self._counters is not None:
            pcie = self._counters.ring_target()
            if pcie is None:
                return 0
        ring = self._ring
        target = pcie[0] if pcie is not None else None
        if ring is None or ring[0] is not batch or ring[1] != target or ring[2].capacity < ticks:
            self._close_ring()
            regions = []
            for job in jobs.values():  # everything sl_sample writes: the rows, the outputs, the answers
                c = job.job
                regions += [(c.array, c.nrows * FIELD_ROW.size), (c.values, 8 * job.n), (c.times, 8 * job.n),
                            (c.status, job.n), (job.addr + _JOB_ANSWERS, ctypes.sizeof(compiled.Job) - _JOB_ANSWERS)]
            if pcie is not None:
                regions += pcie[1]
            try:
                made = compiled.Ring(lib, addresses, len(jobs), regions, max(ticks, self._medium_every - 1),
                                     pcie[0] if pcie is not None else None)
            except OSError:
                log.warning("the compiled sampler's thread could not be started: every cycle is Python's")
                self._ring_lib = None
                return 0
            ring = self._ring = (batch, target, made)
        if not ring[2].arm(first_at, period_s, ticks):
            return 0
        self._round = ring[2]
        return ticks

    def wait_round(self, limit: float) -> bool:
        """Wait (the GIL released) until the armed round is over and the caller's next cycle is due, or it ended early
        (a tick Python must judge, or cut), or until ``limit`` (time.monotonic): whether it is over (True when none
        is armed)."""
        return self._round is None or self._round.wait(limit)

    def end_round(self) -> None:
        """Cut the armed round short: no tick after the one being made (then :meth:`wait_round`)."""
        if self._round is not None:
            self._round.cut()

    def round_samples(self) -> tuple[list[tuple[int, tuple[GpuSample, ...]]], int]:
        """The round's cycles once it is over: per tick kept, in order, (its time in ns, every GPU's sample, made from
        the tick's answers put back where the cycle reads them), and how many ticks were missed (the thread got to
        them after the next one's time, as a late cycle skips the ticks it missed). A round that ended at an unusual
        tick ends with that tick, judged as the live cycle judges it."""
        ring, self._round = self._round, None
        if ring is None:
            return [], 0
        jobs = self._ring[0][0] if self._ring is not None else {}
        out = []
        for slot in range(ring.kept):
            now_ns, pcie_rc = ring.tick(slot)
            self._cycles += 1
            if self._counters is not None:
                self._cycle_poll(self._counters.cycle_answered, pcie_rc)  # the poll the ring made at the tick
            out.append((now_ns, self._sample_devices(now_ns, False, False, False, jobs)))
        self._cycles += ring.missed
        return out, ring.missed

    def _cycle_poll(self, poll: Callable[..., None], *args: Any) -> None:
        """The cycle's PCIe counter poll (or what the ring's answered), never the sample's loss: when it fails, the
        rates are as of the poll before (logged once, counted)."""
        try:
            poll(*args)
        except Exception:
            self.counter_poll_errors += 1
            if self.counter_poll_errors == 1:
                log.exception("PCIe counter poll in the cycle failed; continuing (logged once, counted)")

    def _close_ring(self) -> None:
        ring, self._ring, self._round = self._ring, None, None
        if ring is not None:
            ring[2].close()

    def _lost_sample(self, dev: _Device, now_ns: int) -> GpuSample:
        return GpuSample(dev.ident, now_ns, (Reading("gpu_lost", 1.0, now_ns),), (), lost=True)

    def _maybe_start_pcie_poller(self) -> None:
        without = [
            d for d in self._devices
            if self.access.is_unsupported("field", d.ident.index, (FI_PCIE_COUNT_TX_BYTES, 0))
            and self.access.is_unsupported("field", d.ident.index, (FI_PCIE_COUNT_RX_BYTES, 0))
        ]
        if without:
            self._pcie = _PcieThroughputPoller(self.access, without, self._clock_ns, self._pcie_poll_interval_s)
            self._pcie.start()

    def _batch_read(self, now_ns: int) -> dict[int, compiled.DecodeJob] | None:
        """The fast-tier calls of every GPU whose reads are prepared and usable as they are (see
        :meth:`_prepare_batch`), made by one compiled call (sl_sample); per GPU index its job with the answers."""
        gen = self.access.verdict_counts()
        batch = self._batch
        if batch is None or batch[2] != gen or not batch[3]:
            batch = self._batch = self._prepare_batch(gen)
        jobs, addresses, _, _ = batch
        if not jobs:
            return None
        self._sample_fn(addresses, len(jobs), now_ns)
        return jobs

    def _prepare_batch(self, gen: tuple[int, int, int]
                       ) -> tuple[dict[int, compiled.DecodeJob], Any, tuple[int, int, int], bool]:
        """Which GPUs sl_sample reads: those whose fast-tier field read is prepared (FieldReader.ready), whose
        three getters can be called as they are (PreparedCall.function_address), and whose decoding plan for that
        request exists; each job given the functions, the handle and the request's array."""
        jobs: dict[int, compiled.DecodeJob] = {}
        complete = True
        field_fn = self.access.field_values_address()
        for dev in self._devices:
            i = dev.ident.index
            if self.access.is_lost(i):
                continue
            reader, getters = dev.readers.get("fast"), dev.getters
            last, decoded = dev.last_job.get("fast"), dev.last_decoder.get("fast")
            if (reader is None or getters is None or last is None or decoded is None or not reader.ready()
                    or last[0] is not reader.wanted or decoded[0] is not reader.wanted or reader.array is None):
                complete = False
                continue
            fns = [g.function_address() for g in getters]
            handle = ctypes.cast(dev.handle, ctypes.c_void_p).value
            if field_fn is None or handle is None or None in fns:
                complete = False
                continue
            job = last[1]
            c = job.job
            c.field_fn, (c.clock_fn, c.reasons_fn, c.util_fn) = field_fn, fns
            c.handle, c.array = handle, ctypes.addressof(reader.array)
            jobs[i] = job
        addresses = (ctypes.c_void_p * max(1, len(jobs)))(*[job.addr for job in jobs.values()])
        return jobs, addresses, gen, complete

    def _read(self, dev: _Device, now_ns: int, slow: bool, medium: bool, processes: bool,
              batched: compiled.DecodeJob | None = None) -> tuple[list[Reading], tuple[GpuProcess, ...]]:
        a = self.access
        i, h = dev.ident.index, dev.handle
        # Readings built with tuple.__new__: ~40 % cheaper than the NamedTuple constructor, and these loops
        # make dozens per GPU per cycle (see docs/performance.md)
        new, reading = tuple.__new__, Reading
        readings: list[Reading] = [new(reading, ("gpu_lost", 0.0, now_ns, ()))]
        add = readings.append
        rates_of = self._rates.update
        tier = "slow" if slow else "medium" if medium else "fast"
        reader = dev.readers.get(tier)
        if reader is None:
            request = dev.full_request if slow else dev.fast_medium_request if medium else dev.fast_request
            reader = dev.readers[tier] = a.field_reader(i, h, request)
        # the rows where NVML wrote them when every field answered (no copy), else as bytes
        words: memoryview | None
        quads: memoryview | None
        buf: Any
        decoded = batched is not None and batched.job.state == 2
        if batched is not None:  # this cycle's calls were made by sl_sample
            a.calls += batched.job.ncalled
        if batched is not None and decoded:  # every field answered, and sl_sample decoded the rows
            decoder = dev.last_decoder[tier][1]
            self._emit(dev, batched, medium, reader.array, now_ns, readings)
        else:
            result = reader.answer(batched.job.rets[0]) if batched is not None else reader.read_in_place()
            if result is None:
                wanted, buf, words, quads = reader.wanted, reader.array, reader.words, reader.quads
            else:
                (wanted, buf), quads = result, None
                words = memoryview(buf).cast("I") if buf else None
            last = dev.last_decoder.get(tier)
            if last is not None and last[0] is wanted:  # the same prepared request as last time
                decoder = last[1]
            else:
                decoder = dev.decoders.get(wanted) or _decoder(dev.plan, wanted)
                dev.decoders[wanted] = decoder
                dev.last_decoder[tier] = (wanted, decoder)
            if self._decode_fn is not None:
                self._decode_compiled(dev, tier, wanted, decoder, medium, buf, now_ns, readings)
            else:
                self._decode_loops(dev, decoder, medium, buf, words, quads, now_ns, add)
        # fallbacks for drivers without the power/energy fields (not for fields merely off-tier this cycle:
        # the energy getter costs as much as the energy field, ~2.8 ms on an H100)
        if (not decoder.has_power and a.is_unsupported("field", i, (FI_POWER_INSTANT, 0))
                and (mw := a.call("nvmlDeviceGetPowerUsage", i, h)) is not None):
            add(Reading("power_w", mw / 1000.0, now_ns))
        if (medium and a.is_unsupported("field", i, (FI_POWER_CURRENT_LIMIT, 0))
                and (mw := a.call("nvmlDeviceGetEnforcedPowerLimit", i, h)) is not None):
            add(Reading("power_limit_w", mw / 1000.0, now_ns))
        if (slow and a.is_unsupported("field", i, (FI_TOTAL_ENERGY_CONSUMPTION, 0))
                and (mj := a.call("nvmlDeviceGetTotalEnergyConsumption", i, h)) is not None):
            add(Reading("energy_j", mj / 1000.0, now_ns))
        if self._counters is not None and (polled := self._counters.view(i)) is not None:
            for fid, total_bytes, t_ns in polled:
                t = t_ns or now_ns
                add(new(reading, (_PCIE_SIGNALS[fid], rates_of((i, fid, 0), total_bytes, t), t, ())))
        if self._pcie is not None and (latest := self._pcie.take(i)) is not None:
            tx, rx, t = latest
            add(Reading("pcie_tx_bytes_per_s", tx, t))
            add(Reading("pcie_rx_bytes_per_s", rx, t))
        self._read_getters(dev, now_ns, add, medium, batched if decoded else None)
        if slow:
            self._read_slow(dev, now_ns, add)
        procs = self._read_processes(dev) if processes else ()
        return readings, procs

    def _decode_loops(self, dev: _Device, decoder: _Decoder, medium: bool, buf: Any, words: memoryview | None,
                      quads: memoryview | None, now_ns: int, add: Callable[[Reading], None]) -> None:
        """The rows of ``decoder`` decoded in Python (without the compiled decoder, see _decode_compiled)."""
        new, reading = tuple.__new__, Reading
        i = dev.ident.index
        rates_of, unsupported = self._rates.update, self.access.is_unsupported
        row_at = FIELD_ROW.unpack_from
        for pos, key, signal, treatment, scale, labels, counter_key in decoder.fields:
            _fid, _scope, ts_us, _latency, vtype, rc, raw = row_at(buf, pos * FIELD_ROW.size)
            t = ts_us * 1000 if ts_us > 0 else now_ns
            if rc:
                if not unsupported("field", i, key):  # a field NVML lacks is absent; a failed read is missing
                    add(new(reading, (signal, None, t, labels)))
                continue
            value = raw if vtype == 3 else decode_value(vtype, raw)  # 3: unsigned long long, most fields
            if treatment == "rate":
                rate = rates_of(counter_key, int(value), t, 32 if vtype in VALUE_TYPES_32 else 64)
                add(new(reading, (signal, None if rate is None else rate * scale, t, labels)))
            else:
                add(new(reading, (signal, value * scale, t, labels)))
        # NVLink: the per-GPU total rate every cycle, from the sum of the links' counters; the rate of
        # each link on medium cycles, over the medium interval (the links' counters are read every cycle
        # for the total either way)
        for group in decoder.links:
            ok, ts_us, counter = _link_sum(buf, group, words, quads)
            t = ts_us * 1000 or now_ns
            if ok:
                # 64-bit KiB counters: a sum that goes down means a link was reset (no rate this interval)
                total = rates_of(group.total_key, counter, t)
                add(new(reading, (group.total_signal, None if total is None else total * group.scale, t, ())))
            else:
                add(new(reading, (group.total_signal, None, t, ())))
            if not medium:
                continue
            link_rows = [row_at(buf, pos * FIELD_ROW.size) for pos in group.positions]
            for row, key, labels, counter_key in zip(link_rows, group.keys, group.labels, group.counter_keys,
                                                     strict=True):
                _fid, _scope, ts_us, _latency, vtype, rc, raw = row
                lt = ts_us * 1000 if ts_us > 0 else now_ns
                if rc:
                    if not unsupported("field", i, key):
                        add(new(reading, (group.signal, None, lt, labels)))
                    continue
                value = raw if vtype == 3 else decode_value(vtype, raw)
                rate = rates_of(counter_key, int(value), lt, 32 if vtype in VALUE_TYPES_32 else 64)
                add(new(reading, (group.signal, None if rate is None else rate * group.scale, lt, labels)))

    def _decode_compiled(self, dev: _Device, tier: str, wanted: tuple[tuple[int, int], ...], decoder: _Decoder,
                         medium: bool, buf: Any, now_ns: int, readings: list[Reading]) -> None:
        """The rows of ``decoder`` decoded by the compiled decoder, appended to ``readings`` in the order and
        with the values and times of the Python loops in :meth:`_read`."""
        last = dev.last_job.get(tier)
        if last is not None and last[0] is wanted:
            job = last[1]
        else:
            if dev.slots is None:
                dev.slots = compiled.Slots()
            job = dev.jobs.get((wanted, medium)) or _decode_job(dev.slots, decoder, medium, len(wanted))
            dev.jobs[(wanted, medium)] = job
            dev.last_job[tier] = (wanted, job)
        if not job.n:
            return
        if self._decode_fn(job.addr, buf, now_ns) != 0:  # pragma: no cover - the plan is built from the request
            raise RuntimeError("compiled field decoder: plan does not fit the rows")
        self._emit(dev, job, medium, buf, now_ns, readings)

    def _emit(self, dev: _Device, job: compiled.DecodeJob, medium: bool, buf: Any, now_ns: int,
              readings: list[Reading]) -> None:
        """The readings of a decoded job (its outputs, and what it left to Python), appended to ``readings``."""
        values, times = job.values_mv.tolist(), job.times_mv.tolist()
        status = job.status_mv.tobytes()
        if status == job.zeros:
            readings.extend(map(tuple.__new__, repeat(Reading),
                                zip(job.signals, values, times, job.labels, strict=True)))
            return
        new, reading, add = tuple.__new__, Reading, readings.append
        i = dev.ident.index
        for j, st in enumerate(status):
            if st == compiled.ST_VALUE:
                add(new(reading, (job.signals[j], values[j], times[j], job.labels[j])))
            elif st == compiled.ST_NONE:
                add(new(reading, (job.signals[j], None, times[j], job.labels[j])))
            elif st == compiled.ST_RC:
                if not self.access.is_unsupported("field", i, job.meta[j][1]):
                    add(new(reading, (job.signals[j], None, times[j], job.labels[j])))
            else:
                self._decode_python(dev, job.meta[j], medium, buf, now_ns, add)

    def _decode_python(self, dev: _Device, meta: Any, medium: bool, buf: Any, now_ns: int,
                       add: Callable[[Reading], None]) -> None:
        """One output the compiled decoder left to Python (ST_PY), as :meth:`_read`'s loops decode it; its
        counter moves into CounterRates for good."""
        new, reading = tuple.__new__, Reading
        if isinstance(meta, _LinkGroup):
            ok, ts_us, counter = _link_sum(buf, meta)
            t = ts_us * 1000 or now_ns
            total = self._python_rate(dev, meta.total_key, counter, t, 64) if ok else None
            add(new(reading, (meta.total_signal, None if total is None else total * meta.scale, t, ())))
            return
        pos, key, signal, treatment, scale, labels, counter_key = meta
        _fid, _scope, ts_us, _latency, vtype, rc, raw = FIELD_ROW.unpack_from(buf, pos * FIELD_ROW.size)
        t = ts_us * 1000 if ts_us > 0 else now_ns
        if rc:
            if not self.access.is_unsupported("field", dev.ident.index, key):
                add(new(reading, (signal, None, t, labels)))
            return
        value = raw if vtype == 3 else decode_value(vtype, raw)
        if treatment == "rate":
            rate = self._python_rate(dev, counter_key, int(value), t, 32 if vtype in VALUE_TYPES_32 else 64)
            add(new(reading, (signal, None if rate is None else rate * scale, t, labels)))
        else:
            add(new(reading, (signal, value * scale, t, labels)))

    def _python_rate(self, dev: _Device, key: Hashable, value: int, time_ns: int, width_bits: int) -> float | None:
        """CounterRates.update for a counter of the compiled decoder's, taking it over from its slot."""
        slots = dev.slots
        assert slots is not None
        slot = slots.array[slots.index[key]]
        if slot.has == 1:
            self._rates.adopt(key, slot.value, slot.t_ns)
        slot.has = 2
        return self._rates.update(key, value, time_ns, width_bits)

    def _read_getters(self, dev: _Device, now_ns: int, add: Callable[[Reading], None], medium: bool,
                      batched: compiled.DecodeJob | None = None) -> None:
        """The getters of the cycle; with ``batched``, the answers of those sl_sample made (it stops at the first
        that fails: the access layer's verdict on that one, and the rest called here as always)."""
        a = self.access
        i, h = dev.ident.index, dev.handle
        if medium:
            temp = a.call("nvmlDeviceGetTemperature", i, h, NVML_TEMPERATURE_GPU)
            if temp is not None:
                add(Reading("gpu_temp_c", float(temp), now_ns))
            mem = a.call("nvmlDeviceGetClockInfo", i, h, NVML_CLOCK_MEM, key="mem")
            if mem is not None:
                add(Reading("memory_clock_hz", mem * 1e6, now_ns))
            memory = a.call("nvmlDeviceGetMemoryInfo", i, h)
            if memory is not None:
                add(Reading("fb_used_bytes", float(memory.used), now_ns))
                add(Reading("fb_free_bytes", float(memory.free), now_ns))
                add(Reading("fb_total_bytes", float(memory.total), now_ns))
        getters = dev.getters
        if getters is None:
            getters = dev.getters = self._fast_getters(dev)
        sm_clock, event_reasons, utilization = getters
        new, reading = tuple.__new__, Reading  # as in _read: these run every cycle
        if batched is not None:
            job = batched.job
            made, rets = job.ncalled, job.rets
            sm = job.sm_clock if rets[1] == 0 else sm_clock.failed(rets[1])
            reasons = event_reasons() if made < 3 else job.reasons if rets[2] == 0 else event_reasons.failed(rets[2])
        else:
            sm = sm_clock()
            reasons = event_reasons()
        if sm is not None:
            add(new(reading, ("sm_clock_hz", sm * 1e6, now_ns, ())))
        if reasons is None:
            reasons = a.call("nvmlDeviceGetCurrentClocksThrottleReasons", i, h)
        if reasons is not None:
            # the exporters expand the bitmask into one flag per named reason
            add(new(reading, ("clock_event_reasons", float(reasons), now_ns, ())))
        if batched is not None and batched.job.ncalled == 4:
            rets = batched.job.rets
            util = (batched.job.util_gpu, batched.job.util_mem) if rets[3] == 0 else utilization.failed(rets[3])
        else:
            util = utilization()
        if util is not None:
            add(new(reading, ("gpu_util_ratio", util[0] / 100.0, now_ns, ())))
            add(new(reading, ("memory_busy_ratio", util[1] / 100.0, now_ns, ())))

    def _fast_getters(self, dev: _Device) -> tuple[PreparedCall, PreparedCall, PreparedCall]:
        """The three getters of every cycle, prepared once per GPU (same verdicts as access.call)."""
        a, nvml = self.access, self.access.nvml
        i, h = dev.ident.index, dev.handle
        return (
            a.prepared("nvmlDeviceGetClockInfo", i, h, ctypes.c_uint(NVML_CLOCK_SM), out=ctypes.c_uint(),
                       convert=_ctypes_value, key="sm"),
            a.prepared("nvmlDeviceGetCurrentClocksEventReasons", i, h, out=ctypes.c_ulonglong(),
                       convert=_ctypes_value),
            a.prepared("nvmlDeviceGetUtilizationRates", i, h, out=nvml.c_nvmlUtilization_t(),
                       convert=_utilization),
        )

    def _read_slow(self, dev: _Device, now_ns: int, add: Callable[[Reading], None]) -> None:
        a = self.access
        i, h = dev.ident.index, dev.handle
        for signal, fn in (("pcie_link_gen", "nvmlDeviceGetCurrPcieLinkGeneration"),
                           ("pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth"),
                           ("pcie_link_gen_max", "nvmlDeviceGetMaxPcieLinkGeneration"),
                           ("pcie_link_width_max", "nvmlDeviceGetMaxPcieLinkWidth")):
            value = a.call(fn, i, h)
            if value is not None:
                add(Reading(signal, float(value), now_ns))
        max_sm = a.call("nvmlDeviceGetMaxClockInfo", i, h, NVML_CLOCK_SM, key="sm")
        if max_sm is not None:
            add(Reading("sm_clock_max_hz", max_sm * 1e6, now_ns))
        for link in dev.links:
            state = a.call("nvmlDeviceGetNvLinkState", i, h, link, key=link)
            if state is not None:
                add(Reading("nvlink_link_up", 1.0 if state else 0.0, now_ns, (("link", str(link)),)))

    def _read_processes(self, dev: _Device) -> tuple[GpuProcess, ...]:
        a = self.access
        i, h = dev.ident.index, dev.handle
        procs: dict[int, GpuProcess] = {}
        for kind, fn in (("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
                         ("compute", "nvmlDeviceGetComputeRunningProcesses")):
            for p in a.call(fn, i, h) or ():
                used = p.usedGpuMemory
                procs[int(p.pid)] = GpuProcess(int(p.pid), int(used) if used is not None else None,
                                               "compute" if kind == "compute" else "graphics")
        return tuple(sorted(procs.values(), key=lambda p: p.pid))

    def drain_events(self) -> list[XidEvent]:
        return self._xid.drain() if self._xid is not None else []

    def close(self) -> None:
        self._stop_threads()
        self.access.shutdown()
        self._status = "closed"

    def _stop_threads(self) -> None:
        """The sampler's ring, the XID watcher and the pollers stopped (joined): none may call NVML once it is shut
        down (the ring first: it calls the PCIe poller's cycle poll)."""
        self._close_ring()
        if self._xid is not None:
            self._xid.stop()
            self._xid = None
        if self._pcie is not None:
            self._pcie.stop()
            self._pcie = None
        if self._counters is not None:
            self._counters.stop()
            self._counters = None
