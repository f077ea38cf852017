"""Pull dcgm-exporter and vLLM series out of a Prometheus server, for fleets where Prometheus already
scrapes them (``stacklens serve --prometheus-url URL``, ``stacklens import --prometheus-url URL``).

How: one instant query per selector with a range vector, ``{__name__=~"DCGM_FI_…"}[Dms]`` evaluated at
the window's end, which returns the raw samples with the **scrape's own timestamps** (a ``query_range``
would return its evaluation steps instead). The selectors are derived from the signal catalog: every
DCGM name it knows, every vLLM name (renamed ones too; histograms as their ``_sum`` and ``_count``
series, never the buckets) and the agent's own ``stacklens_*`` names. Each series' metric name and
labels go through the same normalisation as OTLP (:func:`correlator.ingest.otlp_metrics.add_points`),
with the scrape target made to look like the resource the OpenTelemetry Collector's Prometheus
receiver would send (``service.name`` = job).

Nothing is stored twice: per selector the puller remembers which time ranges it has stored (in the
store's ``meta`` table, so a restarted ``serve`` goes on where it stopped) and queries only the rest;
a window is split at its stored edges and samples exactly on an edge belong to the earlier window.
The periodic puller reads up to ``settle_s`` before now, because Prometheus stamps a sample with the
scrape's start but appends it when the scrape ends.

Prometheus being down, slow or answering errors is logged (once per outage) and the window is pulled
again on the next interval; nothing raises out of the puller.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collector.signals import ENGINE_SIGNALS, SIGNALS
from correlator.ingest.batch import IngestBatch
from correlator.ingest.otlp_metrics import Origin, Point, add_points
from correlator.server.serve import is_loopback, require_http_url

if TYPE_CHECKING:
    from correlator.store.duckdb_store import Store

log = logging.getLogger("stacklens.prometheus_pull")

_PROM_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
# labels that name the node a scrape target runs on (service discovery relabelling), before the
# instance's host; DCGM's own Hostname label wins over all of them (node_of reads it per point)
NODE_LABELS = ("node", "kubernetes_node", "k8s_node_name", "nodename", "node_name")
# labels Prometheus renamed because the target had them too (honor_labels: false): the target's are
# the ones that describe the GPU (its pod, its namespace), so they get their names back
_EXPORTED = "exported_"
_META_PREFIX = "prometheus_pull"

Interval = tuple[int, int]  # (lo, hi] in Unix milliseconds


def _selector(names: Sequence[str]) -> str:
    alternatives = "|".join(sorted({n for n in names if _PROM_NAME.match(n)}))
    return '{__name__=~"' + alternatives + '"}'


def default_selectors() -> dict[str, str]:
    """The series the puller reads, by name: derived from the signal catalog."""
    dcgm = [src.name for s in SIGNALS.values() for src in (s.dcgm, *s.dcgm_aliases) if src is not None]
    engine = [n for s in ENGINE_SIGNALS.values() for src in s.sources for n in (src, src.replace(":", "_"))]
    agent = [f"stacklens_{name}" for name in SIGNALS]
    return {"dcgm": _selector(dcgm), "vllm": _selector(engine), "stacklens": _selector(agent)}


class PrometheusError(Exception):
    """Prometheus could not be reached or answered an error; the window is pulled again later.
    ``too_large``: the answer would hold more samples than the server allows (or took too long)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


_MIN_CHUNK_MS = 1000


@dataclass(slots=True)
class PullResult:
    """What one pull did. ``batch`` holds the rows when the puller has no store to write them to."""

    rows: int = 0
    samples: int = 0
    series: int = 0
    ignored: int = 0
    windows: int = 0
    errors: list[str] = field(default_factory=list)
    batch: IngestBatch | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


# -- stored ranges ---------------------------------------------------------------------------------
def subtract(window: Interval, covered: Sequence[Interval]) -> list[Interval]:
    """The parts of ``window`` that no interval of ``covered`` (sorted, disjoint) holds."""
    lo, hi = window
    out: list[Interval] = []
    for clo, chi in covered:
        if chi <= lo or clo >= hi:
            continue
        if clo > lo:
            out.append((lo, clo))
        lo = max(lo, chi)
        if lo >= hi:
            return out
    if lo < hi:
        out.append((lo, hi))
    return out


def union(covered: Sequence[Interval], window: Interval, keep: int = 64) -> list[Interval]:
    """``covered`` with ``window`` added, merged where they touch; at most ``keep`` intervals (the
    oldest gaps are closed first: a gap that old will not be pulled again)."""
    merged: list[Interval] = []
    for lo, hi in sorted([*covered, window]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    while len(merged) > keep:
        merged[0:2] = [(merged[0][0], merged[1][1])]
    return merged


class PrometheusPuller:
    """Reads the catalog's series from the Prometheus at ``url`` into ``store``.

    ``pull(since, until)`` pulls one window (Unix seconds; once); ``start()`` pulls every ``interval_s``
    in a thread until ``stop()``. Without a store, rows are returned in ``PullResult.batch`` and the
    stored ranges are remembered in memory only.
    """

    def __init__(self, url: str, interval_s: float = 15.0, store: Store | None = None, *,
                 selectors: Mapping[str, str] | None = None, timeout_s: float = 10.0, settle_s: float = 5.0,
                 chunk_s: float = 300.0, initial_lookback_s: float = 300.0, max_catchup_s: float = 3600.0,
                 headers: Mapping[str, str] | None = None, node_labels: Sequence[str] = NODE_LABELS) -> None:
        require_http_url("Prometheus URL", url)
        if interval_s <= 0 or chunk_s <= 0:
            raise ValueError("the pull interval and chunk must be positive")
        parts = urllib.parse.urlsplit(url)
        auth: dict[str, str] = {}
        if parts.username is not None:
            # http://user:password@host:9090: sent as basic auth, and kept out of logs and stored keys
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            auth["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            netloc = parts.hostname or ""
            if ":" in netloc:
                netloc = f"[{netloc}]"
            if parts.port is not None:
                netloc += f":{parts.port}"
            url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        self.url = url.rstrip("/")
        self.interval_s = interval_s
        self.store = store
        self.selectors = dict(selectors if selectors is not None else default_selectors())
        self.timeout_s = timeout_s
        self.settle_s = settle_s
        self.chunk_ms = max(1, int(chunk_s * 1000))
        self.initial_lookback_ms = int(initial_lookback_s * 1000)
        self.max_catchup_ms = int(max_catchup_s * 1000)
        self.headers = {**auth, **(headers or {})}
        self.node_labels = tuple(node_labels)
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # never send a loopback query through a proxy from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if is_loopback(host) \
            else urllib.request.build_opener()
        self._covered: dict[str, list[Interval]] = {}
        self._loaded = False
        self._lock = threading.Lock()  # one pull at a time (the thread and a one-shot call)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down = False
        self.last: PullResult | None = None

    # -- one window ----------------------------------------------------------------------------
    def pull(self, since: float, until: float) -> PullResult:
        """Store every sample with ``since < t <= until`` (Unix seconds) that was not stored before.
        Errors are in the result, never raised."""
        lo, hi = round(since * 1000), round(until * 1000)
        with self._lock:
            self._load_covered()
            result = PullResult(batch=None if self.store is not None else IngestBatch())
            for name in self.selectors:
                self._pull_selector(name, (lo, hi), result)
            self._report(result)
            self.last = result
            return result

    def _pull_selector(self, name: str, window: Interval, result: PullResult) -> None:
        chunk = self.chunk_ms
        for lo, hi in subtract(window, self._covered.get(name, [])):
            start = lo
            while start < hi:
                if self._stop.is_set() and self._thread is not None:
                    return  # serve is stopping: the rest is pulled after the restart
                end = min(hi, start + chunk)
                try:
                    try:
                        matrix = self._query(f"{self.selectors[name]}[{end - start}ms]", end)
                    except PrometheusError as e:
                        if e.too_large and end - start > _MIN_CHUNK_MS:
                            chunk = max(_MIN_CHUNK_MS, (end - start) // 2)  # a big fleet: ask for less at a time
                            log.info("prometheus pull: %s; asking for %d ms at a time", e, chunk)
                            continue
                        raise
                    batch = self.normalise(matrix, start, end, result)
                    if self.store is not None:
                        self.store.write(batch, timeout_s=max(30.0, self.timeout_s))
                    elif result.batch is not None:
                        result.batch.extend(batch)
                except Exception as e:  # whatever failed, this window is pulled again later
                    result.errors.append(f"{name} {_iso(start)}..{_iso(end)}: {e}")
                    return
                result.rows += batch.row_count()
                result.ignored += batch.ignored
                result.windows += 1
                self._covered[name] = union(self._covered.get(name, []), (start, end))
                try:
                    self._save_covered(name)
                except Exception as e:  # stored, and remembered in memory: only a restart could pull it twice
                    log.warning("prometheus pull: cannot record the pulled range: %s", e)
                start = end

    def _query(self, promql: str, at_ms: int) -> list[dict[str, Any]]:
        body = urllib.parse.urlencode({"query": promql, "time": f"{at_ms / 1000:.3f}"}).encode()
        req = urllib.request.Request(f"{self.url}/api/v1/query", data=body, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded",
                                              "Accept": "application/json", **self.headers})
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = ""
            with contextlib.suppress(Exception):
                detail = str(json.loads(e.read()).get("error", ""))
            # 422 "query processing would load too many samples", 503 "query timed out"
            too_large = e.code in (422, 503) and ("too many samples" in detail or "timed out" in detail
                                                  or "timeout" in detail)
            raise PrometheusError(f"HTTP {e.code} from {self.url}: {detail or e.reason}", too_large) from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PrometheusError(f"{self.url} does not answer: {e}") from e
        if not isinstance(doc, dict) or doc.get("status") != "success":
            raise PrometheusError(f"{self.url} answered an error: {doc.get('error') if isinstance(doc, dict) else doc}")
        data = doc.get("data") or {}
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"expected a matrix, got {data.get('resultType')!r}")
        result: list[dict[str, Any]] = data.get("result") or []
        return result

    def normalise(self, matrix: Sequence[Mapping[str, Any]], lo_ms: int, hi_ms: int,
                  result: PullResult | None = None) -> IngestBatch:
        """A query's matrix → rows, keeping samples with ``lo_ms < t <= hi_ms``."""
        out = IngestBatch()
        origins: dict[tuple[str, str, str], Origin] = {}
        for series in matrix:
            labels = dict(series.get("metric") or {})
            name = str(labels.pop("__name__", ""))
            for k in [k for k in labels if k.startswith(_EXPORTED)]:
                labels[k[len(_EXPORTED):]] = labels.pop(k)
            job, instance = str(labels.get("job", "")), str(labels.get("instance", ""))
            node = next((str(labels[k]) for k in self.node_labels if labels.get(k)), "") or \
                (urllib.parse.urlsplit(f"//{instance}").hostname or instance)
            key = (job, instance, node)
            origin = origins.get(key)
            if origin is None:
                resource: dict[str, object] = {"service.name": job, "service.instance.id": instance}
                if node:
                    resource["host.name"] = node
                origin = origins[key] = Origin.of(resource)
            points: list[Point] = []
            for ts, text in series.get("values") or ():
                t_ms = round(float(ts) * 1000)
                if not lo_ms < t_ms <= hi_ms:
                    continue
                v = float(text)
                points.append((labels, t_ms * 1_000_000, None if math.isnan(v) else v))
            if result is not None:
                result.series += 1
                result.samples += len(points)
            if points:
                add_points(out, name, origin, points, _same)
        return out

    # -- stored ranges, kept in the store's meta table -------------------------------------------
    def _meta_key(self, name: str) -> str:
        return f"{_META_PREFIX}:{self.url}:{self.selectors[name]}"

    def _load_covered(self) -> None:
        if self._loaded or self.store is None:
            self._loaded = True
            return
        self._loaded = True
        try:
            with self.store.reader() as cur:
                for name in self.selectors:
                    row = cur.execute("SELECT value FROM meta WHERE key = ?", [self._meta_key(name)]).fetchone()
                    if row:
                        self._covered[name] = [(int(a), int(b)) for a, b in json.loads(row[0])]
        except Exception as e:  # a broken record means re-pulling, not failing
            log.warning("prometheus pull: cannot read the stored ranges: %s", e)

    def _save_covered(self, name: str) -> None:
        if self.store is None:
            return
        with self.store.reader() as cur:
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [self._meta_key(name), json.dumps(self._covered[name])])

    def covered(self, name: str) -> list[Interval]:
        """The stored ranges of one selector, (lo, hi] in Unix ms."""
        with self._lock:
            self._load_covered()
            return list(self._covered.get(name, []))

    # -- periodic ------------------------------------------------------------------------------
    def pull_latest(self, now: float | None = None) -> PullResult:
        """One periodic step: from where each selector's stored range ends (at most ``max_catchup_s``
        back; ``initial_lookback_s`` the first time) up to ``settle_s`` before now."""
        now_ms = round((time.time() if now is None else now) * 1000)
        until = now_ms - int(self.settle_s * 1000)
        with self._lock:
            self._load_covered()
            result = PullResult(batch=None if self.store is not None else IngestBatch())
            for name in self.selectors:
                cov = self._covered.get(name)
                since = cov[-1][1] if cov else until - self.initial_lookback_ms
                if since < until - self.max_catchup_ms:
                    log.warning("prometheus pull: %s is %.0f s behind; pulling the last %.0f s only", name,
                                (until - since) / 1000, self.max_catchup_ms / 1000)
                    since = until - self.max_catchup_ms
                if since < until:
                    self._pull_selector(name, (since, until), result)
            self._report(result)
            self.last = result
            return result

    def _report(self, result: PullResult) -> None:
        if result.errors:
            if not self._down:
                log.warning("prometheus pull from %s failed, retrying every %.0f s: %s", self.url, self.interval_s,
                            "; ".join(result.errors[:3]))
            else:
                log.debug("prometheus pull still failing: %s", result.errors[0])
            self._down = True
        else:
            if self._down:
                log.warning("prometheus pull from %s works again", self.url)
            self._down = False
            log.debug("prometheus pull: %d rows from %d samples of %d series", result.rows, result.samples,
                      result.series)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.pull_latest()
            except Exception:  # the thread must outlive any single failure
                log.exception("prometheus pull failed unexpectedly; retrying next interval")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stacklens-prometheus-pull", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 35.0)
            self._thread = None


def _same(p: Point) -> Point:
    return p


def _iso(t_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_ms / 1000)) + f".{t_ms % 1000:03d}Z"
