"""A bounded export queue with retry and backoff, on its own thread.

The sampling loop never waits on the network: it hands encoded requests to :meth:`ExportQueue.put`
and goes on. Requests are sent at most once per ``export_interval_s`` (merged; up to 5 % of it early),
as OpenTelemetry's periodic readers do: at a 100 ms cadence that is one request a second instead of ten. While the
endpoint is unreachable the queue keeps the newest requests up to a byte bound, drops the oldest
beyond it (counting what it dropped), and retries with capped exponential backoff. Queued requests
are sent merged, so a backlog drains in a few large requests.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from collector.export.otlp_encode import merge_requests
from collector.export.otlp_transport import ExportError, MetricsTransport

log = logging.getLogger(__name__)

# a request is sent up to this share of the export interval early rather than waited for (see _take)
_EARLY = 0.05


@dataclass(slots=True)
class ExportStats:
    sent_snapshots: int = 0  # snapshots delivered (a request may hold several)
    sent_batches: int = 0  # export calls that delivered them (snapshots are merged)
    sent_bytes: int = 0
    failed_attempts: int = 0
    dropped_requests: int = 0  # snapshots lost to the bound or to a non-retryable rejection
    queued_requests: int = 0
    queued_bytes: int = 0


class ExportQueue:
    def __init__(
        self,
        transport: MetricsTransport,
        max_bytes: int = 16 << 20,
        max_request_bytes: int = 4 << 20,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rng: random.Random | None = None,
        on_drop: Callable[[int], None] | None = None,
        export_interval_s: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._max_bytes = max_bytes
        self._max_request_bytes = max_request_bytes
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random(0)
        self._on_drop = on_drop
        self._items: deque[tuple[bytes, int]] = deque()  # (request, snapshots in it)
        self._export_interval_s = export_interval_s
        self._monotonic = monotonic
        self._last_send = -float("inf")
        self._flushing = False
        self._bytes = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = ExportStats()
        self._last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stacklens-export", daemon=True)
        self._thread.start()

    def put(self, payload: bytes, snapshots: int = 1) -> None:
        """Queue one encoded request holding ``snapshots`` snapshots (counted in the stats)."""
        with self._cond:
            self._items.append((payload, snapshots))
            self._bytes += len(payload)
            while self._bytes > self._max_bytes and len(self._items) > 1:
                dropped, count = self._items.popleft()
                self._bytes -= len(dropped)
                self._drop(count)
            self._update_stats()
            self._cond.notify()

    def _drop(self, n: int) -> None:
        self.stats.dropped_requests += n
        if self._on_drop is not None:
            self._on_drop(n)

    def _update_stats(self) -> None:
        self.stats.queued_requests = len(self._items)
        self.stats.queued_bytes = self._bytes

    def _take(self) -> tuple[int, int, bytes] | None:
        """(requests, snapshots in them, their merged bytes), or None when stopping with nothing left."""
        with self._cond:
            while True:
                while not self._items and not self._stop:
                    self._cond.wait()
                if not self._items:
                    return None
                # wait out the export interval, unless stopping, flushing or holding a full request. Its last
                # twentieth is not waited out: requests come on the agent's grid, once an interval, and the last
                # send began a wake-up after its request came, so each would otherwise wait that wake-up's few
                # milliseconds again (a second wake-up per request)
                due = self._last_send + self._export_interval_s - self._monotonic()
                if (due <= self._export_interval_s * _EARLY or self._stop or self._flushing
                        or self._bytes >= self._max_request_bytes):
                    break
                self._cond.wait(timeout=due)
            count, size, snapshots = 0, 0, 0
            for item, n in self._items:
                if count and size + len(item) > self._max_request_bytes:
                    break
                count += 1
                size += len(item)
                snapshots += n
            return count, snapshots, merge_requests([self._items[i][0] for i in range(count)])

    def _commit(self, count: int) -> None:
        with self._cond:
            for _ in range(min(count, len(self._items))):
                self._bytes -= len(self._items.popleft()[0])
            self._update_stats()
            self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                failures = self._attempt(*taken, failures)
            except Exception:  # nothing may kill this thread: the agent would go on sampling into the void
                log.exception("unexpected error in the OTLP export loop; dropping %d request(s)", taken[0])
                self._commit(taken[0])
                self._drop(taken[1])
            if failures < 0:
                return

    def _attempt(self, count: int, snapshots: int, payload: bytes, failures: int) -> int:
        """Send the oldest ``count`` requests merged; return the new failure streak (-1: stopping)."""
        self._last_send = self._monotonic()
        try:
            self._transport.send(payload)
        except ExportError as exc:
            self.stats.failed_attempts += 1
            if self._last_error != str(exc):
                log.warning("OTLP export failed (%s); %s", exc, "retrying" if exc.retryable else "dropped")
                self._last_error = str(exc)
            if not exc.retryable:
                self._commit(count)
                self._drop(snapshots)
                return failures
            failures += 1
            # the exponent is capped: an outage of thousands of attempts must not overflow the delay
            delay = min(self._backoff_max_s, self._backoff_initial_s * 2.0 ** min(failures - 1, 32))
            delay *= 0.5 + self._rng.random() / 2  # jitter, so a fleet does not retry in lockstep
            with self._cond:
                if self._stop:
                    return -1
                self._cond.wait(timeout=delay)
            return failures
        if failures:
            log.info("OTLP export recovered after %d failed attempt(s)", failures)
            self._last_error = None
        self.stats.sent_snapshots += snapshots
        self.stats.sent_batches += 1
        self.stats.sent_bytes += len(payload)
        self._commit(count)
        return 0

    def flush(self, timeout_s: float) -> bool:
        """Send what is queued now and wait until the queue is empty (True) or the timeout passes."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._items, timeout=timeout_s)
            finally:
                self._flushing = False

    def stop(self, flush_timeout_s: float = 2.0) -> None:
        self.flush(flush_timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self._backoff_max_s + 1)
        self._transport.close()
