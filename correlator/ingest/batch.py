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
        if tuple(table.column_names) != columns:
            raise ValueError(f"table columns {table.column_names} are not {columns}")
        self.columns = columns
        self._table: pa.Table | None = table
        _DATA_SLOT.__set__(self, None)

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
            d = {c: t.column(c).to_pylist() for c in self.columns}
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
