"""Download and resize stage: URLs in, encoded images plus a status per row out.

``Downloader`` is a callable class over Ray Data numpy batches (``dict[str, np.ndarray]``).
It reuses img2dataset's own code where that code fits:

* ``img2dataset.resizer.Resizer`` does the resize and encode, so images are identical
  to what img2dataset writes for the same ``resize_mode``/``image_size``/quality;
* ``img2dataset.downloader.is_disallowed`` decides the X-Robots-Tag opt-out, with the
  same user-agent-token semantics as img2dataset.

It does not call ``img2dataset.downloader.download_image(_with_retry)`` because that
helper reads the whole body with ``r.read()`` (no size limit, so ``max_bytes`` could not
be enforced while streaming), opens any scheme urllib knows (``file://`` would read local
files), retries permanent failures such as 404 and opt-outs, and returns the error only
as text. Instead ``_fetch`` makes the same urllib request with the same kind of
user-agent, through an opener that only speaks http(s), follows at most
``max_redirects`` redirects, stops reading at ``max_bytes + 1`` and gives up on a body
that takes longer than ``BODY_DEADLINE_FACTOR * timeout_s`` in total.

Before the Resizer sees an image, Pillow fully decodes it and converts it to 8-bit RGB
(`_to_rgb`): OpenCV, which the Resizer uses, accepts truncated JPEGs silently, clips
16-bit images to white when encoding JPEG and keeps grayscale single-channel. Pillow
catches truncation and decompression bombs, applies the EXIF orientation, composites
transparency on white (as img2dataset does for RGBA), scales 16-bit to 8-bit, converts
CMYK and palette images, and takes the first frame of animations.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from capfilt import __version__
from capfilt.config import DownloadConfig
from capfilt.stages.status import Status

#: The whole body must arrive within this many ``timeout_s``: ``timeout_s`` alone bounds
#: each socket operation, so a server dripping one byte per second would never time out.
BODY_DEADLINE_FACTOR = 3

#: Error texts are cut to this many characters so one odd server cannot bloat a shard.
MAX_ERROR_CHARS = 300

#: Columns ``Downloader`` adds (or replaces) in a batch.
OUTPUT_COLUMNS = (
    "image",
    "status",
    "error",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
)

_BROWSER_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
_READ_CHUNK = 1 << 16
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


class _Failure(Exception):
    """A row failed with a known status; ``transient`` ones are worth a retry."""

    def __init__(self, status: Status, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a few redirects, and only to http(s): never ftp://, file:// or data:."""

    def __init__(self, *, max_redirects: int) -> None:
        super().__init__()
        self.max_redirections = max_redirects

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib.request API
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to a {scheme or 'relative'} URL refused", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener(max_redirects: int) -> urllib.request.OpenerDirector:
    """An opener with http(s) handlers only (``build_opener`` would add file/ftp/data)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(max_redirects=max_redirects),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def normalise_url(url: Any) -> str:
    """Return a request-ready http(s) URL or raise ``_Failure(invalid_url)``.

    Rejects null/empty values and every scheme but http(s), so ``file://`` can never read
    a local file. Encodes what browsers encode too (spaces and non-ASCII in the path and
    query, IDNA host names), which urllib would otherwise refuse.
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
    if not host:
        raise _Failure(Status.invalid_url, "no host in URL")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise _Failure(Status.invalid_url, f"host {host!r} is not a valid domain name") from None
    if ":" in ascii_host:  # IPv6 literal
        ascii_host = f"[{ascii_host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + ascii_host + (f":{port}" if port is not None else "")
    path = urllib.parse.quote(parts.path, safe=_URL_SAFE)
    query = urllib.parse.quote(parts.query, safe=_URL_SAFE)
    # The fragment is never sent to the server.
    return urllib.parse.urlunsplit((scheme, netloc, path or "/", query, ""))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0  # 16-bit range -> 8-bit range
        elif img.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0  # float images are usually in [0, 1]
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(body: bytes, *, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode ``body`` with Pillow into upright 8-bit RGB; return it and its size.

    Raises ``_Failure`` with decode_failed (empty, not an image, truncated, corrupt) or
    too_large (more than ``max_pixels`` pixels: checked from the header, before decoding).
    """
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
        raise _Failure(Status.too_large, f"{width}x{height} pixels exceeds the limit of {max_pixels}")
    try:
        img.load()
    except Exception as err:  # truncated/corrupt data surfaces here
        raise _Failure(Status.decode_failed, f"corrupt image: {_one_line(str(err))}") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a malformed EXIF block does not spoil the pixels
        pass
    try:
        rgb = _to_rgb(img)
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

    Bad input never raises out of ``__call__`` and never loses a row.
    """

    def __init__(
        self,
        *,
        cfg: DownloadConfig,
        max_redirects: int = 5,
        max_pixels: int | None = None,
    ) -> None:
        # Imported here, not at module level: importing any part of img2dataset imports
        # albumentations and OpenCV (seconds), which only download workers need. Without
        # NO_ALBUMENTATIONS_UPDATE, albumentations checks online for updates on import.
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from img2dataset.downloader import is_disallowed
        from img2dataset.resizer import Resizer

        self._is_disallowed = is_disallowed

        self.cfg = cfg
        self.max_pixels = int(max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS or 2**31)
        self._directives = set(cfg.disallowed_header_directives)
        self._opener = _http_opener(max_redirects)
        token = cfg.user_agent_token
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

    # ------------------------------------------------------------------ network

    def _fetch(self, url: str) -> bytes:
        """GET ``url`` once; the body, or ``_Failure`` saying why not."""
        request = urllib.request.Request(url, headers={"User-Agent": self._user_agent})
        timeout = self.cfg.timeout_s
        try:
            with self._opener.open(request, timeout=timeout) as response:
                if self._directives and self._is_disallowed(
                    response.headers, self.cfg.user_agent_token, self._directives
                ):
                    raise _Failure(Status.opted_out, "use of image disallowed by X-Robots-Tag directive")
                return self._read_body(response, deadline=time.monotonic() + BODY_DEADLINE_FACTOR * timeout)
        except _Failure:
            raise
        except urllib.error.HTTPError as err:
            err.close()
            transient = err.code >= 500 or err.code in (408, 429)
            raise _Failure(
                Status.download_failed, _one_line(f"HTTP {err.code}: {err.reason}"), transient=transient
            ) from None
        except urllib.error.URLError as err:
            raise _Failure(Status.download_failed, _one_line(str(err.reason)), transient=True) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as err:
            text = str(err) or type(err).__name__
            raise _Failure(Status.download_failed, _one_line(text), transient=True) from None
        except ValueError as err:  # e.g. http.client.InvalidURL for a bad port
            raise _Failure(Status.invalid_url, _one_line(str(err))) from None

    def _read_body(self, response: http.client.HTTPResponse, *, deadline: float) -> bytes:
        """Read at most ``max_bytes`` (streaming), within ``deadline``, checking for truncation."""
        limit = self.cfg.max_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _Failure(Status.too_large, f"Content-Length {int(declared)} exceeds max_bytes {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise _Failure(Status.too_large, f"body exceeds max_bytes {limit}")
            if time.monotonic() > deadline:
                raise _Failure(
                    Status.download_failed,
                    f"body not received within {BODY_DEADLINE_FACTOR * self.cfg.timeout_s:g}s",
                    transient=True,
                )
            chunks.append(chunk)
        missing = getattr(response, "length", None)
        if missing:  # connection closed before Content-Length bytes arrived
            raise _Failure(Status.download_failed, f"connection closed {missing} bytes short", transient=True)
        return b"".join(chunks)

    def _fetch_with_retry(self, url: str) -> bytes:
        attempt = 0
        while True:
            try:
                return self._fetch(url)
            except _Failure as failure:
                if not failure.transient or attempt >= self.cfg.retries:
                    raise
                attempt += 1

    # ------------------------------------------------------------------ per row

    def _prepare(self, url: Any, image: Any) -> _Fetched:
        """Worker-thread part of a row: get the bytes, then decode to RGB with Pillow."""
        try:
            if isinstance(image, bytes | bytearray | memoryview) and len(image) > 0:
                body = bytes(image)
            else:
                body = self._fetch_with_retry(normalise_url(url))
            digest = hashlib.sha256(body).hexdigest()
            try:
                rgb, size = decode_image(body, max_pixels=self.max_pixels)
            except _Failure as failure:
                return _Fetched(failure.status, str(failure), sha256=digest)
            return _Fetched(Status.ok, rgb=rgb, sha256=digest, original_size=size)
        except _Failure as failure:
            return _Fetched(failure.status, str(failure))
        except Exception as err:  # a row must never take the batch down
            return _Fetched(Status.download_failed, _one_line(f"{type(err).__name__}: {err}"))

    def _resize(self, fetched: _Fetched) -> tuple[bytes, int, int, Status, str]:
        """Resize and encode with img2dataset's Resizer: (bytes, width, height, status, error)."""
        if fetched.rgb is None:
            return b"", 0, 0, fetched.status, fetched.error
        try:
            buffer = io.BytesIO()
            fetched.rgb.save(buffer, format="PPM")  # lossless, cheap; OpenCV reads it as BGR
            buffer.seek(0)
        except Exception as err:  # e.g. MemoryError-like failures of odd images
            return b"", 0, 0, Status.decode_failed, _one_line(f"{type(err).__name__}: {err}")
        with self._resize_lock:
            encoded, width, height, _, _, error = self._resizer(buffer)  # never raises
        fetched.rgb = None  # free the decoded pixels now, not at the end of the batch
        if error is not None:
            status = Status.too_small if error == "image too small" else Status.decode_failed
            if status is Status.too_small:
                error = f"smaller side {min(fetched.original_size)} is below min_image_size {self.cfg.min_image_size}"
            return b"", 0, 0, status, _one_line(error)
        return encoded, int(width), int(height), Status.ok, ""

    # ------------------------------------------------------------------ batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        urls = batch.get("url")
        if urls is None:
            raise KeyError("Downloader needs a 'url' column in the batch")  # a wiring bug, not bad data
        n = len(urls)
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
            encoded, width, height, status, error = self._resize(fetched)
            images[index], widths[index], heights[index] = encoded, width, height
            statuses[index], errors[index], digests[index] = status.value, error, fetched.sha256
            original_widths[index], original_heights[index] = fetched.original_size

        # Workers download and decode; this thread resizes as results come in. At most
        # 2 * threads rows are in flight so decoded images cannot pile up in memory.
        window = 2 * self.cfg.threads
        with ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix="capfilt-dl") as pool:
            pending: dict[Future[_Fetched], int] = {}
            queue = iter(todo)
            next_index = next(queue, None)
            while next_index is not None or pending:
                while next_index is not None and len(pending) < window:
                    image = images_in[next_index] if images_in is not None else None
                    pending[pool.submit(self._prepare, urls[next_index], image)] = next_index
                    next_index = next(queue, None)
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(pending.pop(future), future.result())

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
