"""``stacklens serve``: the store, the OTLP receivers (gRPC and HTTP), the read-only API with /metrics,
the optional Prometheus pull and the online detector, started and stopped together.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from correlator.ingest.payload import Limits, decode_record, upb_active
from correlator.server.otlp_grpc import start_grpc_server
from correlator.server.otlp_http import BatchSink, IngestStats, otlp_routes
from correlator.store.duckdb_store import Store
from correlator.store.spool import Spool

log = logging.getLogger("stacklens.serve")


class ServeConfigError(ValueError):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ServeConfigError(f"address {address!r} is not HOST:PORT")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def require_http_url(what: str, url: str) -> None:
    """``url`` is an http(s) URL, or a ServeConfigError (a ValueError) names ``what``."""
    if not url.startswith(("http://", "https://")):
        raise ServeConfigError(f"{what} {url!r} must start with http:// or https://")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    db: str = "stacklens.duckdb"
    otlp_grpc: str | None = "127.0.0.1:4317"
    otlp_http: str | None = "127.0.0.1:4318"
    api: str | None = "127.0.0.1:8686"
    prometheus_url: str | None = None
    prometheus_interval_s: float = 15.0
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    retention_s: float | None = None
    limits: Limits = field(default_factory=Limits)
    detect_interval_s: float = 10.0  # online detection every this many seconds; 0 turns it off
    db_threads: int | None = None  # DuckDB's worker threads (None: one per core)
    spool: bool = True  # acknowledge exports once on the spool (DB.spool/), commit in large groups
    grafana_url: str | None = None  # post confirmed findings as annotations here
    grafana_token: str | None = None

    def validate(self) -> None:
        for name in ("otlp_grpc", "otlp_http", "api"):
            addr = getattr(self, name)
            if addr is None:
                continue
            host, _ = split_address(addr)
            if not is_loopback(host) and not self.token:
                raise ServeConfigError(
                    f"--{name.replace('_', '-')} {addr} is not loopback: a bearer token is required "
                    "(--token or STACKLENS_TOKEN)")
        if self.detect_interval_s < 0:
            raise ServeConfigError("--detect-interval must be 0 (off) or a positive number of seconds")
        if self.grafana_url is not None:
            require_http_url("--grafana-url", self.grafana_url)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ServeConfigError("TLS needs both --tls-cert and --tls-key")
        if self.prometheus_url is not None:
            require_http_url("--prometheus-url", self.prometheus_url)
            if not self.prometheus_interval_s > 0:
                raise ServeConfigError("--prometheus-interval must be a positive number of seconds")
        if not upb_active():
            log.warning("protobuf runs on its pure-Python backend: OTLP decoding is ~20x slower; "
                        "install a protobuf wheel with the upb backend")


def spool_path(db: str) -> Path:
    """Where ``serve`` keeps the exports it acknowledged and has not committed yet (correlator/store/spool.py)."""
    return Path(f"{db}.spool")


def sidecar_path(db: str) -> Path:
    """Where a running ``serve`` says how to reach its API, so the CLI can query a locked database."""
    return Path(f"{db}.serve.json")


class _UvicornThread:
    def __init__(self, app: Any, host: str, port: int, cfg: ServeConfig) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_keep_alive=30, limit_concurrency=256, access_log=False,
                                ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}", daemon=True)

    def start(self, timeout_s: float = 10.0) -> int:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError("HTTP server did not start (address in use?)")
            time.sleep(0.01)
        sock: socket.socket = self.server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Correlator:
    """Everything ``stacklens serve`` runs. ``start`` returns the bound addresses (ports 0 are resolved)."""

    def __init__(self, config: ServeConfig,
                 extra_routes: Callable[[Store, IngestStats], list[BaseRoute]] | None = None) -> None:
        config.validate()
        self.config = config
        self.stats = IngestStats()
        self.store: Store | None = None
        self._http: list[_UvicornThread] = []
        self._grpc: Any = None
        self._extra_routes = extra_routes
        self._background: list[Any] = []
        self.puller: Any = None  # the PrometheusPuller when --prometheus-url is given
        self.detector: Any = None  # the OnlineDetector unless --detect-interval 0
        self.addresses: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        cfg = self.config
        spool = Spool(spool_path(cfg.db), decode_record) if cfg.spool else None
        self.store = store = Store(cfg.db, threads=cfg.db_threads, spool=spool)
        sink = BatchSink(store.submit)
        scheme = "https" if cfg.tls_cert else "http"
        if cfg.otlp_grpc:
            creds = None
            if cfg.tls_cert and cfg.tls_key:
                import grpc

                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self._grpc, port = start_grpc_server(cfg.otlp_grpc, store.submit, cfg.limits, self.stats, cfg.token,
                                                 credentials=creds)
            self.addresses["otlp_grpc"] = f"{split_address(cfg.otlp_grpc)[0]}:{port}"
        ingest = otlp_routes(sink, cfg.limits, self.stats, cfg.token)
        api_routes = self._extra_routes(store, self.stats) if self._extra_routes else []
        same = cfg.api is not None and cfg.otlp_http is not None and cfg.api == cfg.otlp_http
        if cfg.otlp_http:
            host, port = split_address(cfg.otlp_http)
            t = _UvicornThread(Starlette(routes=ingest + (api_routes if same else [])), host, port, cfg)
            self._http.append(t)
            self.addresses["otlp_http"] = f"{scheme}://{host}:{t.start()}"
        if cfg.api and not same:
            host, port = split_address(cfg.api)
            t = _UvicornThread(Starlette(routes=api_routes), host, port, cfg)
            self._http.append(t)
            self.addresses["api"] = f"{scheme}://{host}:{t.start()}"
        elif same:
            self.addresses["api"] = self.addresses["otlp_http"]
        if cfg.prometheus_url:
            from correlator.ingest.prometheus_pull import PrometheusPuller

            puller = PrometheusPuller(cfg.prometheus_url, cfg.prometheus_interval_s, store,
                                      settle_s=min(5.0, cfg.prometheus_interval_s))
            puller.start()
            self.add_background(puller)
            self.puller = puller
        if cfg.detect_interval_s > 0:
            from correlator.analysis.online import OnlineDetector
            from correlator.server.grafana_annotations import GrafanaAnnotator

            annotator = GrafanaAnnotator(cfg.grafana_url, cfg.grafana_token or "") if cfg.grafana_url else None
            self.detector = OnlineDetector(store, cfg.detect_interval_s, sink=annotator)
            self.detector.start()
            self.add_background(self.detector)
        sidecar_path(cfg.db).write_text(json.dumps({"pid": os.getpid(), **self.addresses}))
        return self.addresses

    def add_background(self, stoppable: Any) -> None:
        """Something with ``stop()`` that runs alongside (the Prometheus puller, the online detector)."""
        self._background.append(stoppable)

    def stop(self) -> None:
        for b in self._background:
            b.stop()
        for t in self._http:
            t.stop()
        if self._grpc is not None:
            self._grpc.stop(grace_s=5)
        if self.store is not None:
            self.store.close()
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(self.config.db).unlink()
