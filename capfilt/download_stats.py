"""The download section of ``manifest.json`` and of the report: how well the web answered.

Link rot makes 30-40% failed downloads normal on LAION-style lists, so a user needs to see the
success rate, which hosts fail and how, the bytes stored and the speed. :func:`download_stats`
computes them from a run directory's committed files, one shard at a time: it reads only the
``url`` and ``status`` columns of each samples file and the member headers of each images tar,
so memory grows with the number of distinct domains, never with the number of rows.

* ``success_rate``: rows whose image was downloaded and decoded (status ``ok``, or a model
  stage's failure on a good image) over all rows.
* ``domains``: per host name of the URL (lower case; ``(invalid)`` when the URL has none), rows,
  downloaded rows and counts by status, for the ``top`` hosts with the most rows; the others are
  summed into ``other``.
* ``bytes``: the images as stored in ``images/`` (after the download stage's resize and
  re-encode; the bodies fetched are not recorded), total and mean per image.

Speed depends on the invocation (a resumed run processes fewer rows), so it is not part of
this section: :func:`images_per_s` gives the manifest's ``timing.images_per_s``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from capfilt.rundir import committed_shards, images_path, samples_path
from capfilt.rundir.read import scan_images_tar
from capfilt.stages.status import Status

TOP_DOMAINS = 20
"""Hosts listed one by one in the manifest and the report; the rest are summed as ``other``."""

NOT_DOWNLOADED = frozenset(
    {
        Status.invalid_url,
        Status.download_failed,
        Status.opted_out,
        Status.decode_failed,
        Status.too_small,
        Status.too_large,
    }
)
"""Statuses of rows that yielded no usable image; every other status had its image downloaded."""

INVALID_DOMAIN = "(invalid)"


def domain(url: Any) -> str:
    """The URL's host name in lower case, or ``(invalid)``."""
    if not isinstance(url, str) or not url:
        return INVALID_DOMAIN
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return INVALID_DOMAIN
    return host.lower() if host else INVALID_DOMAIN


def _tar_image_bytes(path: Path) -> tuple[int, int]:
    """(image members, their total bytes) of an images tar, from the member headers only."""
    if not path.is_file():
        return 0, 0
    sizes = [size for _, size, _ in scan_images_tar(path, read=False)]
    return len(sizes), sum(sizes)


def images_per_s(stats: dict[str, Any], rows_per_s: float) -> float:
    """Downloaded images per second of an invocation that processed ``rows_per_s`` rows/s."""
    return round(float(stats.get("success_rate", 0.0)) * rows_per_s, 2)


def download_stats(run_dir: Path, *, top: int = TOP_DOMAINS) -> dict[str, Any]:
    """The download section for the committed shards of ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    by_domain: dict[str, Counter[str]] = {}
    status_counts: Counter[str] = Counter()
    images = image_bytes = 0
    for shard in sorted(committed_shards(run_dir)):
        table = pq.read_table(samples_path(run_dir, shard), columns=["url", "status"])
        for url, status in zip(
            table.column("url").to_pylist(), table.column("status").to_pylist(), strict=True
        ):
            counts = by_domain.setdefault(domain(url), Counter())
            counts[status] += 1
            status_counts[status] += 1
        count, size = _tar_image_bytes(images_path(run_dir, shard))
        images += count
        image_bytes += size
    rows = sum(status_counts.values())
    downloaded = sum(n for s, n in status_counts.items() if s not in NOT_DOWNLOADED)

    def entry(name: str, counts: Counter[str]) -> dict[str, Any]:
        n = sum(counts.values())
        ok = sum(c for s, c in counts.items() if s not in NOT_DOWNLOADED)
        return {
            "domain": name,
            "rows": n,
            "downloaded": ok,
            "success_rate": round(ok / n, 4) if n else 0.0,
            "status": dict(sorted(counts.items())),
        }

    ranked = sorted(by_domain.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    other: Counter[str] = Counter()
    for _, counts in ranked[top:]:
        other.update(counts)
    success = downloaded / rows if rows else 0.0
    return {
        "rows": rows,
        "downloaded": downloaded,
        "success_rate": round(success, 4),
        "status": dict(sorted(status_counts.items())),
        "domains": {
            "count": len(by_domain),
            "top": [entry(name, counts) for name, counts in ranked[:top]],
            "other": entry(f"{max(len(ranked) - top, 0)} other domains", other),
        },
        "bytes": {
            "images": images,
            "total": image_bytes,
            "mean": round(image_bytes / images, 1) if images else 0.0,
        },
    }
