"""pytest glue for the telemetry harnesses.

Prometheus availability policy
------------------------------
Tests that need the real Prometheus server call :func:`require_prometheus` (directly, or
through the :func:`prometheus_factory` fixture, which calls it for them).

* Locally, when the ``prometheus`` binary is absent, those tests are **skipped** (with a
  message saying how to install it: ``apt-get install prometheus`` on Debian/Ubuntu).
* CI sets ``STACKLENS_REQUIRE_PROMETHEUS=1``. Then a missing binary is a **hard failure**,
  so the end-to-end Prometheus tests can never silently turn into skips there.

``STACKLENS_PROMETHEUS_BIN`` may point at a specific binary (see
:func:`tests.harness.prometheus_server.prometheus_binary`).

Fixtures
--------
:func:`prometheus_factory` yields a callable with the same arguments as
:class:`~tests.harness.prometheus_server.PrometheusServer`; every server it starts is shut
down at teardown. :func:`otlp_sink` yields a started
:class:`~tests.harness.otlp_sink.OtlpSink`. To use them in a test module, bind them to
module-level names (``prometheus_factory = fixtures.prometheus_factory``) or list this module
in ``pytest_plugins`` of the root ``conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pytest

from tests.harness.otlp_sink import OtlpSink
from tests.harness.prometheus_server import PrometheusServer, ScrapeTarget, prometheus_binary

__all__ = [
    "REQUIRE_PROMETHEUS_ENV",
    "PrometheusFactory",
    "otlp_sink",
    "prometheus_available",
    "prometheus_factory",
    "prometheus_required",
    "require_prometheus",
]

REQUIRE_PROMETHEUS_ENV = "STACKLENS_REQUIRE_PROMETHEUS"
_TRUE = frozenset({"1", "true", "yes", "on"})


def prometheus_available() -> bool:
    """True when a ``prometheus`` binary can be found."""
    return prometheus_binary() is not None


def prometheus_required() -> bool:
    """True when ``$STACKLENS_REQUIRE_PROMETHEUS`` is set to a true value (as in CI)."""
    return os.environ.get(REQUIRE_PROMETHEUS_ENV, "").strip().lower() in _TRUE


def require_prometheus() -> str:
    """Return the prometheus binary path, or skip the test (locally) / fail it (in CI).

    Must be called from inside a test or fixture (it uses ``pytest.skip``/``pytest.fail``).
    """
    binary = prometheus_binary()
    if binary is not None:
        return binary
    override = os.environ.get("STACKLENS_PROMETHEUS_BIN")
    where = f"$STACKLENS_PROMETHEUS_BIN={override!r}" if override else "PATH"
    message = (
        f"prometheus binary not found (looked in {where}; install it with "
        "`apt-get install prometheus`, or point $STACKLENS_PROMETHEUS_BIN at one)"
    )
    if prometheus_required():
        pytest.fail(f"{message}; {REQUIRE_PROMETHEUS_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(message)


class PrometheusFactory(Protocol):
    """Starts a PrometheusServer (same arguments as its constructor), stopped at teardown."""

    def __call__(
        self,
        targets: Sequence[ScrapeTarget | str] | ScrapeTarget | str = ...,
        **kwargs: Any,
    ) -> PrometheusServer: ...


@pytest.fixture
def prometheus_factory() -> Iterator[PrometheusFactory]:
    """Yield a factory that starts real Prometheus servers; skips/fails per the policy above."""
    binary = require_prometheus()
    servers: list[PrometheusServer] = []

    def start(
        targets: Sequence[ScrapeTarget | str] | ScrapeTarget | str = (),
        **kwargs: Any,
    ) -> PrometheusServer:
        kwargs.setdefault("binary", binary)
        server = PrometheusServer(targets, **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            server.close()


@pytest.fixture
def otlp_sink() -> Iterator[OtlpSink]:
    """Yield a started OtlpSink (gRPC + HTTP on 127.0.0.1), closed at teardown."""
    with OtlpSink() as sink:
        yield sink


@pytest.fixture
def correlator(tmp_path: Any) -> Iterator[Any]:
    """A started :class:`~correlator.server.serve.Correlator` on free loopback ports, over a DuckDB file
    in ``tmp_path``; stopped at teardown."""
    from correlator.server.serve import Correlator, ServeConfig

    c = Correlator(ServeConfig(db=str(tmp_path / "c.duckdb"), otlp_grpc="127.0.0.1:0", otlp_http="127.0.0.1:0",
                               api="127.0.0.1:0"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
