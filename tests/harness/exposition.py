"""A static Prometheus exposition served on 127.0.0.1 for a real Prometheus to scrape in tests (the
exporters a test stands in for: dcgm-exporter, a vLLM server); it records when each scrape arrived."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable
from typing import Any


class StaticExposition:
    """``render(n)`` gives the page of the n-th scrape (1-based)."""

    def __init__(self, render: Callable[[int], str]) -> None:
        self.scrapes: list[float] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.scrapes.append(time.time())
                body = render(len(outer.scrapes)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
