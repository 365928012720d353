"""capfilt report: one self-contained HTML page, checked as text and rendered in Chromium.

The run directory comes from ``support.make_run`` (tests/support.py).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import support as fixtures  # noqa: E402  (tests/ is on pytest's pythonpath)
from PIL import Image, ImageStat

from capfilt.errors import UserError
from capfilt.report import THUMBNAIL_SIDE, _Candidates, build_report

THUMB = '<img src="data:image/jpeg;base64,'


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path / "run"
    return run_dir, fixtures.make_run(run_dir)


def _ok(info: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in info["samples"] if s["status"] == "ok"]


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.mark.parametrize("kind", ["run", "bootstrap_with_summary"])
def test_report_renders_in_headless_chromium(
    run: tuple[Path, dict[str, Any]], tmp_path: Path, kind: str
) -> None:
    browser = _chromium()
    if browser is None:
        message = "chromium not found (/usr/bin/chromium or chromium on PATH); CI installs Debian's chromium"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    run_dir, _ = run
    if kind == "bootstrap_with_summary":  # the demo's page: the CapFilt section on top of the run's
        run_dir = tmp_path / "boot"
        _bootstrap_with_summary(run_dir)
    page = build_report(run_dir)
    png = tmp_path / "shot.png"
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=1280,2000",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert png.is_file(), f"chromium wrote no screenshot (rc {result.returncode}): {result.stderr[-2000:]}"
    with Image.open(png) as shot:
        assert shot.size == (1280, 2000)
        gray = shot.convert("L")
        assert ImageStat.Stat(gray).stddev[0] > 15  # text, charts and thumbnails, not a blank page
        # Kept (green) and removed (red) marks are visible, not only present in the markup.
        rgb = shot.convert("RGB").resize((320, 500))
        pixels = list(rgb.getdata())
    assert any(g > 100 and r < 60 and b < 90 for r, g, b in pixels)  # #1a7f37-ish green
    assert any(r > 180 and g < 70 and b < 80 for r, g, b in pixels)  # #cf222e-ish red


def test_report_is_self_contained_and_shows_the_filter(run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, info = run
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")

    # Self-contained: no scripts, no external resources; images are inline JPEG data URIs.
    assert "<script" not in page.lower()
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    assert "<svg" in page and page.count("<svg") >= 4  # status, sources, two histograms
    ok = _ok(info)
    kept_web = [s for s in ok if s["web_kept"]]
    assert page.count(THUMB) == len(ok)  # 48 per section is more than this run has
    assert page.count('class="card"') == len(ok)

    # Counts and threshold.
    for status, count in info["status"].items():
        assert f">{status}</text>" in page and f"{count:,} (" in page
    assert "threshold 0.5" in page
    assert f"{len(kept_web):,} / {sum(not math.isnan(s['web_itm']) for s in ok):,}" in page
    assert "runs/captioner-tiny" in page and "keep_synthetic: 2" in page
    assert "MapBatches(download)" in page  # per-stage throughput from the manifest

    # Each sample shows its web text and captions, kept green and removed red, with scores.
    removed = next(s for s in ok if not s["web_kept"] and s["web_text"])
    block = re.search(
        r'<div class="t removed"[^>]*><span class="s">([^<]+)</span><span class="src">web</span>'
        + re.escape(removed["web_text"])
        + "<",
        page,
    )
    assert block and block.group(1) == f"{removed['web_itm']:.3f}"
    kept = kept_web[0]
    assert re.search(
        r'<div class="t kept"[^>]*><span class="s">[^<]+</span><span class="src">web</span>'
        + re.escape(kept["web_text"])
        + "<",
        page,
    )
    assert page.count('class="t kept"') == len(info["pairs"])
    failed = next(s for s in info["samples"] if s["status"] == "download_failed")
    assert failed["url"] in page and "HTTP 404" in page


def test_thumbnails_are_small_jpegs(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, _ = run
    # A large image must still become a small thumbnail.
    big = Image.new("RGB", (1600, 1200), (200, 30, 30))
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    with pq.ParquetFile(run_dir / "samples" / "shard-00000.parquet") as f:
        key = next(r["key"] for r in f.read().to_pylist() if r["status"] == "ok")
    tar = run_dir / "images" / "shard-00000.tar"
    with tarfile.open(tar) as old:
        members = [(m, old.extractfile(m).read()) for m in old.getmembers()]
    with tarfile.open(tar, "w") as new:
        for member, data in members:
            if member.name == f"{key}.jpg":
                data = buf.getvalue()
                member.size = len(data)
            new.addfile(member, io.BytesIO(data))
    page = build_report(run_dir, tmp_path / "r.html").read_text()
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert uris
    for uri in uris:
        raw = base64.b64decode(uri)
        assert len(raw) < 12_000
        with Image.open(io.BytesIO(raw)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_SIDE
    assert len(page.encode()) < 300_000


def test_samples_per_section_limits_and_spreads_the_grid(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, info = run
    page = build_report(run_dir, tmp_path / "r.html", samples_per_section=2).read_text()
    assert page.count('class="card"') == 4
    kept_scores = sorted(s["web_itm"] for s in _ok(info) if s["web_kept"])
    section = page.split("<h2>Web text kept</h2>")[1].split("<h2>")[0]
    shown = [
        float(x) for x in re.findall(r'<span class="s">([0-9.]+)</span><span class="src">web</span>', section)
    ]
    assert shown == [pytest.approx(kept_scores[-1], abs=1e-3), pytest.approx(kept_scores[0], abs=1e-3)]
    none = build_report(run_dir, tmp_path / "n.html", samples_per_section=0).read_text()
    assert none.count('class="card"') == 0 and "<svg" in none


def test_untrusted_text_is_escaped(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, _ = run
    path = run_dir / "samples" / "shard-00000.parquet"
    table = pq.read_table(path)
    texts = table.column("web_text").to_pylist()
    texts[1] = '<script>alert("x")</script><img src="http://evil.example/x.png">'
    table = table.set_column(
        table.schema.get_field_index("web_text"), "web_text", pa.array(texts, pa.string())
    )
    pq.write_table(table, path)
    page = build_report(run_dir, tmp_path / "r.html").read_text()
    assert "<script" not in page and 'src="http' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page


def test_missing_images_show_a_placeholder(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, info = run
    (run_dir / "images" / "shard-00001.tar").unlink()
    page = build_report(run_dir, tmp_path / "r.html").read_text()
    missing = sum(s["status"] == "ok" for s in info["samples"][6:12])  # shard 1 holds rows 6..11
    assert page.count('<div class="noimg">no image</div>') == missing > 0


def test_bootstrap_report_charts_rounds(tmp_path: Path) -> None:
    root = tmp_path / "boot"
    infos = fixtures.make_bootstrap(root, rounds=3)
    path = build_report(root)
    assert path == root / "report.html"
    page = path.read_text()
    assert "Bootstrap rounds" in page and "bootstrap round 3 of 4" in page
    for metric in ("txt_r1", "img_r1", "cider", "bleu4", "filter_auc", "kept_web"):
        assert f">{metric}</text>" in page  # one line chart per metric
    assert page.count("<polyline") >= 6
    assert "Evaluation of round 3" in page
    latest_ok = len(_ok(infos[2]))
    assert page.count(THUMB) == latest_ok

    first = build_report(root, tmp_path / "r1.html", round=1).read_text()
    assert "bootstrap round 1 of 4" in first and "Evaluation of round 1" in first
    kept1 = sum(infos[0]["kept"].values())
    assert f"<b>{kept1:,}</b><span>kept pairs in dataset/</span>" in first


def test_plain_run_has_no_rounds_section_and_bad_input_is_a_user_error(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, _ = run
    assert "Bootstrap rounds" not in build_report(run_dir, tmp_path / "r.html").read_text()
    with pytest.raises(UserError, match="single run"):
        build_report(run_dir, round=2)
    with pytest.raises(UserError, match="no such run directory"):
        build_report(tmp_path / "nope")
    (run_dir / "metrics.jsonl").write_text("{not json\n")
    (run_dir / "round-1" / "pipeline").mkdir(parents=True)
    with pytest.raises(UserError, match="no round has pipeline output"):
        build_report(run_dir)


def test_candidates_stay_bounded_and_uniform() -> None:
    picks = _Candidates(cap=10)
    for i in range(1000):
        picks.add(i / 1000, 0, i)
    assert len(picks.items) <= 10 and picks.seen == 1000
    rows = [r for _, _, r in picks.items]
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] >= 1000 - picks.stride  # the whole stream
    chosen = picks.pick(3)
    assert [c[0] for c in chosen] == sorted((c[0] for c in chosen), reverse=True)
    assert chosen[0][0] == max(c[0] for c in picks.items) and chosen[-1][0] == min(c[0] for c in picks.items)
    nan_last = _Candidates(cap=10)
    for score in (math.nan, 0.2, 0.9):
        nan_last.add(score, 0, 0)
    assert [c[0] for c in nan_last.pick(3)][:2] == [0.9, 0.2] and math.isnan(nan_last.pick(3)[2][0])


def test_metrics_lines_must_be_json(tmp_path: Path) -> None:
    root = tmp_path / "boot"
    fixtures.make_bootstrap(root, rounds=1, unfinished=False)
    with open(root / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"round": 2, "txt_r1": 0.5}) + "\n{broken\n")
    with pytest.raises(UserError, match="metrics.jsonl: line 3"):
        build_report(root)


# ---- the demo's top section: CapFilt judged against a synthetic corpus's truth ------------------------

SUMMARY = {
    "threshold": 0.5,
    "filter": {
        "auc": 0.93,
        "by_type": {
            "clean": {"count": 600, "removed": 0.12},
            "junk": {"count": 133, "removed": 0.97, "recall": 0.97, "precision": 0.64, "auc": 0.981},
            "mismatched": {"count": 134, "removed": 0.9, "recall": 0.9, "precision": 0.63, "auc": 0.952},
            "wrong_attribute": {
                "count": 133,
                "removed": 0.61,
                "recall": 0.61,
                "precision": 0.53,
                "auc": 0.804,
            },
        },
    },
    "captions": {
        "captions": 2000,
        "attribute_check": 0.71,
        "images": 1000,
        "images_with_a_right_caption": 0.86,
    },
    "noise": {"raw_web": 0.4, "kept_web_texts": 0.12, "kept_synthetic_wrong": 0.09, "kept_set": 0.1},
    "pairs": {"raw_web": 1000, "kept_web": 600, "synthetic_added": 810, "kept_set": 1410},
    "caption_scores": {"score_auc": 0.561, "agreement_auc": 0.714, "min_agreement": 0.995},
}


def _bootstrap_with_summary(root: Path) -> None:
    fixtures.make_bootstrap(root, rounds=1, unfinished=False)
    path = root / "round-1" / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "capfilt": SUMMARY}), encoding="utf-8")


def test_bootstrap_report_says_at_the_top_whether_capfilt_worked(tmp_path: Path) -> None:
    root = tmp_path / "boot"
    _bootstrap_with_summary(root)
    page = build_report(root).read_text()
    top = page.index("Did CapFilt work?")
    assert top < page.index("The pipeline run") < page.index("kept pairs in dataset/")
    assert "junk 0.981, mismatched 0.952, wrong attribute 0.804" in page
    assert "71% of its 2000 synthetic captions" in page and "86% of the web images" in page
    # per-type precision / recall / AUC, and the false-removal rate of correct texts
    assert re.search(
        r"<td>junk</td>.*?<td class='n'>133</td><td class='n'>97%</td><td class='n'>64%</td>"
        r"<td class='n'>0.981</td>",
        page,
    )
    assert "12% removed by mistake" in page
    # which synthetic captions are right: the filter's ITM against agreement among the captions
    assert "ITM score tells right captions from wrong ones with ROC-AUC 0.561" in page
    assert "other sampled captions with 0.714" in page and "agreement is at least 0.995" in page
    # what CapFilt changed: noise before -> after, pairs added by the captioner
    assert "<b>40% \u2192 10%</b>" in page and "<b>+810</b>" in page and "<b>1,000 \u2192 1,410</b>" in page
    assert '"capfilt"' not in page and "capfilt.filter" not in page  # not repeated in the evaluation table


def test_reports_without_a_summary_have_no_capfilt_section(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, _ = run
    assert "Did CapFilt work?" not in build_report(run_dir, tmp_path / "plain.html").read_text()
    root = tmp_path / "boot"
    fixtures.make_bootstrap(root, rounds=1, unfinished=False)
    assert "Did CapFilt work?" not in build_report(root).read_text()


def test_report_shows_the_score_the_threshold_applied_to_when_itc_is_mixed_in(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """With filter.itc_weight the tile, the histograms and the cards show (1 - w) x ITM + w x ITC,
    the number web_kept / synthetic_kept were decided on, not the ITM alone."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run_dir, _ = run
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("  threshold:", "  itc_weight: 0.5\n  threshold:"), encoding="utf-8")
    for path in sorted((run_dir / "samples").glob("*.parquet")):
        table = pq.read_table(path)
        itm = table.column("web_itm")
        web_itc = pc.subtract(pa.scalar(1.0), itm)  # every mixed web score is exactly 0.5
        synthetic = [[0.9 - v for v in (cell or [])] for cell in table.column("synthetic_itm").to_pylist()]
        table = table.append_column("web_itc", web_itc).append_column(
            "synthetic_itc", pa.array(synthetic, type=pa.list_(pa.float64()))
        )
        pq.write_table(table, path)
    page = build_report(run_dir, tmp_path / "mixed.html").read_text()
    assert "filter threshold (score 0.5 x ITM + 0.5 x ITC cosine)" in page
    assert "Web texts: score 0.5 x ITM + 0.5 x ITC cosine" in page
    web_scores = re.findall(r'<span class="s">([0-9.]+)</span><span class="src">web</span>', page)
    assert web_scores and set(web_scores) == {"0.500"}
    synthetic_scores = re.findall(r'<span class="s">([0-9.]+)</span><span class="src">syn \d</span>', page)
    assert synthetic_scores and set(synthetic_scores) == {"0.450"}
