"""GrafanaAnnotator against a real HTTP server on 127.0.0.1 that answers like Grafana's annotations API
and records every request."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from correlator.server.grafana_annotations import GrafanaAnnotator, finding_key, finding_payload

TOKEN = "glsa_test-token-0123456789"

FINDING: dict[str, Any] = {
    "rank": 1, "cause": "interconnect", "subcause": "pcie", "score": 0.93, "explained_share": 0.81,
    "culprit": {"node": "node-2", "gpu": "GPU-8c1e0000-1111-2222-3333-444455556666", "gpu_index": 3,
                "pod": "vllm-llama-0", "pid": 4120, "mapping": "placement"},
    "window": ["2026-11-22T14:02:00Z", "2026-11-22T14:17:30Z"],
    "evidence": [{"signal": "pcie_rx_bytes_per_s", "unit": "B/s", "baseline": 2.1e9, "incident": 24.8e9,
                  "robust_z": 17.2}],
    "description": "PCIe RX saturated (24.8 GB/s of 25.6 GB/s)",
}
REGRESSION: dict[str, Any] = {"metric": "ttft_p99", "baseline_s": 0.41, "incident_s": 1.37, "ratio": 3.34,
                              "detected": True}


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp() * 1000)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafana:
    """Scripted statuses (consumed in order; 200 once they run out) and every request it received."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[Recorded] = field(default_factory=list)
    next_id: int = 41
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with state.lock:
                state.requests.append(Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                               json.loads(raw) if raw else None))
                status = state.statuses.pop(0) if state.statuses else 200
                state.next_id += 1
                ident = state.next_id
            if state.delay_s:
                time.sleep(state.delay_s)
            if status == 200 and self.command == "POST":
                answer: dict[str, Any] = {"message": "Annotation added", "id": ident}
            elif status == 200:
                answer = {"message": "Annotation patched"}
            else:
                answer = {"message": "internal error" if status >= 500 else "bad request"}
            data = json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        do_POST = _handle  # noqa: N815
        do_PATCH = _handle  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def _annotator(url: str, **kw: Any) -> tuple[GrafanaAnnotator, list[float]]:
    sleeps: list[float] = []
    kw.setdefault("timeout_s", 2.0)
    return GrafanaAnnotator(url, TOKEN, sleep=sleeps.append, **kw), sleeps


def test_posts_the_finding_with_bearer_token_and_payload(grafana: FakeGrafana) -> None:
    ann, _ = _annotator(grafana.url + "/", dashboard_uid="stacklens-incident")
    assert ann.annotate(FINDING, REGRESSION) is True
    assert len(grafana.requests) == 1
    req = grafana.requests[0]
    assert (req.method, req.path) == ("POST", "/api/annotations")
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["content-type"] == "application/json"
    body = req.body
    assert body["time"] == _ms("2026-11-22T14:02:00Z")
    assert body["timeEnd"] == _ms("2026-11-22T14:17:30Z")
    assert body["tags"][:3] == ["stacklens", "interconnect", "pcie"]
    assert "node:node-2" in body["tags"]
    assert "gpu:GPU-8c1e0000-1111-2222-3333-444455556666" in body["tags"]
    assert "metric:ttft_p99" in body["tags"]
    assert body["dashboardUID"] == "stacklens-incident"
    text = body["text"]
    assert "interconnect/pcie on node-2 GPU 3" in text
    assert "pod vllm-llama-0" in text and "pid 4120" in text
    assert "explains 81% of the regression" in text
    assert "TTFT P99 3.3x baseline" in text
    assert "pcie_rx_bytes_per_s: 2.1e+09 -> 2.48e+10 B/s (robust z 17.2)" in text
    assert ann.stats.posted == 1 and ann.stats.failed == 0


def test_payload_accepts_the_alternative_key_names() -> None:
    finding = {"cause": "thermal_power", "sub_cause": "power_cap", "share_explained": 0.5,
               "culprit": {"node": "n1"}, "window": [1_700_000_000_000_000_000, 1_700_000_060_000_000_000],
               "evidence": []}
    body = finding_payload(finding)
    assert body["time"] == 1_700_000_000_000 and body["timeEnd"] == 1_700_000_060_000
    assert body["tags"] == ["stacklens", "thermal_power", "power_cap", "node:n1"]
    assert "explains 50% of the regression" in body["text"]
    assert "dashboardUID" not in body


def test_retries_a_500_then_succeeds(grafana: FakeGrafana) -> None:
    grafana.statuses = [500, 503]
    ann, sleeps = _annotator(grafana.url, attempts=3, backoff_s=0.25)
    assert ann.annotate(FINDING) is True
    assert [r.method for r in grafana.requests] == ["POST"] * 3
    assert grafana.requests[0].body == grafana.requests[2].body
    assert sleeps == [0.25, 0.5]
    assert ann.stats.retries == 2 and ann.stats.posted == 1 and ann.stats.failed == 0


def test_gives_up_after_the_bounded_attempts_without_raising(grafana: FakeGrafana) -> None:
    grafana.statuses = [500] * 10
    ann, sleeps = _annotator(grafana.url, attempts=3)
    assert ann.annotate(FINDING) is False
    assert len(grafana.requests) == 3 and len(sleeps) == 2
    assert ann.stats.failed == 1 and ann.stats.posted == 0
    # not remembered as sent: the next detection of the same finding tries again
    grafana.statuses = []
    assert ann.annotate(FINDING) is True
    assert len(grafana.requests) == 4 and ann.stats.posted == 1


def test_a_client_error_is_not_retried(grafana: FakeGrafana) -> None:
    grafana.statuses = [400]
    ann, sleeps = _annotator(grafana.url, attempts=5)
    assert ann.annotate(FINDING) is False
    assert len(grafana.requests) == 1 and sleeps == []
    assert ann.stats.failed == 1


def test_server_down_returns_false_and_counts() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ann, sleeps = _annotator(f"http://127.0.0.1:{port}", attempts=2, timeout_s=1.0)
    assert ann.annotate(FINDING) is False
    assert len(sleeps) == 1
    assert ann.stats.failed == 1 and ann.stats.retries == 1


def test_a_slow_server_times_out_without_raising(grafana: FakeGrafana) -> None:
    grafana.delay_s = 1.0
    ann, _ = _annotator(grafana.url, attempts=1, timeout_s=0.2)
    t0 = time.monotonic()
    assert ann.annotate(FINDING) is False
    assert time.monotonic() - t0 < 0.9
    assert ann.stats.failed == 1


def test_the_same_finding_is_posted_once(grafana: FakeGrafana) -> None:
    ann, _ = _annotator(grafana.url)
    assert ann.annotate(FINDING, REGRESSION) is True
    assert ann.annotate(dict(FINDING), REGRESSION) is True
    assert ann.annotate_why({"regression": REGRESSION, "findings": [FINDING]}) == 1
    assert len(grafana.requests) == 1
    assert ann.stats.posted == 1 and ann.stats.duplicates == 2


def test_a_growing_window_moves_the_annotation_end(grafana: FakeGrafana) -> None:
    ann, _ = _annotator(grafana.url)
    assert ann.annotate(FINDING) is True
    ident = grafana.next_id
    later = {**FINDING, "window": ["2026-11-22T14:02:00Z", "2026-11-22T14:30:00Z"]}
    assert ann.annotate(later) is True
    assert finding_key(later) == finding_key(FINDING)
    assert [(r.method, r.path) for r in grafana.requests] == [("POST", "/api/annotations"),
                                                              ("PATCH", f"/api/annotations/{ident}")]
    patch = grafana.requests[1]
    assert patch.headers["authorization"] == f"Bearer {TOKEN}"
    assert patch.body["timeEnd"] == _ms("2026-11-22T14:30:00Z")
    assert ann.stats.updated == 1
    # an earlier end than what Grafana has is a duplicate, not a PATCH
    assert ann.annotate(FINDING) is True
    assert len(grafana.requests) == 2 and ann.stats.duplicates == 1


def test_a_different_culprit_is_a_new_annotation(grafana: FakeGrafana) -> None:
    ann, _ = _annotator(grafana.url)
    other = {**FINDING, "culprit": {**FINDING["culprit"], "gpu": "GPU-other", "gpu_index": 1}}
    assert ann.annotate(FINDING) and ann.annotate(other)
    assert [r.method for r in grafana.requests] == ["POST", "POST"]


def test_a_finding_without_window_is_counted_not_raised(grafana: FakeGrafana) -> None:
    ann, _ = _annotator(grafana.url)
    assert ann.annotate({"cause": "memory", "culprit": None}) is False
    assert ann.annotate({**FINDING, "window": ["yesterday", "today"]}) is False
    assert ann.annotate_why({"findings": "not a list"}) == 0
    assert grafana.requests == [] and ann.stats.failed == 2


def test_concurrent_callers_post_one_annotation(grafana: FakeGrafana) -> None:
    grafana.delay_s = 0.1
    ann, _ = _annotator(grafana.url)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(ann.annotate(FINDING))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == [True] * 4
    assert len(grafana.requests) == 1
    assert ann.stats.posted == 1 and ann.stats.duplicates == 3
