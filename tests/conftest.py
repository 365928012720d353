"""Shared fixtures: a loopback HTTP server that serves handcrafted responses.

Tests register routes (``server.add(path, body=..., status=..., headers=...)``) and get
URLs back; nothing leaves 127.0.0.1. Special behaviours a real web server shows now and
then are per-route flags: ``delay_s`` (sleep before answering, for timeouts),
``short_by`` (declare more Content-Length than is sent, then close: a cut transfer),
``chunked`` (no Content-Length).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The downloader honours proxy variables like urllib does; the fixture server is local.
os.environ["no_proxy"] = "127.0.0.1,localhost"


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    short_by: int = 0
    chunked: bool = False


class FixtureServer:
    """A ThreadingHTTPServer on 127.0.0.1 (free port) answering from a route table."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self.user_agents: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # http.server calls do_<METHOD>
                path = self.path.split("?", 1)[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                server.user_agents.append(self.headers.get("User-Agent", ""))
                route = server.routes.get(path, Route(body=b"not found", status=404))
                if route.delay_s:
                    time.sleep(route.delay_s)
                try:
                    self.send_response(route.status)
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    if route.chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        for start in range(0, len(route.body), 4096):
                            piece = route.body[start : start + 4096]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(len(route.body) + route.short_by))
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(route.body)
                    self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (too large, timeout): expected in tests

        class Server(ThreadingHTTPServer):
            # The default backlog of 5 drops bursts of connections; the client's SYN
            # retry then takes 1 s and looks like a timeout.
            request_queue_size = 128

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, path: str, **route: object) -> str:
        """Serve ``Route(**route)`` at ``path``; return its full URL."""
        self.routes[path] = Route(**route)  # type: ignore[arg-type]
        return self.base + path

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def http_server() -> Iterator[FixtureServer]:
    server = FixtureServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The test run's Ray session; yields its GCS address for subprocesses to join."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
