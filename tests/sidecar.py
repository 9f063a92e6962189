"""A stand-in for the Istio sidecar's status endpoints, on 127.0.0.1."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn:
    """Answers GET /healthz/ready with ``ready_status`` and records POST /quitquitquit."""

    def __init__(self, ready_status: int = 503) -> None:
        self.ready_status = ready_status
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.requests.append(f"GET {self.path}")
                status = stand_in.ready_status if self.path == "/healthz/ready" else 404
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                stand_in.requests.append(f"POST {self.path}")
                self.send_response(200 if self.path == "/quitquitquit" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz/ready"

    @property
    def quit_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/quitquitquit"

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
