"""The one choke point for every NVML call the agent makes.

Everything that talks to ``pynvml`` goes through :class:`NvmlAccess`, which:

- loads and initialises NVML lazily, and classifies a failure once (``library_not_found`` is the
  normal answer on a CPU-only node);
- remembers ``NOT_SUPPORTED`` per (call, device, key) and ``FUNCTION_NOT_FOUND`` per call, and never
  asks again;
- turns ``GPU_IS_LOST`` into :class:`GpuLost` and remembers the device as lost;
- counts every other error by (call, error name) for the agent's own metrics, and logs each kind once;
- reads field values in one batched ``nvmlDeviceGetFieldValues`` call per device, on a ctypes array
  prepared once, keeping NVML's own per-value timestamps.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

_Fields = tuple[tuple[int, int], ...]

# NVML return codes this layer treats specially (values from nvml.h, stable across drivers).
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15

_VALUE_TYPE_DOUBLE = 0
VALUE_TYPES_32 = {1, 5}  # unsigned int, signed int


class GpuLost(Exception):
    """NVML said the GPU has fallen off the bus; the device is remembered as lost."""

    def __init__(self, device: int) -> None:
        super().__init__(f"GPU {device} is lost")
        self.device = device


class FieldValue(NamedTuple):
    field_id: int
    scope_id: int
    value: int | float | None  # None when this field's own return code was not SUCCESS
    time_ns: int  # NVML's timestamp of the value; 0 when NVML gave none
    return_code: int
    width_bits: int = 64  # 32 for NVML's 32-bit value types: such counters wrap at 2**32


@dataclass(frozen=True, slots=True)
class InitResult:
    status: str  # "ok", "library_not_found", "driver_not_loaded", "no_permission", "error"
    message: str = ""
    driver_version: str | None = None
    nvml_version: str | None = None


def _error_code(exc: BaseException) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


class NvmlAccess:
    """Thread-safe gateway to pynvml. Pass ``nvml`` to use another module with pynvml's API."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml
        self._lock = threading.Lock()
        self._init: InitResult | None = None
        self._unsupported: set[tuple[str, int, Hashable]] = set()
        self._missing_functions: set[str] = set()
        self._lost: set[int] = set()
        self._logged: set[tuple[str, str]] = set()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.calls = 0
        # (device, requested fields) -> (size of the unsupported set when built, wanted fields, array)
        self._field_arrays: dict[tuple[int, _Fields], tuple[int, _Fields, Any]] = {}
        self._field_fn: Any = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def nvml(self) -> Any:
        if self._nvml is None:
            import pynvml  # deferred: a CPU-only node never needs it loaded

            self._nvml = pynvml
        return self._nvml

    def init(self) -> InitResult:
        """Initialise NVML once; later calls return the first result (call :meth:`reset` to retry)."""
        with self._lock:
            if self._init is not None:
                return self._init
            self._init = self._do_init()
            if self._init.status != "ok":
                log.warning("NVML unavailable (%s): %s; exporting host signals only",
                            self._init.status, self._init.message)
            return self._init

    def _do_init(self) -> InitResult:
        nvml = self.nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            code = _error_code(exc)
            status = {
                NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
                NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
                NVML_ERROR_NO_PERMISSION: "no_permission",
            }.get(code if code is not None else -1, "error")
            return InitResult(status, str(exc))
        driver = self._system_string("nvmlSystemGetDriverVersion")
        version = self._system_string("nvmlSystemGetNVMLVersion")
        return InitResult("ok", "", driver, version)

    def _system_string(self, name: str) -> str | None:
        try:
            value = getattr(self.nvml, name)()
        except self.nvml.NVMLError as exc:
            self._count(name, exc)
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def reset(self) -> None:
        """Forget the init result (so :meth:`init` retries) and every cached verdict."""
        self.shutdown()
        with self._lock:
            self._init = None
            self._unsupported.clear()
            self._missing_functions.clear()
            self._lost.clear()
            self._field_arrays.clear()
            self._field_fn = None

    def shutdown(self) -> None:
        with self._lock:
            if self._init is not None and self._init.status == "ok":
                try:
                    self.nvml.nvmlShutdown()
                except self.nvml.NVMLError as exc:
                    self._count("nvmlShutdown", exc)
                self._init = InitResult("error", "shut down")

    @property
    def ok(self) -> bool:
        return self._init is not None and self._init.status == "ok"

    def is_lost(self, device: int) -> bool:
        return device in self._lost

    def is_unsupported(self, name: str, device: int, key: Hashable = None) -> bool:
        return (name, device, key) in self._unsupported or name in self._missing_functions

    def verdict_counts(self) -> tuple[int, int, int]:
        """How many calls are remembered NOT_SUPPORTED, functions missing and GPUs lost: when these change, a call
        prepared before (a FieldReader's, a PreparedCall's) may no longer be made as it was."""
        return len(self._unsupported), len(self._missing_functions), len(self._lost)

    def field_values_address(self, resolve: bool = False) -> int | None:
        """The address of the resolved nvmlDeviceGetFieldValues (None before it is resolved, unless ``resolve``;
        None when the library lacks it), for a caller that makes the prepared field reads from C and hands their
        answers to :meth:`FieldReader.answer`."""
        if self._field_fn is None and (not resolve or not self._resolve_field_fn()):
            return None
        return ctypes.cast(self._field_fn, ctypes.c_void_p).value

    def _resolve_field_fn(self) -> bool:
        """nvmlDeviceGetFieldValues resolved once (pynvml's lookup); False when the library lacks it (remembered)."""
        nvml = self.nvml
        if "nvmlDeviceGetFieldValues" in self._missing_functions:
            return False
        try:
            self._field_fn = nvml._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
        except nvml.NVMLError as exc:
            if _error_code(exc) == NVML_ERROR_FUNCTION_NOT_FOUND:
                self._missing_functions.add("nvmlDeviceGetFieldValues")
                return False
            raise
        return True

    # -- the choke point -----------------------------------------------------------------------
    def call(self, name: str, device: int, *args: Any, key: Hashable = None) -> Any:
        """Call ``pynvml.<name>(*args)`` for ``device`` (-1 for system calls).

        Returns None when the call is not supported there (remembered: never asked again) or failed;
        raises :class:`GpuLost` when NVML says the GPU is lost.
        """
        if device in self._lost:
            raise GpuLost(device)
        if name in self._missing_functions or (name, device, key) in self._unsupported:
            return None
        nvml = self.nvml
        self.calls += 1
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as exc:
            return self._failed(name, device, key, exc)

    def _failed(self, name: str, device: int, key: Hashable, exc: BaseException) -> None:
        """What :meth:`call` does with an NVML error: remember, raise GpuLost, or count; None."""
        code = _error_code(exc)
        if code == NVML_ERROR_NOT_SUPPORTED:
            self._unsupported.add((name, device, key))
            return None
        if code == NVML_ERROR_FUNCTION_NOT_FOUND:
            self._missing_functions.add(name)
            log.info("NVML has no %s (older driver); not asking again", name)
            return None
        if code == NVML_ERROR_GPU_IS_LOST:
            self._mark_lost(device, name)
            raise GpuLost(device) from None
        self._count(name, exc)
        return None

    def prepared(self, name: str, device: int, handle: Any, *args: Any, out: Any,
                 convert: Callable[[Any], Any], key: Hashable = None) -> PreparedCall:
        """A getter called every cycle, prepared once: the NVML function ``name`` (the C symbol pynvml's
        wrapper of that name calls) with ``handle``, ``args`` (ctypes values) and a pointer to ``out`` (a
        ctypes value reused by every call), whose result is ``convert(out)``. Same verdicts as
        :meth:`call` for ``(name, device, key)``; it saves the wrapper's per-call ctypes objects."""
        return PreparedCall(self, name, device, key, (handle, *args, ctypes.byref(out)), out, convert)

    def call_raising(self, name: str, device: int, *args: Any) -> Any:
        """Like :meth:`call` but lets NVML errors other than GPU_IS_LOST propagate (for callers such
        as the event thread that must see TIMEOUT)."""
        if device in self._lost:
            raise GpuLost(device)
        nvml = self.nvml
        self.calls += 1
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as exc:
            if _error_code(exc) == NVML_ERROR_GPU_IS_LOST:
                self._mark_lost(device, name)
                raise GpuLost(device) from None
            raise

    def _mark_lost(self, device: int, name: str) -> None:
        with self._lock:
            if device not in self._lost:
                self._lost.add(device)
                self.errors[(name, "GPU_IS_LOST")] += 1
                log.error("GPU %d is lost (NVML %s); it is reported lost from now on", device, name)

    def _count(self, name: str, exc: BaseException) -> None:
        kind = type(exc).__name__.removeprefix("NVMLError_") or "unknown"
        with self._lock:
            self.errors[(name, kind)] += 1
            first = (name, kind) not in self._logged
            self._logged.add((name, kind))
        if first:
            log.warning("NVML %s failed: %s (counted from now on, logged once)", name, exc)

    # -- batched field values --------------------------------------------------------------------
    def field_values(self, device: int, handle: Any, fields: Sequence[tuple[int, int]]) -> list[FieldValue]:
        """Read ``fields`` ((field id, scope id) pairs) of one device in one NVML call.

        Fields NVML answered NOT_SUPPORTED for before are left out of the request. A field whose own
        return code is an error comes back with ``value=None``.
        """
        _, rows = self.field_rows(device, handle, fields)
        return [FieldValue(fid, scope, decode_value(vtype, raw) if rc == NVML_SUCCESS else None,
                           ts_us * 1000 if ts_us > 0 else 0, rc, 32 if vtype in VALUE_TYPES_32 else 64)
                for fid, scope, ts_us, _latency, vtype, rc, raw in rows]

    def field_rows(self, device: int, handle: Any, fields: Sequence[tuple[int, int]]
                   ) -> tuple[_Fields, list[tuple[int, int, int, int, int, int, int]]]:
        """The raw rows of one batched read: (field id, scope id, timestamp us, latency us, value type,
        return code, the value union's 64 raw bits), one per wanted field, in the order of the returned
        field tuple. Errors are already handled here: NOT_SUPPORTED remembered, GPU_IS_LOST raised,
        others counted. The sampler decodes these itself; it reads several hundred per cycle."""
        wanted, buf = self.field_buffer(device, handle, fields)
        return wanted, list(FIELD_ROW.iter_unpack(buf))

    def field_buffer(self, device: int, handle: Any, fields: Sequence[tuple[int, int]]) -> tuple[_Fields, bytes]:
        """Like :meth:`field_rows`, but the rows as the bytes of the array NVML filled: ``FIELD_ROW``
        records, little-endian, so a caller can read whole columns at once (``memoryview.cast``)."""
        if device in self._lost:
            raise GpuLost(device)
        if "nvmlDeviceGetFieldValues" in self._missing_functions:
            return (), b""
        # The request minus what NVML refused, and its ctypes array, are cached until NVML refuses
        # another field: filling the ids goes through pynvml's Python-level __setattr__, and NVML
        # leaves them as they are.
        fields = tuple(fields)
        cached = self._field_arrays.get((device, fields))
        if cached is None or cached[0] != len(self._unsupported):
            wanted = tuple(f for f in fields if ("field", device, f) not in self._unsupported)
            array: Any = (self.nvml.c_nvmlFieldValue_t * len(wanted))() if wanted else None
            for i, (fid, scope) in enumerate(wanted):
                array[i].fieldId = fid
                array[i].scopeId = scope
            cached = (len(self._unsupported), wanted, array)
            self._field_arrays[(device, fields)] = cached
        _, wanted, array = cached
        if array is None:
            return (), b""
        if self._field_fn is None and not self._resolve_field_fn():
            return (), b""
        buf = self._read_fields(device, handle, wanted, array, ctypes.c_int32(len(wanted)), ctypes.byref(array))
        return (wanted, buf) if buf else ((), b"")

    def field_reader(self, device: int, handle: Any, fields: Sequence[tuple[int, int]]) -> FieldReader:
        """A prepared :meth:`field_buffer` of these fields, for a read made many times a second: it keeps
        the request's array and call arguments and re-checks only that nothing changed since."""
        return FieldReader(self, device, handle, tuple(fields))

    def _read_fields(self, device: int, handle: Any, wanted: _Fields, array: Any, count: Any, ref: Any) -> bytes:
        """One ``nvmlDeviceGetFieldValues`` call into ``array``; its rows as bytes, errors handled."""
        self.calls += 1
        return self._field_result(device, wanted, self._field_fn(handle, count, ref), array)

    def _field_result(self, device: int, wanted: _Fields, ret: int, array: Any) -> bytes:
        """What one ``nvmlDeviceGetFieldValues`` call into ``array`` returned (``ret``): its rows as bytes,
        errors handled (NOT_SUPPORTED remembered, GPU_IS_LOST raised, others counted); b"" when the call
        itself failed."""
        nvml = self.nvml
        if ret != NVML_SUCCESS:
            if ret == NVML_ERROR_GPU_IS_LOST:
                self._mark_lost(device, "nvmlDeviceGetFieldValues")
                raise GpuLost(device)
            self._count("nvmlDeviceGetFieldValues", nvml.NVMLError(ret))
            return b""
        # The whole array as bytes: attribute access on each ctypes struct costs several microseconds per
        # field. Return codes are one strided column of the array: checked at once, read one by one only
        # when one is not SUCCESS.
        buf = (bytes(array) if _NATIVE_ROWS and ctypes.sizeof(array) == FIELD_ROW.size * len(wanted)
               else b"".join(FIELD_ROW.pack(*row) for row in _rows_slow(array)))
        if not any(memoryview(buf).cast("I")[_RC_WORD::_ROW_WORDS]):
            return buf
        for key, row in zip(wanted, FIELD_ROW.iter_unpack(buf), strict=True):
            rc = row[5]
            if rc == NVML_SUCCESS:
                continue
            if rc == NVML_ERROR_NOT_SUPPORTED:
                self._unsupported.add(("field", device, key))
            elif rc == NVML_ERROR_GPU_IS_LOST:
                self._mark_lost(device, "nvmlDeviceGetFieldValues")
                raise GpuLost(device)
            else:
                self._count(f"field {key[0]}", nvml.NVMLError(rc))
        return buf


class PreparedCall:
    """A prepared NVML getter (:meth:`NvmlAccess.prepared`); call it for the value or None."""

    __slots__ = ("_access", "_args", "_convert", "_device", "_fn", "_key", "_name", "_out")

    def __init__(self, access: NvmlAccess, name: str, device: int, key: Hashable, args: tuple[Any, ...], out: Any,
                 convert: Callable[[Any], Any]) -> None:
        self._access, self._name, self._device, self._key = access, name, device, key
        self._args, self._out, self._convert = args, out, convert
        self._fn: Any = None

    def __call__(self) -> Any:
        a, name, device = self._access, self._name, self._device
        if device in a._lost:
            raise GpuLost(device)
        if name in a._missing_functions or (name, device, self._key) in a._unsupported:
            return None
        fn = self._fn
        nvml = a.nvml
        if fn is None:
            try:
                fn = self._fn = nvml._nvmlGetFunctionPointer(name)
            except nvml.NVMLError as exc:
                return a._failed(name, device, self._key, exc)
        a.calls += 1
        ret = fn(*self._args)
        if ret == NVML_SUCCESS:
            return self._convert(self._out)
        return a._failed(name, device, self._key, nvml.NVMLError(ret))

    def function_address(self) -> int | None:
        """The address of the NVML function this call makes, when it can be made as is now (the GPU not lost,
        the function present and resolved, nothing NOT_SUPPORTED): for a caller that makes it from C and hands
        the answer to :meth:`failed`."""
        a = self._access
        if (self._fn is None or self._device in a._lost or self._name in a._missing_functions
                or (self._name, self._device, self._key) in a._unsupported):
            return None
        return ctypes.cast(self._fn, ctypes.c_void_p).value

    def failed(self, ret: int) -> Any:
        """What :meth:`__call__` answers when NVML returned ``ret`` (not SUCCESS) for a call made elsewhere:
        the same verdicts (NOT_SUPPORTED remembered, GpuLost raised, errors counted), None."""
        a = self._access
        return a._failed(self._name, self._device, self._key, a.nvml.NVMLError(ret))


class FieldReader:
    """A prepared batched field read of one device (:meth:`NvmlAccess.field_reader`). It reuses the
    request's ctypes array and call arguments while the access layer's verdicts are unchanged (no new
    NOT_SUPPORTED, the GPU not lost, the function present); otherwise it goes the full way."""

    __slots__ = ("_access", "_args", "_device", "_fields", "_generation", "_handle", "_rcs", "array", "quads",
                 "wanted", "words")

    def __init__(self, access: NvmlAccess, device: int, handle: Any, fields: _Fields) -> None:
        self._access, self._device, self._handle, self._fields = access, device, handle, fields
        self._generation = -1
        self._args: tuple[_Fields, Any, Any, Any] | None = None
        # after a read_in_place() that returned None: the fields read, the ctypes array NVML filled, and
        # that array's memory as 32-bit and as 64-bit words (FIELD_ROW's columns, see _ROW_WORDS)
        self.wanted: _Fields = ()
        self.array: Any = None
        self.words: memoryview | None = None
        self.quads: memoryview | None = None
        self._rcs: memoryview | None = None

    def read(self) -> tuple[_Fields, bytes]:
        """(the fields NVML answers for, the rows as bytes), as :meth:`NvmlAccess.field_buffer`."""
        a = self._access
        args = self._args
        if (args is None or self._generation != len(a._unsupported) or self._device in a._lost
                or a._field_fn is None):
            return self._prepare()
        wanted, array, count, ref = args
        buf = a._read_fields(self._device, self._handle, wanted, array, count, ref)
        return (wanted, buf) if buf else ((), b"")

    def _prepare(self) -> tuple[_Fields, bytes]:
        """The full way: NvmlAccess.field_buffer, then keep its request's array and arguments."""
        a = self._access
        wanted, buf = a.field_buffer(self._device, self._handle, self._fields)
        cached = a._field_arrays.get((self._device, self._fields))
        self._args, self.array, self.words, self.quads, self._rcs = None, None, None, None, None
        if cached is not None and cached[2] is not None and cached[0] == len(a._unsupported):
            _, prepared, array = cached
            self._args = (prepared, array, ctypes.c_int32(len(prepared)), ctypes.byref(array))
            self._generation = cached[0]
            self.wanted = prepared
            if _NATIVE_ROWS and ctypes.sizeof(array) == FIELD_ROW.size * len(prepared):
                self.array = array
                self.words = memoryview(array).cast("B").cast("I")
                self.quads = memoryview(array).cast("B").cast("Q")
                self._rcs = self.words[_RC_WORD::_ROW_WORDS]
        return wanted, buf

    def ready(self) -> bool:
        """Whether the next :meth:`read_in_place` would make its call into :attr:`array` as prepared (nothing
        changed since); a caller may then make that call itself and hand its answer to :meth:`answer`."""
        a = self._access
        return (self._args is not None and self._rcs is not None and self._generation == len(a._unsupported)
                and self._device not in a._lost and a._field_fn is not None)

    def answer(self, ret: int) -> tuple[_Fields, bytes]:
        """What :meth:`read_in_place` returns after a call made elsewhere into :attr:`array` that returned
        ``ret`` where NVML did not answer every field with SUCCESS; the same verdicts."""
        buf = self._access._field_result(self._device, self.wanted, ret, self.array)
        return (self.wanted, buf) if buf else ((), b"")

    def read_in_place(self) -> tuple[_Fields, bytes] | None:
        """Like :meth:`read`, without copying the rows when nothing is unusual: None when NVML answered
        every field of :attr:`wanted` with SUCCESS; the rows are then in :attr:`array` (read them with
        ``FIELD_ROW.unpack_from(reader.array, offset)`` or the :attr:`words` / :attr:`quads` columns)
        until the next read. Otherwise (a field failed, the request changed, the first read) what
        :meth:`read` returns, with the same verdicts."""
        a = self._access
        args, rcs = self._args, self._rcs
        if (args is None or rcs is None or self._generation != len(a._unsupported) or self._device in a._lost
                or a._field_fn is None):
            return self._prepare()
        wanted, array, count, ref = args
        a.calls += 1
        ret = a._field_fn(self._handle, count, ref)
        if ret == NVML_SUCCESS and not any(rcs):
            return None
        buf = a._field_result(self._device, wanted, ret, array)
        return (wanted, buf) if buf else ((), b"")


class MultiFieldReader:
    """The same fields of several devices, read many times a second (the PCIe counter poller): one
    ``nvmlDeviceGetFieldValues`` call per device as always, each into its own slice of one ctypes array,
    so that the rows of every device are checked, and can be unpacked, at once. That way holds while
    nothing is unusual (every device answered every field, none is lost, no new NOT_SUPPORTED); otherwise
    each device is read with its own :class:`FieldReader`, with the same verdicts."""

    def __init__(self, access: NvmlAccess, devices: Sequence[tuple[int, Any]], fields: _Fields) -> None:
        self._access = access
        self.devices = tuple(devices)
        self.fields = fields
        self._indices = frozenset(index for index, _ in self.devices)
        self._readers = [(index, access.field_reader(index, handle, fields)) for index, handle in self.devices]
        self._generation = -1
        # per device: (index, its slice of the array, the call's arguments)
        self._slices: list[tuple[int, Any, tuple[Any, Any, Any]]] = []
        self._rcs: memoryview | None = None
        self.array: Any = None  # after read() returned None: every device's rows, in device order

    def _prepare(self) -> bool:
        """The shared array for the current verdicts; False when they rule the shared way out."""
        a = self._access
        self._rcs = None
        self._generation = len(a._unsupported)
        k = len(self.fields)
        if (not _NATIVE_ROWS or not self.devices or not k or a._field_fn is None
                or any(("field", index, f) in a._unsupported for index in self._indices for f in self.fields)):
            return False
        row_type = a.nvml.c_nvmlFieldValue_t
        array = (row_type * (k * len(self.devices)))()
        if ctypes.sizeof(array) != FIELD_ROW.size * k * len(self.devices):
            return False
        slices = []
        for j, (index, handle) in enumerate(self.devices):
            part = (row_type * k).from_buffer(array, j * k * FIELD_ROW.size)
            for i, (fid, scope) in enumerate(self.fields):
                part[i].fieldId = fid
                part[i].scopeId = scope
            slices.append((index, part, (handle, ctypes.c_int32(k), ctypes.byref(part))))
        self.array, self._slices = array, slices
        self._rcs = memoryview(array).cast("B").cast("I")[_RC_WORD::_ROW_WORDS]
        return True

    def read(self) -> list[tuple[int, _Fields, bytes]] | None:
        """None when every device answered every field with SUCCESS: the rows are in :attr:`array`
        (``len(fields)`` rows per device, in device order) until the next read. Otherwise per device read
        (a lost device left out): (index, the fields NVML answers for, the rows as bytes)."""
        a = self._access
        rcs = self._rcs
        usable = a._field_fn is not None and self._indices.isdisjoint(a._lost)
        if not usable or rcs is None or self._generation != len(a._unsupported):
            # the shared way is re-examined only when the verdicts change
            if not usable or self._generation == len(a._unsupported) or not self._prepare():
                return self._one_by_one()
            rcs = self._rcs
        assert rcs is not None
        fn = a._field_fn
        a.calls += len(self._slices)
        rets = [fn(*args) for _, _, args in self._slices]
        if not any(rets) and not any(rcs):
            return None
        return self.answers(rets)

    def shared_array(self) -> Any:
        """The shared array (each device's rows in its slice, in device order, field and scope ids set) when the
        shared way is usable under the current verdicts, else None: for a caller that makes the reads from C
        and hands their return codes to :meth:`answers`."""
        a = self._access
        if a._field_fn is None or not self._indices.isdisjoint(a._lost):
            return None
        if (self._rcs is None or self._generation != len(a._unsupported)) and not self._prepare():
            return None
        return self.array

    def answers(self, rets: Sequence[int]) -> list[tuple[int, _Fields, bytes]]:
        """What :meth:`read` answers for reads made into :meth:`shared_array` by someone else, one return code per
        device (in device order): every answer judged by the access layer as if it had made the calls."""
        out = []
        for (index, part, _), ret in zip(self._slices, rets, strict=True):
            try:
                buf = self._access._field_result(index, self.fields, ret, part)
            except GpuLost:
                continue
            out.append((index, self.fields, buf) if buf else (index, (), b""))
        return out

    def _one_by_one(self) -> list[tuple[int, _Fields, bytes]]:
        out = []
        for index, reader in self._readers:
            try:
                wanted, buf = reader.read()
            except GpuLost:
                continue
            out.append((index, wanted, buf))
        return out


# nvmlFieldValue_t: fieldId u32, scopeId u32, timestamp i64 (us), latencyUsec i64, valueType u32,
# nvmlReturn u32, value (an 8-byte union, read here as its raw unsigned 64 bits)
FIELD_ROW = struct.Struct("<IIqqIIQ")
_FIELD_ROW = FIELD_ROW
# the same rows as 32-bit words (10 a row; the return code is word 7) and as 64-bit words (5 a row:
# timestamp 1, value type and return code 3, value 4), for reading columns through memoryview.cast
_ROW_WORDS, _RC_WORD = 10, 7
_NATIVE_ROWS = sys.byteorder == "little"
_DOUBLE = struct.Struct("<d")
_U64 = struct.Struct("<Q")


def decode_value(vtype: int, raw: int) -> int | float:
    """The union's value for NVML's value type (little-endian: the narrow members are the low bits)."""
    if vtype in {3, 2}:  # unsigned long long / unsigned long
        return raw
    if vtype == 0:
        return float(_DOUBLE.unpack(_U64.pack(raw))[0])
    if vtype == 1:
        return raw & 0xFFFFFFFF
    if vtype == 4:
        return raw - (1 << 64) if raw >> 63 else raw
    if vtype == 5:
        low = raw & 0xFFFFFFFF
        return low - (1 << 32) if low >> 31 else low
    if vtype == 6:
        return raw & 0xFFFF
    return raw


def _rows_slow(array: Any) -> list[tuple[int, int, int, int, int, int, int]]:
    """Field-by-field decoding, for a pynvml whose struct layout differs from the packed row."""
    rows = []
    for entry in array:
        raw = _U64.unpack(bytes(entry.value)[:8])[0]
        rows.append((entry.fieldId, entry.scopeId, entry.timestamp, entry.latencyUsec, entry.valueType,
                     entry.nvmlReturn, raw))
    return rows

