"""The downloader against hostile and impolite-to-hit servers (issue 12 items 1-3, issue 14 item 1).

Every server here is ``capfilt.serve.LoopbackServer`` on a loopback address; the routes that
misbehave (drip, many-headers, retry-after, goto, png16, robots.txt) are documented there. No
test asserts how fast something ran: deadlines are shown by the row's error text and by the
server seeing the client hang up early; politeness by what the server observed.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from capfilt.config import DownloadConfig
from capfilt.errors import UserError
from capfilt.serve import LoopbackServer
from capfilt.stages import download as dl
from capfilt.stages.download import AddressPolicy, Downloader, _to_rgb, parse_retry_after

SIZE = 32
LOOPBACK = {"allowed_hosts": ["127.0.0.1"], "backoff_s": 0.0}


def jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run(downloader: Downloader, urls: list[str]) -> dict[str, np.ndarray]:
    return downloader({"url": np.array(urls, dtype=object)})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site")
    (root / "img.jpg").write_bytes(jpeg())
    (root / "private").mkdir()
    (root / "private" / "a.jpg").write_bytes(jpeg(color=(0, 0, 200)))
    (root / "public").mkdir()
    (root / "public" / "b.jpg").write_bytes(jpeg(color=(0, 200, 0)))
    return root


@pytest.fixture()
def server(site: Path) -> Iterator[LoopbackServer]:
    with LoopbackServer(directory=site) as srv:
        yield srv


@pytest.fixture()
def second(site: Path) -> Iterator[LoopbackServer]:
    """Another host: the same directory served on 127.0.0.2."""
    with LoopbackServer(directory=site, host="127.0.0.2") as srv:
        yield srv


def wait_for(predicate, *, limit_s: float = 30.0) -> None:
    """Poll until ``predicate()`` holds (a bound for the server side to notice, not a speed test)."""
    stop = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > stop:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- 12.1 deadlines


def test_drip_servers_hit_the_deadline_and_are_hung_up_on(server: LoopbackServer) -> None:
    """Acceptance: drip rows end download_failed with 'deadline'; the normal rows in the batch are ok.

    Before: a 1-byte/s drip of the status line, headers or chunk sizes held the row until the
    server hung up and ended as decode_failed ('empty body'). The server seeing the client close
    the connection mid-drip proves the deadline cut the transfer (no drip ever completes).
    """
    drips = [f"{server.url}/drip/{phase}/img.jpg" for phase in ("status", "headers", "chunks", "body")]
    normal = [f"{server.url}/img.jpg"] * 4
    cfg = DownloadConfig(image_size=SIZE, timeout_s=2, retries=0, threads=8, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [u for pair in zip(drips, normal, strict=True) for u in pair])
    statuses, errors = list(out["status"]), list(out["error"])
    assert statuses[1::2] == ["ok"] * 4
    assert statuses[0::2] == ["download_failed"] * 4
    assert all(e.startswith("deadline:") for e in errors[0::2]), errors
    wait_for(lambda: len(server.drips) == 4)
    assert sorted(outcome for _, outcome, _ in server.drips) == ["client closed early"] * 4
    body = (server._server.root / "img.jpg").stat().st_size
    assert all(sent < body for _, _, sent in server.drips)


def test_header_bytes_are_capped(server: LoopbackServer) -> None:
    """Before: http.client accepted 100 header lines of 64 KB; now the status line + headers are capped."""
    cfg = DownloadConfig(image_size=SIZE, threads=2, **LOOPBACK)
    out = run(
        Downloader(cfg=cfg),
        [f"{server.url}/many-headers/90/img.jpg", f"{server.url}/many-headers/30/img.jpg"],
    )
    assert list(out["status"]) == ["download_failed", "ok"]
    assert "max_header_bytes=65536" in out["error"][0]
    small = DownloadConfig(image_size=SIZE, threads=1, max_header_bytes=4096, **LOOPBACK)
    out = run(Downloader(cfg=small), [f"{server.url}/many-headers/5/img.jpg"])
    assert out["status"][0] == "download_failed" and "max_header_bytes=4096" in out["error"][0]


def test_batch_deadline_fails_stuck_rows_and_returns(server: LoopbackServer) -> None:
    """A row stuck beyond what a socket bounds ends download_failed 'deadline: batch ...'; others keep theirs."""
    cfg = DownloadConfig(image_size=SIZE, timeout_s=30, retries=0, threads=4, batch_timeout_s=1.0, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [f"{server.url}/img.jpg", f"{server.url}/slow/20/img.jpg"])
    assert list(out["status"]) == ["ok", "download_failed"]
    assert out["error"][1].startswith("deadline: batch not finished within 1s")


def test_derived_batch_deadline_covers_every_attempt() -> None:
    cfg = DownloadConfig(timeout_s=5, retries=2, threads=4, backoff_s=1, retry_after_max_s=10)
    bound = Downloader(cfg=cfg).batch_timeout(9)
    # 3 waves of 4 threads, each row 3 attempts of 5 s plus the longest waits (2 x 10 s), plus slack
    assert bound == 3 * (3 * 5 + 20) + dl.BATCH_DEADLINE_SLACK_S
    assert Downloader(cfg=DownloadConfig(batch_timeout_s=7)).batch_timeout(1000) == 7


# ----------------------------------------------------------------------------- 12.2 pixels and memory


def test_huge_sixteen_bit_png_is_too_large_from_its_header(server: LoopbackServer) -> None:
    """Before: a ~160 KB 9000x9000 16-bit PNG (81 Mpx) was decoded, +2 GB RSS per row."""
    cfg = DownloadConfig(image_size=SIZE, threads=1, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [f"{server.url}/png16/9000x9000"])
    assert out["status"][0] == "too_large"
    assert "9000x9000" in out["error"][0] and "max_pixels=40000000" in out["error"][0]
    assert out["original_width"][0] == 0  # never decoded


def test_sixteen_bit_conversion_is_integer_and_strip_wise() -> None:
    """Before: np.asarray(img, float64) made an 8-byte-per-pixel copy; now < 2 bytes per pixel."""
    side = 2000
    img = Image.fromarray(np.full((side, side), 32768, dtype=np.uint16))
    img.load()
    tracemalloc.start()
    try:
        rgb = _to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.getpixel((side // 2, side // 2)) == (128, 128, 128)
    assert peak < 2 * side * side, peak
    full = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert [full.getpixel((x, 0)) for x in range(3)] and [
        _to_rgb(full).getpixel((x, 0))[0] for x in range(3)
    ] == [
        0,
        1,
        255,
    ]


def test_pixel_budget_serialises_decodes(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget of one image, decodes never overlap; with a larger one they do (the probe works)."""
    active = {"now": 0, "max": 0}
    lock = threading.Lock()
    real = dl._decode_opened

    def probe(img: Image.Image):
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.1)
        try:
            return real(img)
        finally:
            with lock:
                active["now"] -= 1

    monkeypatch.setattr(dl, "_decode_opened", probe)
    urls = [f"{server.url}/img.jpg"] * 8
    tight = DownloadConfig(image_size=SIZE, threads=8, max_pixels=4000, decode_pixel_budget=4000, **LOOPBACK)
    out = run(Downloader(cfg=tight), urls)
    assert list(out["status"]) == ["ok"] * 8 and active["max"] == 1
    active["max"] = 0
    loose = DownloadConfig(
        image_size=SIZE, threads=8, max_pixels=4000, decode_pixel_budget=40_000, **LOOPBACK
    )
    assert list(run(Downloader(cfg=loose), urls)["status"]) == ["ok"] * 8 and active["max"] > 1


def test_memory_error_is_a_row_status(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = dl._decode_opened

    def oom_for_wide(img: Image.Image):
        if img.size[0] > 60:
            raise MemoryError
        return real(img)

    monkeypatch.setattr(dl, "_decode_opened", oom_for_wide)
    cfg = DownloadConfig(image_size=SIZE, threads=2, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [f"{server.url}/img.jpg", f"{server.url}/gen/40x40.jpg"])
    assert list(out["status"]) == ["too_large", "ok"]
    assert "out of memory" in out["error"][0]


def test_budget_must_fit_one_image() -> None:
    with pytest.raises(ValueError, match="decode_pixel_budget"):
        DownloadConfig(max_pixels=100, decode_pixel_budget=99)


# ----------------------------------------------------------------------------- 12.3 address policy


def test_default_policy_blocks_loopback_without_sending_a_request(server: LoopbackServer) -> None:
    """Acceptance (stage level): every loopback spelling is blocked_address and nothing reaches the server."""
    port = server.port
    urls = [
        f"http://127.0.0.1:{port}/img.jpg",
        f"http://127.0.0.2:{port}/img.jpg",
        f"http://2130706433:{port}/img.jpg",  # 127.0.0.1 as one decimal number
        f"http://2130706434:{port}/img.jpg",  # 127.0.0.2
        f"http://0x7f000001:{port}/img.jpg",
        f"http://[::1]:{port}/img.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/img.jpg",
        f"http://localhost:{port}/img.jpg",
    ]
    out = run(Downloader(cfg=DownloadConfig(image_size=SIZE, threads=4)), urls)
    assert list(out["status"]) == ["blocked_address"] * len(urls), list(out["error"])
    assert "loopback" in out["error"][0] or "mapped" in out["error"][0]
    assert server.requests == []


@pytest.mark.parametrize(
    "ip",
    ["10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
     "127.0.0.2", "fd00::1", "fe80::1", "::1", "::", "::ffff:8.8.8.8", "::ffff:127.0.0.1", "2002:7f00:1::1",
     "64:ff9b::a00:1", "240.0.0.1", "255.255.255.255"],
)  # fmt: skip
def test_non_global_addresses_are_refused(ip: str) -> None:
    policy = AddressPolicy(allow_private=False, allowed_hosts=[])
    assert policy.refusal("example.com", ip) is not None
    assert AddressPolicy(allow_private=True, allowed_hosts=[]).refusal("example.com", ip) is None


def test_public_addresses_and_exemptions() -> None:
    policy = AddressPolicy(allow_private=False, allowed_hosts=["10.0.0.0/8", "intranet.example", "fd00::5"])
    assert policy.refusal("example.com", "93.184.216.34") is None
    assert policy.refusal("example.com", "2606:4700::1") is None
    assert policy.refusal("example.com", "10.9.8.7") is None  # CIDR entry
    assert policy.refusal("example.com", "11.0.0.1") is None
    assert policy.refusal("intranet.example", "192.168.0.1") is None  # host name entry
    assert policy.refusal("INTRANET.example.", "127.0.0.1") is None
    assert policy.refusal("example.com", "fd00::5") is None
    assert policy.refusal("example.com", "fd00::6") is not None
    assert policy.refusal("example.com", "192.168.0.1") is not None


def test_allowed_hosts_are_validated() -> None:
    assert DownloadConfig(allowed_hosts=[" 127.0.0.1 ", "[::1]", "Example.COM"]).allowed_hosts == [
        "127.0.0.1",
        "::1",
        "example.com",
    ]
    for bad in (["10.0.0.0/33"], [""], ["user@host"]):
        with pytest.raises(ValueError, match="allowed_hosts"):
            DownloadConfig(allowed_hosts=bad)


def test_redirect_hops_are_checked_too(server: LoopbackServer, second: LoopbackServer) -> None:
    """A permitted host redirecting to a blocked one (another loopback host and port) is blocked_address."""
    target = quote(f"{second.url}/img.jpg", safe="")
    url = f"{server.url}/goto/{target}"
    out = run(Downloader(cfg=DownloadConfig(image_size=SIZE, threads=1, **LOOPBACK)), [url])
    assert out["status"][0] == "blocked_address" and "127.0.0.2" in out["error"][0]
    assert second.requests == []
    wide = DownloadConfig(image_size=SIZE, threads=1, allowed_hosts=["127.0.0.0/8"])
    assert run(Downloader(cfg=wide), [url])["status"][0] == "ok"
    assert second.requests == [("GET", "/img.jpg")]


def test_dns_rebinding_cannot_switch_the_checked_address(
    server: LoopbackServer, second: LoopbackServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolver answers a permitted IP first and a blocked one after: the connection uses the
    checked answer (server on 127.0.0.1), never a second lookup (127.0.0.2). Host keeps the name."""
    calls: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.example":
            calls.append(host)
            address = "127.0.0.1" if len(calls) == 1 else "127.0.0.2"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = server.port
    second.stop()
    with LoopbackServer(directory=server._server.root, host="127.0.0.2", port=port) as rebound:
        out = run(
            Downloader(cfg=DownloadConfig(image_size=SIZE, threads=1, **LOOPBACK)),
            [f"http://rebind.example:{port}/img.jpg"],
        )
        assert out["status"][0] == "ok", out["error"][0]
        assert rebound.requests == [] and calls == ["rebind.example"]
        assert f"rebind.example:{port}" in server.max_concurrent  # the Host header kept the name
        out = run(
            Downloader(cfg=DownloadConfig(image_size=SIZE, threads=1, **LOOPBACK)),
            [f"http://rebind.example:{port}/img.jpg"],
        )
        assert out["status"][0] == "blocked_address" and rebound.requests == []


def test_credentials_in_urls_are_invalid(server: LoopbackServer) -> None:
    url = f"http://user:secret@127.0.0.1:{server.port}/img.jpg"
    out = run(
        Downloader(cfg=DownloadConfig(image_size=SIZE, threads=1, **LOOPBACK)),
        [url, f"http://u@{server.url[7:]}/img.jpg"],
    )
    assert list(out["status"]) == ["invalid_url", "invalid_url"] and "credentials" in out["error"][0]
    assert server.requests == []


def test_opt_out_header_on_a_redirect_hop_is_honoured(server: LoopbackServer) -> None:
    """Before: only the final response's X-Robots-Tag was read; a 302 carrying noai was ignored."""
    out = run(
        Downloader(cfg=DownloadConfig(image_size=SIZE, threads=1, **LOOPBACK)),
        [f"{server.url}/header/noai/redirect/1/img.jpg", f"{server.url}/redirect/1/header/nofollow/img.jpg"],
    )
    assert list(out["status"]) == ["opted_out", "ok"]
    paths = [path for _, path in server.requests]
    assert "/redirect/0/img.jpg" not in paths  # the opted-out hop's target is never requested
    assert "/redirect/0/header/nofollow/img.jpg" in paths


# ----------------------------------------------------------------------------- 14.1 politeness


def test_per_host_concurrency_cap_is_never_exceeded(server: LoopbackServer, second: LoopbackServer) -> None:
    """16 threads, 2 hosts, cap 3: each host sees at most 3 requests at once (and more than 1, so
    the server's counter does see overlap; each request takes 1 s to answer)."""
    urls = [f"{base}/slow/1/img.jpg" for base in (server.url, second.url) for _ in range(6)]
    cfg = DownloadConfig(image_size=SIZE, threads=16, per_host_connections=3, allowed_hosts=["127.0.0.0/8"])
    out = run(Downloader(cfg=cfg), urls)
    assert list(out["status"]) == ["ok"] * len(urls)
    first, other = server.max_concurrent, second.max_concurrent
    assert list(first) == [f"127.0.0.1:{server.port}"] and list(other) == [f"127.0.0.2:{second.port}"]
    assert 2 <= first[f"127.0.0.1:{server.port}"] <= 3
    assert 2 <= other[f"127.0.0.2:{second.port}"] <= 3


def test_per_host_rate_spaces_request_starts(server: LoopbackServer) -> None:
    cfg = DownloadConfig(image_size=SIZE, threads=8, per_host_rate=5, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [f"{server.url}/img.jpg"] * 6)
    assert list(out["status"]) == ["ok"] * 6
    times = [t for _, t in server.request_times]
    assert len(times) == 6 and times[-1] - times[0] >= 0.8  # 5 intervals of 1/5 s (minus the first's lag)


def test_retry_after_is_honoured_up_to_the_cap(server: LoopbackServer) -> None:
    cfg = DownloadConfig(image_size=SIZE, threads=2, retries=2, retry_after_max_s=5, **LOOPBACK)
    out = run(
        Downloader(cfg=cfg),
        [f"{server.url}/retry-after/1/1/img.jpg", f"{server.url}/retry-after/9/120/img.jpg"],
    )
    assert list(out["status"]) == ["ok", "download_failed"]
    honoured = [t for path, t in server.request_times if path == "/retry-after/1/1/img.jpg"]
    assert len(honoured) == 2 and honoured[1] - honoured[0] >= 1.0  # not retried before Retry-After
    assert "Retry-After 120s exceeds download.retry_after_max_s=5" in out["error"][1]
    assert [p for _, p in server.requests].count("/retry-after/9/120/img.jpg") == 1  # not hammered


def test_retry_after_pauses_the_whole_host(server: LoopbackServer) -> None:
    """A 429 with Retry-After holds back the host's other rows too, not only the one that got it."""
    cfg = DownloadConfig(image_size=SIZE, threads=1, retries=1, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [f"{server.url}/retry-after/1/1/img.jpg", f"{server.url}/img.jpg"])
    assert list(out["status"]) == ["ok", "ok"]
    times = dict((path, t) for path, t in server.request_times)
    first_429 = server.request_times[0][1]
    assert times["/img.jpg"] - first_429 >= 1.0


def test_transient_failures_are_retried_with_the_configured_count(server: LoopbackServer) -> None:
    cfg = DownloadConfig(image_size=SIZE, threads=1, retries=3, backoff_s=0.01, allowed_hosts=["127.0.0.1"])
    out = run(Downloader(cfg=cfg), [f"{server.url}/status/503", f"{server.url}/status/404"])
    assert list(out["status"]) == ["download_failed", "download_failed"]
    paths = [p for _, p in server.requests]
    assert paths.count("/status/503") == 4 and paths.count("/status/404") == 1
    with pytest.raises(ValueError, match="retries"):
        DownloadConfig(retries=11)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None


def test_robots_txt_is_obeyed_when_on_and_fetched_once_per_host(site: Path) -> None:
    rules = "User-agent: capfilt\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n"
    with LoopbackServer(directory=site, robots_txt=rules) as srv:
        urls = [f"{srv.url}/private/a.jpg", f"{srv.url}/public/b.jpg"] * 3
        on = DownloadConfig(image_size=SIZE, threads=4, robots_txt=True, **LOOPBACK)
        out = run(Downloader(cfg=on), urls)
        assert list(out["status"]) == ["opted_out", "ok"] * 3
        assert "robots.txt disallows" in out["error"][0]
        assert [p for _, p in srv.requests].count("/robots.txt") == 1
        assert ("GET", "/private/a.jpg") not in srv.requests
        off = DownloadConfig(image_size=SIZE, threads=4, **LOOPBACK)
        before = len(srv.requests)
        assert list(run(Downloader(cfg=off), urls)["status"]) == ["ok"] * 6
        assert "/robots.txt" not in [p for _, p in srv.requests[before:]]


def test_missing_robots_txt_allows_and_unreachable_one_fails(server: LoopbackServer) -> None:
    cfg = DownloadConfig(image_size=SIZE, threads=2, robots_txt=True, **LOOPBACK)
    out = run(Downloader(cfg=cfg), [f"{server.url}/img.jpg"])  # no robots.txt: 404 = no rules
    assert out["status"][0] == "ok"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    out = run(Downloader(cfg=cfg), [f"http://127.0.0.1:{port}/img.jpg"])  # nothing listens
    assert out["status"][0] == "download_failed" and "robots.txt" in out["error"][0]


def test_loopback_server_host_must_be_loopback(site: Path) -> None:
    with pytest.raises(UserError, match="loopback"):
        LoopbackServer(directory=site, host="0.0.0.0")


def test_bootstrap_rounds_opt_in_to_the_served_loopback_corpus_only(tmp_path: Path) -> None:
    """The bootstrap serves its synthetic corpus on 127.0.0.1; its rounds allow that address only."""
    from capfilt import bootstrap

    cfg = bootstrap.load_config(None, ["pipeline.download.allowed_hosts=[]"])
    assert cfg.pipeline.download.allowed_hosts == []
    boot = bootstrap.Bootstrap(cfg=cfg, run_dir=tmp_path)
    pcfg = boot.pipeline_config(1, tmp_path / "urls.parquet", tmp_path / "stage")
    assert pcfg.download.allowed_hosts == ["127.0.0.1"] and not pcfg.download.allow_private_networks
    demo = bootstrap.load_config(None, [])  # the embedded demo config says so explicitly too
    assert demo.pipeline.download.allowed_hosts == ["127.0.0.1"]
