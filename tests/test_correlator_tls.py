"""``stacklens serve --tls-cert/--tls-key``: both receivers speak TLS with the given certificate. The real
OpenTelemetry SDK exporters, trusting only a self-signed certificate made by the test (openssl), deliver over
OTLP/HTTPS and OTLP/gRPC with TLS; clients that do not trust it, or speak plaintext, get nothing stored."""

from __future__ import annotations

import http.client
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from typer.testing import CliRunner

from collector.engine_spans import VllmSpanEmitter, engine_resource
from correlator.cli import app
from correlator.server.serve import Correlator, ServeConfig, ServeConfigError

T0 = 1_790_000_000_000_000_000


def self_signed(tmp: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (openssl, EC P-256, one day)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_correlator(tmp_path: Path) -> Iterator[tuple[Correlator, Path]]:
    cert, key = self_signed(tmp_path)
    c = Correlator(ServeConfig(db=str(tmp_path / "tls.duckdb"), otlp_grpc="127.0.0.1:0", otlp_http="127.0.0.1:0",
                               api=None, tls_cert=str(cert), tls_key=str(key)))
    c.start()
    try:
        yield c, cert
    finally:
        c.stop()


class Req:
    def __init__(self, i: int) -> None:
        self.request_id, self.arrival_ns = f"tls-{i}", T0 + i * 10**7
        self.queue_s, self.prefill_s, self.decode_s = 0.002 * i, 0.04, 0.6
        self.ttft_s = self.queue_s + self.prefill_s
        self.e2e_s = self.ttft_s + self.decode_s
        self.end_ns = self.arrival_ns + round(self.e2e_s * 1e9)
        self.prompt_tokens, self.output_tokens, self.finish_reason = 50 + i, 10, "stop"


def _rows(c: Correlator, sql: str) -> list[tuple[Any, ...]]:
    assert c.store is not None
    c.store.flush()  # acknowledged exports are committed within about a second (the spool); now, for the test
    with c.store.reader() as cur:
        return list(cur.execute(sql).fetchall())


def test_sdk_exporters_deliver_over_https_and_grpc_tls(tls_correlator: tuple[Correlator, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    c, cert = tls_correlator
    # requests lets these variables override the exporter's certificate_file (its session-level verify)
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    http_url, grpc_addr = c.addresses["otlp_http"], c.addresses["otlp_grpc"]
    assert http_url.startswith("https://")
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    exporters: list[tuple[str, Any]] = [
        ("h", HttpSpanExporter(endpoint=f"{http_url}/v1/traces", certificate_file=str(cert))),
        ("g", GrpcSpanExporter(endpoint=grpc_addr, insecure=False, credentials=creds)),
    ]
    for prefix, exporter in exporters:
        emitter = VllmSpanEmitter(engine_resource("vllm", "node-tls", 99, model="m"), exporter)
        for i in range(50):
            r = Req(i)
            r.request_id = f"{prefix}-{i}"
            emitter.emit(r)
        assert emitter.flush()
        emitter.shutdown()
    rows = _rows(c, "SELECT substr(request_id, 1, 1), count(*), min(ttft_s), max(queue_s) FROM requests GROUP BY 1 "
                    "ORDER BY 1")
    assert rows == [("g", 50, pytest.approx(0.04), pytest.approx(0.098)),
                    ("h", 50, pytest.approx(0.04), pytest.approx(0.098))]

    reader = PeriodicExportingMetricReader(
        GrpcMetricExporter(endpoint=grpc_addr, insecure=False, credentials=creds), export_interval_millis=60_000)
    provider = MeterProvider(resource=Resource.create({"service.name": "vllm", "host.name": "node-tls"}),
                             metric_readers=[reader])
    provider.get_meter("tls").create_counter("vllm_prompt_tokens").add(123)  # the SDK refuses ":" in names
    assert provider.force_flush()
    provider.shutdown()
    assert _rows(c, "SELECT s.name, max(value) FROM engine_samples JOIN signals s USING (signal_id) GROUP BY 1") == [
        ("engine_prompt_tokens_total", 123.0)]


def test_untrusted_or_plaintext_clients_store_nothing(tls_correlator: tuple[Correlator, Path],
                                                      tmp_path: Path) -> None:
    c, _cert = tls_correlator
    host, port = c.addresses["otlp_http"].removeprefix("https://").rsplit(":", 1)
    body = ExportTraceServiceRequest().SerializeToString()
    # a client that trusts only another certificate refuses the handshake
    other, _ = self_signed(tmp_path, "other")
    ctx = ssl.create_default_context(cafile=str(other))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
    conn.close()
    # plaintext HTTP to the TLS port gets no OTLP answer
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        plain.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
        assert plain.getresponse().status != 200
    except (ConnectionError, http.client.HTTPException):
        pass
    finally:
        plain.close()
    # plaintext gRPC to the TLS port never reaches the service
    with grpc.insecure_channel(c.addresses["otlp_grpc"]) as ch:
        export = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as e:
            export(body, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _rows(c, "SELECT count(*) FROM requests") == [(0,)]


def test_tls_needs_both_cert_and_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with pytest.raises(ServeConfigError):
        ServeConfig(db=str(tmp_path / "x.duckdb"), tls_cert=str(cert)).validate()
    res = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "x.duckdb"), "--tls-key", str(key)])
    assert res.exit_code == 2
    assert "--tls-cert" in res.output
