"""The access layer decodes nvmlFieldValue_t arrays from their bytes; it must agree with pynvml's
own ctypes struct for every NVML value type (a wrong layout would corrupt every field silently)."""

from __future__ import annotations

import ctypes

import pynvml
import pytest

from collector.nvml.access import _FIELD_ROW, _rows_slow, decode_value

CASES = [(0, "dVal", -3.25), (1, "uiVal", 4_291_001_968), (2, "ulVal", 2**40 + 5), (3, "ullVal", 2**64 - 1),
         (4, "sllVal", -7), (5, "siVal", -2), (6, "usVal", 65_535)]


def test_row_layout_matches_pynvml_struct() -> None:
    assert ctypes.sizeof(pynvml.c_nvmlFieldValue_t) == _FIELD_ROW.size


@pytest.mark.parametrize(("vtype", "member", "value"), CASES)
def test_decode_every_value_type(vtype: int, member: str, value: float) -> None:
    arr = (pynvml.c_nvmlFieldValue_t * 2)()
    arr[1].fieldId, arr[1].scopeId, arr[1].timestamp, arr[1].latencyUsec = 197, 3, 1_795_392_289_860_539, 71
    arr[1].valueType, arr[1].nvmlReturn = vtype, 0
    arr[1].value.ullVal = 0xDEADBEEFDEADBEEF  # garbage in the bytes a narrow member does not cover
    setattr(arr[1].value, member, value)
    fast = list(_FIELD_ROW.iter_unpack(bytes(arr)))
    assert fast == _rows_slow(arr)
    fid, scope, ts, latency, vt, rc, raw = fast[1]
    assert (fid, scope, ts, latency, vt, rc) == (197, 3, 1_795_392_289_860_539, 71, vtype, 0)
    assert decode_value(vt, raw) == value
