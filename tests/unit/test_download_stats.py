"""The download section: success rate, statuses by domain, bytes; in the manifest and the report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
from PIL import Image

from capfilt.download_stats import domain, download_stats, images_per_s
from capfilt.report import build_report
from capfilt.stages import write

# (url, status) per row; rows 0-4 are shard 0, rows 5-8 shard 1.
ROWS = [
    ("http://a.example/1.jpg", "ok"),
    ("http://A.example:8080/2.jpg", "ok"),
    ("http://a.example/3.jpg", "download_failed"),
    ("https://b.example/x.png", "too_small"),
    (None, "invalid_url"),
    ("http://a.example/4.jpg", "caption_failed"),  # its image was downloaded
    ("https://b.example/y.png", "ok"),
    ("ftp://", "invalid_url"),
    ("http://<script>.example/z.jpg", "download_failed"),
]


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16 + i, 16), (i * 20, 0, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def build(run_dir: Path) -> int:
    """Two committed shards of ROWS; returns the bytes of the images stored."""
    stored = 0
    for shard, rows in ((0, range(0, 5)), (1, range(5, 9))):
        images = [jpeg(i) if ROWS[i][1] in ("ok", "caption_failed") else b"" for i in rows]
        stored += sum(len(b) for i, b in zip(rows, images, strict=True) if ROWS[i][1] == "ok")
        table = pa.table(
            {
                "key": [f"k{i}" for i in rows],
                "url": pa.array([ROWS[i][0] for i in rows], pa.string()),
                "web_text": [f"text {i}" for i in rows],
                "status": [ROWS[i][1] for i in rows],
                "error": ["" if ROWS[i][1] == "ok" else "x" for i in rows],
                "image": pa.array(images, pa.binary()),
                "web_kept": [ROWS[i][1] == "ok" for i in rows],
            }
        )
        write.write_shard(run_dir, shard, table)
    return stored


def test_domain_is_the_lower_case_host_or_invalid() -> None:
    assert domain("HTTP://Img.Example.COM:8080/a.jpg?x=1") == "img.example.com"
    assert domain(None) == domain("") == domain("ftp://") == domain("not a url") == "(invalid)"
    assert domain("http://[::1") == "(invalid)"


def test_download_stats_count_statuses_by_domain_and_stored_bytes(tmp_path: Path) -> None:
    stored = build(tmp_path)
    stats = download_stats(tmp_path)
    assert stats["rows"] == 9
    assert stats["downloaded"] == 4 and stats["success_rate"] == round(4 / 9, 4)
    assert sum(stats["status"].values()) == 9
    top = stats["domains"]["top"]
    assert stats["domains"]["count"] == 4
    assert [d["domain"] for d in top] == ["a.example", "(invalid)", "b.example", "<script>.example"]
    assert top[0] == {
        "domain": "a.example",
        "rows": 4,
        "downloaded": 3,
        "success_rate": 0.75,
        "status": {"caption_failed": 1, "download_failed": 1, "ok": 2},
    }
    assert stats["domains"]["other"]["rows"] == 0
    assert stats["bytes"] == {"images": 3, "total": stored, "mean": round(stored / 3, 1)}
    assert images_per_s(stats, 9.0) == 4.0


def test_domains_beyond_top_are_summed(tmp_path: Path) -> None:
    build(tmp_path)
    stats = download_stats(tmp_path, top=1)
    other = stats["domains"]["other"]
    assert [d["domain"] for d in stats["domains"]["top"]] == ["a.example"]
    assert other["domain"] == "3 other domains" and other["rows"] == 5 and other["downloaded"] == 1
    assert other["status"] == {"download_failed": 1, "invalid_url": 2, "ok": 1, "too_small": 1}


def test_report_has_a_download_section_with_escaped_domains(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "config.yaml").write_text("input: {path: x}\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"timing": {"images_per_s": 12.5}}))
    page = build_report(tmp_path).read_text()
    assert "<h2>Downloads</h2>" in page
    assert "44.4%" in page and "12.5" in page
    assert "&lt;script&gt;.example" in page and "<script>" not in page
