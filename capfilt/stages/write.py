"""Write: the pipeline's finished rows become committed shards, written by Ray workers.

A shard ``i`` is the input rows ``i * rows_per_shard ... (i + 1) * rows_per_shard - 1`` (the
pipeline assigns them; see ``capfilt/pipeline.py``). Committing it writes three files::

    images/shard-00007.tar        webdataset, img2dataset layout: KEY.jpg + KEY.json per ok row
    dataset/shard-00007.parquet   one row per kept pair (see DATASET_SCHEMA)
    samples/shard-00007.parquet   one row per input row of the shard, whatever happened to it

in that order, each atomically (:meth:`capfilt.rundir.RunDir.write_atomic`): the samples file
goes LAST and is the shard's commit marker. A run killed at any moment leaves either a
committed shard (all three files complete) or no samples file, in which case the rerun
rewrites the shard from scratch (:meth:`~capfilt.rundir.RunDir.clean_partial` first removes
the leftovers).

Two steps, both in Ray workers (the driver only sees their small summaries):

* :func:`write_parts` (the last map step of the DAG): a finished block's rows, split by
  shard, each piece written to ``_parts/shard-NNNNN/part-<first row>-<digest>.parquet``. The
  name is a pure function of the piece's row numbers, so a retried task rewrites the same
  file. Returns one summary row per piece (shard, rows, part path).
* :func:`commit_shard` (a Ray task the driver starts once the parts of a shard hold all its
  rows): reads exactly the listed parts, drops rows seen twice (by ``_row``), checks the row
  count, writes the three files and deletes the parts. Idempotent: if the samples file is
  already there it only reports the shard's counts.

Why ``dataset/`` holds tar references rather than image bytes: the images are already
stored once in ``images/``; copying them into every kept pair (a sample may have a web and
one or more synthetic pairs) would double or triple the run's size. The reference is a
path relative to the run directory (``image_tar``) and a member name (``image_member``);
:func:`read_dataset` with ``with_images=True`` joins the bytes back in for training code that
prefers one self-contained table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.errors import UserError
from capfilt.guards import inside
from capfilt.rundir import (  # noqa: F401 - re-exported: dedup, bootstrap.summary and tests import them from here
    DATASET_DIR,
    DATASET_SCHEMA,
    IMAGE_META_COLUMNS,
    IMAGES_DIR,
    OPTIONAL_SAMPLE_COLUMNS,
    PARTS_DIR,
    ROW_COLUMN,
    SAMPLE_SCHEMA,
    SAMPLES_DIR,
    SHARD_COLUMN,
    SHARD_META_KEY,
    HashingWriter,
    RunDir,
    clean_partial,
    committed_shards,
    dataset_path,
    images_path,
    input_fingerprint,
    samples_path,
    shard_counts,
    shard_stem,
    summarize,
)
from capfilt.rundir.read import kept_texts, scan_images_tar, shard_files
from capfilt.stages.status import Status


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
    for key, text, source, itm in kept_texts(samples):
        columns["key"].append(key)
        columns["text"].append(text)
        columns["source"].append(source)
        columns["itm"].append(itm)
        columns["shard"].append(shard)
        columns["image_tar"].append(tar)
        columns["image_member"].append(f"{key}.{image_ext}")
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
    for name in IMAGE_META_COLUMNS:
        if name in row:
            meta[name] = row[name]
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def write_images_tar(target: Path | IO[bytes], rows: pa.Table, *, image_ext: str = "jpg") -> int:
    """Write the ok rows' images as a webdataset tar (KEY.ext + KEY.json) to a path or binary
    stream; returns the image count.

    Member metadata is fixed (mtime 0, mode 0644, no owner), so equal rows give equal bytes.
    """
    wanted = ("key", "url", "web_text", "status", "error", "image", *IMAGE_META_COLUMNS)
    names = [n for n in wanted if n in rows.column_names]
    count = 0
    opened = (
        tarfile.open(target, "w", format=tarfile.PAX_FORMAT)
        if isinstance(target, str | Path)
        else tarfile.open(fileobj=target, mode="w", format=tarfile.PAX_FORMAT)
    )
    with opened as tar:
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
    counts: dict[str, Any] | None = dataclasses.field(default=None, compare=False)
    """rows, rows by status and kept pairs by source (what manifest.json sums)."""


def _as_run(run: RunDir | Path | str) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


def write_shard(
    run: RunDir | Path | str,
    shard: int,
    rows: pa.Table,
    *,
    keep_cols: Sequence[str] = (),
    image_ext: str = "jpg",
    paths: Mapping[str, str] | None = None,
) -> ShardSummary:
    """Commit one complete shard: images tar, dataset parquet, then samples parquet (the marker).

    ``rows`` are all the shard's rows (any order; sorted by ``_row`` when present) with the
    pipeline's columns: key, url, web_text, status, error, image, synthetic_texts, scores and
    kept flags (missing model columns get their "stage skipped" defaults). ``paths`` (kind ->
    path) writes the three files elsewhere (``capfilt run --retry`` stages a shard first).
    """
    run = _as_run(run)
    target = dict(paths or {})
    if ROW_COLUMN in rows.column_names:
        rows = rows.sort_by(ROW_COLUMN)
    else:  # rows given without input row numbers (tests, tools): their order is the row order
        rows = rows.append_column(ROW_COLUMN, pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    samples = samples_table(rows, keep_cols=keep_cols)
    dataset = dataset_table(samples, shard=shard, image_ext=image_ext)

    def tar(stream: IO[bytes]) -> tuple[int, str]:
        hashing = HashingWriter(stream)
        count = write_images_tar(hashing, rows, image_ext=image_ext)  # type: ignore[arg-type]
        return count, hashing.sha256.hexdigest()

    images, images_sha = run.write_atomic(target.get(IMAGES_DIR) or run.shard_path(IMAGES_DIR, shard), tar)
    buffer = io.BytesIO()
    pq.write_table(dataset, buffer)
    dataset_bytes = buffer.getvalue()
    run.write_atomic(
        target.get(DATASET_DIR) or run.shard_path(DATASET_DIR, shard),
        lambda stream: stream.write(dataset_bytes),
    )
    record = {
        "rows": samples.num_rows,
        "input_fingerprint": input_fingerprint(rows),
        "images_sha256": images_sha,
        "dataset_sha256": hashlib.sha256(dataset_bytes).hexdigest(),
    }
    samples = samples.replace_schema_metadata({SHARD_META_KEY: json.dumps(record, sort_keys=True)})
    run.write_atomic(
        target.get(SAMPLES_DIR) or run.shard_path(SAMPLES_DIR, shard),
        lambda stream: pq.write_table(samples, stream),
    )
    return ShardSummary(
        shard=shard,
        rows=samples.num_rows,
        images=images,
        pairs=dataset.num_rows,
        counts=shard_counts(samples.column("status"), dataset.column("source")),
    )


# --------------------------------------------------------------------------- worker-side writing

PART_SUMMARY_SCHEMA = pa.schema([("shard", pa.int64()), ("rows", pa.int64()), ("part", pa.string())])
"""What a write task returns per part file: all the driver ever sees of the finished rows."""


def part_name(rows: np.ndarray) -> str:
    """Deterministic part file name for a piece with these input row numbers (sorted)."""
    digest = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]
    return f"part-{int(rows[0]):012d}-{len(rows)}-{digest}.parquet"


def write_parts(block: pa.Table, *, run: RunDir) -> pa.Table:
    """Write-part task body: one part file per shard present in ``block``; returns summaries.

    Every column of the finished rows (image bytes included) goes into the part file; the
    returned table (:data:`PART_SUMMARY_SCHEMA`) holds only shard, row count and part path.
    """
    shards: list[int] = []
    counts: list[int] = []
    paths: list[str] = []
    if block.num_rows:
        shard_column = block.column(SHARD_COLUMN)
        for shard in sorted(pc.unique(shard_column).to_pylist()):
            piece = block.filter(pc.equal(shard_column, shard)).sort_by(ROW_COLUMN)
            rows = piece.column(ROW_COLUMN).to_numpy()
            path = f"{run.parts_dir(int(shard))}/{part_name(rows)}"
            run.write_atomic(path, lambda stream, piece=piece: pq.write_table(piece, stream))
            shards.append(int(shard))
            counts.append(piece.num_rows)
            paths.append(path)
    return pa.table({"shard": shards, "rows": counts, "part": paths}, schema=PART_SUMMARY_SCHEMA)


def _read_part(run: RunDir, path: str) -> pa.Table:
    with run.fs.open(path, "rb") as stream:
        return pq.read_table(stream)


def commit_shard(
    run: RunDir,
    shard: int,
    parts: Sequence[str],
    *,
    expected: int,
    keep_cols: Sequence[str] = (),
    image_ext: str = "jpg",
) -> dict[str, Any]:
    """Commit task body: assemble ``parts`` into the shard's three files, then delete them.

    Returns the shard's summary (shard, rows, images, pairs, status counts, kept counts).
    Rows present in two parts (a retried task whose first attempt also wrote) are kept once.
    """
    if run.exists(run.shard_path(SAMPLES_DIR, shard)):  # a retry after the commit: report only
        run.remove(parts)
        counts = run.shard_counts(shard)
        return {"shard": shard, "images": None, "pairs": sum(counts["kept"].values()), **counts}
    tables = [_read_part(run, path) for path in parts]
    rows = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    del tables
    numbers = rows.column(ROW_COLUMN).to_numpy()
    _, first = np.unique(numbers, return_index=True)  # sorted by _row, each row once
    rows = rows.take(pa.array(first))
    if rows.num_rows != expected:
        raise RuntimeError(f"shard {shard}: {rows.num_rows} rows in its parts, expected {expected}")
    keys = rows.column("key")
    if pc.count_distinct(keys).as_py() != rows.num_rows:
        counts = pc.value_counts(keys)
        repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))[0].as_py()
        raise UserError(
            f"input.key_col: key {repeated['values']!r} occurs {repeated['counts']} times in shard {shard} "
            "(keys must be unique across the input files)"
        )
    summary = write_shard(run, shard, rows, keep_cols=keep_cols, image_ext=image_ext)
    run.remove(parts)
    return {"shard": shard, "images": summary.images, "pairs": summary.pairs, **(summary.counts or {})}


# --------------------------------------------------------------------------- reading


def _read_shards(directory: Path, columns: Iterable[str] | None = None) -> pa.Table | None:
    files = shard_files(directory)
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
    cache: dict[str, dict[str, bytes]] = {}  # one tar at a time: rows come grouped by shard
    images: list[bytes] = []
    for tar_name, member in zip(
        table.column("image_tar").to_pylist(), table.column("image_member").to_pylist(), strict=True
    ):
        if tar_name not in cache:
            path = inside(run_dir, tar_name, what="image_tar")
            cache = {tar_name: {name: data for name, _, data in scan_images_tar(path)}}  # type: ignore[misc]
        images.append(cache[tar_name][member])
    return table.append_column("image", pa.array(images, type=pa.binary()))
