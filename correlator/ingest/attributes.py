"""OTLP ``KeyValue`` lists → plain dicts (the one place that reads ``AnyValue``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def any_value(v: Any) -> object:
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "bool_value":
        return v.bool_value
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "bytes_value":
        return bytes(v.bytes_value).hex()
    if which == "kvlist_value":
        return attributes_of(v.kvlist_value.values)
    return None


def attributes_of(kvs: Iterable[Any]) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in kvs:
        v = kv.value
        which = v.WhichOneof("value")
        # the common cases inline: this runs once per attribute of every span and point
        if which == "string_value":
            out[kv.key] = v.string_value
        elif which == "int_value":
            out[kv.key] = v.int_value
        elif which == "double_value":
            out[kv.key] = v.double_value
        else:
            out[kv.key] = any_value(v)
    return out
