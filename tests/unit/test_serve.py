"""The loopback server: every documented route does what its docstring says, and nothing leaks."""

from __future__ import annotations

import http.client
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from capfilt.errors import UserError
from capfilt.serve import BIG_DEFAULT_BYTES, LoopbackServer, serve_directory, serve_forever


def _jpeg(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "images" / "c.webp").write_bytes(b"RIFF fake")
    (tmp_path / "images" / "with space.jpg").write_bytes(_jpeg(8, 8))
    (tmp_path.parent / "secret.txt").write_text("outside the root")
    return tmp_path


@pytest.fixture()
def server(site: Path):
    before = set(threading.enumerate())
    with LoopbackServer(directory=site) as srv:
        yield srv
    leaked = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leaked, f"threads outlived the server: {leaked}"


def _get(
    url: str, *, method: str = "GET", timeout: float = 5.0
) -> tuple[int, http.client.HTTPMessage, bytes]:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.headers, response.read()


def _raw(
    server: LoopbackServer, path: str, method: str = "GET"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request without following redirects or normalising the path."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_binds_loopback_only_and_picks_a_free_port(server: LoopbackServer) -> None:
    host, port = server._server.server_address[:2]
    assert host == "127.0.0.1"
    assert port > 0
    assert server.url == f"http://127.0.0.1:{port}"


def test_files_get_and_head_with_content_types(server: LoopbackServer, site: Path) -> None:
    status, headers, body = _get(f"{server.url}/images/a.jpg")
    assert status == 200 and body == (site / "images" / "a.jpg").read_bytes()
    assert headers["Content-Type"] == "image/jpeg"
    assert _get(f"{server.url}/images/b.png")[1]["Content-Type"] == "image/png"
    assert _get(f"{server.url}/images/c.webp")[1]["Content-Type"] == "image/webp"
    assert _get(server.url_for("images/with space.jpg"))[0] == 200

    status, headers, body = _get(f"{server.url}/images/a.jpg", method="HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) == (site / "images" / "a.jpg").stat().st_size
    # the query string does not change which file is served
    assert _get(f"{server.url}/images/a.jpg?x=1")[2] == (site / "images" / "a.jpg").read_bytes()


def test_missing_files_directories_and_escapes(server: LoopbackServer) -> None:
    assert _raw(server, "/images/nope.jpg")[0] == 404
    assert _raw(server, "/images")[0] == 404
    assert _raw(server, "/images/../../secret.txt")[0] == 403
    assert _raw(server, "/images/%2e%2e/%2e%2e/secret.txt")[0] == 403
    assert _raw(server, "/%2e%2e%2fsecret.txt")[0] == 403


@pytest.mark.parametrize("code", [404, 403, 500, 503])
def test_status_route(server: LoopbackServer, code: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(f"{server.url}/status/{code}")
    assert info.value.code == code


def test_status_route_rejects_nonsense(server: LoopbackServer) -> None:
    assert _raw(server, "/status/abc")[0] == 400
    assert _raw(server, "/status/42")[0] == 400
    assert _raw(server, "/status/204")[2] == b""


def test_slow_route_times_out_clients_then_serves(server: LoopbackServer, site: Path) -> None:
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _get(f"{server.url}/slow/2/images/a.jpg", timeout=0.3)  # nothing arrives before the wait ends
    status, _, body = _get(f"{server.url}/slow/0.2/images/a.jpg")
    assert status == 200 and body == (site / "images" / "a.jpg").read_bytes()
    assert _raw(server, "/slow/999")[0] == 400


def test_stop_wakes_slow_handlers_quickly(site: Path) -> None:
    before = set(threading.enumerate())
    srv = LoopbackServer(directory=site).start()
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            _get(f"{srv.url}/slow/30", timeout=20)
        except BaseException as error:  # the server hangs up without answering
            errors.append(error)

    client = threading.Thread(target=hang)
    client.start()
    deadline = time.monotonic() + 5
    while not srv.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.stop()  # must not wait out the 30 s handler
    client.join(timeout=10)
    assert not client.is_alive(), "stop() left the slow request hanging"
    assert errors, "the slow request should have been cut off"
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]


def test_redirect_chain_counts_hops(server: LoopbackServer, site: Path) -> None:
    status, _, body = _get(f"{server.url}/redirect/3/images/a.jpg")
    assert status == 200 and body == (site / "images" / "a.jpg").read_bytes()
    assert [p for _, p in server.requests] == [
        "/redirect/3/images/a.jpg",
        "/redirect/2/images/a.jpg",
        "/redirect/1/images/a.jpg",
        "/redirect/0/images/a.jpg",
    ]
    status, headers, _ = _raw(server, "/redirect/1/status/500")
    assert status == 302 and headers["Location"] == "/redirect/0/status/500"


def test_redirect_loop_points_at_itself(server: LoopbackServer) -> None:
    status, headers, _ = _raw(server, "/redirect-loop")
    assert status == 302 and headers["Location"] == "/redirect-loop"
    with pytest.raises(urllib.error.HTTPError):  # urllib gives up on a loop
        _get(f"{server.url}/redirect-loop")


def test_header_route_adds_robots_tags_to_a_real_image(server: LoopbackServer, site: Path) -> None:
    status, headers, body = _get(f"{server.url}/header/noai/images/a.jpg")
    assert status == 200 and body == (site / "images" / "a.jpg").read_bytes()
    assert headers.get_all("X-Robots-Tag") == ["noai"]
    _, headers, _ = _get(f"{server.url}/header/capfilt:%20noimageai/header/noindex/images/a.jpg")
    assert headers.get_all("X-Robots-Tag") == ["capfilt: noimageai", "noindex"]
    # wrappers compose with other routes
    _, headers, _ = _get(f"{server.url}/header/noai/redirect/0/images/a.jpg")
    assert headers["X-Robots-Tag"] == "noai"
    assert _get(f"{server.url}/images/a.jpg")[1].get_all("X-Robots-Tag") is None


def test_truncated_route_sends_half_an_image(server: LoopbackServer, site: Path) -> None:
    full = (site / "images" / "a.jpg").read_bytes()
    status, headers, body = _get(f"{server.url}/truncated/images/a.jpg")
    assert status == 200 and body == full[: len(full) // 2]
    assert int(headers["Content-Length"]) == len(body)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()
    assert _raw(server, "/truncated/images/nope.jpg")[0] == 404


def test_cut_route_breaks_the_transfer(server: LoopbackServer) -> None:
    with pytest.raises(http.client.IncompleteRead):
        _get(f"{server.url}/cut/images/a.jpg")


def test_chunked_route_streams_without_a_length(server: LoopbackServer, site: Path) -> None:
    full = (site / "images" / "a.jpg").read_bytes()
    status, headers, body = _get(f"{server.url}/chunked/images/a.jpg")
    assert status == 200 and body == full
    assert headers["Transfer-Encoding"] == "chunked" and headers["Content-Length"] is None
    assert headers["Content-Type"] == "image/jpeg"
    _, headers, body = _get(f"{server.url}/header/noai/chunked/gen/8x8.png")
    assert headers["X-Robots-Tag"] == "noai" and body.startswith(b"\x89PNG")
    assert _raw(server, "/chunked/images/nope.jpg")[0] == 404


def test_requests_are_counted_per_path_with_their_user_agents(server: LoopbackServer) -> None:
    for agent in ("capfilt-test/1", "other/2"):
        urllib.request.urlopen(
            urllib.request.Request(f"{server.url}/images/a.jpg", headers={"User-Agent": agent}), timeout=5
        ).close()
    assert _raw(server, "/images/b.png", method="HEAD")[0] == 200
    assert (server.hits("/images/a.jpg"), server.hits("/images/b.png"), server.hits("/nope")) == (2, 1, 0)
    assert server.user_agents[:2] == ["capfilt-test/1", "other/2"]


def test_flaky_route_fails_n_times_per_path(server: LoopbackServer, site: Path) -> None:
    codes = []
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(f"{server.url}/flaky/2/images/a.jpg")
        codes.append(info.value.code)
    assert codes == [503, 503]
    assert _get(f"{server.url}/flaky/2/images/a.jpg")[2] == (site / "images" / "a.jpg").read_bytes()
    assert _raw(server, "/flaky/1/images/b.png")[0] == 503  # counted per path


def test_empty_html_and_big_bodies(server: LoopbackServer) -> None:
    status, headers, body = _get(f"{server.url}/empty")
    assert (status, headers["Content-Type"], body) == (200, "image/jpeg", b"")
    status, headers, body = _get(f"{server.url}/html")
    assert headers["Content-Type"].startswith("text/html") and body.startswith(b"<!doctype html>")
    status, headers, body = _get(f"{server.url}/big/1000000")
    assert len(body) == 1_000_000 and body.count(0) == 1_000_000
    assert (
        int(_get(f"{server.url}/big", method="HEAD")[1]["Content-Length"]) == BIG_DEFAULT_BYTES > 20_000_000
    )


def test_client_hanging_up_on_big_body_leaves_server_healthy(server: LoopbackServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/big")
    response = conn.getresponse()
    assert len(response.read(100_000)) == 100_000
    conn.close()  # stop reading like a downloader enforcing max_bytes
    assert _get(f"{server.url}/images/a.jpg")[0] == 200


@pytest.mark.parametrize(
    ("spec", "fmt", "ctype"),
    [
        ("64x32.png", "PNG", "image/png"),
        ("10x20.jpg", "JPEG", "image/jpeg"),
        ("5x5.webp", "WEBP", "image/webp"),
    ],
)
def test_generated_images(server: LoopbackServer, spec: str, fmt: str, ctype: str) -> None:
    _, headers, body = _get(f"{server.url}/gen/{spec}")
    image = Image.open(io.BytesIO(body))
    width, height = (int(v) for v in spec.split(".")[0].split("x"))
    assert (image.format, image.size, headers["Content-Type"]) == (fmt, (width, height), ctype)


def test_generated_image_rejects_bad_specs(server: LoopbackServer) -> None:
    for bad in ("/gen/0x10.png", "/gen/10x10.gif", "/gen/5000x5.png", "/gen/axb.jpg"):
        assert _raw(server, bad)[0] == 400, bad


def test_concurrent_requests_are_served_in_parallel(server: LoopbackServer) -> None:
    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(lambda _: _get(f"{server.url}/slow/0.5/images/a.jpg")[0], range(32)))
    assert statuses == [200] * 32
    # counted by the server while answering (no wall clock): several slow requests at once
    assert max(server.max_concurrent.values()) > 1


def test_custom_routes(site: Path) -> None:
    def echo(handler, rest: str) -> None:
        handler.reply(201, rest.encode(), content_type="text/plain")

    with LoopbackServer(directory=site, routes={"echo": echo}) as srv:
        status, _, body = _raw(srv, "/echo/hello/world")
        assert (status, body) == (201, b"hello/world")
    with pytest.raises(ValueError, match="status"):
        LoopbackServer(directory=site, routes={"status": echo})


def test_serve_directory_yields_url_and_stops(site: Path) -> None:
    with serve_directory(site) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        assert _get(f"{base_url}/images/a.jpg")[0] == 200
    with pytest.raises(urllib.error.URLError):
        _get(f"{base_url}/images/a.jpg", timeout=1)


def test_user_errors(site: Path) -> None:
    with pytest.raises(UserError, match="directory"):
        LoopbackServer(directory=site / "missing")
    with LoopbackServer(directory=site) as srv, pytest.raises(UserError, match="port"):
        LoopbackServer(directory=site, port=srv.port)
    with pytest.raises(UserError, match="port"):
        serve_forever(site, port=70000)


def test_serve_forever_runs_until_interrupted(site: Path) -> None:
    code = f"from capfilt.serve import serve_forever; serve_forever({str(site)!r}, 0)"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    # As a terminal starts it: Ctrl-C's default disposition. A test run started in the background
    # by a script (`.ci/run &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:(\d+))/ ", line)
        assert match and int(match[2]) > 0, line
        assert _get(f"{match[1]}/images/a.jpg")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0  # a bound for a hang, not a speed test
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
