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
``/chunked/FILE``                   ``FILE`` (as for /truncated) with ``Transfer-Encoding: chunked``
                                    and no Content-Length: the size is known only at the end
``/flaky/N/REST``                   503 for the first N requests of this exact path, then ``REST``
``/empty``                          200, ``image/jpeg``, zero bytes
``/html``                           200, ``text/html``: a page where an image was expected
``/big[/NBYTES]``                   200, ``image/jpeg``, NBYTES (default 25,000,000) zero bytes,
                                    streamed: exceeds a 20 MB download limit
``/gen/WxH.EXT``                    a generated W x H image (EXT jpg, png or webp; W, H <= 4096)
``/png16/WxH``                      a mid-grey 16-bit grayscale PNG (W, H <= 20000): tiny file, many
                                    pixels (9000x9000 is ~160 KB for 81 Mpx)
``/drip/PHASE/FILE``                ``FILE`` (as for /truncated) sent at 1 byte per second during
                                    PHASE: ``status`` (status line), ``headers``, ``chunks`` (chunked
                                    body, the chunk-size lines dripped) or ``body``; the rest is sent
                                    at once. ``drips`` records whether the client hung up early
``/many-headers/N/REST``            ``REST`` with N extra 1,000-byte headers (N <= 10000)
``/retry-after/N/VALUE/REST``       429 with ``Retry-After: VALUE`` (URL-decoded: seconds or an HTTP
                                    date) for the first N requests of this exact path, then ``REST``;
                                    ``request_times`` has when each request arrived
``/goto/URL``                       302 to the URL-decoded absolute ``URL`` (another host or port)
``/robots.txt``                     the ``robots_txt`` text given to the server (else a file or 404)
==================================  ================================================================

Every request is counted per ``Host`` header while it is being answered: ``max_concurrent`` has
the most simultaneous requests seen per Host. ``requests`` lists (method, path) of every request,
``hits(path)`` counts them for one path, ``user_agents`` has each request's ``User-Agent``. A
server may listen on any 127.x.y.z address (``host=``), so two servers on 127.0.0.1 and 127.0.0.2
are two hosts for a client.

Tests may add their own routes: ``LoopbackServer(directory=..., routes={"name": fn})`` sends
``/name/REST`` to ``fn(handler, rest)``, where ``handler.reply(...)`` answers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
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
MAX_PNG16_SIDE = 20_000
MAX_EXTRA_HEADERS = 10_000
DRIP_INTERVAL_S = 1.0
"""Seconds between two bytes of a ``/drip`` phase."""
DRIP_PHASES = ("status", "headers", "chunks", "body")
_CHUNK = 64 * 1024

Route = Callable[["LoopbackHandler", str], None]
"""A custom route: called with the handler and the rest of the path after ``/name/``."""


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that joins its handler threads on close and keeps route state."""

    daemon_threads = False  # server_close() joins every handler thread: nothing outlives the server
    block_on_close = True
    allow_reuse_address = True

    request_queue_size = 128  # the default backlog of 5 drops bursts of concurrent clients

    def __init__(
        self, *, root: Path, host: str, port: int, routes: Mapping[str, Route], robots_txt: str | None
    ) -> None:
        self.root = root
        self.routes = dict(routes)
        self.robots_txt = robots_txt
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.flaky_counts: dict[str, int] = {}
        self.request_log: list[tuple[str, str]] = []
        self.request_times: list[tuple[str, float]] = []
        self.user_agents: list[str] = []
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.drips: list[tuple[str, str, int]] = []
        super().__init__((host, port), LoopbackHandler)

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
        host = self.headers.get("Host", "")
        server = self.server
        with server.lock:
            server.request_log.append((self.command, path))
            server.request_times.append((path, time.monotonic()))
            server.user_agents.append(self.headers.get("User-Agent", ""))
            server.active[host] = server.active.get(host, 0) + 1
            server.max_active[host] = max(server.max_active.get(host, 0), server.active[host])
        self._extra_headers = []
        try:
            if path == "/robots.txt" and server.robots_txt is not None:
                self.reply(200, server.robots_txt.encode(), content_type=CONTENT_TYPES[".txt"])
            else:
                self._route(path.lstrip("/"))
        except (ConnectionError, TimeoutError):
            raise
        except _BadRequest as error:
            self.reply(400, f"{error}\n".encode())
        finally:
            with server.lock:
                server.active[host] -= 1

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

    def _png16(self, tail: str) -> None:
        match = re.fullmatch(r"(\d+)x(\d+)", tail)
        if match is None or not all(1 <= int(v) <= MAX_PNG16_SIDE for v in match.groups()):
            raise _BadRequest(f"png16: expected WxH with sides 1..{MAX_PNG16_SIDE}, got {tail!r}")
        self.reply(200, _png16(int(match[1]), int(match[2])), content_type="image/png")

    def _drip(self, tail: str) -> None:
        phase, _, rest = tail.partition("/")
        if phase not in DRIP_PHASES:
            raise _BadRequest(f"drip: phase must be one of {', '.join(DRIP_PHASES)}, got {phase!r}")
        self._raw_response(rest, chunked=phase == "chunks", drip=phase)

    def _chunked(self, tail: str) -> None:
        self._raw_response(tail, chunked=True, drip=None)

    def _raw_response(self, rest: str, *, chunked: bool, drip: str | None) -> None:
        """``rest``'s file as an HTTP/1.1 response written by hand (chunked or with a length);
        the ``drip`` phase, if any, is sent at one byte per ``DRIP_INTERVAL_S``."""
        found = self._file_body(rest)
        if found is None:
            self.reply(404, b"not found\n")
            return
        body, content_type = found
        status_line = b"HTTP/1.1 200 OK\r\n"
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
        extra = "".join(f"{name}: {value}\r\n" for name, value in self._extra_headers)
        headers = f"Content-Type: {content_type}\r\n{framing}\r\n{extra}Connection: close\r\n\r\n".encode()
        parts: list[tuple[bytes, bool]] = [(status_line, drip == "status"), (headers, drip == "headers")]
        if chunked:
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                parts += [(b"%x\r\n" % len(piece), drip == "chunks"), (piece + b"\r\n", False)]
            parts.append((b"0\r\n\r\n", drip == "chunks"))
        else:
            parts.append((body, drip == "body"))
        self.close_connection = True
        if self.command == "HEAD":
            parts = parts[:2]
        sent = 0
        outcome = "completed"
        try:
            for data, slow in parts:
                if not slow:
                    self.wfile.write(data)
                    sent += len(data)
                    continue
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    sent += 1
                    if self.server.stopping.wait(DRIP_INTERVAL_S):
                        outcome = "server stopped"
                        return
        except OSError:  # ConnectionError included: the client hung up
            outcome = "client closed early"
        finally:
            if drip is not None:
                with self.server.lock:
                    self.server.drips.append((urlsplit(self.path).path, outcome, sent))

    def _many_headers(self, tail: str) -> None:
        count_text, _, rest = tail.partition("/")
        count = _int_arg(count_text, "header count")
        if not 0 <= count <= MAX_EXTRA_HEADERS:
            raise _BadRequest(f"many-headers: count must be within 0..{MAX_EXTRA_HEADERS}")
        self._extra_headers.extend((f"X-Filler-{i}", "a" * 980) for i in range(count))
        self._route(rest)

    def _retry_after(self, tail: str) -> None:
        count_text, _, rest = tail.partition("/")
        value, _, rest = rest.partition("/")
        failures = _int_arg(count_text, "retry-after count")
        value = unquote(value)
        if "\r" in value or "\n" in value:
            raise _BadRequest("Retry-After value must be one line")
        key = urlsplit(self.path).path
        with self.server.lock:
            seen = self.server.flaky_counts.get(key, 0)
            self.server.flaky_counts[key] = seen + 1
        if seen < failures:
            self.reply(429, b"too many requests\n", headers={"Retry-After": value})
        else:
            self._route(rest)

    def _goto(self, tail: str) -> None:
        target = unquote(tail)
        if "\r" in target or "\n" in target:
            raise _BadRequest("goto: the URL must be one line")
        self.reply(302, b"", headers={"Location": target})

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


@lru_cache(maxsize=4)
def _png16(width: int, height: int) -> bytes:
    """A valid mid-grey (32768) 16-bit grayscale PNG, compressed row by row (small memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x80\x00" * width  # filter byte "none", then big-endian 16-bit samples
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


_BUILTINS: dict[str, Callable[[LoopbackHandler, str], None]] = {
    "status": LoopbackHandler._status,
    "slow": LoopbackHandler._slow,
    "redirect": LoopbackHandler._redirect,
    "redirect-loop": LoopbackHandler._redirect_loop,
    "header": LoopbackHandler._header,
    "truncated": LoopbackHandler._truncated,
    "cut": LoopbackHandler._cut,
    "chunked": LoopbackHandler._chunked,
    "flaky": LoopbackHandler._flaky,
    "empty": LoopbackHandler._empty,
    "html": LoopbackHandler._html,
    "big": LoopbackHandler._big,
    "gen": LoopbackHandler._gen,
    "png16": LoopbackHandler._png16,
    "drip": LoopbackHandler._drip,
    "many-headers": LoopbackHandler._many_headers,
    "retry-after": LoopbackHandler._retry_after,
    "goto": LoopbackHandler._goto,
}
SPECIAL_ROUTES: tuple[str, ...] = tuple(_BUILTINS)
"""First path segments that are routes, not files: a file under DIR/status/... cannot be served."""


class LoopbackServer:
    """A directory served on 127.0.0.1 from a background thread; a context manager.

    ``port=0`` picks a free port; ``url`` is the base URL without a trailing slash. ``requests``
    lists every (method, path) received, for tests that count retries or redirects. Leaving the
    ``with`` block wakes sleeping ``/slow`` handlers, stops the server and joins all its threads.
    ``host`` may be any loopback IPv4 address (127.0.0.2 is a second host for a client);
    ``robots_txt`` is served at ``/robots.txt``.
    """

    def __init__(
        self,
        *,
        directory: Path | str,
        port: int = 0,
        routes: Mapping[str, Route] | None = None,
        host: str = HOST,
        robots_txt: str | None = None,
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
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is None or address.version != 4 or not address.is_loopback:
            raise UserError(f"host: {host!r} is not a loopback IPv4 address (127.x.y.z)")
        self.host = host
        try:
            self._server = _Server(
                root=root, host=host, port=port, routes=routes or {}, robots_txt=robots_txt
            )
        except OSError as error:
            raise UserError(f"port: cannot listen on {host}:{port} ({error.strerror or error})") from None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._server.lock:
            return list(self._server.request_log)

    def hits(self, path: str) -> int:
        """How many requests (any method) asked for ``path`` (as sent, e.g. ``/a%20b.jpg``)."""
        with self._server.lock:
            return sum(p == path for _, p in self._server.request_log)

    @property
    def user_agents(self) -> list[str]:
        """The ``User-Agent`` header of every request ("" when absent), in arrival order."""
        with self._server.lock:
            return list(self._server.user_agents)

    @property
    def request_times(self) -> list[tuple[str, float]]:
        """(path, ``time.monotonic()`` when it arrived) for every request, in arrival order."""
        with self._server.lock:
            return list(self._server.request_times)

    @property
    def max_concurrent(self) -> dict[str, int]:
        """Most requests answered at the same time, per ``Host`` header (``host:port``)."""
        with self._server.lock:
            return dict(self._server.max_active)

    @property
    def drips(self) -> list[tuple[str, str, int]]:
        """(path, outcome, bytes sent) of each finished ``/drip`` response; outcome is
        ``completed``, ``client closed early`` or ``server stopped``."""
        with self._server.lock:
            return list(self._server.drips)

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
