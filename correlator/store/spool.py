"""The spool: an append-only, fsynced log of the OTLP exports the receivers have acknowledged and the store has
not yet committed to DuckDB.

Why: an export answered only after its own DuckDB transaction pays BEGIN/COMMIT (and DuckDB's WAL fsync) for
every few exports in flight, ~2 k rows a commit at four 512-span exports in flight, which is what kept span
ingest under 100k spans/s per core. With the spool, an export is durable, and answered, once its body is in
this log and the log is fsynced (one fdatasync for all exports that arrived meanwhile); the store then commits
the decoded rows in large groups (>= 8k rows or about a second) together with the sequence number of the last
record they cover (``meta.spool_seq``). After a crash, the records past that number are decoded again and
committed; the rows of one record are committed once, never twice, because the number moves in the same
transaction as the rows.

On disk: ``<db>.spool/<first seq, 20 digits>.spool`` segments of records, each a 24-byte header (magic, seq,
body length, CRC-32 of the body, signal, format) and the inflated body as it was decoded. A record cut short or
whose CRC does not match ends its segment (it was never acknowledged: the fsync that covers it did not
return). A new segment is started at each open and when one passes ``segment_bytes``; a segment whose records
are all committed is deleted. A record whose rows cannot be committed even on their own is copied to
``rejected/`` with the reason, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from correlator.ingest.batch import IngestBatch

log = logging.getLogger("stacklens.spool")

_MAGIC = b"SLSP"
_HEADER = struct.Struct("<4sQIIBBxx")  # magic, seq, body length, crc32(body), signal, format, padding
_SIGNALS: tuple[Literal["traces", "metrics"], ...] = ("traces", "metrics")
_FORMATS: tuple[Literal["protobuf", "json"], ...] = ("protobuf", "json")
_SUFFIX = ".spool"


class SpoolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One acknowledged export: its signal, its body's format and the body itself (inflated)."""

    signal: Literal["traces", "metrics"]
    fmt: Literal["protobuf", "json"]
    body: bytes


@dataclass(frozen=True, slots=True)
class PreparedRecord:
    """A record with what its header needs that takes time (the body's CRC-32), made before the caller takes
    the lock that orders appends."""

    body: bytes
    crc: int
    signal: int
    fmt: int


def prepare(record: SpoolRecord) -> PreparedRecord:
    return PreparedRecord(record.body, zlib.crc32(record.body), _SIGNALS.index(record.signal),
                          _FORMATS.index(record.fmt))


def settle(f: Future[None], error: BaseException | None = None) -> None:
    """Resolve a waiter's future; one it cancelled meanwhile (a receiver that gave up waiting: the client
    retries, and the retry is stored once) is left as it is, rather than the thread settling it dying of it."""
    with contextlib.suppress(InvalidStateError):
        if error is None:
            f.set_result(None)
        else:
            f.set_exception(error)


def _settle(waiters: list[Future[None]], error: BaseException | None = None) -> None:
    for f in waiters:
        settle(f, error)


@dataclass(slots=True)
class _Segment:
    first_seq: int
    path: Path
    last_seq: int  # the newest record's (first_seq - 1 while empty)


class Spool:
    """``decode`` turns a record back into rows (the receivers' decoder) when a crashed run is recovered."""

    def __init__(self, directory: str | os.PathLike[str], decode: Callable[[SpoolRecord], IngestBatch], *,
                 segment_bytes: int = 64 << 20) -> None:
        self.directory = Path(directory)
        self.decode = decode
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()  # appends, rotation, the index
        self._sync_lock = threading.Lock()  # held around an fdatasync, so the segment is not closed under it
        self._wake = threading.Condition(self._lock)
        self._segments: deque[_Segment] = deque()
        self._index: dict[int, tuple[Path, int, int]] = {}  # seq -> (segment, offset of the record, its size)
        self._order: deque[int] = deque()  # the index's seqs, oldest first
        self._next_seq = 1
        self._fd: int | None = None
        self._generation = 0  # changes at each rotation: a sync of a closed segment is skipped
        self._offset = 0  # in the current segment
        self._appended = 0  # bytes appended since open, over all segments
        self._synced = 0
        self._waiters: deque[tuple[int, Future[None]]] = deque()  # (position that must be synced, future)
        self._closing = False
        self._failed: BaseException | None = None
        self._syncer: threading.Thread | None = None

    # -- opening and recovery -------------------------------------------------------------------
    def open(self, committed_seq: int) -> Iterator[tuple[int, SpoolRecord]]:
        """The records after ``committed_seq``, oldest first; then the spool is ready for appends (in a new
        segment). Segments wholly at or below ``committed_seq`` are deleted."""
        self.directory.mkdir(parents=True, exist_ok=True)
        last = committed_seq
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            try:
                first = int(path.name[: -len(_SUFFIX)])
            except ValueError:
                log.warning("spool: %s is not a segment; left alone", path)
                continue
            seg = _Segment(first, path, first - 1)
            for seq, offset, size, record in self._read_segment(path):
                seg.last_seq = max(seg.last_seq, seq)
                last = max(last, seq)
                if seq > committed_seq:
                    self._remember(seq, path, offset, size)
                    yield seq, record
            self._segments.append(seg)
        self._next_seq = last + 1
        self._drop_committed(committed_seq)
        self._start_segment()
        self._syncer = threading.Thread(target=self._sync_loop, name="stacklens-spool-sync", daemon=True)
        self._syncer.start()

    def _read_segment(self, path: Path) -> Iterator[tuple[int, int, int, SpoolRecord]]:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            end = offset + _HEADER.size
            if end > len(data):
                log.warning("spool: %s ends in a cut-short header at %d (never acknowledged)", path, offset)
                return
            magic, seq, length, crc, signal, fmt = _HEADER.unpack_from(data, offset)
            if magic != _MAGIC or signal >= len(_SIGNALS) or fmt >= len(_FORMATS):
                log.warning("spool: %s has no record at %d; the rest of it is ignored", path, offset)
                return
            body = data[end:end + length]
            if len(body) < length or zlib.crc32(body) != crc:
                log.warning("spool: record %d in %s is cut short or damaged (never acknowledged)", seq, path)
                return
            yield seq, offset, _HEADER.size + length, SpoolRecord(_SIGNALS[signal], _FORMATS[fmt], body)
            offset = end + length

    def _start_segment(self) -> None:
        """A new segment for the next appends (under ``_lock`` and ``_sync_lock`` once open)."""
        path = self.directory / f"{self._next_seq:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._fsync_directory()  # the segment's name must survive a crash as much as its contents
        self._segments.append(_Segment(self._next_seq, path, self._next_seq - 1))
        self._offset = 0
        self._generation += 1

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- appending ------------------------------------------------------------------------------
    def append(self, record: PreparedRecord) -> tuple[int, Future[None]]:
        """Write ``record`` (:func:`prepare`); its sequence number, and a future resolved once it is on disk
        (fsynced). The caller holds whatever lock orders the sequence numbers with its own queue (the store's)."""
        body = record.body
        synced: Future[None] = Future()
        with self._lock:
            if self._failed is not None:
                raise SpoolError(f"the spool cannot be written: {self._failed}")
            if self._fd is None or self._closing:
                raise SpoolError("the spool is not open")
            if self._offset >= self._segment_bytes:
                self._rotate()
            seq = self._next_seq
            header = _HEADER.pack(_MAGIC, seq, len(body), record.crc, record.signal, record.fmt)
            size = len(header) + len(body)
            try:
                written = os.writev(self._fd, (header, body))
                if written != size:  # a short write (a full disk): the record must not count
                    raise OSError(f"wrote {written} of {size} bytes")
            except OSError as e:
                self._fail(e)
                raise SpoolError(f"the spool cannot be written: {e}") from e
            self._next_seq += 1
            self._remember(seq, self._segments[-1].path, self._offset, size)
            self._segments[-1].last_seq = seq
            self._offset += size
            self._appended += size
            self._waiters.append((self._appended, synced))
            self._wake.notify()
        return seq, synced

    def _remember(self, seq: int, path: Path, offset: int, size: int) -> None:
        self._index[seq] = (path, offset, size)
        self._order.append(seq)

    def _fail(self, error: BaseException) -> None:
        """The segment can no longer be trusted: refuse further appends, fail whoever waits (under _lock)."""
        self._failed = error
        waiters = [f for _, f in self._waiters]
        self._waiters.clear()
        _settle(waiters, SpoolError(f"the spool cannot be written: {error}"))

    def _rotate(self) -> None:
        """Close the current segment (synced first) and start the next (under ``_lock``)."""
        with self._sync_lock:
            assert self._fd is not None
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self._fail(e)
                raise SpoolError(f"the spool cannot be synced: {e}") from e
            os.close(self._fd)
            self._fd = None
            self._mark_synced(self._appended)
            self._start_segment()

    def _mark_synced(self, position: int) -> None:
        """Everything up to ``position`` is on disk (under ``_lock``)."""
        self._synced = max(self._synced, position)
        done = []
        while self._waiters and self._waiters[0][0] <= self._synced:
            done.append(self._waiters.popleft()[1])
        _settle(done)

    def _sync_loop(self) -> None:
        """One fdatasync for every append that came while the last one ran (group commit)."""
        while True:
            with self._lock:
                while not self._waiters and not self._closing:
                    self._wake.wait()
                if not self._waiters and self._closing:
                    return
                fd, generation, target = self._fd, self._generation, self._appended
            with self._sync_lock:
                error: OSError | None = None
                if fd is not None and generation == self._generation:
                    try:
                        os.fdatasync(fd)
                    except OSError as e:
                        error = e
                # else: rotated meanwhile, and the rotation synced all of it
            with self._lock:
                if error is not None:
                    self._fail(error)
                    return
                self._mark_synced(target)

    # -- after commits ----------------------------------------------------------------------------
    def committed(self, seq: int) -> None:
        """The rows of every record up to ``seq`` are committed: forget them, delete segments wholly done."""
        with self._lock:
            self._drop_committed(seq)

    def _drop_committed(self, seq: int) -> None:
        while self._order and self._order[0] <= seq:
            del self._index[self._order.popleft()]
        while len(self._segments) > 1 and self._segments[0].last_seq <= seq:
            seg = self._segments.popleft()
            with contextlib.suppress(FileNotFoundError):
                seg.path.unlink()

    def reject(self, seq: int, reason: str) -> Path | None:
        """Copy record ``seq`` (whose rows could not be committed) to ``rejected/`` with the reason; its path."""
        with self._lock:
            where = self._index.get(seq)
        if where is None:
            return None
        path, offset, size = where
        with path.open("rb") as f:
            f.seek(offset)
            raw = f.read(size)
        _, _, _, _, signal, fmt = _HEADER.unpack_from(raw, 0)
        out = self.directory / "rejected"
        out.mkdir(exist_ok=True)
        target = out / f"{seq:020d}-{_SIGNALS[signal]}.{'pb' if _FORMATS[fmt] == 'protobuf' else 'json'}"
        target.write_bytes(raw[_HEADER.size:])
        target.with_suffix(".reason.txt").write_text(reason + "\n")
        with target.open("rb") as f:
            os.fsync(f.fileno())
        log.error("spool: record %d could not be stored (%s); its body is kept in %s", seq, reason, target)
        return target

    def close(self) -> None:
        """Sync what was appended, stop the syncer, close the segment; with every record committed (a clean
        stop), its segments and the folder, where nothing else is in it, are removed."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._syncer is not None:
            self._syncer.join(timeout=30)
        with self._lock, self._sync_lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = None
                self._mark_synced(self._appended)
            if not self._index:  # nothing left to commit
                for seg in self._segments:
                    with contextlib.suppress(FileNotFoundError):
                        seg.path.unlink()
                self._segments.clear()
                with contextlib.suppress(OSError):
                    self.directory.rmdir()  # only when empty: rejected/ stays
