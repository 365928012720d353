"""Write: commit the pipeline's rows to the run directory, one shard at a time.

A shard ``i`` is the input rows ``i * rows_per_shard ... (i + 1) * rows_per_shard - 1`` (the
pipeline assigns them; see ``capfilt/pipeline.py``). Committing it writes three files::

    images/shard-00007.tar        webdataset, img2dataset layout: KEY.jpg + KEY.json per ok row
    dataset/shard-00007.parquet   one row per kept pair (see DATASET_COLUMNS)
    samples/shard-00007.parquet   one row per input row of the shard, whatever happened to it

Each file is written under a hidden temporary name and renamed into place, and the samples
file goes LAST: its presence is the shard's commit marker. A run killed at any moment leaves
either a committed shard (all three files complete) or no samples file, in which case the
rerun rewrites the shard from scratch (:func:`clean_partial` removes the leftovers first).

Why ``dataset/`` holds tar references rather than image bytes: the images are already
stored once in ``images/``; copying them into every kept pair (a sample may have a web and
one or more synthetic pairs) would double or triple the run's size. The reference is a
path relative to the run directory (``image_tar``) and a member name (``image_member``);
:func:`read_dataset` with ``with_images=True`` joins the bytes back in for training code that
prefers one self-contained table.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.stages.status import Status

SAMPLES_DIR = "samples"
IMAGES_DIR = "images"
DATASET_DIR = "dataset"

ROW_COLUMN = "_row"
"""Internal column: the row's index in the input (orders rows inside a shard)."""
SHARD_COLUMN = "_shard"
"""Internal column: the shard a row belongs to (``_row // rows_per_shard``)."""

SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("web_text", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("synthetic_texts", pa.list_(pa.string())),
        ("web_itm", pa.float64()),
        ("synthetic_itm", pa.list_(pa.float64())),
        ("web_kept", pa.bool_()),
        ("synthetic_kept", pa.list_(pa.bool_())),
    ]
)
"""The columns every samples file has, in this order; keep_cols follow them."""

OPTIONAL_SAMPLE_COLUMNS: dict[str, pa.DataType] = {
    "web_itc": pa.float64(),
    "synthetic_itc": pa.list_(pa.float64()),
    "width": pa.int64(),
    "height": pa.int64(),
    "original_width": pa.int64(),
    "original_height": pa.int64(),
    "sha256": pa.string(),
    "web_clip": pa.float64(),
    "synthetic_clip": pa.list_(pa.float64()),
    "phash": pa.string(),  # 16 hex digits
    "duplicate_of": pa.string(),
}
"""Columns copied into samples files when the stages produced them (ITC scores when
``filter.itc_column``; image sizes and content hash from the download stage; CLIP scores
with a ``clip`` section; the perceptual hash and the dedup mark with ``dedup.enabled``)."""

DATASET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),  # web | synthetic
        ("itm", pa.float64()),  # the filter's match probability (NaN when no filter ran)
        ("shard", pa.int32()),
        ("image_tar", pa.string()),  # relative to the run directory, e.g. images/shard-00007.tar
        ("image_member", pa.string()),  # e.g. KEY.jpg
    ]
)

_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")


def shard_stem(shard: int) -> str:
    """``shard-00007`` for shard 7."""
    return f"shard-{shard:05d}"


def samples_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"{shard_stem(shard)}.parquet"


def images_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / IMAGES_DIR / f"{shard_stem(shard)}.tar"


def dataset_path(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / DATASET_DIR / f"{shard_stem(shard)}.parquet"


def committed_shards(run_dir: Path) -> set[int]:
    """Shards whose samples file exists, i.e. that a rerun must skip."""
    directory = Path(run_dir) / SAMPLES_DIR
    if not directory.is_dir():
        return set()
    return {int(m.group(1)) for p in directory.iterdir() if (m := _SHARD_RE.match(p.name))}


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what an interrupted run left: temporary files and files of uncommitted shards.

    Returns the removed paths. Safe to call on a fresh or finished run directory.
    """
    run_dir = Path(run_dir)
    done = committed_shards(run_dir)
    removed: list[Path] = []
    for sub in (SAMPLES_DIR, IMAGES_DIR, DATASET_DIR):
        directory = run_dir / sub
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            stale = path.name.startswith(".") and path.name.endswith(".tmp")
            match = re.match(r"^shard-(\d{5,})\.", path.name)
            if stale or (match and int(match.group(1)) not in done):
                path.unlink()
                removed.append(path)
    return removed


def _commit(write: Any, final: Path) -> None:
    """Write through ``write(tmp_path)`` to a hidden temporary name, fsync, rename to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


class ShardBuffer:
    """Collects rows arriving in any order and hands out each shard once all its rows are in.

    The pipeline's rows stream back from Ray in no particular order; a shard is complete when
    the number of rows received for it equals ``expected[shard]``. Rows are identified by the
    ``_shard`` and ``_row`` columns.
    """

    def __init__(self, *, expected: Mapping[int, int]) -> None:
        self.expected = dict(expected)
        self._parts: dict[int, list[pa.Table]] = {}
        self._counts: dict[int, int] = {}

    @property
    def pending(self) -> dict[int, int]:
        """Rows received so far for each shard not yet handed out."""
        return dict(self._counts)

    def add(self, table: pa.Table) -> list[tuple[int, pa.Table]]:
        """Add a batch; return the shards it completed as ``(shard, rows sorted by _row)``."""
        if table.num_rows == 0:
            return []
        shards = table.column(SHARD_COLUMN)
        complete: list[tuple[int, pa.Table]] = []
        for shard in sorted(pc.unique(shards).to_pylist()):
            if shard not in self.expected:
                raise RuntimeError(f"row for shard {shard}, which this run does not write")
            part = table.filter(pc.equal(shards, shard))
            self._parts.setdefault(shard, []).append(part)
            count = self._counts.get(shard, 0) + part.num_rows
            if count > self.expected[shard]:
                raise RuntimeError(f"shard {shard}: {count} rows arrived, expected {self.expected[shard]}")
            self._counts[shard] = count
            if count == self.expected[shard]:
                rows = pa.concat_tables(self._parts.pop(shard), promote_options="permissive")
                del self._counts[shard]
                del self.expected[shard]
                complete.append((shard, rows.sort_by(ROW_COLUMN)))
        return complete


def _column(rows: pa.Table, name: str, type_: pa.DataType, default: Any) -> pa.Array:
    """Column ``name`` cast to ``type_``, or ``default`` repeated when the stage did not run."""
    if name in rows.column_names:
        column = rows.column(name)
        if pa.types.is_null(column.type) or column.type != type_:
            column = column.cast(type_)
        return column
    return pa.array([default] * rows.num_rows, type=type_)


def samples_table(rows: pa.Table, *, keep_cols: Sequence[str] = ()) -> pa.Table:
    """The samples file's table: SAMPLE_SCHEMA columns, present optional columns, keep_cols."""
    n = rows.num_rows
    defaults: dict[str, Any] = {
        "error": "",
        "synthetic_texts": [],
        "web_itm": math.nan,
        "synthetic_itm": [],
        "web_kept": False,
    }
    arrays: list[Any] = []
    fields: list[pa.Field] = []
    for field in SAMPLE_SCHEMA:
        if field.name == "synthetic_kept" and field.name not in rows.column_names:
            texts = _column(rows, "synthetic_texts", pa.list_(pa.string()), []).to_pylist()
            arrays.append(pa.array([[False] * len(t or []) for t in texts], type=field.type))
        elif field.name in rows.column_names or field.name in defaults:
            arrays.append(_column(rows, field.name, field.type, defaults.get(field.name)))
        else:
            raise ValueError(f"rows lack the required column {field.name!r}")
        fields.append(field)
    for name, type_ in OPTIONAL_SAMPLE_COLUMNS.items():
        if name in rows.column_names:
            arrays.append(_column(rows, name, type_, None))
            fields.append(pa.field(name, type_))
    for name in keep_cols:
        arrays.append(rows.column(name) if name in rows.column_names else pa.nulls(n))
        fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def dataset_table(samples: pa.Table, *, shard: int, image_ext: str = "jpg") -> pa.Table:
    """One row per kept pair of a shard: its web text if kept, then its kept synthetic captions."""
    columns: dict[str, list[Any]] = {name: [] for name in DATASET_SCHEMA.names}
    tar = f"{IMAGES_DIR}/{shard_stem(shard)}.tar"
    for row in samples.select(
        ["key", "web_text", "web_itm", "web_kept", "synthetic_texts", "synthetic_itm", "synthetic_kept"]
    ).to_pylist():
        pairs: list[tuple[str, str, float]] = []
        if row["web_kept"]:
            pairs.append((row["web_text"], "web", row["web_itm"]))
        scores = row["synthetic_itm"] or []
        for j, (text, kept) in enumerate(
            zip(row["synthetic_texts"] or [], row["synthetic_kept"] or [], strict=True)
        ):
            if kept:
                pairs.append((text, "synthetic", scores[j] if j < len(scores) else math.nan))
        for text, source, itm in pairs:
            columns["key"].append(row["key"])
            columns["text"].append(text)
            columns["source"].append(source)
            columns["itm"].append(math.nan if itm is None else itm)
            columns["shard"].append(shard)
            columns["image_tar"].append(tar)
            columns["image_member"].append(f"{row['key']}.{image_ext}")
    return pa.table(columns, schema=DATASET_SCHEMA)


def _image_json(row: Mapping[str, Any]) -> bytes:
    """The KEY.json sidecar, with img2dataset's field names."""
    meta = {
        "key": row.get("key"),
        "url": row.get("url"),
        "caption": row.get("web_text"),
        "status": "success" if row.get("status") == Status.ok else row.get("status"),
        "error_message": row.get("error") or None,
    }
    for name in ("width", "height", "original_width", "original_height", "sha256"):
        if name in row:
            meta[name] = row[name]
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def write_images_tar(path: Path, rows: pa.Table, *, image_ext: str = "jpg") -> int:
    """Write the ok rows' images as a webdataset tar (KEY.ext + KEY.json); returns image count.

    Member metadata is fixed (mtime 0, mode 0644, no owner), so equal rows give equal bytes.
    """
    names = [
        n
        for n in (
            "key",
            "url",
            "web_text",
            "status",
            "error",
            "image",
            "width",
            "height",
            "original_width",
            "original_height",
            "sha256",
        )
        if n in rows.column_names
    ]
    count = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for row in rows.select(names).to_pylist():
            image = row.get("image")
            if row.get("status") != Status.ok or not image:
                continue
            row.pop("image")
            for member, payload in (
                (f"{row['key']}.{image_ext}", image),
                (f"{row['key']}.json", _image_json(row)),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
            count += 1
    return count


@dataclass(frozen=True)
class ShardSummary:
    """What one committed shard holds (for progress bars)."""

    shard: int
    rows: int
    images: int
    pairs: int


def write_shard(
    run_dir: Path, shard: int, rows: pa.Table, *, keep_cols: Sequence[str] = (), image_ext: str = "jpg"
) -> ShardSummary:
    """Commit one complete shard: images tar, dataset parquet, then samples parquet (the marker).

    ``rows`` are all the shard's rows (any order; sorted by ``_row`` when present) with the
    pipeline's columns: key, url, web_text, status, error, image, synthetic_texts, scores and
    kept flags (missing model columns get their "stage skipped" defaults).
    """
    run_dir = Path(run_dir)
    if ROW_COLUMN in rows.column_names:
        rows = rows.sort_by(ROW_COLUMN)
    samples = samples_table(rows, keep_cols=keep_cols)
    dataset = dataset_table(samples, shard=shard, image_ext=image_ext)
    images = 0

    def write_tar(tmp: Path) -> None:
        nonlocal images
        images = write_images_tar(tmp, rows, image_ext=image_ext)

    _commit(write_tar, images_path(run_dir, shard))
    _commit(lambda tmp: pq.write_table(dataset, tmp), dataset_path(run_dir, shard))
    _commit(lambda tmp: pq.write_table(samples, tmp), samples_path(run_dir, shard))
    return ShardSummary(shard=shard, rows=samples.num_rows, images=images, pairs=dataset.num_rows)


def _read_shards(directory: Path, columns: Iterable[str] | None = None) -> pa.Table | None:
    files = sorted(p for p in directory.glob("shard-*.parquet") if _SHARD_RE.match(p.name))
    if not files:
        return None
    tables = [pq.read_table(p, columns=list(columns) if columns is not None else None) for p in files]
    return pa.concat_tables(tables, promote_options="permissive")


def read_samples(run_dir: Path, columns: Iterable[str] | None = None) -> pa.Table | None:
    """All committed samples rows (shard order), or None when no shard is committed."""
    return _read_shards(Path(run_dir) / SAMPLES_DIR, columns)


def read_dataset(run_dir: Path, *, with_images: bool = False) -> pa.Table | None:
    """All kept pairs of a run; ``with_images`` adds an ``image`` bytes column read from the tars."""
    run_dir = Path(run_dir)
    table = _read_shards(run_dir / DATASET_DIR)
    if table is None or not with_images:
        return table
    cache: dict[str, dict[str, bytes]] = {}
    images: list[bytes] = []
    for tar_name, member in zip(
        table.column("image_tar").to_pylist(), table.column("image_member").to_pylist(), strict=True
    ):
        if tar_name not in cache:
            with tarfile.open(run_dir / tar_name) as tar:
                cache = {
                    tar_name: {
                        m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                        for m in tar.getmembers()
                        if m.isfile() and not m.name.endswith(".json")
                    }
                }
        images.append(cache[tar_name][member])
    return table.append_column("image", pa.array(images, type=pa.binary()))


def summarize(run_dir: Path) -> dict[str, Any]:
    """Counts over every committed shard: rows, rows by status, kept pairs by source, shards.

    Recomputed from the files (not from what one process saw), so a resumed run reports the
    same numbers as an uninterrupted one.
    """
    run_dir = Path(run_dir)
    samples = read_samples(run_dir, columns=["status"])
    dataset = _read_shards(run_dir / DATASET_DIR, columns=["source"])
    by_status: dict[str, int] = {}
    if samples is not None:
        for item in pc.value_counts(samples.column("status")).to_pylist():
            by_status[item["values"]] = item["counts"]
    kept = {"web": 0, "synthetic": 0}
    if dataset is not None:
        for item in pc.value_counts(dataset.column("source")).to_pylist():
            kept[item["values"]] = item["counts"]
    return {
        "rows": samples.num_rows if samples is not None else 0,
        "shards": len(committed_shards(run_dir)),
        "status": dict(sorted(by_status.items())),
        "kept": kept,
    }
