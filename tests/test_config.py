"""Configuration: precedence flags > env > file > defaults, and clear errors for malformed input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from collector.config import ConfigError, env_var, parse_duration, resolve_settings
from collector.export.otlp_transport import config_from_env, parse_headers


@pytest.mark.parametrize(("text", "seconds"), [("100ms", 0.1), ("1s", 1.0), ("2m", 120.0), ("1.5", 1.5),
                                                (" 250ms ", 0.25), ("1h", 3600.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "interval") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "1 sec", "-1s", "", "1d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="interval"):
        parse_duration(text, "interval")


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ninterval = "5s"\nprometheus_port = 9500\nseed = 3\n')
    env = {env_var("interval_s"): "2s", env_var("prometheus_port"): "9600", "NODE_NAME": "k8s-n1"}
    s = resolve_settings({"interval_s": "250ms"}, env, cfg)
    assert s.interval_s == 0.25  # flag
    assert s.prometheus_port == 9600  # env over file
    assert s.seed == 3  # file
    assert s.k8s_node_name == "k8s-n1" and s.node_name == "k8s-n1"


@pytest.mark.parametrize(("content", "message"), [
    ("interval = [", "not valid TOML"),
    ("intervall = '1s'", "unknown setting"),
    ("interval = '10ms'", "between 100ms and 1h"),
    ("prometheus_port = 'x'", "expected an integer"),
    ("simulate = 'maybe'", "expected true or false"),
])
def test_malformed_config_file_names_the_problem(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message):
        resolve_settings({}, {}, cfg)


def test_malformed_config_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("interval = 'soon'\n")
    proc = subprocess.run(  # noqa: PLW1510 - the tests read returncode
        [sys.executable, "-m", "collector.cli", "--config", str(cfg), "--simulate", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr and "interval" in proc.stderr
    missing = subprocess.run(  # noqa: PLW1510 - the tests read returncode
        [sys.executable, "-m", "collector.cli", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_otlp_env_follows_the_specification() -> None:
    base = config_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert base is not None and base.endpoint == "http://collector:4318/v1/metrics"
    assert base.protocol == "http/protobuf"
    signal = config_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                              "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://b:9999/custom"})
    assert signal is not None and signal.endpoint == "http://b:9999/custom"  # used as is
    grpc = config_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "corr:4317",
                            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-tenant=t1",
                            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    assert grpc is not None and grpc.endpoint == "corr:4317" and grpc.protocol == "grpc"
    assert grpc.headers == (("authorization", "Bearer abc"), ("x-tenant", "t1"))
    assert grpc.timeout_s == 2.5 and grpc.compression == "gzip"
    flag = config_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:1"}, endpoint="http://flag:4318")
    assert flag is not None and flag.endpoint == "http://flag:4318/v1/metrics"
    assert config_from_env({}) is None


@pytest.mark.parametrize("env", [
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://a:1"},
])
def test_otlp_env_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        config_from_env(env)


def test_parse_headers_rejects_malformed() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        parse_headers("novalue")
