"""Run the real Prometheus server (Debian's ``prometheus`` binary) for tests.

:class:`PrometheusServer` writes a ``prometheus.yml`` into a fresh temporary directory,
starts ``prometheus`` with its TSDB in that directory, listening on ``127.0.0.1`` on a free
port with ``--web.enable-lifecycle``, waits until ``/-/ready`` answers and then offers thin,
typed wrappers over the HTTP API (instant and range queries, series, targets, reload) plus
:meth:`PrometheusServer.wait_for`, which polls a PromQL query until it returns data.

Only the standard library is used (``urllib`` for HTTP). Scrape targets must be loopback
addresses (``127.0.0.1:PORT`` or ``localhost:PORT``); the harness never talks to anything
else.

The configuration file is written as JSON, which is valid YAML and therefore accepted by
Prometheus as is; this avoids a YAML dependency and any quoting pitfalls.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "PrometheusApiError",
    "PrometheusServer",
    "PrometheusStartupError",
    "ScrapeTarget",
    "build_config",
    "free_tcp_port",
    "prometheus_binary",
]

_LOOPBACK = "127.0.0.1"
_ALLOWED_TARGET_HOSTS = frozenset({"127.0.0.1", "localhost"})
_BINARY_ENV = "STACKLENS_PROMETHEUS_BIN"
_LOG_TAIL_CHARS = 4000
# Never route loopback API calls through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

PromResult = list[dict[str, Any]]


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` server binary, or None when it is not installed.

    ``$STACKLENS_PROMETHEUS_BIN`` (a path or a command name) takes precedence over ``$PATH``.
    """
    override = os.environ.get(_BINARY_ENV)
    if override:
        return shutil.which(override)
    return shutil.which("prometheus")


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class PrometheusStartupError(RuntimeError):
    """The prometheus process did not become ready; the message carries its log output."""


class PrometheusApiError(RuntimeError):
    """The HTTP API answered with ``"status": "error"`` (or a non-JSON failure)."""

    def __init__(self, message: str, *, error_type: str = "", http_status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.http_status = http_status


@dataclass(frozen=True)
class ScrapeTarget:
    """One static scrape target.

    ``address`` is ``"127.0.0.1:PORT"``. Targets sharing a ``job`` become one scrape config,
    so they must agree on ``metrics_path``, ``honor_timestamps``, ``scrape_interval`` and
    ``scheme``. ``honor_timestamps=None`` leaves Prometheus' default (true). ``labels`` are
    extra target labels.
    """

    address: str
    job: str = "stacklens"
    metrics_path: str = "/metrics"
    honor_timestamps: bool | None = None
    scrape_interval: str | float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    scheme: str = "http"

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"scrape target must look like '127.0.0.1:PORT', got {self.address!r}")
        if host not in _ALLOWED_TARGET_HOSTS:
            raise ValueError(f"scrape targets must be on loopback (127.0.0.1), got {self.address!r}")
        if not self.metrics_path.startswith("/"):
            raise ValueError(f"metrics_path must start with '/', got {self.metrics_path!r}")


def _duration(value: str | float) -> str:
    """Prometheus duration string from seconds (float) or a ready-made string like "1s"."""
    if isinstance(value, str):
        return value
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"duration must be positive, got {value!r}")
    return f"{round(value * 1000)}ms"


def _seconds(value: str | float) -> float:
    if not isinstance(value, str):
        return float(value)
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        number = value.removesuffix(suffix)
        if number != value:
            try:
                return float(number) * units[suffix]
            except ValueError:
                break
    return math.inf  # unknown format: let prometheus validate it


def _normalise_targets(targets: Sequence[ScrapeTarget | str] | ScrapeTarget | str) -> list[ScrapeTarget]:
    if isinstance(targets, ScrapeTarget | str):
        targets = [targets]
    out: list[ScrapeTarget] = []
    for target in targets:
        out.append(ScrapeTarget(address=target) if isinstance(target, str) else target)
    return out


def build_config(
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval: str | float = 1.0,
    scrape_timeout: str | float | None = None,
    evaluation_interval: str | float | None = None,
) -> dict[str, Any]:
    """The prometheus.yml content (as a JSON-compatible dict) for ``targets``."""
    interval = _duration(scrape_interval)
    glob: dict[str, Any] = {
        "scrape_interval": interval,
        "evaluation_interval": _duration(evaluation_interval or scrape_interval),
    }
    if scrape_timeout is not None:
        glob["scrape_timeout"] = _duration(scrape_timeout)
    elif _seconds(scrape_interval) < 10:
        glob["scrape_timeout"] = interval  # the 10s default would exceed the interval
    jobs: dict[str, dict[str, Any]] = {}
    for target in targets:
        settings: dict[str, Any] = {
            "metrics_path": target.metrics_path,
            "scheme": target.scheme,
        }
        if target.honor_timestamps is not None:
            settings["honor_timestamps"] = target.honor_timestamps
        if target.scrape_interval is not None:
            job_interval = _duration(target.scrape_interval)
            settings["scrape_interval"] = job_interval
            if scrape_timeout is None and _seconds(target.scrape_interval) < _seconds(
                glob.get("scrape_timeout", "10s")
            ):
                settings["scrape_timeout"] = job_interval
        job = jobs.get(target.job)
        if job is None:
            jobs[target.job] = job = {"job_name": target.job, **settings, "static_configs": []}
        else:
            clashing = {k: (job.get(k), v) for k, v in settings.items() if job.get(k) != v}
            clashing.pop("scrape_timeout", None)
            if clashing:
                raise ValueError(f"targets of job {target.job!r} disagree on settings: {clashing}")
        static: dict[str, Any] = {"targets": [target.address]}
        if target.labels:
            static["labels"] = dict(target.labels)
        job["static_configs"].append(static)
    return {"global": glob, "scrape_configs": list(jobs.values())}


class PrometheusServer:
    """The real Prometheus server as a context manager.

    Timing note: Prometheus 2.42 hands new targets to its scrape manager at most every 5 s
    (a fixed discovery throttle, not configurable), so the first sample of a target appears
    about 5 s after start or after :meth:`reload` / :meth:`set_targets`; later samples follow
    every ``scrape_interval``. ``wait_for``'s default 15 s timeout allows for that.

    ``targets`` may be ``ScrapeTarget`` objects or plain ``"127.0.0.1:PORT"`` strings (which
    get job ``"stacklens"``). An empty list is allowed (add targets later with
    :meth:`set_targets`). ``scrape_interval`` is seconds (float) or a Prometheus duration
    string. ``extra_args`` are appended to the command line.
    """

    def __init__(
        self,
        targets: Sequence[ScrapeTarget | str] | ScrapeTarget | str = (),
        *,
        scrape_interval: str | float = 1.0,
        scrape_timeout: str | float | None = None,
        evaluation_interval: str | float | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 30.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self._targets = _normalise_targets(targets)
        self._scrape_interval = scrape_interval
        self._scrape_timeout = scrape_timeout
        self._evaluation_interval = evaluation_interval
        self._binary = binary
        self._extra_args = list(extra_args)
        self._startup_timeout_s = startup_timeout_s
        self._request_timeout_s = request_timeout_s
        self._tmpdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._port: int | None = None
        # Validate eagerly so configuration mistakes surface before a process is spawned.
        self._config = self._build_config()

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build_config(self) -> dict[str, Any]:
        return build_config(
            self._targets,
            scrape_interval=self._scrape_interval,
            scrape_timeout=self._scrape_timeout,
            evaluation_interval=self._evaluation_interval,
        )

    @property
    def config_path(self) -> Path:
        return self._require_tmpdir() / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self._require_tmpdir() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_tmpdir() / "prometheus.log"

    def _require_tmpdir(self) -> Path:
        if self._tmpdir is None:
            raise RuntimeError("PrometheusServer has not been started")
        return self._tmpdir

    def start(self) -> None:
        """Start the server and wait for ``/-/ready``; raises PrometheusStartupError."""
        if self._process is not None:
            raise RuntimeError("PrometheusServer already started")
        binary = self._binary or prometheus_binary()
        if binary is None:
            raise PrometheusStartupError(
                "prometheus binary not found (apt-get install prometheus, or set $STACKLENS_PROMETHEUS_BIN)"
            )
        self._tmpdir = Path(tempfile.mkdtemp(prefix="stacklens-prometheus-"))
        self._write_config()
        self.data_dir.mkdir()
        try:
            # A free port can be taken between picking it and prometheus binding it; retry then.
            for attempt in range(3):
                self._port = free_tcp_port()
                self._spawn(binary)
                try:
                    self._wait_ready()
                    return
                except PrometheusStartupError:
                    exited = self._process is not None and self._process.poll() is not None
                    in_use = "address already in use" in self.log_text().lower()
                    if not (exited and in_use) or attempt == 2:
                        raise
                    self._kill()
        except BaseException:
            self.close()
            raise

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self._config, indent=2) + "\n", encoding="utf-8")

    def _spawn(self, binary: str) -> None:
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = self.log_path.open("ab")
        cmd = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={_LOOPBACK}:{self._port}",
            "--web.enable-lifecycle",
            "--log.level=info",
            *self._extra_args,
        ]
        self._process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._tmpdir,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise PrometheusStartupError(
                    f"prometheus exited with code {code} before becoming ready.\n"
                    f"command: {process.args if process else None!r}\n"
                    f"--- prometheus output ---\n{self.log_text(_LOG_TAIL_CHARS)}"
                )
            try:
                status, _ = self._raw_request("GET", "/-/ready", timeout=1.0)
                if status == 200:
                    return
                last_error = f"HTTP {status}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise PrometheusStartupError(
            f"prometheus at {self.url} not ready after {self._startup_timeout_s}s (last: {last_error}).\n"
            f"--- prometheus output ---\n{self.log_text(_LOG_TAIL_CHARS)}"
        )

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def close(self) -> None:
        """Terminate prometheus (SIGTERM, then SIGKILL after 10 s) and delete the temp dir."""
        self._kill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("PrometheusServer has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``"http://127.0.0.1:PORT"``."""
        return f"http://{_LOOPBACK}:{self.port}"

    def log_text(self, max_chars: int | None = None) -> str:
        """The server's combined stdout/stderr so far (the last ``max_chars`` characters)."""
        if self._tmpdir is None:
            return ""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text if max_chars is None else text[-max_chars:]

    # -- HTTP plumbing ----------------------------------------------------------------------

    def _raw_request(
        self, method: str, path: str, *, data: bytes | None = None, timeout: float | None = None
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with _OPENER.open(request, timeout=timeout or self._request_timeout_s) as response:
                body: bytes = response.read()
                status: int = response.status
                return status, body
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _api(self, path: str, params: Mapping[str, str | Sequence[str]]) -> Any:
        pairs: list[tuple[str, str]] = []
        for key, value in params.items():
            if isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, item) for item in value)
        body = urllib.parse.urlencode(pairs).encode()
        status, raw = self._raw_request("POST", path, data=body)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise PrometheusApiError(
                f"{path}: HTTP {status}, non-JSON body: {raw[:500]!r}", http_status=status
            ) from exc
        if not isinstance(payload, dict) or payload.get("status") != "success":
            error_type = str(payload.get("errorType", "")) if isinstance(payload, dict) else ""
            error = payload.get("error", payload) if isinstance(payload, dict) else payload
            raise PrometheusApiError(
                f"{path} {dict(pairs)}: HTTP {status}, {error_type}: {error}",
                error_type=error_type,
                http_status=status,
            )
        return payload.get("data")

    # -- API --------------------------------------------------------------------------------

    def query(self, promql: str, time: float | None = None) -> PromResult:
        """Instant query (``/api/v1/query``); returns the ``result`` list.

        Vector results are ``[{"metric": {...}, "value": [ts, "value"]}, ...]``. Scalar and
        string results are wrapped as ``[{"metric": {}, "value": [ts, "value"]}]`` so the
        return type is always a list of dicts. Raises PrometheusApiError on an error status.
        """
        params: dict[str, str] = {"query": promql}
        if time is not None:
            params["time"] = repr(float(time))
        return self._result(self._api("/api/v1/query", params))

    def query_range(self, promql: str, start: float, end: float, step: float | str = 1.0) -> PromResult:
        """Range query (``/api/v1/query_range``); returns the ``result`` list (matrix)."""
        params = {
            "query": promql,
            "start": repr(float(start)),
            "end": repr(float(end)),
            "step": step if isinstance(step, str) else repr(float(step)),
        }
        return self._result(self._api("/api/v1/query_range", params))

    @staticmethod
    def _result(data: Any) -> PromResult:
        if not isinstance(data, dict):
            raise PrometheusApiError(f"unexpected query data: {data!r}")
        result = data.get("result")
        if data.get("resultType") in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        if not isinstance(result, list):
            raise PrometheusApiError(f"unexpected query result: {data!r}")
        return result

    def series(self, match: str, start: float | None = None, end: float | None = None) -> PromResult:
        """Series matching a selector (``/api/v1/series``): a list of label dicts."""
        params: dict[str, str | Sequence[str]] = {"match[]": [match]}
        if start is not None:
            params["start"] = repr(float(start))
        if end is not None:
            params["end"] = repr(float(end))
        data = self._api("/api/v1/series", params)
        if not isinstance(data, list):
            raise PrometheusApiError(f"unexpected series data: {data!r}")
        return data

    def label_values(self, label: str) -> list[str]:
        """Values of one label (``/api/v1/label/<name>/values``)."""
        status, raw = self._raw_request("GET", f"/api/v1/label/{urllib.parse.quote(label)}/values")
        payload = json.loads(raw)
        if status != 200 or payload.get("status") != "success":
            raise PrometheusApiError(f"label values {label}: HTTP {status}: {payload}", http_status=status)
        return [str(v) for v in payload["data"]]

    def targets(self, state: str = "active") -> list[dict[str, Any]]:
        """Scrape targets (``/api/v1/targets``): ``activeTargets`` (or ``droppedTargets``)."""
        status, raw = self._raw_request("GET", f"/api/v1/targets?state={urllib.parse.quote(state)}")
        payload = json.loads(raw)
        if status != 200 or payload.get("status") != "success":
            raise PrometheusApiError(f"targets: HTTP {status}: {payload}", http_status=status)
        key = "droppedTargets" if state == "dropped" else "activeTargets"
        targets: list[dict[str, Any]] = payload["data"].get(key) or []
        return targets

    def targets_summary(self) -> str:
        """One line per active target: job, URL, health, last error, last scrape time."""
        try:
            targets = self.targets()
        except (PrometheusApiError, OSError, ValueError) as exc:
            return f"(could not read targets: {exc})"
        if not targets:
            return "(no active targets)"
        lines = []
        for t in targets:
            job = t.get("labels", {}).get("job", "?")
            lines.append(
                f"job={job} url={t.get('scrapeUrl')} health={t.get('health')} "
                f"lastError={t.get('lastError')!r} lastScrape={t.get('lastScrape')}"
            )
        return "\n".join(lines)

    def wait_for_targets_up(self, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """Wait until every active target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        while True:
            targets = self.targets()
            if targets and all(t.get("health") == "up" for t in targets):
                return targets
            if time.monotonic() >= deadline:
                raise AssertionError(f"targets not all up after {timeout_s}s:\n{self.targets_summary()}")
            time.sleep(0.1)

    def wait_for(
        self,
        promql: str,
        timeout_s: float = 15.0,
        predicate: Callable[[PromResult], bool] | None = None,
        *,
        poll_interval_s: float = 0.2,
    ) -> PromResult:
        """Poll an instant query until it returns a non-empty result (or ``predicate`` is true).

        Returns that result. Query syntax errors (``bad_data``) are raised immediately; on
        timeout raises AssertionError with the last result/error, the health of every scrape
        target and the tail of the server log.
        """
        deadline = time.monotonic() + timeout_s
        last_result: PromResult | None = None
        last_error: str | None = None
        while True:
            try:
                last_result = self.query(promql)
                last_error = None
                done = predicate(last_result) if predicate is not None else bool(last_result)
                if done:
                    return last_result
            except PrometheusApiError as exc:
                if exc.error_type == "bad_data":
                    raise
                last_error = str(exc)
            except (urllib.error.URLError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Prometheus query {promql!r} not satisfied within {timeout_s}s.\n"
                    f"last result: {json.dumps(last_result)}\n"
                    f"last error: {last_error}\n"
                    f"targets:\n{self.targets_summary()}\n"
                    f"--- prometheus log tail ---\n{self.log_text(1500)}"
                )
            time.sleep(poll_interval_s)

    def reload(self) -> None:
        """Ask the server to re-read its config (``POST /-/reload``); raises on failure."""
        status, raw = self._raw_request("POST", "/-/reload", data=b"")
        if status != 200:
            raise PrometheusApiError(
                f"reload failed: HTTP {status}: {raw.decode(errors='replace')}", http_status=status
            )

    def set_targets(self, targets: Sequence[ScrapeTarget | str] | ScrapeTarget | str) -> None:
        """Replace the scrape targets, rewrite prometheus.yml and reload (if running)."""
        previous = self._targets
        self._targets = _normalise_targets(targets)
        try:
            self._config = self._build_config()
        except ValueError:
            self._targets = previous
            raise
        if self._tmpdir is not None:
            self._write_config()
            if self.running:
                self.reload()

    @property
    def config(self) -> dict[str, Any]:
        """The configuration currently written to prometheus.yml (a copy)."""
        copied: dict[str, Any] = json.loads(json.dumps(self._config))
        return copied
