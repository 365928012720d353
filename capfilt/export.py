"""`capfilt export`: turn a run's kept pairs into a dataset other tools load directly.

A run directory stores each image once (``images/shard-*.tar``) and refers to it from the
kept pairs (``dataset/shard-*.parquet``: key, text, source, itm, image_tar, image_member).
That layout is right for resuming and for capfilt's own trainer, but a user who wants to
train open_clip or load the data with Hugging Face ``datasets`` needs the image next to each
text. This module joins them back, one kept pair per output sample:

* ``webdataset``: ``00000.tar, ...`` with ``KEY_N.jpg`` + ``KEY_N.txt`` (one caption) +
  ``KEY_N.json`` (key, source, itm, url). One caption per sample because open_clip's
  loader reads ``.txt`` as a single string; an image with two kept texts is two samples
  (``_0``, ``_1``) sharing the image bytes.
* ``parquet``: ``00000.parquet, ...`` with columns key, image (bytes), text, source, itm, url;
  ``datasets.load_dataset("parquet", data_files=...)`` reads it, and
  ``.cast_column("image", datasets.Image())`` decodes the bytes to PIL.
* ``jsonl``: ``00000.jsonl, ...`` one JSON object per pair whose ``image`` is a path relative
  to the export directory (``images/00000/KEY.jpg``), the image copied once per shard.

Every export also gets a dataset card, ``README.md``: counts by source and by status, the
filter's score histogram, the models, versions and config. Each file is written to a hidden
temporary name and renamed into place; the card goes last, so its presence means the export
finished.

Locating the run (plain, or one round of a bootstrap directory), reading its tars and
counting it is :mod:`capfilt.rundir.read`, shared with :mod:`capfilt.report`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.errors import UserError, user_os_error
from capfilt.guards import inside, validate_key, validate_member
from capfilt.rundir import SAMPLES_DIR
from capfilt.rundir.read import RunStats, RunView, TarImages, collect_stats, resolve_run
from capfilt.stages.status import Status

ExportFormat = Literal["webdataset", "parquet", "jsonl"]
FORMATS: tuple[str, ...] = ("webdataset", "parquet", "jsonl")

EXPORT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("itm", pa.float64()),
        ("url", pa.string()),
    ]
)
"""Columns of an exported parquet shard (what HF ``datasets`` and pyarrow read back)."""

PARQUET_ROW_GROUP = 256
"""Rows per parquet row group: bounds the export's memory to a few hundred images."""

_EXPORT_FILE = re.compile(r"^\d{5,}\.(tar|parquet|jsonl)$")


# --------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One kept image-text pair with its image bytes, as an export writes it."""

    key: str
    index: int  # the pair's number among its image's kept pairs: 0, 1, ...
    text: str
    source: str
    itm: float
    url: str | None
    image: bytes
    ext: str  # image file extension without the dot, e.g. "jpg"

    @property
    def sample_key(self) -> str:
        """``KEY_N``: unique per pair; webdataset keys must not contain dots."""
        return f"{self.key}_{self.index}"


def iter_pairs(view: RunView) -> Iterator[Pair]:
    """Every kept pair of the run in shard order, joined with its image and URL.

    Uses the dataset's ``image`` bytes column when it has one; otherwise reads the tar
    member it names. URLs come from the dataset's ``url`` column or the samples shard.
    """
    with TarImages(root=view.pipeline_dir) as images:
        for path in view.dataset_files():
            table = pq.read_table(path)
            names = set(table.column_names)
            missing = {"key", "text", "source"} - names
            if missing:
                raise UserError(f"{path}: dataset shard lacks column(s) {', '.join(sorted(missing))}")
            if "image" not in names and not {"image_tar", "image_member"} <= names:
                raise UserError(
                    f"{path}: dataset shard has neither an image column nor image_tar/image_member"
                )
            urls = _urls(table, view.pipeline_dir / SAMPLES_DIR / path.name)
            counts: dict[str, int] = {}
            columns = [
                c
                for c in ("key", "text", "source", "itm", "image", "image_tar", "image_member")
                if c in names
            ]
            for batch in table.select(columns).to_batches(max_chunksize=PARQUET_ROW_GROUP):
                for row in batch.to_pylist():
                    key = row["key"]
                    validate_key(key, where=str(path))  # keys become file and member names below
                    index = counts.get(key, 0)
                    counts[key] = index + 1
                    member = row.get("image_member") or f"{key}.jpg"
                    validate_member(member, where=str(path))
                    image = row.get("image")
                    if image is None:
                        image = images.read(row["image_tar"], member)
                    itm = row.get("itm")
                    yield Pair(
                        key=key,
                        index=index,
                        text=row["text"] or "",
                        source=row["source"],
                        itm=math.nan if itm is None else float(itm),
                        url=urls.get(key),
                        image=image,
                        ext=member.rsplit(".", 1)[-1].lower() if "." in member else "jpg",
                    )


def _urls(dataset: pa.Table, samples_file: Path) -> dict[str, str | None]:
    if "url" in dataset.column_names:
        return dict(zip(dataset.column("key").to_pylist(), dataset.column("url").to_pylist(), strict=True))
    if not samples_file.is_file():
        return {}
    samples = pq.read_table(samples_file, columns=["key", "url"])
    return dict(zip(samples.column("key").to_pylist(), samples.column("url").to_pylist(), strict=True))


# --------------------------------------------------------------------------- writers


def _commit(final: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` to a hidden temporary name, then rename onto ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError as err:
        user = user_os_error(err, final)
        if user is None:
            raise
        raise user from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def _pair_meta(pair: Pair) -> dict[str, Any]:
    return {
        "key": pair.key,
        "source": pair.source,
        "itm": None if math.isnan(pair.itm) else pair.itm,
        "url": pair.url,
    }


class _ShardedWriter:
    """Rolls output files every ``rows_per_shard`` pairs; subclasses write one shard's pairs.

    A shard is written under a temporary name and renamed when it is full or at ``close``,
    so an interrupted export never leaves a truncated file under a final name.
    """

    suffix = ""

    def __init__(self, *, out_dir: Path, rows_per_shard: int) -> None:
        self.out_dir = out_dir
        self.rows_per_shard = rows_per_shard
        self.files: list[str] = []
        self.pairs = 0
        self._shard = -1
        self._in_shard = 0

    def _tmp(self) -> Path:
        return self.out_dir / f".{self._shard:05d}.{self.suffix}.tmp"

    def add(self, pair: Pair) -> None:
        if self._shard < 0 or self._in_shard >= self.rows_per_shard:
            self._finish()
            self._shard += 1
            self._in_shard = 0
            self._start()
        self._write(pair)
        self._in_shard += 1
        self.pairs += 1

    def _finish(self) -> None:
        if self._shard < 0:
            return
        self._end()
        name = f"{self._shard:05d}.{self.suffix}"
        os.replace(self._tmp(), self.out_dir / name)
        self.files.append(name)

    def close(self) -> None:
        self._finish()
        self._shard = -1

    def abort(self) -> None:
        """Drop the shard in progress (after an error), leaving only committed shards."""
        try:
            self._end()
        except Exception:  # noqa: BLE001, S110 - the shard is discarded; the first error is reported
            pass
        finally:
            if self._shard >= 0 and self._tmp().exists():
                self._tmp().unlink()
            self._shard = -1

    def _start(self) -> None:
        raise NotImplementedError

    def _write(self, pair: Pair) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError


class _WebDatasetWriter(_ShardedWriter):
    """``KEY_N.<ext>`` (image) + ``KEY_N.txt`` (caption) + ``KEY_N.json`` per pair."""

    suffix = "tar"

    def _start(self) -> None:
        self._tar: tarfile.TarFile | None = tarfile.open(self._tmp(), "w", format=tarfile.PAX_FORMAT)

    def _write(self, pair: Pair) -> None:
        assert self._tar is not None
        stem = pair.sample_key
        _add_member(self._tar, f"{stem}.{pair.ext}", pair.image)
        _add_member(self._tar, f"{stem}.txt", pair.text.encode("utf-8"))
        meta = json.dumps(_pair_meta(pair), ensure_ascii=False, sort_keys=True)
        _add_member(self._tar, f"{stem}.json", meta.encode("utf-8"))

    def _end(self) -> None:
        if getattr(self, "_tar", None) is not None:
            self._tar.close()  # type: ignore[union-attr]
            self._tar = None


class _ParquetWriter(_ShardedWriter):
    """EXPORT_SCHEMA rows, flushed in row groups of PARQUET_ROW_GROUP pairs."""

    suffix = "parquet"

    def _start(self) -> None:
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._tmp(), EXPORT_SCHEMA)
        self._rows: list[dict[str, Any]] = []

    def _flush(self) -> None:
        if self._rows and self._writer is not None:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=EXPORT_SCHEMA))
            self._rows = []

    def _write(self, pair: Pair) -> None:
        self._rows.append(
            {
                "key": pair.key,
                "image": pair.image,
                "text": pair.text,
                "source": pair.source,
                "itm": pair.itm,
                "url": pair.url,
            }
        )
        if len(self._rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def _end(self) -> None:
        if getattr(self, "_writer", None) is not None:
            self._flush()
            self._writer.close()  # type: ignore[union-attr]
            self._writer = None


class _JsonlWriter(_ShardedWriter):
    """One JSON line per pair; its image copied once per shard to ``images/NNNNN/KEY.ext``."""

    suffix = "jsonl"

    def _start(self) -> None:
        self._handle: io.TextIOWrapper | None = open(self._tmp(), "w", encoding="utf-8")  # noqa: SIM115
        self._copied: set[str] = set()
        self.images = getattr(self, "images", 0)

    def _write(self, pair: Pair) -> None:
        assert self._handle is not None
        rel = f"images/{self._shard:05d}/{pair.key}.{pair.ext}"
        if rel not in self._copied:
            target = inside(self.out_dir, rel, what="--out")  # never outside the export directory
            _commit(target, lambda tmp: tmp.write_bytes(pair.image))
            self._copied.add(rel)
            self.images += 1
        row = {"image": rel, "text": pair.text, **_pair_meta(pair)}
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def _end(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._handle.close()  # type: ignore[union-attr]
            self._handle = None


_WRITERS: dict[str, type[_ShardedWriter]] = {
    "webdataset": _WebDatasetWriter,
    "parquet": _ParquetWriter,
    "jsonl": _JsonlWriter,
}


def _clear_previous(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to mix with an earlier export unless ``overwrite``; then remove only its files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a directory")
    previous = [
        p for p in out_dir.iterdir() if _EXPORT_FILE.match(p.name) or p.name in ("README.md", "images")
    ]
    if previous and not overwrite:
        raise UserError(
            f"--out: {out_dir} already holds an export ({previous[0].name}); pass --overwrite to replace it"
        )
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    format: ExportFormat = "webdataset",  # noqa: A002 - the CLI option's name
    round: int | None = None,  # noqa: A002 - the CLI option's name
    rows_per_shard: int = 10_000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the run's kept pairs (image, text, source, score) to ``out_dir`` in ``format``.

    Returns a summary: format, paths, round, pair and image counts, pairs by source, the
    shard files written, and the manifest's kept counts for comparison.
    """
    if format not in _WRITERS:
        raise UserError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard: must be at least 1, got {rows_per_shard}")
    view = resolve_run(run_dir, round=round)
    out = Path(out_dir)
    if out.resolve() in (view.root.resolve(), view.pipeline_dir.resolve()):
        raise UserError(f"--out: {out} is the run directory itself; choose another directory")
    _clear_previous(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)

    writer = _WRITERS[format](out_dir=out, rows_per_shard=rows_per_shard)
    by_source: dict[str, int] = {}
    images = 0
    try:
        for pair in iter_pairs(view):
            writer.add(pair)
            by_source[pair.source] = by_source.get(pair.source, 0) + 1
            images += pair.index == 0
        writer.close()
    except BaseException as err:
        writer.abort()
        user = user_os_error(err, out) if isinstance(err, OSError) else None
        if user is not None:
            raise user from None
        raise

    stats = collect_stats(view)
    summary: dict[str, Any] = {
        "format": format,
        "out_dir": str(out),
        "run_dir": str(view.pipeline_dir),
        "round": view.round,
        "pairs": writer.pairs,
        "images": images,
        "by_source": dict(sorted(by_source.items())),
        "shards": len(writer.files),
        "files": list(writer.files),
        "manifest_kept": view.manifest().get("kept"),
    }
    card = dataset_card(view, stats, summary)
    _commit(out / "README.md", lambda tmp: tmp.write_text(card, encoding="utf-8"))
    return summary


# --------------------------------------------------------------------------- dataset card


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "-"


def _status_meaning(status: str) -> str:
    try:
        return Status(status).description
    except ValueError:
        return ""


_LOAD_SNIPPETS: dict[str, str] = {
    "webdataset": (
        "```python\nimport webdataset as wds\n"
        'ds = wds.WebDataset("{dir}/{{00000..{last:05d}}}.tar").decode("pil").to_tuple("jpg;png;webp", "txt")\n```\n'
        "open_clip: `--train-data '{dir}/{{00000..{last:05d}}}.tar' --dataset-type webdataset "
        "--train-num-samples {pairs}`. Each sample's `.json` holds key, source, itm and url."
    ),
    "parquet": (
        "```python\nimport datasets\n"
        'ds = datasets.load_dataset("parquet", data_files="{dir}/*.parquet", split="train")\n'
        'ds = ds.cast_column("image", datasets.Image())  # bytes -> PIL on access\n```'
    ),
    "jsonl": (
        "```python\nimport json\nfrom PIL import Image\n"
        'for line in open("{dir}/00000.jsonl"):\n    row = json.loads(line)\n'
        '    image = Image.open("{dir}/" + row["image"])\n```\n'
        "`image` paths are relative to this directory."
    ),
}


def dataset_card(view: RunView, stats: RunStats, summary: Mapping[str, Any]) -> str:
    """The export's README.md: what is in it, where it came from, how the filter scored it."""
    manifest = view.manifest()
    config = view.config()
    name = view.root.resolve().name or str(view.root)
    pairs = int(summary["pairs"])
    when = datetime.now(UTC).isoformat(timespec="seconds")
    origin = f"`{view.pipeline_dir}`" + (f" (bootstrap round {view.round})" if view.round is not None else "")
    out: list[str] = [
        f"# {name}: image-text pairs cleaned by capfilt",
        "",
        f"Exported {when} from the run {origin} as **{summary['format']}**: "
        f"{pairs:,} image-text pairs over {summary['images']:,} images in {summary['shards']} shard(s). "
        "Each pair is an image with one text the filter kept: the original web text (`web`), a caption "
        "written by the captioner (`synthetic`) or a human annotation (`human`); `itm` is the filter's "
        "image-text match probability.",
        "",
        "## How to load",
        "",
        _LOAD_SNIPPETS[str(summary["format"])].format(
            dir=summary["out_dir"], last=max(int(summary["shards"]) - 1, 0), pairs=pairs
        ),
        "",
        "## Pairs by source",
        "",
        _table(
            ["source", "pairs", "share"],
            [[s, f"{n:,}", _share(n, pairs)] for s, n in sorted(summary["by_source"].items())]
            + [["total", f"{pairs:,}", _share(pairs, pairs)]],
        ),
        "",
    ]
    manifest_kept = manifest.get("kept")
    if isinstance(manifest_kept, dict) and {k: v for k, v in manifest_kept.items() if v} != {
        k: v for k, v in summary["by_source"].items() if v
    }:
        out += [
            f"Note: the run's manifest.json lists kept pairs {manifest_kept}, which differs from this "
            "export; the run may have been resumed or extended after the manifest was written.",
            "",
        ]
    out += [
        "## Input rows by status",
        "",
        f"{stats.rows:,} input rows; every row has exactly one status (failures are kept as data in "
        "the run's `samples/`).",
        "",
        _table(
            ["status", "rows", "share", "meaning"],
            [[s, f"{n:,}", _share(n, stats.rows), _status_meaning(s)] for s, n in stats.status.items()],
        ),
        "",
        "## Filter scores",
        "",
    ]
    rule = view.selection()
    threshold = None if rule is None else rule.threshold
    rule = (
        f"ITM match probability of every scored text; the filter kept a text when its score was at least "
        f"**{threshold}**"
        if threshold is not None
        else "No filter ran in this run; scores are absent"
    )
    out.append(
        f"{rule} (web texts kept: {stats.web_kept:,} of {stats.web_scored:,} scored; synthetic captions "
        f"kept: {stats.synthetic_kept:,} of {stats.synthetic_total:,}).\n"
    )
    if stats.web_hist is not None and stats.synthetic_hist is not None:
        web, syn = stats.web_hist, stats.synthetic_hist
        rows = []
        for i in range(len(web.kept)):
            lo, hi = web.edges[i], web.edges[i + 1]
            label = f"[{lo:.1f}, {hi:.1f}{']' if i == len(web.kept) - 1 else ')'}"
            rows.append(
                [label, web.kept[i] + web.removed[i], web.kept[i], syn.kept[i] + syn.removed[i], syn.kept[i]]
            )
        rows.append(["not scored", web.unscored, 0, syn.unscored, 0])
        out += [_table(["ITM", "web texts", "web kept", "synthetic captions", "synthetic kept"], rows), ""]
    out += ["## Models", ""]
    models = manifest.get("models") if isinstance(manifest.get("models"), dict) else {}
    for stage in ("caption", "filter"):
        ids = models.get(stage) if models else None
        if not ids:
            section = config.get(stage)
            if isinstance(section, dict):
                ids = [section["model"]] if section.get("model") else list(section.get("models") or [])
        out.append(f"- {stage}: {', '.join(f'`{m}`' for m in ids) if ids else 'none (stage skipped)'}")
    out.append("")
    versions = manifest.get("versions")
    if isinstance(versions, dict) and versions:
        out += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    if manifest.get("started_at") or manifest.get("finished_at"):
        timing = manifest.get("timing") if isinstance(manifest.get("timing"), dict) else {}
        out += [
            "## Run",
            "",
            f"Started {manifest.get('started_at', '?')}, finished {manifest.get('finished_at', '?')}"
            + (
                f"; {timing.get('rows_per_s')} rows/s over {timing.get('wall_s')} s"
                if timing.get("wall_s")
                else ""
            )
            + ".",
            "",
        ]
    text = view.config_text()
    if text:
        out += ["## Pipeline config", "", "```yaml", text.rstrip("\n"), "```", ""]
    return "\n".join(out)
