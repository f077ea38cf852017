"""Online detection while ``stacklens serve`` runs: every 10 s, the last minute of requests against
the hour before it, for the fleet and for each replica against its peers; a finding is
kept (and posted to Grafana) once two evaluations in a row name the same cause and culprit.

The same ``why`` runs offline and online; only the windows differ (``WhyQuery(since="60s")``). Two
confirmations keep the noise of a short window from raising alarms: a latency tail over a minute of one
replica's requests wobbles, a real fault stays. An incident stays open while it is still found and is
closed after a few evaluations without it; each open incident is stored once (and its annotation extended).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import duckdb

from correlator.analysis.requests import data_extent
from correlator.analysis.why import NoData, RootCause, WhyQuery, store_findings

log = logging.getLogger(__name__)

WINDOW = "60s"
CONFIRMATIONS = 2  # evaluations in a row that must agree before a finding is kept
CLOSE_AFTER = 6  # evaluations without it before an open incident is closed
MIN_SCORE = 0.5  # a weaker top finding (evidence that has not shown yet) is not confirmed


class FindingSink(Protocol):
    """Where confirmed findings go besides the store (the Grafana annotator)."""

    def annotate_why(self, doc: dict[str, Any], top: int = 1) -> int: ...


IncidentKey = tuple[str, str | None, str | None, str | None]  # cause, subcause, node, gpu


def _key(finding: dict[str, Any]) -> IncidentKey:
    c = finding["culprit"]
    return finding["cause"], finding.get("subcause"), c.get("node"), c.get("gpu")


@dataclass
class Incident:
    key: IncidentKey
    first_seen_ns: int  # the data time of the first evaluation that found it
    confirmed_ns: int | None = None  # the data time it was confirmed (and stored)
    last_seen_ns: int = 0
    misses: int = 0
    streak: int = 1
    doc: dict[str, Any] = field(default_factory=dict)


class OnlineDetector:
    """``step(cur, as_of_ns)`` evaluates once (deterministic, for tests and replays); ``start()`` runs
    ``step`` every ``interval_s`` on a thread with the store's latest data."""

    def __init__(self, store: Any = None, interval_s: float = 10.0, window: str = WINDOW,
                 sink: FindingSink | None = None) -> None:
        self.store = store
        self.interval_s = interval_s
        self.window = window
        self.sink = sink
        self.open: dict[IncidentKey, Incident] = {}
        self.evaluations = 0
        self.errors = 0
        self.last: dict[str, Any] | None = None  # the latest evaluation's ``why`` document (None: no data)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, cur: duckdb.DuckDBPyConnection, as_of_ns: int | None = None, store: bool = True
             ) -> list[Incident]:
        """One evaluation; returns the incidents confirmed by it."""
        self.evaluations += 1
        self.last = None
        try:
            doc = RootCause(cur, speculative=False).why(WhyQuery(since=self.window, as_of_ns=as_of_ns))
        except NoData:
            return []
        self.last = doc
        now_ns = as_of_ns
        if now_ns is None:  # the data's time: the end of the newest request (why found some, so there is one)
            extent = data_extent(cur)
            now_ns = extent[1] if extent else 0
        found = [f for f in doc.get("findings", []) if f["cause"] != "none" and f["score"] >= MIN_SCORE
                 ] if doc["regression"]["detected"] else []
        top = _key(found[0]) if found else None
        newly: list[Incident] = []
        for key, other in list(self.open.items()):
            if key != top:
                other.misses += 1
                other.streak = 0
                if other.misses >= (CLOSE_AFTER if other.confirmed_ns is not None else 1):
                    del self.open[key]
        if top is not None:
            seen = self.open.get(top)
            if seen is None:
                inc = self.open[top] = Incident(top, now_ns, doc=doc)
            else:
                inc = seen
                inc.streak += 1
            inc.misses = 0
            inc.last_seen_ns = now_ns
            inc.doc = doc
            if inc.confirmed_ns is None and inc.streak >= CONFIRMATIONS:
                inc.confirmed_ns = now_ns
                newly.append(inc)
                if store:
                    store_findings(cur, doc, now_ns)
            if inc.confirmed_ns is not None and self.sink is not None:
                self.sink.annotate_why(doc)  # posts once, then extends the annotation's end
        return newly

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stacklens-online-detector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.store.reader() as cur:
                    for inc in self.step(cur):
                        log.warning("stacklens finding: %s", inc.doc.get("verdict"))
            except Exception:  # the detector must never take the server down
                self.errors += 1
                log.exception("online detection failed")

