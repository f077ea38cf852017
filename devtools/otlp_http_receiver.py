"""A minimal OTLP/HTTP metrics receiver for the real-GPU check: parses every request with the official
protobuf classes and writes a summary (points per metric, first/last point time, last values)."""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

summary: dict[str, Any] = {"requests": 0, "bytes": 0, "metrics": {}, "resource": {}}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        req = ExportMetricsServiceRequest.FromString(body)
        with lock:
            summary["requests"] += 1
            summary["bytes"] += len(body)
            for rm in req.resource_metrics:
                summary["resource"] = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        dps = m.gauge.data_points or m.sum.data_points
                        e = summary["metrics"].setdefault(m.name, {"unit": m.unit, "points": 0, "missing": 0,
                                                                   "first_ns": None, "last_ns": 0, "last": None})
                        for dp in dps:
                            e["points"] += 1
                            e["missing"] += dp.flags & 1
                            e["first_ns"] = e["first_ns"] or dp.time_unix_nano
                            e["last_ns"] = max(e["last_ns"], dp.time_unix_nano)
                            e["last"] = dp.as_double
        out = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        return


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=14318)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=60)
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    threading.Timer(a.seconds, server.shutdown).start()
    server.serve_forever()
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
