"""OTLP transports for encoded metrics requests: gRPC and HTTP/protobuf.

Configuration follows the OpenTelemetry exporter specification: ``OTEL_EXPORTER_OTLP_[METRICS_]``
``ENDPOINT``, ``PROTOCOL``, ``HEADERS``, ``TIMEOUT``, ``COMPRESSION``, ``INSECURE`` and ``CERTIFICATE``,
with the agent's flags taking precedence. A transport only sends; retrying and buffering are the
export queue's job.
"""

from __future__ import annotations

import gzip
import http.client
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Protocol_ = Literal["grpc", "http/protobuf"]

_GRPC_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
# gRPC status codes the OTLP specification calls retryable
_GRPC_RETRYABLE = {"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS",
                   "RESOURCE_EXHAUSTED"}
_HTTP_RETRYABLE = {429, 502, 503, 504}


class ExportError(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class ConfigError(ValueError):
    """A configuration the agent cannot start with (exit code 2)."""


class MetricsTransport(Protocol):
    def send(self, payload: bytes) -> None:
        """Send one serialized ExportMetricsServiceRequest; raise :class:`ExportError` on failure."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    endpoint: str
    protocol: Protocol_ = "http/protobuf"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    compression: Literal["gzip", "none"] = "none"
    insecure: bool | None = None
    certificate: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


def parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    """``k1=v1,k2=v2`` with URL-encoded values, as OTEL_EXPORTER_OTLP_HEADERS."""
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"malformed OTLP header {item.strip()!r}: expected key=value")
        out.append((urllib.parse.unquote(key.strip()).lower(), urllib.parse.unquote(value.strip())))
    return tuple(out)


def config_from_env(
    env: Mapping[str, str],
    endpoint: str | None = None,
    protocol: str | None = None,
    headers: str | None = None,
) -> OtlpConfig | None:
    """Resolve the OTLP metrics exporter configuration; None when no endpoint is configured at all."""

    def get(name: str) -> str | None:
        return env.get(f"OTEL_EXPORTER_OTLP_METRICS_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")

    proto = (protocol or get("PROTOCOL") or "http/protobuf").strip()
    if proto not in ("grpc", "http/protobuf"):
        raise ConfigError(f"unsupported OTLP protocol {proto!r}: use grpc or http/protobuf")
    signal_endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    # The flag and OTEL_EXPORTER_OTLP_ENDPOINT are base endpoints: over HTTP they get the signal path
    # appended (unless it is already there); the signal-specific variable is used as it is.
    if endpoint or (base_endpoint and not signal_endpoint):
        url = endpoint or base_endpoint or ""
        is_base = True
    elif signal_endpoint:
        url, is_base = signal_endpoint, False
    else:
        return None
    if proto == "http/protobuf" and is_base and not url.rstrip("/").endswith("/v1/metrics"):
        url = url.rstrip("/") + "/v1/metrics"
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    if proto == "http/protobuf" and parsed.scheme not in ("http", "https"):
        raise ConfigError(f"OTLP HTTP endpoint must be http:// or https://, got {url!r}")
    if not parsed.hostname:
        raise ConfigError(f"OTLP endpoint has no host: {url!r}")
    timeout_ms = get("TIMEOUT")
    try:
        timeout_s = float(timeout_ms) / 1000.0 if timeout_ms else 10.0
    except ValueError:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT must be milliseconds, got {timeout_ms!r}") from None
    compression = (get("COMPRESSION") or "none").strip().lower()
    if compression not in ("gzip", "none"):
        raise ConfigError(f"unsupported OTLP compression {compression!r}: use gzip or none")
    insecure_text = get("INSECURE")
    insecure = None if insecure_text is None else insecure_text.strip().lower() == "true"
    header_text = headers if headers is not None else (get("HEADERS") or "")
    return OtlpConfig(
        endpoint=url,
        protocol="grpc" if proto == "grpc" else "http/protobuf",
        headers=parse_headers(header_text),
        timeout_s=timeout_s,
        compression="gzip" if compression == "gzip" else "none",
        insecure=insecure,
        certificate=get("CERTIFICATE"),
    )


class HttpTransport:
    """OTLP/HTTP with protobuf bodies over one kept-alive connection.

    A failure closes the connection and is reported as retryable; the export queue retries on a new
    connection after its backoff. No retry happens here: re-sending a POST whose response was lost
    could deliver it twice."""

    def __init__(self, config: OtlpConfig) -> None:
        self._config = config
        self._url = config.endpoint if "://" in config.endpoint else f"http://{config.endpoint}"
        parsed = urllib.parse.urlparse(self._url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "localhost"
        self._port = parsed.port or (443 if self._https else 80)
        self._path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": "stacklens-agent"}
        self._headers.update(dict(config.headers))
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._context: Any = None
        if self._https:
            import ssl

            self._context = ssl.create_default_context(cafile=config.certificate)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._config.timeout_s,
                                                         context=self._context)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._config.timeout_s)
        return self._conn

    def send(self, payload: bytes) -> None:
        body = gzip.compress(payload, compresslevel=1) if self._config.compression == "gzip" else payload
        conn = self._connection()
        try:
            conn.request("POST", self._path, body=body, headers=self._headers)
            response = conn.getresponse()
            detail = response.read()
        except (http.client.HTTPException, OSError) as exc:
            self.close()
            raise ExportError(f"cannot reach {self._url}: {exc}", True) from None
        if response.will_close:
            self.close()
        if not 200 <= response.status < 300:
            text = detail[:200].decode(errors="replace")
            raise ExportError(f"HTTP {response.status} from {self._url}: {text}", response.status in _HTTP_RETRYABLE)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class GrpcTransport:
    def __init__(self, config: OtlpConfig) -> None:
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

        self._grpc = grpc
        self._config = config
        parsed = urllib.parse.urlparse(config.endpoint if "://" in config.endpoint else f"//{config.endpoint}")
        target = parsed.netloc or config.endpoint
        secure = parsed.scheme == "https" or (config.insecure is False and parsed.scheme != "http")
        options = [("grpc.max_send_message_length", 64 << 20)]
        if secure:
            root = Path(config.certificate).read_bytes() if config.certificate else None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._call = self._channel.unary_unary(
            _GRPC_METHOD,
            request_serializer=None,  # payload is already serialized
            response_deserializer=metrics_service_pb2.ExportMetricsServiceResponse.FromString,
        )
        self._metadata = tuple(config.headers)
        self._compression = grpc.Compression.Gzip if config.compression == "gzip" else None

    def send(self, payload: bytes) -> None:
        grpc = self._grpc
        try:
            self._call(payload, timeout=self._config.timeout_s, metadata=self._metadata,
                       compression=self._compression)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise ExportError(f"gRPC {name} from {self._config.endpoint}: {details}", name in _GRPC_RETRYABLE) from None

    def close(self) -> None:
        self._channel.close()


def make_transport(config: OtlpConfig) -> MetricsTransport:
    return GrpcTransport(config) if config.protocol == "grpc" else HttpTransport(config)
