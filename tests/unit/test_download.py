"""Downloader against a loopback server serving good images and every bad-input class.

No Ray: the Downloader is called directly on a numpy dict batch, as map_batches would.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capfilt.config import DownloadConfig
from capfilt.stages.download import OUTPUT_COLUMNS, Downloader, normalise_url
from capfilt.stages.status import Status

SIZE = 32
LOOPBACK = {"allowed_hosts": ["127.0.0.1"], "backoff_s": 0.0}
"""Every config here opts in to the loopback test server (the default policy blocks it)."""


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb_jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", size, color), "JPEG", quality=95)


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims width x height pixels but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def decoded(body: bytes) -> np.ndarray:
    """The Downloader's output image as an (H, W, 3) RGB array."""
    with Image.open(io.BytesIO(body)) as img:
        assert img.mode == "RGB", f"output must be RGB, got {img.mode}"
        return np.asarray(img)


def run(downloader: Downloader, urls: list[object], **columns: list[object]) -> dict[str, np.ndarray]:
    batch = {"url": np.array(urls, dtype=object)}
    for name, values in columns.items():
        column = np.empty(len(values), dtype=object)
        column[:] = values
        batch[name] = column
    return downloader(batch)


@pytest.fixture(scope="module")
def downloader() -> Downloader:
    # border: square outputs, which these tests check (the default is keep_ratio)
    cfg = DownloadConfig(
        image_size=SIZE,
        resize_mode="border",
        timeout_s=1,
        retries=1,
        max_bytes=200_000,
        threads=8,
        **LOOPBACK,
    )
    return Downloader(cfg=cfg)


# ----------------------------------------------------------------------------- images


def test_image_kinds_are_converted_to_rgb(http_server, downloader):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent -> white
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 40))  # left half opaque red
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    palette.info["transparency"] = 0  # index 0 (blue) is transparent -> white
    sixteen = Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16))  # mid grey, not white
    assert sixteen.mode.startswith("I;16")
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red in CMYK
    rotated = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display

    bodies = {
        "/rgb.jpg": rgb_jpeg(),
        "/rgba.png": encode(rgba, "PNG"),
        "/palette.png": encode(palette, "PNG"),
        "/grey16.png": encode(sixteen, "PNG"),
        "/animated.gif": gif.getvalue(),
        "/cmyk.jpg": encode(cmyk, "JPEG"),
        "/grey.png": encode(Image.new("L", (40, 40), 100), "PNG"),
        "/rotated.jpg": encode(rotated, "JPEG", exif=exif),
        "/image.webp": encode(Image.new("RGB", (40, 40), (0, 0, 200)), "WEBP"),
    }
    urls = [http_server.add(path, body) for path, body in bodies.items()]
    out = run(downloader, urls)
    assert list(out["status"]) == ["ok"] * len(urls), list(out["error"])
    assert list(out["error"]) == [""] * len(urls)
    assert list(out["width"]) == [SIZE] * len(urls) and list(out["height"]) == [SIZE] * len(urls)
    pixels = {path: decoded(body) for path, body in zip(bodies, out["image"], strict=True)}

    def near(pixel: np.ndarray, expected: tuple[int, int, int], tol: int = 40) -> bool:
        return bool(np.all(np.abs(pixel.astype(int) - expected) <= tol))

    # border mode pads 64x48 to a square with white bars top and bottom
    assert near(pixels["/rgb.jpg"][SIZE // 2, SIZE // 2], (200, 30, 30))
    assert near(pixels["/rgb.jpg"][0, SIZE // 2], (255, 255, 255))
    assert near(pixels["/rgba.png"][SIZE // 2, 4], (255, 0, 0))
    assert near(pixels["/rgba.png"][SIZE // 2, SIZE - 4], (255, 255, 255))
    assert near(pixels["/palette.png"][SIZE // 2, SIZE // 2], (255, 255, 255))
    assert near(pixels["/grey16.png"][SIZE // 2, SIZE // 2], (128, 128, 128), tol=3)
    assert near(pixels["/animated.gif"][SIZE // 2, SIZE // 2], (255, 0, 0))  # first frame
    assert near(pixels["/cmyk.jpg"][SIZE // 2, SIZE // 2], (255, 0, 0))
    assert near(pixels["/grey.png"][SIZE // 2, SIZE // 2], (100, 100, 100), tol=3)
    assert near(pixels["/image.webp"][SIZE // 2, SIZE // 2], (0, 0, 200))
    originals = dict(
        zip(bodies, zip(out["original_width"], out["original_height"], strict=True), strict=True)
    )
    assert originals["/rgb.jpg"] == (64, 48)
    assert originals["/rotated.jpg"] == (20, 40)  # EXIF orientation applied
    assert list(out["sha256"]) == [hashlib.sha256(body).hexdigest() for body in bodies.values()]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("border", (SIZE, SIZE)), ("center_crop", (SIZE, SIZE)), ("keep_ratio", (43, SIZE)), ("no", (64, 48))],
)
def test_resize_modes_follow_img2dataset(http_server, mode, expected):
    url = http_server.add("/mode.jpg", rgb_jpeg((64, 48)))
    out = run(Downloader(cfg=DownloadConfig(image_size=SIZE, resize_mode=mode, threads=1, **LOOPBACK)), [url])
    assert out["status"][0] == "ok"
    assert (out["width"][0], out["height"][0]) == expected
    assert decoded(out["image"][0]).shape[:2] == expected[::-1]


def test_png_output_format(http_server):
    url = http_server.add("/for-png.jpg", rgb_jpeg())
    out = run(
        Downloader(cfg=DownloadConfig(image_size=SIZE, encode_format="png", threads=1, **LOOPBACK)), [url]
    )
    assert out["image"][0].startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- bad input


def test_every_bad_input_class_gets_its_status_in_order(http_server, downloader):
    good = rgb_jpeg()
    noisy = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)), "JPEG"
    )
    server = http_server
    server.add("/good.jpg", good)
    base = server.url
    rows: list[tuple[object, Status, str]] = [
        (f"{base}/good.jpg", Status.ok, ""),
        (None, Status.invalid_url, "empty"),
        ("", Status.invalid_url, "empty"),
        ("   ", Status.invalid_url, "empty"),
        ("file:///etc/passwd", Status.invalid_url, "scheme"),
        ("ftp://example.com/a.jpg", Status.invalid_url, "scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", Status.invalid_url, "scheme"),
        ("not a url", Status.invalid_url, "scheme"),
        ("http://", Status.invalid_url, "host"),
        ("http://[::1/a.jpg", Status.invalid_url, "unparsable"),
        (f"{base}/status/404", Status.download_failed, "HTTP 404"),
        (f"{base}/status/500", Status.download_failed, "HTTP 500"),
        (f"{base}/slow/1.5/good.jpg", Status.download_failed, "deadline"),
        (f"{base}/cut/good.jpg", Status.download_failed, "short"),
        (f"{base}/redirect/1/good.jpg", Status.ok, ""),
        (f"{base}/redirect-loop", Status.download_failed, "loop"),
        (f"{base}/goto/{quote('file:///etc/passwd', safe='')}", Status.download_failed, "refused"),
        (f"{base}/goto/{quote('ftp://x/a.jpg', safe='')}", Status.download_failed, "refused"),
        (server.add("/empty.jpg", b""), Status.decode_failed, "empty"),
        (server.add("/page.html", b"<html><body>hi</body></html>"), Status.decode_failed, "not an image"),
        (server.add("/truncated.jpg", noisy[: len(noisy) * 2 // 3]), Status.decode_failed, "truncated"),
        (server.add("/corrupt.png", png_bomb(10, 10)[:33] + b"\x00" * 40), Status.decode_failed, ""),
        (server.add("/bomb.png", png_bomb()), Status.too_large, "pixels"),
        (server.add("/huge.jpg", good + b"\0" * 300_000), Status.too_large, "Content-Length"),
        (f"{base}/chunked/huge.jpg", Status.too_large, "max_bytes"),
        (f"{base}/chunked/good.jpg", Status.ok, ""),
        (f"{base}/header/noai/good.jpg", Status.opted_out, "X-Robots-Tag"),
        (f"{base}/header/{quote('capfilt: noimageai', safe='')}/good.jpg", Status.opted_out, ""),
        (f"{base}/header/{quote('otherbot: noai, noindex', safe='')}/good.jpg", Status.ok, ""),
        (f"{base}/header/nofollow/good.jpg", Status.ok, ""),
        (server.add("/with space.jpg", good), Status.ok, ""),
    ]
    urls = [row[0] for row in rows]
    keys = [f"k{i}" for i in range(len(rows))]
    out = run(downloader, urls[:-1] + [base + "/with space.jpg"], key=keys)

    for column in (*OUTPUT_COLUMNS, "url", "key"):
        assert len(out[column]) == len(rows), column
    assert list(out["key"]) == keys  # pass-through columns keep their order
    for i, (url, status, fragment) in enumerate(rows):
        assert (url, out["status"][i]) == (url, status.value), out["error"][i]
        assert fragment.lower() in out["error"][i].lower(), (url, out["error"][i])
        if status is Status.ok:
            assert out["error"][i] == "" and out["image"][i][:2] == b"\xff\xd8"
        else:
            assert out["error"][i] and out["image"][i] == b"" and out["width"][i] == 0
    assert out["original_width"][urls.index(base + "/bomb.png")] == 0
    assert server.user_agents and all("capfilt" in agent for agent in server.user_agents)
    # Transient failures are retried (retries=1), permanent ones are not.
    assert server.hits("/status/500") == 2
    assert server.hits("/status/404") == 1
    assert server.hits("/header/noai/good.jpg") == 1


def test_too_small_keeps_original_size(http_server):
    url = http_server.add("/small.jpg", rgb_jpeg((40, 30)))
    out = run(
        Downloader(cfg=DownloadConfig(image_size=SIZE, min_image_size=31, threads=1, **LOOPBACK)), [url, url]
    )
    assert list(out["status"]) == ["too_small", "too_small"]
    assert "30" in out["error"][0]
    assert (out["original_width"][0], out["original_height"][0]) == (40, 30)
    assert out["image"][0] == b""


def test_opt_out_check_can_be_disabled(http_server):
    http_server.add("/optout-off.jpg", rgb_jpeg())
    url = f"{http_server.url}/header/noai/optout-off.jpg"
    cfg = DownloadConfig(image_size=SIZE, disallowed_header_directives=[], threads=1, **LOOPBACK)
    assert run(Downloader(cfg=cfg), [url])["status"][0] == "ok"


def test_rows_with_image_bytes_are_not_downloaded(http_server, downloader):
    """webdataset input: the image is already there, only decode + resize run."""
    url = http_server.add("/never-fetched.jpg", rgb_jpeg())
    out = run(downloader, [url, "", url], image=[rgb_jpeg((50, 50)), b"not an image", b""])
    assert list(out["status"]) == ["ok", "decode_failed", "ok"]
    assert out["original_width"][0] == 50 and out["original_width"][2] == 64
    assert http_server.hits("/never-fetched.jpg") == 1  # only the row with empty image bytes


def test_empty_batch(downloader):
    out = downloader({"url": np.array([], dtype=object), "key": np.array([], dtype=object)})
    assert all(len(out[name]) == 0 for name in (*OUTPUT_COLUMNS, "key"))
    # typed, so Arrow (and Ray) see binary/string columns rather than nulls
    assert pa.array(out["image"]).type == pa.binary()
    assert pa.array(out["status"]).type == pa.string()


def test_output_dtypes_are_one_dimensional(http_server, downloader):
    """Object arrays of bytes/str (not fixed-width or 2-D) so Ray converts them to Arrow as-is."""
    out = run(downloader, [http_server.add("/dtype.jpg", rgb_jpeg()), None])
    for name in ("image", "status", "error", "sha256"):
        assert out[name].dtype == object and out[name].shape == (2,)
    assert pa.array(out["image"]).type == pa.binary() and pa.array(out["error"]).type == pa.string()
    for name in ("width", "height", "original_width", "original_height"):
        assert out[name].dtype == np.int32


def test_normalise_url_encodes_like_a_browser():
    assert normalise_url("http://Example.com/a b.jpg?q=ü#frag") == "http://example.com/a%20b.jpg?q=%C3%BC"
    assert normalise_url("https://bücher.de/x%20y.png") == "https://xn--bcher-kva.de/x%20y.png"
    assert normalise_url(" http://h:8080 ") == "http://h:8080/"
