"""What ingest hands the store: normalised rows, column by column, with names (node, GPU uuid, signal)
not yet turned into the store's integer ids.

Every decoder (OTLP protobuf and JSON, Prometheus pull, Parquet import) fills one of these; the store
writes a whole batch in one transaction or none of it. Times are UTC nanoseconds as the source stamped
them; a value of ``None`` is a missing value and is stored as NULL, never as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# Column order of each table, as the store's tables have them (store/schema.py).
GPU_COLUMNS = ("time_ns", "node", "gpu_uuid", "gpu_index", "signal", "sub", "value")
HOST_COLUMNS = ("time_ns", "node", "signal", "sub", "value")
ENGINE_COLUMNS = ("time_ns", "node", "service", "model", "pid", "signal", "value")
PLACEMENT_COLUMNS = ("time_ns", "node", "gpu_uuid", "pid", "container_id", "pod_uid", "pod", "namespace",
                     "container", "used_memory_bytes")
GPU_INFO_COLUMNS = ("time_ns", "node", "gpu_uuid", "gpu_index", "model", "pci_bus_id", "device")
REQUEST_COLUMNS = (
    "start_ns", "end_ns", "node", "service", "model", "engine", "trace_id", "span_id", "request_id",
    "ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s",
    "prompt_tokens", "output_tokens", "finish_reason", "pid", "container_id", "pod_uid", "pod", "namespace",
    "gpu_uuids",
)


@dataclass(slots=True)
class Rows:
    """Rows of one table as parallel lists (one list per column)."""

    columns: tuple[str, ...]
    data: dict[str, list[object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.data:
            self.data = {c: [] for c in self.columns}

    def __len__(self) -> int:
        return len(self.data[self.columns[0]])

    def append(self, *values: object) -> None:
        for c, v in zip(self.columns, values, strict=True):
            self.data[c].append(v)

    def extend(self, other: Rows) -> None:
        for c in self.columns:
            self.data[c].extend(other.data[c])


_DATA_SLOT: Any = Rows.__dict__["data"]  # the slot behind Rows.data


class ArrowRows(Rows):
    """Rows held as one Arrow table, as the compiled span decoder makes them (columns ``columns``, in that
    order, of the types the store gives the lists: ``_ARROW_TYPES``, else string), so that the store takes
    them without a Python object per value.

    They behave as :class:`Rows` for everyone else: ``data`` makes the lists (the same values) when first
    read, and from then on the lists are the rows and the table is let go (``table`` is None), so that a
    caller that changes the lists, appends or extends never has them differ from what is stored."""

    __slots__ = ("_table",)

    def __init__(self, columns: tuple[str, ...], table: pa.Table) -> None:
        want = self._table_columns(columns)
        if tuple(table.column_names) != want:
            raise ValueError(f"table columns {table.column_names} are not {want}")
        self.columns = columns
        self._table: pa.Table | None = table
        _DATA_SLOT.__set__(self, None)

    def _table_columns(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        """The table's columns for rows of ``columns``: the same ones."""
        return columns

    def _lists(self, table: pa.Table) -> dict[str, list[object]]:
        """The rows of ``table`` as lists of ``columns``."""
        return {c: table.column(c).to_pylist() for c in self.columns}

    @property
    def table(self) -> pa.Table | None:
        """The rows as the Arrow table, or None once ``data`` has been read (the lists are the rows then)."""
        return self._table

    @property
    def data(self) -> dict[str, list[object]]:
        d: dict[str, list[object]] | None = _DATA_SLOT.__get__(self)
        if d is None:
            t = self._table
            assert t is not None
            d = self._lists(t)
            _DATA_SLOT.__set__(self, d)
            self._table = None
        return d

    @data.setter
    def data(self, value: dict[str, list[object]]) -> None:
        _DATA_SLOT.__set__(self, value)
        self._table = None

    def __len__(self) -> int:
        t = self._table
        return t.num_rows if t is not None else len(self.data[self.columns[0]])


# A request as the store keeps it (the table request_rows, store/schema.py) but with its node's name where the
# table has the node's id: how the compiled span decoder gives requests (StoredRequests), so that the store
# only maps the names to ids. Ids of 32 and 16 hex digits as 64-bit words (others as text), a request id as
# prefix, two words and suffix where it has one of the forms request_rows knows, and the latencies that equal
# their derivation left out (NULL) with a bit each in ``derived`` (schema.DERIVED_LATENCIES).
STORED_REQUEST_COLUMNS = (
    "start_ns", "end_ns", "node", "service", "model", "engine", "trace_hi", "trace_lo", "span_bin",
    "request_hi", "request_lo", "request_form", "trace_text", "span_text", "request_text", "request_suffix", "derived",
    "ttft_s", "tpot_s", "e2e_s", "queue_s", "prefill_s", "decode_s", "inference_s", "prompt_tokens",
    "output_tokens", "finish_reason", "pid", "container_id", "pod_uid", "pod", "namespace", "gpu_uuids")


class StoredRequests(ArrowRows):
    """Requests held in the store's own form (``STORED_REQUEST_COLUMNS``, one Arrow table), as the compiled span
    decoder makes them: the store writes them without converting anything but the node's name.

    For everyone else they are rows of ``REQUEST_COLUMNS``: ``data`` gives the lists decode_spans would have
    made (the ids back as hex, the derived latencies computed again, as the view ``requests`` does), and from
    then on the lists are the rows (``table`` is None)."""

    __slots__ = ()

    def __init__(self, table: pa.Table) -> None:
        super().__init__(REQUEST_COLUMNS, table)

    def _table_columns(self, columns: tuple[str, ...]) -> tuple[str, ...]:
        return STORED_REQUEST_COLUMNS

    def _lists(self, table: pa.Table) -> dict[str, list[object]]:
        return requests_of_stored(table)


def requests_of_stored(t: pa.Table) -> dict[str, list[object]]:
    """The ``REQUEST_COLUMNS`` lists of requests in the stored form (``STORED_REQUEST_COLUMNS``): what the view
    ``requests`` (store/schema.py) reads back from request_rows, in Python. Not on a hot path."""
    from correlator.store.schema import DERIVED_LATENCIES

    c = {name: t.column(name).to_pylist() for name in STORED_REQUEST_COLUMNS}
    n = t.num_rows

    def hex_id(hi: object, lo: object, text: object, digits: int) -> object:
        if hi is None:
            return text
        return f"{hi:016x}{lo:016x}" if digits == 32 else f"{hi:016x}"

    def request_id(i: int) -> object:
        hi, lo = c["request_hi"][i], c["request_lo"][i]
        if hi is None:
            return c["request_text"][i]
        h = f"{hi:016x}{lo:016x}"
        if c["request_form"][i] == 2:
            h = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        return f"{c['request_text'][i] or ''}{h}{c['request_suffix'][i] or ''}"

    def derive(i: int, name: str) -> object:
        q, p, dec, out = c["queue_s"][i], c["prefill_s"][i], c["decode_s"][i], c["output_tokens"][i]
        start, end = c["start_ns"][i], c["end_ns"][i]
        if name == "ttft_s":
            return q + p if q is not None and p is not None else None
        if name == "tpot_s":
            return dec / float(out - 1) if dec is not None and out is not None and out >= 2 else None
        if name == "e2e_s":
            return float(end - start) / 1e9 if start > 0 and end >= start else None
        return p + dec if p is not None and dec is not None else None  # inference_s

    out: dict[str, list[object]] = {name: c[name] for name in REQUEST_COLUMNS if name in c}
    out["trace_id"] = [hex_id(c["trace_hi"][i], c["trace_lo"][i], c["trace_text"][i], 32) for i in range(n)]
    out["span_id"] = [hex_id(c["span_bin"][i], None, c["span_text"][i], 16) for i in range(n)]
    out["request_id"] = [request_id(i) for i in range(n)]
    for name, bit in DERIVED_LATENCIES.items():
        out[name] = [derive(i, name) if c["derived"][i] & bit else c[name][i] for i in range(n)]
    return {name: out[name] for name in REQUEST_COLUMNS}


@dataclass(slots=True)
class IngestBatch:
    gpu_samples: Rows = field(default_factory=lambda: Rows(GPU_COLUMNS))
    host_samples: Rows = field(default_factory=lambda: Rows(HOST_COLUMNS))
    engine_samples: Rows = field(default_factory=lambda: Rows(ENGINE_COLUMNS))
    placements: Rows = field(default_factory=lambda: Rows(PLACEMENT_COLUMNS))
    gpu_info: Rows = field(default_factory=lambda: Rows(GPU_INFO_COLUMNS))
    requests: Rows = field(default_factory=lambda: Rows(REQUEST_COLUMNS))
    # points and spans the decoder understood but did not keep (unknown metric names, non-request spans)
    ignored: int = 0

    def tables(self) -> dict[str, Rows]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ignored"}

    def row_count(self) -> int:
        return sum(len(r) for r in self.tables().values())

    def extend(self, other: IngestBatch) -> None:
        for name, rows in self.tables().items():
            rows.extend(other.tables()[name])
        self.ignored += other.ignored
