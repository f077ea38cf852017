"""XID events from NVML's event API, on a thread of their own.

DCGM exports XIDs as a gauge holding the last XID number, which never resets and hides repeats; the
agent keeps each event with its time instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any

from collector.nvml.access import NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_TIMEOUT, GpuLost, NvmlAccess
from collector.records import GpuIdentity, XidEvent

log = logging.getLogger(__name__)

NVML_EVENT_TYPE_XID_CRITICAL_ERROR = 0x8


def handle_key(handle: Any) -> int | None:
    """A stable integer for an NVML device handle (a pointer), to match event data to devices."""
    return ctypes.cast(handle, ctypes.c_void_p).value


class XidWatcher:
    """Waits on an NVML event set for XID critical errors of every GPU and queues them."""

    def __init__(
        self,
        access: NvmlAccess,
        devices: list[tuple[GpuIdentity, Any]],
        clock_ns: Callable[[], int],
        wait_ms: int = 2000,
    ) -> None:
        self._access = access
        self._devices = devices
        self._by_handle = {handle_key(h): ident for ident, h in devices}
        self._clock_ns = clock_ns
        # each wait that ends without an event is a wake-up (and an NVMLError raised and caught): the thread wakes
        # every wait_ms when idle, and stop() waits for the wait under way (stopping matters at exit only)
        self._wait_ms = wait_ms
        self._events: list[XidEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: Any = None
        self.registered: list[int] = []

    def start(self) -> bool:
        """Register every GPU that supports XID events; start the thread if any did."""
        nvml = self._access.nvml
        try:
            self._event_set = self._access.call_raising("nvmlEventSetCreate", -1)
        except nvml.NVMLError as exc:
            log.warning("NVML event set unavailable (%s); XIDs will not be reported", exc)
            return False
        for ident, handle in self._devices:
            try:
                self._access.call_raising(
                    "nvmlDeviceRegisterEvents", ident.index, handle, NVML_EVENT_TYPE_XID_CRITICAL_ERROR,
                    self._event_set,
                )
                self.registered.append(ident.index)
            except GpuLost:
                continue
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) != NVML_ERROR_NOT_SUPPORTED:
                    log.warning("GPU %d: XID events not registered: %s", ident.index, exc)
        if not self.registered:
            return False
        self._thread = threading.Thread(target=self._run, name="stacklens-xid", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        nvml = self._access.nvml
        failures = 0
        while not self._stop.is_set():
            try:
                data = self._access.call_raising("nvmlEventSetWait", -1, self._event_set, self._wait_ms)
            except GpuLost:
                continue
            except nvml.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code == NVML_ERROR_TIMEOUT:
                    failures = 0
                    continue
                if code == 15:  # GPU_IS_LOST for the set as a whole: which GPU is unknown here
                    continue
                failures += 1
                log.warning("NVML event wait failed (%s); backing off", exc)
                self._stop.wait(min(30.0, 0.5 * 2**failures))
                continue
            failures = 0
            if data.eventType & NVML_EVENT_TYPE_XID_CRITICAL_ERROR:
                ident = self._by_handle.get(handle_key(data.device))
                if ident is None:
                    continue
                event = XidEvent(ident.uuid, ident.index, int(data.eventData), self._clock_ns())
                with self._lock:
                    self._events.append(event)
                    # bounded: an XID storm must not grow memory without limit
                    if len(self._events) > 10_000:
                        del self._events[: len(self._events) - 10_000]

    def drain(self) -> list[XidEvent]:
        with self._lock:
            out, self._events = self._events, []
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._wait_ms / 1000 + 1)
        if self._event_set is not None:
            with contextlib.suppress(GpuLost):
                self._access.call("nvmlEventSetFree", -1, self._event_set)
            self._event_set = None
