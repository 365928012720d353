"""`capfilt report`: one self-contained HTML page that shows what the filter did to a run.

The page must open anywhere (a laptop, a CI artifact, an e-mail attachment) without a
network, so everything is inline: CSS in a ``<style>`` block, charts as hand-written SVG,
thumbnails as small base64 JPEG data URIs. There is no JavaScript at all. Text from the web
is untrusted, so every string that came from the data is HTML-escaped, and URLs are shown as
text, never as links.

Sections, top to bottom: headline numbers; input rows by status and kept pairs by source;
the ITM score histograms of web texts and synthetic captions with the threshold; per-round
metrics of a bootstrap directory (from ``metrics.jsonl``); a grid of samples whose web text
was kept and one whose web text was removed (thumbnail, web text and synthetic captions with
their scores, kept green and removed red); examples of failed rows; models, versions,
timing and config.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from capfilt.download_stats import download_stats
from capfilt.errors import UserError
from capfilt.eval import auc_text
from capfilt.rundir import IMAGES_DIR
from capfilt.rundir.read import (
    KEPT_COLUMNS,
    RunStats,
    RunView,
    ScoreHistogram,
    TarImages,
    collect_stats,
    filter_scores,
    resolve_run,
    score_columns,
)
from capfilt.stages.select import score_words
from capfilt.stages.status import Status

THUMBNAIL_SIDE = 144
"""Longest side of a thumbnail in pixels: readable in a grid, a few KB as JPEG."""
THUMBNAIL_QUALITY = 70
HISTOGRAM_BINS = 20
FAILED_EXAMPLES = 3
"""Example rows shown per failure status."""
CANDIDATE_FACTOR = 32
"""Candidates kept per grid slot while scanning; thinned systematically beyond that."""

KEPT = "#1a7f37"
REMOVED = "#cf222e"
NEUTRAL = "#57606a"
ACCENT = "#0969da"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1240px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 16px}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:12px}
.tile{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px}
.tile b{display:block;font-size:22px}.tile span{color:#57606a;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:16px}
.chart{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:8px;overflow:hidden}
.card img,.noimg{display:block;width:144px;height:108px;object-fit:contain;background:#eaeef2;margin:0 auto 6px;border-radius:4px}
.noimg{line-height:108px;text-align:center;color:#57606a;font-size:12px}
.key{font:11px ui-monospace,monospace;color:#57606a;word-break:break-all}
.t{margin:4px 0;padding:3px 6px;border-radius:4px;font-size:13px;word-break:break-word}
.t.kept{background:#dafbe1;border-left:4px solid #1a7f37}.t.removed{background:#ffebe9;border-left:4px solid #cf222e}
.t.none{background:#f6f8fa;border-left:4px solid #8c959f;color:#57606a}
.t .s{float:right;font:12px ui-monospace,monospace;margin-left:6px}.t .src{font-size:11px;color:#57606a;margin-right:4px}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px;overflow:auto;font-size:12px}
.legend{font-size:12px;color:#57606a}.sw{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;border-radius:2px}
"""


def _e(value: Any) -> str:
    """HTML-escape anything (data from the web is untrusted); floats to 4 significant digits."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    return html.escape("" if value is None else str(value), quote=True)


def _score(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _nice_max(value: float) -> float:
    """Round an axis maximum up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


def _num(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.3g}"


# --------------------------------------------------------------------------- SVG charts


def bar_chart(items: list[tuple[str, int, str]], *, title: str, width: int = 560) -> str:
    """Horizontal bars: ``(label, value, colour)`` per row, value and share printed after the bar."""
    row, top, label_w, value_w = 26, 30, 150, 110
    height = top + row * max(len(items), 1) + 10
    total = sum(v for _, v, _ in items)
    peak = max([v for _, v, _ in items] + [1])
    span = width - label_w - value_w - 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
        f'<text x="8" y="18" font-size="14" font-weight="600">{_e(title)}</text>',
    ]
    if not items:
        parts.append(f'<text x="8" y="{top + 16}" font-size="12" fill="{NEUTRAL}">no rows</text>')
    for i, (label, value, colour) in enumerate(items):
        y = top + i * row
        w = span * value / peak
        parts += [
            f'<text x="{label_w}" y="{y + 15}" font-size="12" text-anchor="end">{_e(label)}</text>',
            f'<rect x="{label_w + 6}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{colour}" rx="2"/>',
            f'<text x="{label_w + 12 + w:.1f}" y="{y + 15}" font-size="12">{value:,} ({_pct(value, total)})</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(
    hist: ScoreHistogram, *, title: str, threshold: float | None, width: int = 560, height: int = 240
) -> str:
    """Stacked bars of kept (green) and removed (red) texts per ITM bin, threshold dashed."""
    left, right, top, bottom = 48, 12, 42, 40
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    totals = [k + r for k, r in zip(hist.kept, hist.removed, strict=True)]
    peak = _nice_max(max(totals + [0]))
    bins = len(totals)
    bw = (x1 - x0) / max(bins, 1)

    def ypos(v: float) -> float:
        return y1 - (y1 - y0) * v / peak

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
        f'<text x="8" y="18" font-size="14" font-weight="600">{_e(title)}</text>',
        f'<text x="{width - 8}" y="18" font-size="11" text-anchor="end" fill="{NEUTRAL}">'
        f"{hist.total:,} scored, {hist.unscored:,} not scored</text>",
    ]
    for frac in (0.0, 0.5, 1.0):
        y = ypos(peak * frac)
        parts += [
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#d0d7de"/>',
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{_num(peak * frac)}</text>',
        ]
    for i, (kept, removed) in enumerate(zip(hist.kept, hist.removed, strict=True)):
        x = x0 + i * bw + 1
        yk = ypos(kept)
        yr = ypos(kept + removed)
        if kept:
            parts.append(
                f'<rect x="{x:.1f}" y="{yk:.1f}" width="{bw - 2:.1f}" height="{y1 - yk:.1f}" fill="{KEPT}"/>'
            )
        if removed:
            parts.append(
                f'<rect x="{x:.1f}" y="{yr:.1f}" width="{bw - 2:.1f}" height="{yk - yr:.1f}" fill="{REMOVED}"/>'
            )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + (x1 - x0) * tick
        parts += [
            f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 4}" stroke="#57606a"/>',
            f'<text x="{x:.1f}" y="{y1 + 16}" font-size="11" text-anchor="middle">{tick:g}</text>',
        ]
    parts.append(f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#57606a"/>')
    parts.append(
        f'<text x="{(x0 + x1) / 2}" y="{height - 6}" font-size="11" text-anchor="middle">ITM match probability</text>'
    )
    if threshold is not None:
        x = x0 + (x1 - x0) * min(max(threshold, 0.0), 1.0)
        parts += [
            f'<line x1="{x:.1f}" y1="{y0 - 12}" x2="{x:.1f}" y2="{y1}" stroke="#1f2328" stroke-width="2" stroke-dasharray="5 3"/>',
            f'<text x="{min(max(x, x0 + 40), x1 - 40):.1f}" y="{y0 - 15}" font-size="11" text-anchor="middle">'
            f"threshold {threshold:g}</text>",
        ]
    parts.append("</svg>")
    return "".join(parts)


def line_chart(xs: list[float], ys: list[float], *, title: str, width: int = 280, height: int = 170) -> str:
    """One metric over bootstrap rounds: points joined by a line, each labelled with its value."""
    left, right, top, bottom = 40, 16, 30, 30
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    finite = [y for y in ys if math.isfinite(y)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    xmin, xmax = (min(xs), max(xs)) if xs else (0, 1)
    xspan = (xmax - xmin) or 1

    def pos(x: float, y: float) -> tuple[float, float]:
        px = x0 + (x1 - x0) * ((x - xmin) / xspan if len(xs) > 1 else 0.5)
        return px, y1 - (y1 - y0) * (y - lo) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
        f'<text x="8" y="18" font-size="13" font-weight="600">{_e(title)}</text>',
        f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#57606a"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#57606a"/>',
    ]
    points = [pos(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    if len(points) > 1:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{ACCENT}" stroke-width="2"/>')
    for x, y in zip(xs, ys, strict=True):
        if not math.isfinite(y):
            continue
        px, py = pos(x, y)
        parts += [
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{ACCENT}"/>',
            f'<text x="{px:.1f}" y="{py - 7:.1f}" font-size="10" text-anchor="middle">{_num(round(y, 4))}</text>',
        ]
    for x in xs:
        px, _ = pos(x, lo)
        parts.append(f'<text x="{px:.1f}" y="{y1 + 14}" font-size="10" text-anchor="middle">{_num(x)}</text>')
    parts.append(
        f'<text x="{(x0 + x1) / 2}" y="{height - 3}" font-size="10" text-anchor="middle">round</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- choosing samples


@dataclass
class _Candidates:
    """A systematic sample of (score, file, row) over a stream of unknown length.

    Keeps every ``stride``-th candidate; when more than ``cap`` are held it drops every
    other one and doubles the stride, so memory stays bounded and the sample uniform.
    """

    cap: int
    stride: int = 1
    seen: int = 0
    items: list[tuple[float, int, int]] = field(default_factory=list)

    def add(self, score: float, file: int, row: int) -> None:
        if self.seen % self.stride == 0:
            self.items.append((score, file, row))
            if len(self.items) > self.cap:
                self.items = self.items[::2]
                self.stride *= 2
        self.seen += 1

    def pick(self, n: int) -> list[tuple[float, int, int]]:
        """``n`` candidates evenly spread over the score range, highest score first."""
        ordered = sorted(
            self.items, key=lambda c: (math.isnan(c[0]), 0.0 if math.isnan(c[0]) else -c[0], c[1], c[2])
        )
        if len(ordered) <= n:
            return ordered
        if n <= 1:
            return ordered[:n]
        return [ordered[round(i * (len(ordered) - 1) / (n - 1))] for i in range(n)]


@dataclass
class _Scan:
    kept: _Candidates
    removed: _Candidates
    failed: dict[str, list[dict[str, Any]]]


def _scan(view: RunView, files: list[Path], *, per_section: int) -> _Scan:
    """One pass over the samples files: grid candidates and examples of failed rows."""
    cap = max(per_section * CANDIDATE_FACTOR, 1)
    scan = _Scan(kept=_Candidates(cap=cap), removed=_Candidates(cap=cap), failed={})
    itc_weight = view.itc_weight()
    for f, path in enumerate(files):
        names = pq.read_schema(path).names
        cols = [c for c in ("status", "web_kept", *score_columns(itc_weight)) if c in names]
        table = pq.read_table(path, columns=cols)
        if "status" not in cols:
            continue
        status = np.asarray(table.column("status").to_pylist(), dtype=object)
        scores = (
            filter_scores(table, itc_weight)[0]
            if set(score_columns(itc_weight)) <= set(cols)
            else np.full(len(status), math.nan)
        )
        kept = (
            np.asarray(
                pc.fill_null(table.column("web_kept"), False).to_numpy(zero_copy_only=False), dtype=bool
            )
            if "web_kept" in cols
            else np.zeros(len(status), dtype=bool)
        )
        for row in np.flatnonzero(status == Status.ok.value):
            (scan.kept if kept[row] else scan.removed).add(float(scores[row]), f, int(row))
        bad = [int(r) for r in np.flatnonzero(status != Status.ok.value)]
        wanted = [r for r in bad if len(scan.failed.get(status[r], [])) < FAILED_EXAMPLES]
        if wanted:
            info = pq.read_table(path, columns=[c for c in ("key", "url", "error") if c in names]).take(
                wanted
            )
            for r, row in zip(wanted, info.to_pylist(), strict=True):
                examples = scan.failed.setdefault(status[r], [])
                if len(examples) < FAILED_EXAMPLES:
                    examples.append(row)
    return scan


def _thumbnail(data: bytes) -> str | None:
    """A small JPEG data URI of the image, or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE * 2))
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_DETAIL_COLUMNS = ("url", *KEPT_COLUMNS, "web_itc", "synthetic_itc")
"""What a sample card shows: the URL, what :func:`~capfilt.rundir.read.kept_texts` reads, and the
ITC cosines that a filter score with ``itc_weight`` is partly made of."""


def _rows(view: RunView, files: list[Path], picks: list[tuple[float, int, int]]) -> list[dict[str, Any]]:
    """The picked samples rows with a ``thumb`` data URI, in the order picked."""
    by_file: dict[int, list[int]] = {}
    for _, f, r in picks:
        by_file.setdefault(f, []).append(r)
    found: dict[tuple[int, int], dict[str, Any]] = {}
    itc_weight = view.itc_weight()
    with TarImages(root=view.pipeline_dir) as images:
        for f, rows in sorted(by_file.items()):
            names = pq.read_schema(files[f]).names
            table = pq.read_table(files[f], columns=[c for c in _DETAIL_COLUMNS if c in names]).take(
                sorted(rows)
            )
            tar = f"{IMAGES_DIR}/{files[f].stem}.tar"
            scored = set(score_columns(itc_weight)) <= set(names)
            web_score, synthetic_score = filter_scores(table, itc_weight) if scored else (None, None)
            offsets = (
                np.cumsum([0] + [len(t or []) for t in table.column("synthetic_itm").to_pylist()])
                if scored
                else None
            )
            for i, (r, row) in enumerate(zip(sorted(rows), table.to_pylist(), strict=True)):
                if web_score is not None and synthetic_score is not None and offsets is not None:
                    row["web_score"] = float(web_score[i])
                    row["synthetic_score"] = [float(v) for v in synthetic_score[offsets[i] : offsets[i + 1]]]
                image = images.image_for_key(tar, row["key"])
                row["thumb"] = _thumbnail(image[1]) if image else None
                found[(f, r)] = row
    return [found[(f, r)] for _, f, r in picks]


def _text_line(text: str, source: str, score: float | None, kept: bool | None) -> str:
    cls = "none" if kept is None else ("kept" if kept else "removed")
    verdict = "" if kept is None else (" kept" if kept else " removed")
    return (
        f'<div class="t {cls}" title="{_e(source)}{verdict}"><span class="s">{_score(score)}</span>'
        f'<span class="src">{_e(source)}</span>{_e(text) if text else "<i>(empty)</i>"}</div>'
    )


def _card(row: dict[str, Any]) -> str:
    img = (
        f'<img src="{row["thumb"]}" alt="{_e(row["key"])}">'
        if row.get("thumb")
        else '<div class="noimg">no image</div>'
    )
    web_score = row.get("web_score", row.get("web_itm"))
    web_line = _text_line(row.get("web_text") or "", "web", web_score, bool(row.get("web_kept")))
    texts = row.get("synthetic_texts") or []
    scores = row.get("synthetic_score", row.get("synthetic_itm")) or []
    kept = row.get("synthetic_kept") or []
    syn_lines = [
        _text_line(
            t,
            f"syn {j + 1}",
            scores[j] if j < len(scores) else None,
            bool(kept[j]) if j < len(kept) else None,
        )
        for j, t in enumerate(texts)
    ]
    if not texts:
        syn_lines = [_text_line("no synthetic captions", "syn", None, None)]
    return (
        f'<div class="card">{img}<div class="key" title="{_e(row.get("url"))}">{_e(row["key"])}</div>'
        f"{web_line}{''.join(syn_lines)}</div>"
    )


# --------------------------------------------------------------------------- page


def _tile(value: str, label: str) -> str:
    return f'<div class="tile"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def _kv_table(items: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>"


def _status_colour(status: str) -> str:
    return KEPT if status == Status.ok.value else REMOVED


def _metrics_section(view: RunView) -> str:
    metrics = view.metrics()
    if not metrics:
        return ""
    rounds = [r.get("round") for r in metrics]
    xs = [float(r) if isinstance(r, int | float) else float(i + 1) for i, r in enumerate(rounds)]
    keys: list[str] = []
    for row in metrics:
        for k, v in row.items():
            if k != "round" and isinstance(v, int | float) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    charts = []
    for k in keys:
        ys = [float(r[k]) if isinstance(r.get(k), int | float) else math.nan for r in metrics]
        charts.append(f'<div class="chart">{line_chart(xs, ys, title=k)}</div>')
    head = "".join(f"<th>{_e(k)}</th>" for k in ["round", *keys])
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_e(r.get(k, ""))}</td>' for k in ["round", *keys]) + "</tr>"
        for r in metrics
    )
    return (
        f"<h2>Bootstrap rounds</h2><p class='sub'>{len(metrics)} finished round(s) from metrics.jsonl; "
        f"this page's samples and histograms are round {_e(view.round)}. MED_0 is where the captioner "
        "and the filter start, and may be pre-trained with other settings than later rounds (the demo's "
        "takes every human caption as an item of its own, <code>pretrain.round0_captions</code>): "
        "whether CapFilt's data beats the raw web at the same budget is what <code>--ablation</code> "
        "(and <code>benchmarks/ablation.py</code>, over seeds) measures.</p>"
        f'<div class="charts">{"".join(charts)}</div><p></p><table><tr>{head}</tr>{body}</table>'
    )


# --------------------------------------------------------------------------- demo: CapFilt vs ground truth
# A bootstrap round on a synthetic corpus stores, in eval.json's "capfilt" key, what its filter and
# captioner did judged against the corpus's truth (capfilt.bootstrap.capfilt_summary). These
# functions show it at the top of the page; they render nothing for any other run.

_NOISE_NAMES = {
    "junk": ("junk", "file names, shop slogans, SEO words"),
    "mismatched": ("mismatched", "a correct text, but of another image"),
    "wrong_attribute": ("wrong attribute", "one colour or shape is wrong"),
}


def _share(value: Any) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{100 * value:.0f}%"


def _capfilt_headline(summary: dict[str, Any], round_: Any) -> str:
    """Plain sentences with the numbers a newcomer asks first: did the filter and captioner work?"""
    by_type = summary.get("filter", {}).get("by_type", {})
    caps, noise, pairs = summary.get("captions", {}), summary.get("noise", {}), summary.get("pairs", {})
    aucs = ", ".join(
        f"{_NOISE_NAMES[k][0]} {auc_text(by_type[k].get('auc'))}" for k in _NOISE_NAMES if k in by_type
    )
    return (
        f"<h2>Did CapFilt work? (round {_e(round_)}, checked against the synthetic corpus's ground truth)</h2>"
        "<ul>"
        f"<li><b>Filter: does it tell correct web texts from noise?</b> Its ROC-AUC per kind of noise is {_e(aucs)} "
        "(0.5 would be a coin flip, 1.0 ranks every correct text above every noisy one).</li>"
        f"<li><b>Captioner: does it describe the images?</b> {_e(_share(caps.get('attribute_check')))} of its "
        f"{_e(caps.get('captions', 0))} synthetic captions name the right colour and shape of every object "
        f"(the attribute check); {_e(_share(caps.get('images_with_a_right_caption')))} of the web images got at "
        "least one such caption.</li>"
        f"{_caption_scores_item(summary.get('caption_scores') or {}, summary.get('itc_weight') or 0.0)}"
        f"<li><b>Noise: is the kept data cleaner?</b> {_e(_share(noise.get('raw_web')))} of the raw web texts are "
        f"wrong; {_e(_share(noise.get('kept_web_texts')))} of the web texts the filter kept are, and "
        f"{_e(_share(noise.get('kept_set')))} of everything CapFilt kept (kept web texts and synthetic "
        "captions together; a synthetic caption counts as wrong when it fails the attribute check).</li>"
        f"<li><b>Added data:</b> {_e(pairs.get('synthetic_added', 0))} synthetic captions join "
        f"the {_e(pairs.get('kept_web', 0))} web texts kept out of {_e(pairs.get('raw_web', 0))}.</li>"
        "</ul>"
    )


def _caption_scores_item(scores: dict[str, Any], itc_weight: float) -> str:
    """How well the filter's score and the agreement among captions tell right captions from wrong."""
    if not isinstance(scores.get("agreement_auc"), int | float):
        return ""
    rule = (
        f" A synthetic caption is kept only when its agreement is at least {_e(scores['min_agreement'])}."
        if isinstance(scores.get("min_agreement"), int | float)
        else ""
    )
    return (
        f"<li><b>Which synthetic captions are right?</b> The filter's {_e(score_words(itc_weight))} tells right captions from "
        f"wrong ones with ROC-AUC {_e(auc_text(scores.get('score_auc')))}; agreement with the image's other sampled "
        f"captions with {_e(auc_text(scores['agreement_auc']))} (the filter learned from the same model as the "
        f"captioner and shares its mistakes; a caption the captioner guessed differs from its other samples).{rule}</li>"
    )


def _capfilt_filter_table(summary: dict[str, Any]) -> str:
    """Per noise type: texts, share removed (recall), precision, ROC-AUC; clean: false removals."""
    by_type = summary.get("filter", {}).get("by_type", {})
    rows = []
    for kind, (name, meaning) in _NOISE_NAMES.items():
        if kind not in by_type:
            continue
        e = by_type[kind]
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_e(meaning)}</td><td class='n'>{_e(e.get('count'))}</td>"
            f"<td class='n'>{_share(e.get('recall'))}</td><td class='n'>{_share(e.get('precision'))}</td>"
            f"<td class='n'>{auc_text(e.get('auc'))}</td></tr>"
        )
    if "clean" in by_type:
        e = by_type["clean"]
        rows.append(
            f"<tr><td>correct</td><td>the text describes the image</td><td class='n'>{_e(e.get('count'))}</td>"
            f"<td class='n'>{_share(e.get('removed'))} removed by mistake</td><td class='n'>-</td>"
            "<td class='n'>-</td></tr>"
        )
    return (
        f"<h3>The filter, per kind of web text (a text is removed when its ITM score is below "
        f"{_e(summary.get('threshold'))})</h3>"
        "<table><tr><th>web text</th><th>what it is</th><th>texts</th><th>recall: share removed</th>"
        "<th>precision: removed texts of this kind / removed texts of this kind or correct</th>"
        "<th>ROC-AUC vs correct</th></tr>" + "".join(rows) + "</table>"
    )


def _capfilt_changed_panel(summary: dict[str, Any]) -> str:
    """What CapFilt changed: noise rate before/after and the pairs the captioner added."""
    noise, pairs = summary.get("noise", {}), summary.get("pairs", {})
    tiles = "".join(
        [
            _tile(
                f"{_share(noise.get('raw_web'))} \u2192 {_share(noise.get('kept_set'))}",
                "wrong web pairs: raw web \u2192 kept by CapFilt",
            ),
            _tile(_share(noise.get("kept_web_texts")), "wrong among the kept web texts"),
            _tile(_share(noise.get("kept_synthetic_wrong")), "wrong among the kept synthetic captions"),
            _tile(
                f"{pairs.get('raw_web', 0):,} \u2192 {pairs.get('kept_set', 0):,}",
                "web pairs: raw \u2192 kept (web texts + synthetic captions)",
            ),
            _tile(f"+{pairs.get('synthetic_added', 0):,}", "synthetic captions added by the captioner"),
        ]
    )
    return f"<h3>What CapFilt changed</h3><div class='tiles'>{tiles}</div>"


def capfilt_section(view: RunView) -> str:
    """The demo's top section (empty unless the round's eval.json holds a ``capfilt`` summary)."""
    summary = view.eval().get("capfilt") if view.is_bootstrap else None
    if not isinstance(summary, dict):
        return ""
    return (
        _capfilt_headline(summary, view.round)
        + _capfilt_filter_table(summary)
        + _capfilt_changed_panel(summary)
    )


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def _models_section(view: RunView) -> str:
    manifest = view.manifest()
    config = view.config()
    parts = ["<h2>Models and run</h2>"]
    items: list[tuple[str, Any]] = []
    models = manifest.get("models") if isinstance(manifest.get("models"), dict) else {}
    for stage in ("caption", "filter"):
        ids = (models or {}).get(stage)
        if not ids and isinstance(config.get(stage), dict):
            section = config[stage]
            ids = [section["model"]] if section.get("model") else list(section.get("models") or [])
        items.append((f"{stage} model", ", ".join(map(str, ids)) if ids else "none (stage skipped)"))
    for name in ("started_at", "finished_at", "input_rows", "complete"):
        if name in manifest:
            items.append((name, manifest[name]))
    timing = manifest.get("timing") if isinstance(manifest.get("timing"), dict) else {}
    for name in ("wall_s", "rows_per_s", "rows_processed"):
        if name in timing:
            items.append((f"timing.{name}", timing[name]))
    if isinstance(manifest.get("versions"), dict):
        items += [(f"version {k}", v) for k, v in manifest["versions"].items()]
    parts.append(_kv_table(items))
    stages = timing.get("stages") if isinstance(timing.get("stages"), list) else []
    if stages:
        head = "<tr><th>operator</th><th>rows</th><th>wall s</th><th>rows/s</th></tr>"
        body = "".join(
            f'<tr><td>{_e(s.get("operator"))}</td><td class="n">{_e(s.get("rows"))}</td>'
            f'<td class="n">{_e(s.get("wall_s"))}</td><td class="n">{_e(s.get("rows_per_s"))}</td></tr>'
            for s in stages
            if isinstance(s, dict)
        )
        parts.append(f"<h3>Per-stage throughput</h3><table>{head}{body}</table>")
    evaluation = view.eval()
    if evaluation:
        shown = {k: v for k, v in evaluation.items() if k != "capfilt"}  # capfilt: the top section
        parts.append(f"<h3>Evaluation of round {_e(view.round)}</h3>{_kv_table(_flatten(shown))}")
    text = view.config_text()
    if text:
        parts.append(f"<h3>Pipeline config</h3><pre>{_e(text)}</pre>")
    if view.is_bootstrap:
        for path in sorted(view.root.glob("*.yaml")):
            parts.append(f"<h3>{_e(path.name)}</h3><pre>{_e(path.read_text(encoding='utf-8'))}</pre>")
    return "".join(parts)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def download_section(view: RunView) -> str:
    """Success rate, bytes, speed and the top domains with their statuses (capfilt.download_stats)."""
    manifest = view.manifest()
    stats = manifest.get("download") if isinstance(manifest.get("download"), dict) else None
    if stats is None:
        stats = download_stats(view.pipeline_dir)
    if not stats.get("rows"):
        return ""
    timing = manifest.get("timing") if isinstance(manifest.get("timing"), dict) else {}
    speed = timing.get("images_per_s")
    tiles = "".join(
        [
            _tile(
                f"{100 * stats['success_rate']:.1f}%",
                f"downloaded ({stats['downloaded']:,} of {stats['rows']:,} rows)",
            ),
            _tile(_bytes(stats["bytes"]["total"]), f"{stats['bytes']['images']:,} images stored"),
            _tile(_bytes(stats["bytes"]["mean"]), "mean stored image"),
            _tile("n/a" if speed is None else f"{speed:g}", "downloaded images/s (last invocation)"),
            _tile(f"{stats['domains']['count']:,}", "domains"),
        ]
    )
    domains = stats["domains"]
    head = "<tr><th>domain</th><th>rows</th><th>downloaded</th><th>success</th><th>statuses</th></tr>"
    entries = list(domains["top"]) + ([domains["other"]] if domains["other"]["rows"] else [])
    body = "".join(
        f"<tr><td>{_e(d['domain'])}</td><td class='n'>{d['rows']:,}</td><td class='n'>{d['downloaded']:,}</td>"
        f"<td class='n'>{100 * d['success_rate']:.1f}%</td><td>"
        + ", ".join(f"{_e(k)} {v:,}" for k, v in sorted(d["status"].items(), key=lambda kv: -kv[1]))
        + "</td></tr>"
        for d in entries
    )
    return (
        "<h2>Downloads</h2><p class='sub'>Rows whose image was downloaded and decoded, by domain of the URL "
        f"(top {len(domains['top'])} by rows). Bytes are the images as stored after resizing.</p>"
        f'<div class="tiles">{tiles}</div><p></p><table>{head}{body}</table>'
    )


def _grid_section(title: str, note: str, rows: list[dict[str, Any]], total: int) -> str:
    cards = "".join(_card(r) for r in rows) or "<p class='sub'>none</p>"
    return (
        f"<h2>{_e(title)}</h2><p class='sub'>{_e(note)} Showing {len(rows):,} of {total:,}, spread over the "
        f"score range, highest first.</p><div class='grid'>{cards}</div>"
    )


def _failed_section(failed: dict[str, list[dict[str, Any]]], stats: RunStats) -> str:
    if not failed:
        return ""
    rows = []
    for status, examples in sorted(failed.items(), key=lambda kv: -stats.status.get(kv[0], 0)):
        try:
            meaning = Status(status).description
        except ValueError:
            meaning = ""
        shown = "<br>".join(
            f"<span class='key'>{_e(x.get('key'))}</span> {_e(x.get('url'))}: {_e(x.get('error'))}"
            for x in examples
        )
        rows.append(
            f"<tr><td>{_e(status)}</td><td class='n'>{stats.status.get(status, 0):,}</td>"
            f"<td>{_e(meaning)}</td><td>{shown}</td></tr>"
        )
    return (
        "<h2>Failed rows</h2><p class='sub'>Failures are data: each input row that did not yield an image "
        "keeps its status and error in samples/.</p>"
        "<table><tr><th>status</th><th>rows</th><th>meaning</th><th>examples</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def render(view: RunView, *, samples_per_section: int = 48) -> str:
    """The report page for ``view`` as one HTML string."""
    stats = collect_stats(view, bins=HISTOGRAM_BINS)
    files = view.samples_files()
    scan = _scan(view, files, per_section=samples_per_section)
    kept_rows = _rows(view, files, scan.kept.pick(samples_per_section))
    removed_rows = _rows(view, files, scan.removed.pick(samples_per_section))
    rule = view.selection()
    threshold = None if rule is None else rule.threshold
    score_name = score_words(rule.itc_weight if rule is not None else 0.0)
    ok = stats.status.get(Status.ok.value, 0)
    where = f"{view.root}" + (
        f" — bootstrap round {view.round} of {len(view.rounds)}" if view.is_bootstrap else ""
    )
    when = datetime.now(UTC).isoformat(timespec="seconds")

    tiles = "".join(
        [
            _tile(f"{stats.rows:,}", "input rows"),
            _tile(f"{ok:,} ({_pct(ok, stats.rows)})", "images downloaded (status ok)"),
            _tile(f"{stats.pairs:,}", "kept pairs in dataset/"),
            _tile(
                f"{stats.web_kept:,} / {stats.web_scored:,}",
                f"web texts kept / scored ({_pct(stats.web_kept, stats.web_scored)})",
            ),
            _tile(
                f"{stats.synthetic_kept:,} / {stats.synthetic_total:,}",
                f"synthetic captions kept / written ({_pct(stats.synthetic_kept, stats.synthetic_total)})",
            ),
            _tile(
                f"{stats.images_with_kept:,}",
                f"images with a kept text ({_pct(stats.images_with_kept, ok)} of ok)",
            ),
            _tile("none" if threshold is None else f"{threshold:g}", f"filter threshold ({score_name})"),
        ]
    )
    status_chart = bar_chart(
        [(s, n, _status_colour(s)) for s, n in stats.status.items()], title="Input rows by status"
    )
    source_colours = {"web": ACCENT, "synthetic": "#8250df", "human": "#bf8700"}
    source_chart = bar_chart(
        [(s, n, source_colours.get(s, NEUTRAL)) for s, n in stats.kept.items()], title="Kept pairs by source"
    )
    hists = ""
    if stats.web_hist is not None and stats.synthetic_hist is not None:
        hists = (
            f'<div class="chart">{histogram_chart(stats.web_hist, title=f"Web texts: {score_name}", threshold=threshold)}</div>'
            f'<div class="chart">{histogram_chart(stats.synthetic_hist, title=f"Synthetic captions: {score_name}", threshold=threshold)}</div>'
        )
    legend = (
        f'<p class="legend"><span class="sw" style="background:{KEPT}"></span>kept'
        f'<span class="sw" style="background:{REMOVED}"></span>removed '
        "(a text above the threshold can still be removed when the sample already has keep_synthetic "
        "captions, when a synthetic caption disagrees with the image's other captions (select.min_agreement), "
        "or when its web text is empty)</p>"
    )
    body = [
        f"<h1>capfilt report: {_e(view.root.resolve().name)}</h1>",
        f'<p class="sub">{_e(where)} · generated {_e(when)}</p>',
        capfilt_section(view),
        "<h2>The pipeline run</h2>" if view.is_bootstrap else "",
        f'<div class="tiles">{tiles}</div>',
        "<h2>What happened to the input</h2>",
        f'<div class="charts"><div class="chart">{status_chart}</div><div class="chart">{source_chart}</div></div>',
        "<h2>Filter scores</h2>",
        f'<div class="charts">{hists}</div>{legend}',
        _metrics_section(view),
        _grid_section(
            "Web text kept",
            "Samples whose web text passed the filter, with their synthetic captions.",
            kept_rows,
            scan.kept.seen,
        ),
        _grid_section(
            "Web text removed",
            "Samples whose web text the filter removed (or that had none); green synthetic captions replaced it.",
            removed_rows,
            scan.removed.seen,
        ),
        download_section(view),
        _failed_section(scan.failed, stats),
        _models_section(view),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>capfilt report: {_e(view.root.resolve().name)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def build_report(
    run_dir: str | Path,
    out_path: str | Path | None = None,
    *,
    samples_per_section: int = 48,
    round: int | None = None,  # noqa: A002 - the CLI option's name
) -> Path:
    """Write the HTML report of a run (or a bootstrap directory's round) and return its path.

    The default path is ``RUN/report.html`` (the bootstrap directory's root for a bootstrap).
    The file is written to a temporary name and renamed, so a reader never sees half a page.
    """
    if samples_per_section < 0:
        raise UserError(f"--samples: must be 0 or more, got {samples_per_section}")
    view = resolve_run(run_dir, round=round)
    out = Path(out_path) if out_path is not None else view.root / "report.html"
    page = render(view, samples_per_section=samples_per_section)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
