"""Findings as Grafana annotations: each regression stacklens explains shows up on the dashboards' time axis.

``GrafanaAnnotator(url, token).annotate(finding, regression)`` posts one finding of ``stacklens why``
(DESIGN.md's JSON: ``cause``, ``subcause``, ``culprit``, ``window``, ``explained_share``, ``evidence``)
to Grafana's HTTP API as a region annotation over the incident window::

    POST {url}/api/annotations   Authorization: Bearer <service account token>
    {"time": <ms>, "timeEnd": <ms>, "tags": ["stacklens", cause, subcause, "node:...", "gpu:..."],
     "text": "...", "dashboardUID": <optional>}

The same finding (cause, sub-cause, culprit and window start) is posted once: seen again with a later
window end, as the online detector re-runs while an incident goes on, the existing annotation's end is
moved (``PATCH /api/annotations/{id}``); seen again unchanged, nothing is sent. Transient failures
(connection errors, timeouts, 429 and 5xx) are retried a bounded number of times with backoff; nothing
raises into the caller: failures are logged and counted in :attr:`GrafanaAnnotator.stats`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["AnnotatorStats", "GrafanaAnnotator", "finding_key", "finding_payload"]

log = logging.getLogger("stacklens.grafana")

# HTTP statuses worth another attempt: the request may succeed unchanged later
_RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
_MAX_EVIDENCE = 3

FindingKey = tuple[str, str, str, str, int]


class AnnotationError(Exception):
    """A finding that cannot become an annotation (no usable window)."""


@dataclass
class AnnotatorStats:
    """Counters for /metrics and tests. ``failed`` counts findings given up on, ``retries`` extra attempts."""

    posted: int = 0
    updated: int = 0
    duplicates: int = 0
    failed: int = 0
    retries: int = 0


@dataclass
class _Sent:
    annotation_id: int | None
    end_ms: int


def _to_ms(value: Any) -> int:
    """RFC 3339 text (``2026-11-22T14:02:00Z``) or integer UTC nanoseconds -> UTC milliseconds."""
    if isinstance(value, bool):
        raise AnnotationError(f"time {value!r} is neither RFC 3339 nor nanoseconds")
    if isinstance(value, int):
        return value // 1_000_000
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as e:
            raise AnnotationError(f"time {value!r} is not RFC 3339") from e
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return int(dt.timestamp() * 1000)
    raise AnnotationError(f"time {value!r} is neither RFC 3339 nor nanoseconds")


def _window_ms(finding: Mapping[str, Any]) -> tuple[int, int]:
    window = finding.get("window")
    if not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2:
        raise AnnotationError("the finding has no window [start, end]")
    start, end = _to_ms(window[0]), _to_ms(window[1])
    return start, max(start, end)


def _subcause(finding: Mapping[str, Any]) -> str | None:
    # DESIGN.md's key is ``subcause``; ``sub_cause`` is accepted as well
    value = finding.get("subcause", finding.get("sub_cause"))
    return None if value is None else str(value)


def _share(finding: Mapping[str, Any]) -> float | None:
    value = finding.get("explained_share", finding.get("share_explained"))
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _culprit(finding: Mapping[str, Any]) -> Mapping[str, Any]:
    culprit = finding.get("culprit")
    return culprit if isinstance(culprit, Mapping) else {}


def finding_key(finding: Mapping[str, Any]) -> FindingKey:
    """What makes two findings the same: cause, sub-cause, culprit node and GPU, and the window's start."""
    c = _culprit(finding)
    return (str(finding.get("cause") or "none"), _subcause(finding) or "", str(c.get("node") or ""),
            str(c.get("gpu") or ""), _window_ms(finding)[0])


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "?" if v is None else str(v)


def _text(finding: Mapping[str, Any], regression: Mapping[str, Any] | None) -> str:
    cause = str(finding.get("cause") or "none")
    sub = _subcause(finding)
    c = _culprit(finding)
    where = str(c.get("node") or "the fleet")
    if c.get("gpu_index") is not None:
        where += f" GPU {c['gpu_index']}"
    if c.get("gpu"):
        where += f" ({c['gpu']})"
    if c.get("pod"):
        where += f", pod {c['pod']}"
    if c.get("pid"):
        where += f", pid {c['pid']}"
    head = f"stacklens: {cause}" + (f"/{sub}" if sub else "") + f" on {where}"
    lines = [head]
    what = []
    if regression:
        metric = str(regression.get("metric") or "latency").replace("_", " ").upper()
        ratio = regression.get("ratio")
        if isinstance(ratio, int | float) and not isinstance(ratio, bool):
            what.append(f"{metric} {ratio:.1f}x baseline")
        else:
            what.append(metric)
    share = _share(finding)
    if cause == "none":
        what.append("no signal the data holds explains the regression")
    elif share is not None:
        what.append(f"explains {share:.0%} of the regression")
    if isinstance(finding.get("score"), int | float):
        what.append(f"score {float(finding['score']):.2f}")
    if what:
        lines.append("; ".join(what))
    if finding.get("description"):
        lines.append(str(finding["description"]))
    evidence = finding.get("evidence")
    if isinstance(evidence, Sequence) and not isinstance(evidence, str):
        for ev in list(evidence)[:_MAX_EVIDENCE]:
            if not isinstance(ev, Mapping):
                continue
            unit = f" {ev['unit']}" if ev.get("unit") else ""
            line = (f"{ev.get('signal', '?')}: {_fmt_value(ev.get('baseline'))} -> "
                    f"{_fmt_value(ev.get('incident'))}{unit}")
            if isinstance(ev.get("robust_z"), int | float):
                line += f" (robust z {float(ev['robust_z']):.1f})"
            lines.append(line)
    return "\n".join(lines)


def finding_payload(finding: Mapping[str, Any], regression: Mapping[str, Any] | None = None,
                    dashboard_uid: str | None = None, extra_tags: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON body of ``POST /api/annotations`` for one finding (pure; raises AnnotationError)."""
    start, end = _window_ms(finding)
    c = _culprit(finding)
    tags = ["stacklens", str(finding.get("cause") or "none")]
    sub = _subcause(finding)
    if sub:
        tags.append(sub)
    if c.get("node"):
        tags.append(f"node:{c['node']}")
    if c.get("gpu"):
        tags.append(f"gpu:{c['gpu']}")
    if regression and regression.get("metric"):
        tags.append(f"metric:{regression['metric']}")
    tags.extend(t for t in extra_tags if t not in tags)
    body: dict[str, Any] = {"time": start, "timeEnd": end, "tags": tags, "text": _text(finding, regression)}
    if dashboard_uid:
        body["dashboardUID"] = dashboard_uid
    return body


class GrafanaAnnotator:
    """Posts findings to one Grafana as annotations. Thread-safe; ``annotate`` never raises.

    ``url`` is Grafana's base URL (``http://grafana:3000``), ``token`` a service account token with the
    annotations:write permission. Without ``dashboard_uid`` the annotations are organisation-wide (every
    dashboard that shows annotations by the ``stacklens`` tag sees them). Each finding costs at most
    ``attempts`` requests of at most ``timeout_s`` each, with ``backoff_s`` doubling between them.
    """

    def __init__(self, url: str, token: str, dashboard_uid: str | None = None, timeout_s: float = 5.0,
                 attempts: int = 3, backoff_s: float = 0.5, extra_tags: Sequence[str] = (),
                 remember: int = 4096, sleep: Callable[[float], None] = time.sleep) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url = url.rstrip("/")
        self._token = token
        self.dashboard_uid = dashboard_uid
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.extra_tags = tuple(extra_tags)
        self.stats = AnnotatorStats()
        self._remember = remember
        self._sent: OrderedDict[FindingKey, _Sent] = OrderedDict()
        self._lock = threading.Lock()
        self._sleep = sleep

    def annotate(self, finding: Mapping[str, Any], regression: Mapping[str, Any] | None = None) -> bool:
        """Post (or extend) the annotation of one finding. True when Grafana has it, False otherwise."""
        try:
            return self._annotate(finding, regression)
        except Exception:  # never into the caller: the detector goes on whatever Grafana does
            log.exception("annotating a finding in Grafana failed")
            with self._lock:
                self.stats.failed += 1
            return False

    def annotate_why(self, doc: Mapping[str, Any], top: int = 1) -> int:
        """Annotate the first ``top`` findings of a ``why`` document; returns how many Grafana has."""
        findings = doc.get("findings")
        if not isinstance(findings, Sequence) or isinstance(findings, str):
            return 0
        regression = doc.get("regression") if isinstance(doc.get("regression"), Mapping) else None
        return sum(self.annotate(f, regression) for f in list(findings)[:top] if isinstance(f, Mapping))

    # -- internals ---------------------------------------------------------------------------------------
    def _annotate(self, finding: Mapping[str, Any], regression: Mapping[str, Any] | None) -> bool:
        try:
            key = finding_key(finding)
            body = finding_payload(finding, regression, self.dashboard_uid, self.extra_tags)
        except AnnotationError as e:
            log.warning("finding not annotated: %s", e)
            with self._lock:
                self.stats.failed += 1
            return False
        with self._lock:
            sent = self._sent.get(key)
            if sent is None:
                # claim the key before posting, so two threads never post the same finding twice
                self._sent[key] = _Sent(None, body["timeEnd"])
                while len(self._sent) > self._remember:
                    self._sent.popitem(last=False)
            else:
                self._sent.move_to_end(key)
                if body["timeEnd"] <= sent.end_ms or sent.annotation_id is None:
                    self.stats.duplicates += 1
                    return True
        if sent is not None:
            ident = sent.annotation_id
            update = {"timeEnd": body["timeEnd"], "text": body["text"], "tags": body["tags"]}
            ok = self._request("PATCH", f"/api/annotations/{ident}", update) is not None
            with self._lock:
                if ok:
                    sent.end_ms = max(sent.end_ms, body["timeEnd"])
                    self.stats.updated += 1
                else:
                    self.stats.failed += 1
            return ok
        answer = self._request("POST", "/api/annotations", body)
        with self._lock:
            if answer is None:
                self._sent.pop(key, None)  # not in Grafana: the next detection may try again
                self.stats.failed += 1
                return False
            ident = answer.get("id")
            claimed = self._sent.get(key)
            if claimed is not None and isinstance(ident, int) and not isinstance(ident, bool):
                claimed.annotation_id = ident
            self.stats.posted += 1
        return True

    def _request(self, method: str, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """One call with bounded retries; the decoded JSON answer, or None after giving up."""
        data = json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
                   "Accept": "application/json", "User-Agent": "stacklens-correlator"}
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            retry = False
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    answer = json.loads(raw) if raw else {}
                except ValueError:
                    answer = {}
                return answer if isinstance(answer, dict) else {}
            except urllib.error.HTTPError as e:
                detail = e.read(512).decode("utf-8", "replace").strip()
                retry = e.code in _RETRYABLE
                log.warning("Grafana %s %s: HTTP %d %s (attempt %d of %d)", method, path, e.code, detail,
                            attempt, self.attempts)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                retry = True
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                log.warning("Grafana %s %s: %s (attempt %d of %d)", method, path, reason, attempt, self.attempts)
            if not retry or attempt == self.attempts:
                break
            with self._lock:
                self.stats.retries += 1
            self._sleep(delay)
            delay *= 2
        return None
