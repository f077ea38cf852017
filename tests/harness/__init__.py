"""Test harnesses that run real telemetry servers on 127.0.0.1.

* :mod:`tests.harness.prometheus_server` starts Debian's real ``prometheus`` binary and
  queries it over its HTTP API.
* :mod:`tests.harness.otlp_sink` is a real OTLP receiver (gRPC and HTTP/protobuf, metrics
  and traces) that records what it receives and can be told to fail or go away.
* :mod:`tests.harness.fixtures` has the pytest glue (skip/fail policy when the prometheus
  binary is missing, and ready-made fixtures).

The submodules are imported explicitly by tests; this package module imports nothing so
that importing one harness does not pull in the dependencies of the other.
"""
