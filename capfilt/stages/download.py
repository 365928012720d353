"""Download and resize stage: URLs in, encoded images plus a status per row out.

``Downloader`` is a callable class over Ray Data numpy batches (``dict[str, np.ndarray]``).
It reuses img2dataset's own code where that code fits:

* ``img2dataset.resizer.Resizer`` does the resize and encode, so images are identical
  to what img2dataset writes for the same ``resize_mode``/``image_size``/quality;
* ``img2dataset.downloader.is_disallowed`` decides the X-Robots-Tag opt-out, with the
  same user-agent-token semantics as img2dataset.

The HTTP client is ``http.client`` driven by this module (not urllib's opener), because
every hop of a request has to be checked and bounded:

* **One absolute deadline per request** (``timeout_s``): from the first connect (once the
  request holds its per-host slot) to the last body byte, TLS handshake and every redirect
  hop included. A process-wide watchdog thread shuts the
  socket down when the deadline passes, so a server dripping its status line, headers,
  chunk sizes or body one byte per second cannot hold a row longer; the row fails with
  an error starting ``deadline:``. Status line plus headers are capped at
  ``max_header_bytes``. A per-batch deadline (``batch_timeout_s``) is the backstop for
  what no socket bounds (a hanging DNS resolver): rows still running then fail with
  ``deadline:`` and the task returns.
* **Address policy**: every connection (first request and each redirect hop, robots.txt
  too) resolves the host, refuses non-global addresses (loopback, RFC 1918, link-local,
  ULA, CGNAT, multicast, IPv4-mapped/6to4/Teredo IPv6...) with ``blocked_address``,
  connects to the checked IP itself (a second DNS answer cannot rebind it; Host header
  and TLS SNI keep the name) and checks the connected peer again. ``allowed_hosts``
  (names, IPs, CIDRs) and ``allow_private_networks`` opt out. Proxy variables are not
  used: a proxy would resolve the host where the policy cannot see it.
* **Politeness** (per download task, i.e. per ``Downloader`` call): at most
  ``per_host_connections`` requests to one host at a time and ``per_host_rate``
  request starts per second; a 429/503 with ``Retry-After`` pauses the whole host for
  that long (up to ``retry_after_max_s``, a longer one fails the row); transient
  failures are retried ``retries`` times with exponential back-off and jitter;
  ``robots_txt: true`` fetches each host's robots.txt once per task and obeys it for
  the user-agent token.
* Redirects are followed by hand (at most ``max_redirects``, http(s) only, loops
  detected) so the opt-out headers of every hop are checked, not only the last one.

Before the Resizer sees an image, Pillow reads its header (more than ``max_pixels``:
too_large), waits for the task's pixel budget (``decode_pixel_budget``: bounds the
memory of concurrent decodes), fully decodes it and converts it to 8-bit RGB
(`_to_rgb`): OpenCV, which the Resizer uses, accepts truncated JPEGs silently, clips
16-bit images to white when encoding JPEG and keeps grayscale single-channel. Pillow
catches truncation, applies the EXIF orientation, composites transparency on white (as
img2dataset does for RGBA), converts CMYK and palette images, and takes the first frame
of animations; 16-bit images are scaled to 8 bits with integer arithmetic in strips
(no full-size float copy). A ``MemoryError`` makes the row too_large, not the task fail.
"""

from __future__ import annotations

import email.utils
import hashlib
import heapq
import http.client
import io
import ipaddress
import math
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.robotparser
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from capfilt import __version__
from capfilt.config import DownloadConfig
from capfilt.rundir import IMAGE_COLUMN, IMAGE_META_COLUMNS
from capfilt.stages.status import Status

#: Error texts are cut to this many characters so one odd server cannot bloat a shard.
MAX_ERROR_CHARS = 300

#: Redirect hops one request follows at most.
MAX_REDIRECTS = 5

#: robots.txt bodies are read up to this size (RFC 9309 asks for at least 500 KiB).
ROBOTS_MAX_BYTES = 512 * 1024

#: Added to the derived per-batch deadline: time for decode/resize and scheduling.
BATCH_DEADLINE_SLACK_S = 30.0

#: Columns ``Downloader`` adds (or replaces) in a batch.
OUTPUT_COLUMNS = (IMAGE_COLUMN, "status", "error", *IMAGE_META_COLUMNS)

_BROWSER_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_READ_CHUNK = 1 << 16
_STRIP_ROWS = 64  # rows converted at a time for 16-bit and float images
_REDIRECT_CODES = (301, 302, 303, 307, 308)
# Characters left alone when percent-encoding a URL's path and query: the reserved set
# plus '%', so URLs that are already encoded stay as they are.
_URL_SAFE = "/:@!$&'()*+,;=?#[]~%"


@dataclass
class _Fetched:
    """What a worker thread hands back for one row; ``rgb`` is set only when decoding worked."""

    status: Status
    error: str = ""
    rgb: Image.Image | None = None
    sha256: str = ""
    original_size: tuple[int, int] = (0, 0)
    budget: int = 0  # decode pixel budget held until the main thread has resized ``rgb``


class _Failure(Exception):
    """A row failed with a known status; ``transient`` ones are worth a retry.

    ``retry_after``: seconds the server asked us to wait (429/503 ``Retry-After``).
    """

    def __init__(
        self,
        status: Status,
        message: str,
        *,
        transient: bool = False,
        retry_after: float | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient
        self.retry_after = retry_after
        self.http_status = http_status


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def normalise_url(url: Any) -> str:
    """Return a request-ready http(s) URL or raise ``_Failure(invalid_url)``.

    Rejects null/empty values, every scheme but http(s) (so ``file://`` can never read
    a local file) and URLs carrying credentials (``user:pw@host``). Encodes what browsers
    encode too (spaces and non-ASCII in the path and query, IDNA host names), which
    http.client would otherwise refuse.
    """
    if isinstance(url, bytes):
        url = url.decode("utf-8", errors="replace")
    if not isinstance(url, str) or not url.strip():
        raise _Failure(Status.invalid_url, "empty URL")
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as err:
        raise _Failure(Status.invalid_url, f"unparsable URL: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Failure(Status.invalid_url, f"scheme {scheme or '(none)'!r} not allowed, only http and https")
    if "@" in parts.netloc:
        raise _Failure(Status.invalid_url, "URL carries credentials (user:password@host), refused")
    if not host:
        raise _Failure(Status.invalid_url, "no host in URL")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise _Failure(Status.invalid_url, f"host {host!r} is not a valid domain name") from None
    if any(ord(c) < 33 or c in "\\%" for c in ascii_host):
        raise _Failure(Status.invalid_url, f"host {host!r} is not a valid domain name")
    if ":" in ascii_host:  # IPv6 literal
        ascii_host = f"[{ascii_host}]"
    netloc = ascii_host + (f":{port}" if port is not None else "")
    path = urllib.parse.quote(parts.path, safe=_URL_SAFE)
    query = urllib.parse.quote(parts.query, safe=_URL_SAFE)
    # The fragment is never sent to the server.
    return urllib.parse.urlunsplit((scheme, netloc, path or "/", query, ""))


# --------------------------------------------------------------------------- address policy


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address (a short reason), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "IPv4-mapped IPv6 address"
        if ip.sixtofour is not None or ip.teredo is not None:
            return "IPv6 tunnel address embedding IPv4"
        if ip in _NAT64:
            return "NAT64 address embedding IPv4"
    for test, reason in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_private", "private network"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, test):
            return reason
    if not ip.is_global:
        return "shared/non-global address (e.g. CGNAT 100.64.0.0/10)"
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressPolicy:
    """Which peers a download may connect to: public unicast addresses, plus the exemptions.

    ``allowed_hosts`` entries are host names (matched exactly, case-insensitively, against
    the URL's host: that host may resolve to anything), IP addresses or CIDR networks
    (matched against the resolved address).
    """

    def __init__(self, *, allow_private: bool, allowed_hosts: list[str]) -> None:
        self.allow_private = allow_private
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed_hosts:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry.lower().rstrip("."))

    def refusal(self, host: str, ip_text: str) -> str | None:
        """None when ``host`` may be reached at ``ip_text``; else why not."""
        if self.allow_private or host.lower().rstrip(".") in self.names:
            return None
        ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        if any(ip.version == net.version and ip in net for net in self.networks):
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            mapped = ip.ipv4_mapped
            if any(net.version == 4 and mapped in net for net in self.networks):
                return None
        reason = address_refusal(ip)
        return f"{host} resolves to {ip} ({reason})" if reason else None

    def connect(self, host: str, port: int, deadline: float) -> socket.socket:
        """Resolve ``host``, connect to its first permitted address, check the peer again."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as err:
            raise _Failure(
                Status.download_failed, _one_line(f"cannot resolve {host}: {err}"), transient=True
            ) from None
        refusals: list[str] = []
        last_error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            ip_text = str(sockaddr[0])
            reason = self.refusal(host, ip_text)
            if reason is not None:
                refusals.append(reason)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise _deadline_failure()
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(sockaddr)
                peer = sock.getpeername()[0]
                reason = self.refusal(host, str(peer))
                if reason is not None:  # cannot differ from the checked address; checked anyway
                    raise _Failure(Status.blocked_address, f"connected peer refused: {reason}")
                return sock
            except _Failure:
                sock.close()
                raise
            except TimeoutError:
                sock.close()
                raise _deadline_failure() from None
            except OSError as err:
                sock.close()
                last_error = err
        if last_error is not None:
            raise _Failure(
                Status.download_failed, _one_line(f"cannot connect to {host}: {last_error}"), transient=True
            )
        raise _Failure(
            Status.blocked_address, _one_line("; ".join(dict.fromkeys(refusals)) or f"no address for {host}")
        )


# --------------------------------------------------------------------------- deadlines


class _Watch:
    __slots__ = ("deadline", "fd", "fired", "cancelled")

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.fired = False
        self.cancelled = False

    def __lt__(self, other: _Watch) -> bool:
        return self.deadline < other.deadline


class _Watchdog:
    """One daemon thread per process that shuts down sockets whose deadline has passed.

    Shutting a socket down wakes any thread blocked reading it (the read sees EOF or an
    error), whatever phase the request is in. ``cancel`` must be called before the socket
    is closed, so a file descriptor is never shut down after it was reused.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[_Watch] = []
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> _Watch:
        entry = _Watch(sock.fileno(), deadline)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="capfilt-dl-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def cancel(self, entry: _Watch) -> None:
        with self._cond:
            entry.cancelled = True

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(timeout=5.0)
                    continue
                left = self._heap[0].deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(timeout=left)
                    continue
                entry = heapq.heappop(self._heap)
                entry.fired = True
                try:
                    sock = socket.socket(fileno=entry.fd)
                except OSError:
                    continue
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                finally:
                    sock.detach()


_WATCHDOG = _Watchdog()


def _deadline_failure(timeout_s: float | None = None) -> _Failure:
    within = f" within timeout_s={timeout_s:g}s" if timeout_s is not None else ""
    return _Failure(
        Status.download_failed,
        f"deadline: no complete response{within} (connect, status line, headers and body)",
        transient=True,
    )


class _HeaderCap:
    """File wrapper for http.client: fails once the status line and headers exceed ``limit``."""

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw = raw
        self.limit: int | None = limit
        self._used = 0

    def readline(self, size: int = -1) -> bytes:
        line = self._raw.readline(size)
        if self.limit is not None:
            self._used += len(line)
            if self._used > self.limit:
                raise _Failure(
                    Status.download_failed, f"response headers exceed max_header_bytes={self.limit}"
                )
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _Response(http.client.HTTPResponse):
    header_limit = 65_536

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp = _HeaderCap(self.fp, self.header_limit)

    def begin(self) -> None:
        super().begin()
        if isinstance(self.fp, _HeaderCap):
            self.fp.limit = None  # chunk-size lines are bounded by the deadline, not this cap


def _connection(
    scheme: str,
    host: str,
    port: int,
    *,
    policy: AddressPolicy,
    deadline: float,
    header_limit: int,
    context: ssl.SSLContext | None,
    watches: list[_Watch],
) -> http.client.HTTPConnection:
    """An http.client connection whose socket comes from ``policy.connect`` (checked peer).

    The socket's deadline watch is appended to ``watches`` as soon as TCP is connected; the
    caller cancels it before closing the connection.
    """
    response_class = type("_CappedResponse", (_Response,), {"header_limit": header_limit})

    def create(address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        sock = policy.connect(address[0], address[1], deadline)
        # Watched from the TCP connect on, so a TLS handshake cannot outlive the deadline either
        # (the TLS socket that wraps this one keeps its file descriptor).
        watches.append(_WATCHDOG.watch(sock, deadline))
        return sock

    left = max(0.001, deadline - time.monotonic())
    if scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=left, context=context
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=left)
    conn._create_connection = create  # noqa: SLF001 - the documented hook http.client connects through
    conn.response_class = response_class
    return conn


# --------------------------------------------------------------------------- politeness


class _Cancelled(Exception):
    """The batch deadline passed while this row waited."""


class _HostLimiter:
    """Per-host concurrency cap and request rate for one download task."""

    def __init__(self, *, connections: int, rate: float | None, cancel: threading.Event) -> None:
        self._cap = connections
        self._interval = 1.0 / rate if rate else 0.0
        self._cancel = cancel
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._not_before: dict[str, float] = {}

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        with self._cond:
            while True:
                if self._cancel.is_set():
                    raise _Cancelled
                now = time.monotonic()
                start = self._not_before.get(host, 0.0)
                if self._active.get(host, 0) < self._cap and now >= start:
                    break
                self._cond.wait(timeout=min(0.5, max(0.001, start - now)) if now < start else 0.5)
            self._active[host] = self._active.get(host, 0) + 1
            if self._interval:
                self._not_before[host] = max(now, start) + self._interval
        try:
            yield
        finally:
            with self._cond:
                self._active[host] -= 1
                self._cond.notify_all()

    def pause(self, host: str, seconds: float) -> None:
        """No new request to ``host`` for ``seconds`` (a Retry-After or back-off)."""
        with self._cond:
            until = time.monotonic() + seconds
            self._not_before[host] = max(self._not_before.get(host, 0.0), until)


class _PixelBudget:
    """Decoded pixels one task may hold at once; a decode waits until its image fits."""

    def __init__(self, total: int, cancel: threading.Event) -> None:
        self._total = total
        self._used = 0
        self._cancel = cancel
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> int:
        with self._cond:
            while self._used and self._used + pixels > self._total:
                if self._cancel.is_set():
                    raise _Cancelled
                self._cond.wait(timeout=0.5)
            self._used += pixels
        return pixels

    def release(self, pixels: int) -> None:
        if pixels:
            with self._cond:
                self._used -= pixels
                self._cond.notify_all()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class _BatchState:
    """What the rows of one ``Downloader`` call share: handed to every worker explicitly, so a
    thread left running after a batch deadline never touches the next batch's limits."""

    cancel: threading.Event
    hosts: _HostLimiter
    budget: _PixelBudget
    robots: dict[tuple[str, str, int], _Robots]
    robots_lock: threading.Lock


@dataclass
class _Robots:
    ready: threading.Event
    parser: urllib.robotparser.RobotFileParser | None = None
    failure: _Failure | None = None


def _to_eight_bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8-bit ``L``, in strips of rows.

    Integer arithmetic for integer modes (16-bit values are rounded ``(v + 128) // 257``);
    only one strip at a time is copied out of Pillow, so memory stays near the size of the
    8-bit result whatever the image size.
    """
    width, height = img.size
    low, high = img.getextrema()
    out = np.empty((height, width), dtype=np.uint8)
    sixteen = img.mode.startswith("I;16") or (img.mode == "I" and high > 255)
    unit_float = img.mode == "F" and high <= 1.0
    for top in range(0, height, _STRIP_ROWS):
        strip = np.asarray(img.crop((0, top, width, min(height, top + _STRIP_ROWS))))
        if img.mode == "F":
            values = strip.astype(np.float32) * (255.0 if unit_float else 1.0)
            out[top : top + len(strip)] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        elif sixteen:
            values = strip.astype(np.int64 if img.mode == "I" else np.uint32)
            if img.mode == "I":
                np.clip(values, 0, 65535, out=values)
            values += 128
            values //= 257  # round(v / 257): 0..65535 -> 0..255
            out[top : top + len(strip)] = values
        else:
            out[top : top + len(strip)] = np.clip(strip, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_eight_bit(img)
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(body: bytes, *, max_pixels: int) -> Image.Image:
    """Open ``body`` lazily (header only) and check its pixel count against ``max_pixels``."""
    if not body:
        raise _Failure(Status.decode_failed, "empty body")
    try:
        img = Image.open(io.BytesIO(body))
    except Image.DecompressionBombError as err:
        raise _Failure(Status.too_large, _one_line(str(err))) from None
    except Image.UnidentifiedImageError:
        raise _Failure(Status.decode_failed, "not an image: unknown or unsupported format") from None
    except Exception as err:  # Pillow raises many types for bad bytes
        raise _Failure(Status.decode_failed, f"not a decodable image: {_one_line(str(err))}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise _Failure(Status.too_large, f"{width}x{height} pixels exceeds download.max_pixels={max_pixels}")
    return img


def decode_image(body: bytes, *, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode ``body`` with Pillow into upright 8-bit RGB; return it and its size.

    Raises ``_Failure`` with decode_failed (empty, not an image, truncated, corrupt) or
    too_large (more than ``max_pixels`` pixels: checked from the header, before decoding).
    """
    return _decode_opened(open_image(body, max_pixels=max_pixels))


def _decode_opened(img: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as err:  # truncated/corrupt data surfaces here
        raise _Failure(Status.decode_failed, f"corrupt image: {_one_line(str(err))}") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except MemoryError:
        raise
    except Exception:  # a malformed EXIF block does not spoil the pixels
        pass
    try:
        rgb = _to_rgb(img)
    except MemoryError:
        raise
    except Exception as err:
        raise _Failure(
            Status.decode_failed, f"cannot convert {img.mode} to RGB: {_one_line(str(err))}"
        ) from None
    return rgb, rgb.size


class Downloader:
    """Ray ``map_batches`` callable: download, decode and resize each row's image.

    Input batch: a ``url`` column (str; null/empty allowed) and optionally an ``image``
    column; a row whose ``image`` already holds bytes (webdataset input) is not
    downloaded, only decoded and resized. All input columns pass through unchanged.

    Added columns, one value per input row, in input order (see ``OUTPUT_COLUMNS``):
    ``image`` (encoded bytes, b"" unless ok), ``status`` (``Status`` value), ``error``
    ("" when ok), ``width``/``height`` (encoded image, 0 unless ok),
    ``original_width``/``original_height`` (after EXIF orientation; 0 when never
    decoded), ``sha256`` (hex digest of the downloaded bytes, "" when none; lets a later
    step find duplicate images, also across different URLs).

    Bad input never raises out of ``__call__`` and never loses a row. Per-host limits,
    the robots.txt cache and the pixel budget live for one ``__call__`` (one batch).
    """

    def __init__(self, *, cfg: DownloadConfig, max_redirects: int = MAX_REDIRECTS) -> None:
        # Imported here, not at module level: importing any part of img2dataset imports
        # albumentations and OpenCV (seconds), which only download workers need. Without
        # NO_ALBUMENTATIONS_UPDATE, albumentations checks online for updates on import.
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from img2dataset.downloader import is_disallowed
        from img2dataset.resizer import Resizer

        self._is_disallowed = is_disallowed

        self.cfg = cfg
        self.max_redirects = max_redirects
        self._directives = set(cfg.disallowed_header_directives)
        self._policy = AddressPolicy(
            allow_private=cfg.allow_private_networks, allowed_hosts=cfg.allowed_hosts
        )
        self._ssl = ssl.create_default_context()
        token = cfg.user_agent_token
        self._robots_agent = token or "*"
        self._user_agent = (
            f"{_BROWSER_UA} (compatible; {token}; +capfilt/{__version__})" if token else _BROWSER_UA
        )
        self._resizer = Resizer(
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            resize_only_if_bigger=False,
            encode_format=cfg.encode_format,
            encode_quality=cfg.encode_quality,
            min_image_size=cfg.min_image_size,
        )
        # The Resizer redirects the process's stdout/stderr file descriptors while it
        # works; two threads doing that at once can leave them pointing at /dev/null.
        self._resize_lock = threading.Lock()

    def _new_batch_state(self) -> _BatchState:
        cancel = threading.Event()
        return _BatchState(
            cancel=cancel,
            hosts=_HostLimiter(
                connections=self.cfg.per_host_connections, rate=self.cfg.per_host_rate, cancel=cancel
            ),
            budget=_PixelBudget(self.cfg.decode_pixel_budget, cancel),
            robots={},
            robots_lock=threading.Lock(),
        )

    # ------------------------------------------------------------------ network

    def _exchange(self, state: _BatchState, url: str, *, robots: bool) -> bytes:
        """GET ``url`` following redirects by hand; the 2xx body, or ``_Failure``.

        One deadline, ``timeout_s`` after the first hop got its host slot (waiting for a
        per-host slot does not count; the batch deadline bounds that), covers every hop.
        ``robots``: this is a page fetch (check robots.txt and opt-out headers on every
        hop), not the fetch of a robots.txt itself.
        """
        deadline: float | None = None
        seen = {url}
        for hop in range(self.max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").lower()
            if robots and self.cfg.robots_txt:
                self._check_robots(state, parts)
            with state.hosts.slot(host):
                if deadline is None:
                    deadline = time.monotonic() + self.cfg.timeout_s
                body, location = self._request(parts, deadline, robots=robots)
            if body is not None:
                return body
            if hop == self.max_redirects:
                break
            target = urllib.parse.urljoin(url, location)
            scheme = urllib.parse.urlsplit(target).scheme.lower()
            if scheme not in ("http", "https"):
                raise _Failure(
                    Status.download_failed,
                    _one_line(
                        f"redirect to a {scheme or 'relative'} URL refused: only http and https are allowed"
                    ),
                )
            try:
                target = normalise_url(target)
            except _Failure as failure:
                raise _Failure(Status.download_failed, f"bad redirect target: {failure}") from None
            if target in seen:
                raise _Failure(Status.download_failed, "redirect loop")
            seen.add(target)
            url = target
        raise _Failure(Status.download_failed, f"too many redirects (more than {self.max_redirects})")

    def _request(
        self, parts: urllib.parse.SplitResult, deadline: float, *, robots: bool
    ) -> tuple[bytes | None, str]:
        """One GET on its own connection: (2xx body, "") or (None, a redirect's Location)."""
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        watches: list[_Watch] = []
        conn = _connection(
            scheme, parts.hostname or "", port, policy=self._policy, deadline=deadline,
            header_limit=self.cfg.max_header_bytes, context=self._ssl, watches=watches,
        )  # fmt: skip
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            conn.connect()
            conn.request("GET", target, headers={"User-Agent": self._user_agent, "Accept": "*/*"})
            response = conn.getresponse()
            if (
                robots
                and self._directives
                and self._is_disallowed(response.headers, self.cfg.user_agent_token, self._directives)
            ):
                raise _Failure(Status.opted_out, "use of image disallowed by X-Robots-Tag directive")
            code = response.status
            if code in _REDIRECT_CODES:
                location = response.headers.get("Location")
                if not location:
                    raise _Failure(Status.download_failed, f"HTTP {code} redirect without a Location")
                result: tuple[bytes | None, str] = (None, location)
            elif not 200 <= code < 300:
                transient = code >= 500 or code in (408, 429)
                retry_after = (
                    parse_retry_after(response.headers.get("Retry-After")) if code in (429, 503) else None
                )
                raise _Failure(
                    Status.download_failed, _one_line(f"HTTP {code}: {response.reason}"),
                    transient=transient, retry_after=retry_after, http_status=code,
                )  # fmt: skip
            else:
                limit = self.cfg.max_bytes if robots else ROBOTS_MAX_BYTES
                result = (self._read_body(response, limit=limit, strict=robots), "")
        except (_Failure, _Cancelled):
            if any(w.fired for w in watches):
                raise _deadline_failure(self.cfg.timeout_s) from None
            raise
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
            if any(w.fired for w in watches) or isinstance(err, TimeoutError):
                raise _deadline_failure(self.cfg.timeout_s) from None
            text = str(err) or type(err).__name__
            raise _Failure(Status.download_failed, _one_line(text), transient=True) from None
        except ValueError as err:  # e.g. http.client.InvalidURL for a bad port
            raise _Failure(Status.invalid_url, _one_line(str(err))) from None
        finally:
            for watch in watches:
                _WATCHDOG.cancel(watch)
            conn.close()
        if any(w.fired for w in watches):
            # A shut-down socket reads as EOF, which http.client may take for the end of the
            # headers or of a body without Content-Length: what arrived is not a response.
            raise _deadline_failure(self.cfg.timeout_s)
        return result

    def _read_body(self, response: http.client.HTTPResponse, *, limit: int, strict: bool) -> bytes:
        """Read at most ``limit`` bytes (streaming), checking for truncation.

        ``strict``: over the limit is a too_large failure; otherwise (robots.txt) the
        first ``limit`` bytes are kept.
        """
        declared = response.headers.get("Content-Length")
        if strict and declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _Failure(Status.too_large, f"Content-Length {int(declared)} exceeds max_bytes {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                if strict:
                    raise _Failure(Status.too_large, f"body exceeds max_bytes {limit}")
                chunks.append(chunk[: len(chunk) - (size - limit)])
                return b"".join(chunks)
            chunks.append(chunk)
        missing = getattr(response, "length", None)
        if missing:  # connection closed before Content-Length bytes arrived
            raise _Failure(Status.download_failed, f"connection closed {missing} bytes short", transient=True)
        return b"".join(chunks)

    def _check_robots(self, state: _BatchState, parts: urllib.parse.SplitResult) -> None:
        """Raise ``_Failure(opted_out)`` when the host's robots.txt disallows this URL for us."""
        scheme = parts.scheme.lower()
        key = (scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80))
        with state.robots_lock:
            entry = state.robots.get(key)
            owner = entry is None
            if entry is None:
                entry = state.robots[key] = _Robots(ready=threading.Event())
        if owner:
            try:
                entry.parser = self._fetch_robots(state, parts)
            except _Failure as failure:
                entry.failure = failure
            except _Cancelled:
                entry.failure = _Failure(Status.download_failed, "deadline: robots.txt not fetched")
            finally:
                entry.ready.set()
        else:
            while not entry.ready.wait(timeout=0.5):
                if state.cancel.is_set():
                    raise _Cancelled
        if entry.failure is not None:
            raise _Failure(entry.failure.status, f"robots.txt: {entry.failure}")
        if entry.parser is not None:
            url = urllib.parse.urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))
            if not entry.parser.can_fetch(self._robots_agent, url):
                raise _Failure(Status.opted_out, f"robots.txt disallows this URL for {self._robots_agent!r}")

    def _fetch_robots(
        self, state: _BatchState, parts: urllib.parse.SplitResult
    ) -> urllib.robotparser.RobotFileParser | None:
        """The host's parsed robots.txt; None (allow all) when it has none (4xx).

        RFC 9309: a 4xx means no rules; a 5xx or an unreachable server means "disallow
        all", which here fails the row (download_failed) rather than calling it opted out.
        """
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/robots.txt", "", ""))
        try:
            body = self._run_exchange(state, url, robots=False)
        except _Failure as failure:
            if failure.http_status is not None and 400 <= failure.http_status < 500:
                return None
            raise _Failure(
                failure.status, f"unreachable ({failure}), so nothing is fetched from this host"
            ) from None
        parser = urllib.robotparser.RobotFileParser()
        parser.parse(body.decode("utf-8", errors="replace").splitlines())
        return parser

    def _run_exchange(self, state: _BatchState, url: str, *, robots: bool) -> bytes:
        return self._exchange(state, url, robots=robots)

    def _fetch_with_retry(self, state: _BatchState, url: str) -> bytes:
        """One row's download: attempts with back-off, each with its own ``timeout_s`` deadline."""
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        attempt = 0
        while True:
            try:
                return self._run_exchange(state, url, robots=True)
            except _Failure as failure:
                if not failure.transient or attempt >= self.cfg.retries:
                    raise
                wait_s = self.cfg.backoff_s * (2**attempt) * random.uniform(0.5, 1.5)
                if failure.retry_after is not None:
                    if failure.retry_after > self.cfg.retry_after_max_s:
                        raise _Failure(
                            failure.status,
                            f"{failure}; Retry-After {failure.retry_after:g}s exceeds "
                            f"download.retry_after_max_s={self.cfg.retry_after_max_s:g}",
                        ) from None
                    wait_s = max(wait_s, failure.retry_after)
                wait_s = min(wait_s, max(self.cfg.retry_after_max_s, failure.retry_after or 0.0))
                if failure.http_status in (429, 503):
                    state.hosts.pause(host, wait_s)  # the whole host is told to slow down
                if state.cancel.wait(wait_s):
                    raise _Cancelled from None
                attempt += 1

    # ------------------------------------------------------------------ per row

    def _prepare(self, state: _BatchState, url: Any, image: Any) -> _Fetched:
        """Worker-thread part of a row: get the bytes, then decode to RGB with Pillow."""
        held = 0
        try:
            if isinstance(image, bytes | bytearray | memoryview) and len(image) > 0:
                body = bytes(image)
            else:
                body = self._fetch_with_retry(state, normalise_url(url))
            digest = hashlib.sha256(body).hexdigest()
            try:
                img = open_image(body, max_pixels=self.cfg.max_pixels)
                held = state.budget.acquire(img.size[0] * img.size[1])
                rgb, size = _decode_opened(img)
            except _Failure as failure:
                state.budget.release(held)
                return _Fetched(failure.status, str(failure), sha256=digest)
            except MemoryError:
                state.budget.release(held)
                return _Fetched(Status.too_large, "out of memory while decoding", sha256=digest)
            return _Fetched(Status.ok, rgb=rgb, sha256=digest, original_size=size, budget=held)
        except _Failure as failure:
            return _Fetched(failure.status, str(failure))
        except _Cancelled:
            state.budget.release(held)
            return _Fetched(Status.download_failed, "deadline: batch deadline passed while waiting")
        except MemoryError:
            state.budget.release(held)
            return _Fetched(Status.too_large, "out of memory")
        except Exception as err:  # a row must never take the batch down
            state.budget.release(held)
            return _Fetched(Status.download_failed, _one_line(f"{type(err).__name__}: {err}"))

    def _resize(self, state: _BatchState, fetched: _Fetched) -> tuple[bytes, int, int, Status, str]:
        """Resize and encode with img2dataset's Resizer: (bytes, width, height, status, error)."""
        if fetched.rgb is None:
            return b"", 0, 0, fetched.status, fetched.error
        try:
            try:
                buffer = io.BytesIO()
                fetched.rgb.save(buffer, format="PPM")  # lossless, cheap; OpenCV reads it as BGR
                buffer.seek(0)
            except MemoryError:
                return b"", 0, 0, Status.too_large, "out of memory while resizing"
            except Exception as err:
                return b"", 0, 0, Status.decode_failed, _one_line(f"{type(err).__name__}: {err}")
            fetched.rgb = None  # free the decoded pixels now, not at the end of the batch
            with self._resize_lock:
                encoded, width, height, _, _, error = self._resizer(buffer)  # never raises
        finally:
            fetched.rgb = None
            state.budget.release(fetched.budget)
            fetched.budget = 0
        if error is not None:
            status = Status.too_small if error == "image too small" else Status.decode_failed
            if status is Status.too_small:
                error = f"smaller side {min(fetched.original_size)} is below min_image_size {self.cfg.min_image_size}"
            return b"", 0, 0, status, _one_line(error)
        return encoded, int(width), int(height), Status.ok, ""

    # ------------------------------------------------------------------ batch

    def batch_timeout(self, rows: int) -> float:
        """The per-batch deadline: ``batch_timeout_s``, or a bound no honest batch reaches.

        Derived: each wave of ``threads`` rows may take every attempt's full deadline (twice
        with robots.txt) plus the longest back-offs; rate-limited rows may all be on one host.
        """
        cfg = self.cfg
        if cfg.batch_timeout_s is not None:
            return cfg.batch_timeout_s
        per_attempt = cfg.timeout_s * (2 if cfg.robots_txt else 1)
        waits = sum(min(cfg.retry_after_max_s, cfg.backoff_s * 1.5 * 2**a) for a in range(cfg.retries))
        per_row = (cfg.retries + 1) * per_attempt + max(
            waits, cfg.retries * cfg.retry_after_max_s if cfg.retries else 0
        )
        waves = math.ceil(rows / cfg.threads)
        rate_wait = rows / cfg.per_host_rate if cfg.per_host_rate else 0.0
        return waves * per_row + rate_wait + BATCH_DEADLINE_SLACK_S

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        urls = batch.get("url")
        if urls is None:
            raise KeyError("Downloader needs a 'url' column in the batch")  # a wiring bug, not bad data
        n = len(urls)
        state = self._new_batch_state()
        images_in = batch.get("image")
        images: list[bytes] = [b""] * n
        statuses: list[str] = [""] * n
        errors: list[str] = [""] * n
        widths = np.zeros(n, dtype=np.int32)
        heights = np.zeros(n, dtype=np.int32)
        original_widths = np.zeros(n, dtype=np.int32)
        original_heights = np.zeros(n, dtype=np.int32)
        digests: list[str] = [""] * n

        # Rows whose status an earlier step already set (input.where: filtered_metadata) pass
        # through untouched: never requested, their status and error kept.
        preset = batch.get("status")
        todo = [i for i in range(n) if preset is None or not preset[i]]
        if preset is not None:
            preset_errors = batch.get("error")
            for i in set(range(n)) - set(todo):
                statuses[i] = str(preset[i])
                errors[i] = str(preset_errors[i]) if preset_errors is not None else ""

        def finish(index: int, fetched: _Fetched) -> None:
            encoded, width, height, status, error = self._resize(state, fetched)
            images[index], widths[index], heights[index] = encoded, width, height
            statuses[index], errors[index], digests[index] = status.value, error, fetched.sha256
            original_widths[index], original_heights[index] = fetched.original_size

        # Workers download and decode; this thread resizes as results come in. At most
        # 2 * threads rows are in flight so decoded images cannot pile up in memory.
        timeout = self.batch_timeout(n)
        batch_deadline = time.monotonic() + timeout
        window = 2 * self.cfg.threads
        pool = ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix="capfilt-dl")
        pending: dict[Future[_Fetched], int] = {}
        queue = iter(todo)
        next_index = next(queue, None)
        try:
            while next_index is not None or pending:
                while next_index is not None and len(pending) < window:
                    image = images_in[next_index] if images_in is not None else None
                    pending[pool.submit(self._prepare, state, urls[next_index], image)] = next_index
                    next_index = next(queue, None)
                left = batch_deadline - time.monotonic()
                if left <= 0:
                    break
                done, _ = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(pending.pop(future), future.result())
            if pending or next_index is not None:  # the batch deadline passed: account for every stuck row
                state.cancel.set()
                late = _Fetched(Status.download_failed, f"deadline: batch not finished within {timeout:g}s")
                for future, index in pending.items():
                    if future.done():
                        finish(index, future.result())
                    else:
                        future.cancel()
                        finish(index, _Fetched(late.status, late.error))
                while next_index is not None:  # rows never started
                    finish(next_index, _Fetched(late.status, late.error))
                    next_index = next(queue, None)
        finally:
            # After a deadline the stuck threads are left to end on their own (their
            # sockets are shut down by the watchdog); the task does not wait for them.
            pool.shutdown(wait=not state.cancel.is_set(), cancel_futures=True)

        out = dict(batch)
        out["image"] = _object_array(images, empty_dtype=bytes)
        out["status"] = _object_array(statuses, empty_dtype=str)
        out["error"] = _object_array(errors, empty_dtype=str)
        out["width"] = widths
        out["height"] = heights
        out["original_width"] = original_widths
        out["original_height"] = original_heights
        out["sha256"] = _object_array(digests, empty_dtype=str)
        return out


def _object_array(values: list[Any], *, empty_dtype: type) -> np.ndarray:
    """1-D object array of bytes/str (``np.array`` would pad them to a fixed width).

    An empty batch gets a typed empty array instead, because Arrow infers the type
    ``null`` from an empty object array and the block would not match the others.
    """
    if not values:
        return np.array([], dtype=empty_dtype)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
