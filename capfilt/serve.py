"""A loopback HTTP server for a directory, with routes that misbehave on purpose.

The demo serves the synthetic corpus over HTTP so the pipeline downloads it exactly as it would
download LAION; tests use the same server, plus the special routes below, to produce every failure a
downloader meets on the web. It binds 127.0.0.1 only: nothing here is meant to be reachable from
another machine.

Routes (stable: download tests depend on them). ``REST`` is any other route or a file path:

==================================  ================================================================
``/PATH``                           the file ``DIR/PATH`` (GET and HEAD); 404 if missing or a
                                    directory, 403 for paths escaping ``DIR``
``/status/CODE``                    an empty-ish response with status ``CODE`` (e.g. 404, 500, 503)
``/slow/SECONDS[/REST]``            waits ``SECONDS`` (float, at most 60) before answering ``REST``
                                    (or a short text body): provokes client timeouts
``/redirect/N/REST``                N chained 302 redirects, then ``REST``
``/redirect-loop``                  302 to itself, forever
``/header/VALUE/REST``              ``REST`` with an added ``X-Robots-Tag: VALUE`` header (VALUE is
                                    URL-decoded, e.g. ``noai``, ``capfilt:%20noimageai``); nest it
                                    for several X-Robots-Tag lines
``/truncated/FILE``                 the first half of ``FILE``'s bytes, with a matching
                                    Content-Length (the transfer succeeds, the image does not decode);
                                    FILE is a path under DIR or ``gen/WxH.EXT``
``/cut/FILE``                       announces ``FILE``'s full Content-Length, sends half, closes
                                    (the transfer itself fails)
``/flaky/N/REST``                   503 for the first N requests of this exact path, then ``REST``
``/empty``                          200, ``image/jpeg``, zero bytes
``/html``                           200, ``text/html``: a page where an image was expected
``/big[/NBYTES]``                   200, ``image/jpeg``, NBYTES (default 25,000,000) zero bytes,
                                    streamed: exceeds a 20 MB download limit
``/gen/WxH.EXT``                    a generated W x H image (EXT jpg, png or webp; W, H <= 4096)
==================================  ================================================================

Tests may add their own routes: ``LoopbackServer(directory=..., routes={"name": fn})`` sends
``/name/REST`` to ``fn(handler, rest)``, where ``handler.reply(...)`` answers.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

from capfilt.errors import UserError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

CONTENT_TYPES: dict[str, str] = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
    ".tar": "application/x-tar",
}

BIG_DEFAULT_BYTES = 25_000_000
"""Default size of ``/big``: above the default ``download.max_bytes`` of 20,000,000."""

MAX_SLOW_SECONDS = 60.0
MAX_GEN_SIDE = 4096
_CHUNK = 64 * 1024

Route = Callable[["LoopbackHandler", str], None]
"""A custom route: called with the handler and the rest of the path after ``/name/``."""


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that joins its handler threads on close and keeps route state."""

    daemon_threads = False  # server_close() joins every handler thread: nothing outlives the server
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, *, root: Path, port: int, routes: Mapping[str, Route]) -> None:
        self.root = root
        self.routes = dict(routes)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.flaky_counts: dict[str, int] = {}
        self.request_log: list[tuple[str, str]] = []
        super().__init__((HOST, port), LoopbackHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up early (timeouts, size limits) are expected: no tracebacks for those."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            logger.debug("client %s went away: %s", client_address, error)
        else:
            logger.warning("error serving %s", client_address, exc_info=True)


class LoopbackHandler(BaseHTTPRequestHandler):
    """Answers one request (HTTP/1.0: one request per connection, so no idle keep-alive threads)."""

    server: _Server
    server_version = "capfilt-serve"
    _extra_headers: list[tuple[str, str]]  # set per request; each /header/ adds one
    timeout = 10  # seconds a silent client may hold a connection, which bounds shutdown time

    def do_GET(self) -> None:
        self._dispatch_request()

    def do_HEAD(self) -> None:
        self._dispatch_request()

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # ---- replying ---------------------------------------------------------------------------------

    def reply(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        """Send a whole response; HEAD gets the same headers and no body.

        ``content_length`` overrides the announced length (``/cut`` lies with it).
        """
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for name, value in [*self._extra_headers, *(headers or {}).items()]:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _stream_zeros(self, nbytes: int, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(nbytes))
        for name, value in self._extra_headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        chunk = bytes(_CHUNK)
        sent = 0
        while sent < nbytes and not self.server.stopping.is_set():
            part = chunk[: min(_CHUNK, nbytes - sent)]
            self.wfile.write(part)
            sent += len(part)

    # ---- routing ----------------------------------------------------------------------------------

    def _dispatch_request(self) -> None:
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.request_log.append((self.command, path))
        self._extra_headers = []
        try:
            self._route(path.lstrip("/"))
        except (ConnectionError, TimeoutError):
            raise
        except _BadRequest as error:
            self.reply(400, f"{error}\n".encode())

    def _route(self, rest: str) -> None:
        name, _, tail = rest.partition("/")
        if name in self.server.routes:
            self.server.routes[name](self, tail)
            return
        builtin = _BUILTINS.get(name)
        if builtin is not None:
            builtin(self, tail)
        else:
            self._file(rest)

    def _resolve(self, rest: str) -> Path | None:
        """The file a path names, None if absent; raises _Forbidden for paths escaping the root."""
        parts = [unquote(p) for p in rest.split("/") if p]
        if any(p in ("..", ".") or "/" in p or "\\" in p for p in parts):
            raise _Forbidden(rest)
        target = self.server.root.joinpath(*parts)
        if not target.resolve().is_relative_to(self.server.root.resolve()):
            raise _Forbidden(rest)
        return target if target.is_file() else None

    def _file_body(self, rest: str) -> tuple[bytes, str] | None:
        """Body and content type of what ``rest`` names (a file or a /gen image), None if absent."""
        if rest.startswith("gen/"):
            return _generated_image(rest[len("gen/") :])
        try:
            target = self._resolve(rest)
        except _Forbidden:
            return None
        if target is None:
            return None
        return target.read_bytes(), CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")

    def _file(self, rest: str) -> None:
        try:
            target = self._resolve(rest)
        except _Forbidden:
            self.reply(403, b"forbidden\n")
            return
        if target is None:
            self.reply(404, b"not found\n")
            return
        content_type = CONTENT_TYPES.get(target.suffix.lower(), "application/octet-stream")
        self.reply(200, target.read_bytes(), content_type=content_type)

    # ---- built-in routes ----------------------------------------------------------------------------

    def _status(self, tail: str) -> None:
        code = _int_arg(tail, "status code")
        if not 200 <= code <= 599:
            raise _BadRequest(f"status code {code} outside 200..599")
        self.reply(code, b"" if code in (204, 304) else f"status {code}\n".encode())

    def _slow(self, tail: str) -> None:
        seconds_text, _, rest = tail.partition("/")
        try:
            seconds = float(seconds_text)
        except ValueError:
            raise _BadRequest(f"slow: {seconds_text!r} is not a number of seconds") from None
        if not 0 <= seconds <= MAX_SLOW_SECONDS:
            raise _BadRequest(f"slow: seconds must be within 0..{MAX_SLOW_SECONDS:g}")
        if self.server.stopping.wait(seconds):
            return  # shutting down: hang up without an answer
        if rest:
            self._route(rest)
        else:
            self.reply(200, b"slow\n")

    def _redirect(self, tail: str) -> None:
        count_text, _, rest = tail.partition("/")
        count = _int_arg(count_text, "redirect count")
        if count < 0:
            raise _BadRequest("redirect count must not be negative")
        if count == 0:
            self._route(rest)
        else:
            self.reply(302, b"", headers={"Location": f"/redirect/{count - 1}/{rest}"})

    def _redirect_loop(self, tail: str) -> None:
        self.reply(302, b"", headers={"Location": "/redirect-loop"})

    def _header(self, tail: str) -> None:
        value, _, rest = tail.partition("/")
        value = unquote(value)
        if "\r" in value or "\n" in value:
            raise _BadRequest("header value must be one line")
        # Nested /header/ routes send one X-Robots-Tag line each, as servers addressing several
        # user agents do ("X-Robots-Tag: otherbot: noai" then "X-Robots-Tag: noindex").
        self._extra_headers.append(("X-Robots-Tag", value))
        self._route(rest)

    def _truncated(self, tail: str) -> None:
        found = self._file_body(tail)
        if found is None:
            self.reply(404, b"not found\n")
            return
        body, content_type = found
        self.reply(200, body[: len(body) // 2], content_type=content_type)

    def _cut(self, tail: str) -> None:
        found = self._file_body(tail)
        if found is None:
            self.reply(404, b"not found\n")
            return
        body, content_type = found
        self.reply(200, body[: len(body) // 2], content_type=content_type, content_length=len(body))
        self.close_connection = True

    def _flaky(self, tail: str) -> None:
        count_text, _, rest = tail.partition("/")
        failures = _int_arg(count_text, "flaky count")
        key = urlsplit(self.path).path
        with self.server.lock:
            seen = self.server.flaky_counts.get(key, 0)
            self.server.flaky_counts[key] = seen + 1
        if seen < failures:
            self.reply(503, b"try again\n", headers={"Retry-After": "0"})
        else:
            self._route(rest)

    def _empty(self, tail: str) -> None:
        self.reply(200, b"", content_type="image/jpeg")

    def _html(self, tail: str) -> None:
        page = b"<!doctype html><html><head><title>Not an image</title></head><body>hello</body></html>\n"
        self.reply(200, page, content_type="text/html; charset=utf-8")

    def _big(self, tail: str) -> None:
        nbytes = _int_arg(tail, "big size") if tail else BIG_DEFAULT_BYTES
        if nbytes < 0:
            raise _BadRequest("big size must not be negative")
        self._stream_zeros(nbytes, "image/jpeg")

    def _gen(self, tail: str) -> None:
        found = _generated_image(tail)
        if found is None:
            raise _BadRequest(f"gen: expected WxH.jpg|png|webp with sides 1..{MAX_GEN_SIDE}, got {tail!r}")
        body, content_type = found
        self.reply(200, body, content_type=content_type)


class _BadRequest(Exception):
    """A special route was called with arguments it cannot use: answered with 400."""


class _Forbidden(Exception):
    """A path that would escape the served directory."""


def _int_arg(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _BadRequest(f"{what}: {text!r} is not an integer") from None


_GEN_RE = re.compile(r"^(\d+)x(\d+)\.(jpg|jpeg|png|webp)$")


def _generated_image(spec: str) -> tuple[bytes, str] | None:
    """A W x H image with a diagonal gradient (so resizing and decoding have something to do)."""
    match = _GEN_RE.match(spec)
    if match is None:
        return None
    width, height, ext = int(match[1]), int(match[2]), match[3]
    if not (1 <= width <= MAX_GEN_SIDE and 1 <= height <= MAX_GEN_SIDE):
        return None
    from PIL import Image

    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    buf = BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue(), CONTENT_TYPES[f".{ext}"]


_BUILTINS: dict[str, Callable[[LoopbackHandler, str], None]] = {
    "status": LoopbackHandler._status,
    "slow": LoopbackHandler._slow,
    "redirect": LoopbackHandler._redirect,
    "redirect-loop": LoopbackHandler._redirect_loop,
    "header": LoopbackHandler._header,
    "truncated": LoopbackHandler._truncated,
    "cut": LoopbackHandler._cut,
    "flaky": LoopbackHandler._flaky,
    "empty": LoopbackHandler._empty,
    "html": LoopbackHandler._html,
    "big": LoopbackHandler._big,
    "gen": LoopbackHandler._gen,
}
SPECIAL_ROUTES: tuple[str, ...] = tuple(_BUILTINS)
"""First path segments that are routes, not files: a file under DIR/status/... cannot be served."""


class LoopbackServer:
    """A directory served on 127.0.0.1 from a background thread; a context manager.

    ``port=0`` picks a free port; ``url`` is the base URL without a trailing slash. ``requests``
    lists every (method, path) received, for tests that count retries or redirects. Leaving the
    ``with`` block wakes sleeping ``/slow`` handlers, stops the server and joins all its threads.
    """

    def __init__(
        self, *, directory: Path | str, port: int = 0, routes: Mapping[str, Route] | None = None
    ) -> None:
        root = Path(directory)
        if not root.is_dir():
            raise UserError(f"directory: {root} is not a directory")
        clashes = sorted(set(routes or {}) & set(SPECIAL_ROUTES))
        if clashes:
            raise ValueError(f"routes: {clashes} would hide built-in routes")
        if not 0 <= port <= 65535:
            raise UserError(f"port: must be within 0..65535, got {port}")
        try:
            self._server = _Server(root=root, port=port, routes=routes or {})
        except OSError as error:
            raise UserError(f"port: cannot listen on {HOST}:{port} ({error.strerror or error})") from None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._server.lock:
            return list(self._server.request_log)

    def url_for(self, path: str) -> str:
        """Absolute URL of a path below the root, quoting what needs it."""
        return f"{self.url}/{quote(path.lstrip('/'))}"

    def start(self) -> LoopbackServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"capfilt-serve-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wake slow handlers, join the serving thread and every handler thread."""
        self._server.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextmanager
def serve_directory(
    directory: Path | str, *, port: int = 0, routes: Mapping[str, Route] | None = None
) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 for the ``with`` block; yields the base URL (no trailing /).

    ``with serve_directory(corpus) as base_url: url_list(corpus, base_url)`` is how the demo turns a
    synthetic corpus into a URL list the pipeline downloads.
    """
    with LoopbackServer(directory=directory, port=port, routes=routes) as server:
        yield server.url


def serve_forever(directory: Path | str, port: int = 0) -> None:
    """Serve ``directory`` on 127.0.0.1:``port`` until interrupted (the ``capfilt serve`` command)."""
    server = LoopbackServer(directory=directory, port=port)
    try:
        server.start()
        print(f"serving {Path(directory).resolve()} at {server.url}/ (Ctrl-C to stop)", flush=True)
        while server._thread is not None and server._thread.is_alive():
            server._thread.join(timeout=0.5)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.stop()
