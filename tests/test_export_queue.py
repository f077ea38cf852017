"""The export queue: bounded, retries retryable failures with backoff, never blocks the producer."""

from __future__ import annotations

import threading
import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from collector.export.otlp_encode import OtlpMetricsEncoder, ResourceInfo
from collector.export.otlp_transport import ExportError
from collector.export.queue import ExportQueue
from collector.records import GpuIdentity, GpuSample, NodeSnapshot, Reading


class ScriptedTransport:
    """An in-memory transport: fails while ``down`` is set, records what it delivered."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.reject = False
        self.delivered: list[bytes] = []
        self.attempts = 0

    def send(self, payload: bytes) -> None:
        self.attempts += 1
        if self.reject:
            raise ExportError("HTTP 400: bad request", retryable=False)
        if self.down.is_set():
            raise ExportError("connection refused", retryable=True)
        self.delivered.append(payload)

    def close(self) -> None:
        return None


def _payload(i: int) -> bytes:
    gpu = GpuIdentity(0, "GPU-0", "H100", "0", 0)
    return OtlpMetricsEncoder(ResourceInfo("n")).encode(
        NodeSnapshot("n", i, (GpuSample(gpu, i, (Reading("power_w", float(i), i),)),)))


def _delivered_values(t: ScriptedTransport) -> list[float]:
    out = []
    for payload in t.delivered:
        for rm in ExportMetricsServiceRequest.FromString(payload).resource_metrics:
            for m in rm.scope_metrics[0].metrics:
                if m.name == "stacklens.power_w":
                    out.append(m.gauge.data_points[0].as_double)
    return out


def test_outage_is_bridged_in_order_and_merged() -> None:
    t = ScriptedTransport()
    t.down.set()
    q = ExportQueue(t, backoff_initial_s=0.01, backoff_max_s=0.05)
    q.start()
    for i in range(50):
        q.put(_payload(i))
    time.sleep(0.2)
    assert t.delivered == [] and t.attempts >= 2  # retried, with backoff
    t.down.clear()
    assert q.flush(5.0)
    q.stop()
    assert _delivered_values(t) == [float(i) for i in range(50)]  # nothing lost, nothing twice, in order
    assert len(t.delivered) < 50  # the backlog went out merged
    assert q.stats.dropped_requests == 0


def test_bounded_buffer_drops_oldest_and_counts() -> None:
    t = ScriptedTransport()
    t.down.set()
    size = len(_payload(0))
    dropped: list[int] = []
    q = ExportQueue(t, max_bytes=size * 10, backoff_initial_s=10, backoff_max_s=10, on_drop=dropped.append)
    q.start()
    for i in range(100):
        q.put(_payload(i))
    assert q.stats.queued_bytes <= size * 10 + size
    assert q.stats.dropped_requests >= 89 and sum(dropped) == q.stats.dropped_requests
    t.down.clear()
    q.stop(flush_timeout_s=0)


def test_producer_never_blocks_on_a_dead_endpoint() -> None:
    t = ScriptedTransport()
    t.down.set()
    q = ExportQueue(t, backoff_initial_s=1.0)
    q.start()
    start = time.perf_counter()
    for i in range(200):
        q.put(_payload(i))
    assert time.perf_counter() - start < 0.5
    q.stop(flush_timeout_s=0)


def test_non_retryable_rejection_is_dropped_and_counted() -> None:
    t = ScriptedTransport()
    t.reject = True
    q = ExportQueue(t)
    q.start()
    q.put(_payload(1))
    assert q.flush(2.0)
    q.stop()
    assert q.stats.dropped_requests == 1 and t.delivered == []


def test_a_long_outage_never_kills_the_export_thread() -> None:
    """Thousands of failed attempts (a correlator down for hours) and then recovery."""
    t = ScriptedTransport()
    t.down.set()
    q = ExportQueue(t, backoff_initial_s=1e-6, backoff_max_s=1e-5)
    q.start()
    q.put(_payload(1))
    deadline = time.monotonic() + 20
    while t.attempts < 3000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.attempts >= 3000
    t.down.clear()
    assert q.flush(5.0), "the export thread died during the outage"
    q.stop()
    assert _delivered_values(t) == [1.0]


def test_export_interval_merges_a_fast_cadence_into_few_requests() -> None:
    t = ScriptedTransport()
    q = ExportQueue(t, export_interval_s=0.4)
    q.start()
    for i in range(10):  # ten samples at a 20 ms cadence
        q.put(_payload(i))
        time.sleep(0.02)
    time.sleep(0.1)
    early = len(t.delivered)
    assert q.flush(5.0)
    q.stop()
    assert early <= 2  # the first went at once, the rest wait for the interval
    assert len(t.delivered) <= 3
    assert _delivered_values(t) == [float(i) for i in range(10)]  # merged, in order, complete


def test_a_request_on_the_agents_grid_is_sent_without_a_second_wait() -> None:
    """Requests come once an export interval and the last send began a wake-up after its request: a request
    due within the interval's last twentieth goes at once (one wake-up per request, not two); one due later
    waits out the interval."""

    class Clock:
        now = 100.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    q = ExportQueue(ScriptedTransport(), export_interval_s=1.0, monotonic=clock)
    q._last_send = 100.0
    clock.now = 100.0 + 1.0 - 0.004  # the last send woke 4 ms after its request
    q.put(_payload(1))
    taken = q._take()
    assert taken is not None and taken[:2] == (1, 1)  # taken at once, not after another 4 ms wait

    q2 = ExportQueue(ScriptedTransport(), export_interval_s=1.0, monotonic=clock)
    q2._last_send = 100.0
    clock.now = 100.0 + 0.9  # a tenth of the interval early: held back
    q2.put(_payload(2))
    result: list[tuple[int, int, bytes] | None] = []
    waiter = threading.Thread(target=lambda: result.append(q2._take()), daemon=True)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and result == []  # still waiting (the clock does not move)
    with q2._cond:
        q2._flushing = True
        q2._cond.notify_all()
    waiter.join(5)
    assert result and result[0] is not None and result[0][:2] == (1, 1)
