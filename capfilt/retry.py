"""`capfilt run CONFIG --retry STATUS[,STATUS...]`: re-process failed rows of a finished run in place.

::

    driver: the run must be finished (every shard committed and verified)
    find tasks (one per group of shards): per shard, the positions of the rows to retry
      (samples status/error columns only; only shard numbers and row positions come back)
    the same DAG as a run, fed by retry-read tasks (key, url, web_text, keep_cols, _row, _shard
      read back from the samples files) -> part files under _parts/
    commit task per affected shard (:func:`commit_retry`): old rows not retried (samples row,
      image from the old tar) + the new rows, sorted by _row -> staged under
      _retry/shard-N/ (tar, dataset, samples last) -> moved over the shard's files (samples last)

Which rows: ``--retry transient`` (the keyword) selects the download failures worth another
try (:func:`is_transient`); explicit status names select every row with that status; both can
be mixed (``--retry transient,decode_failed``).

Crash safety: the new shard is first written completely under ``_retry/shard-N/`` (samples
file last, the staging marker); only then are the three files moved over the old ones, samples
last. Any later ``capfilt run`` first finishes the moves of a staged shard whose samples file
is there (:func:`finish_staged`) and drops incomplete staging, so a crash leaves either the old
shard or the new one. The merge is "old shard, with the rows found in the parts replaced", so a
commit repeated after a crash writes the same bytes; a rerun of the same ``--retry`` selects
the rows that still match and retries those.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.errors import UserError
from capfilt.rundir import (
    IMAGES_DIR,
    ROW_COLUMN,
    SAMPLES_DIR,
    SHARD_COLUMN,
    SHARD_DIRS,
    RunDir,
    shard_name,
    shard_number,
    shard_stem,
)
from capfilt.rundir.read import scan_images_tar
from capfilt.stages.status import Status

RETRY_DIR = "_retry"
"""Staging area of shards being rewritten by a retry: ``_retry/shard-N/{images,dataset,samples}/shard-N.*``."""
TRANSIENT = "transient"
"""The ``--retry`` keyword for transient download failures (see :func:`is_transient`)."""
NOT_RETRYABLE = {Status.ok, Status.filtered_metadata}
"""Statuses --retry refuses: ok rows have nothing to redo; input.where decides filtered_metadata."""

_PERMANENT_HTTP = re.compile(r"^HTTP ([1-4]\d\d)\b")
SHARDS_PER_FIND_TASK = 16


def parse_statuses(text: str) -> tuple[frozenset[str], bool]:
    """``--retry`` value -> (explicit statuses, whether ``transient`` was named); UserError if bad."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--retry: give {TRANSIENT} or status names separated by commas")
    valid = {s.value for s in Status}
    explicit = set()
    transient = False
    for name in names:
        if name == TRANSIENT:
            transient = True
        elif name not in valid:
            choices = ", ".join(sorted(valid - NOT_RETRYABLE))
            raise UserError(f"--retry: unknown status {name!r}; use {TRANSIENT} or one of {choices}")
        elif name in NOT_RETRYABLE:
            raise UserError(f"--retry: {name} rows are not retried (choose failure statuses or {TRANSIENT})")
        else:
            explicit.add(name)
    return frozenset(explicit), transient


def is_transient(status: str | None, error: str | None) -> bool:
    """Whether a row's failure is transient (worth a retry), from its stored status and error.

    Only ``download_failed`` rows can be. Their error text (capfilt/stages/download.py) is
    permanent when it names an HTTP status below 500 other than 408 and 429 (404, 403, 410, a
    3xx without Location, ...), a redirect problem (loop, too many, refused target) or headers
    over ``max_header_bytes``; every other download failure is transient: deadlines
    (``deadline: ...``), DNS and connect errors, HTTP 408/429/5xx, a connection closed short,
    resets, Retry-After over the cap, robots.txt unreachable.
    """
    if status != Status.download_failed:
        return False
    text = (error or "").strip()
    match = _PERMANENT_HTTP.match(text)
    if match is not None:
        return int(match.group(1)) in (408, 429)
    lowered = text.lower()
    return "redirect" not in lowered and not lowered.startswith("response headers exceed")


def retry_mask(
    status: Sequence[Any], error: Sequence[Any], statuses: frozenset[str], transient: bool
) -> np.ndarray:
    """Boolean mask of the rows to retry."""
    return np.array(
        [s in statuses or (transient and is_transient(s, e)) for s, e in zip(status, error, strict=True)],
        dtype=bool,
    )


# --------------------------------------------------------------------------- tasks


def find_rows(
    run: RunDir, shards: Iterable[int], statuses: frozenset[str], transient: bool
) -> list[tuple[int, list[int]]]:
    """Find task body: (shard, positions of its rows to retry) for each shard with some."""
    out = []
    for shard in shards:
        with run.fs.open(run.shard_path(SAMPLES_DIR, shard), "rb") as stream:
            table = pq.read_table(stream, columns=["status", "error"])
        mask = retry_mask(
            table.column("status").to_pylist(), table.column("error").to_pylist(), statuses, transient
        )
        if mask.any():
            out.append((int(shard), np.flatnonzero(mask).tolist()))
    return out


def read_retry_rows(batch: pa.Table, *, run: RunDir, keep_cols: list[str], rows_per_shard: int) -> pa.Table:
    """Retry-read task body: each row of ``batch`` is (shard, JSON positions); returns the rows
    as a read task would (key, url, web_text, keep_cols, _row, _shard), from the samples file."""
    tables = []
    for shard, text in zip(batch.column("shard").to_pylist(), batch.column("rows").to_pylist(), strict=True):
        positions = json.loads(text)
        with run.fs.open(run.shard_path(SAMPLES_DIR, shard), "rb") as stream:
            table = pq.read_table(stream, columns=["key", "url", "web_text", *keep_cols])
        table = table.take(pa.array(positions, type=pa.int64()))
        rows = np.asarray(positions, dtype=np.int64) + int(shard) * rows_per_shard
        table = table.append_column(ROW_COLUMN, pa.array(rows))
        table = table.append_column(SHARD_COLUMN, pa.array(np.full(len(rows), int(shard), dtype=np.int64)))
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _stage_path(run: RunDir, shard: int, kind: str) -> str:
    return run.path(RETRY_DIR, shard_stem(shard), kind, shard_name(kind, shard))


def _publish(run: RunDir, shard: int) -> None:
    """Move a completely staged shard over the committed one: tar, dataset, samples last."""
    for kind in SHARD_DIRS:
        staged = _stage_path(run, shard, kind)
        if run.exists(staged):
            run.fs.mv(staged, run.shard_path(kind, shard))
    _drop_stage(run, shard)


def _drop_stage(run: RunDir, shard: int) -> None:
    directory = run.path(RETRY_DIR, shard_stem(shard))
    if run.exists(directory):
        run.fs.rm(directory, recursive=True)


def finish_staged(run: RunDir) -> list[int]:
    """Recovery before any run: publish completely staged shards, drop incomplete staging.

    Returns the shards published. A staged shard is complete when its samples file is staged
    (it is written last); once moves have started, the staged samples file is still there
    (moved last), so the moves are finished.
    """
    root = run.path(RETRY_DIR)
    if not run.exists(root):
        return []
    published = []
    for entry in run.fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        shard = shard_number(name, suffix="")
        if shard is None:
            continue
        if run.exists(_stage_path(run, shard, SAMPLES_DIR)):
            _publish(run, shard)
            published.append(shard)
        else:
            _drop_stage(run, shard)
    if run.exists(root):
        run.fs.rm(root, recursive=True)
    return published


def _old_images(run: RunDir, shard: int, members: set[str]) -> dict[str, bytes]:
    """The bytes of ``members`` of the committed shard's tar."""
    with run.fs.open(run.shard_path(IMAGES_DIR, shard), "rb") as stream:
        return {name: data for name, _, data in scan_images_tar(stream, members=members)}  # type: ignore[misc]


def commit_retry(
    run: RunDir,
    shard: int,
    parts: Sequence[str],
    *,
    expected: int,
    rows_per_shard: int,
    keep_cols: Sequence[str] = (),
    image_ext: str = "jpg",
) -> dict[str, Any]:
    """Retry-commit task body: merge the committed shard with the retried rows of ``parts``.

    Rows not in the parts keep their samples row and image bytes; the shard is staged, then
    published (module docstring). Returns the same summary as a normal commit.
    """
    from capfilt.stages import write as writer

    if run.exists(_stage_path(run, shard, SAMPLES_DIR)):  # an earlier attempt staged it completely
        _publish(run, shard)
    present = [p for p in parts if run.exists(p)]
    if not present:  # an earlier attempt published and removed the parts: report only
        counts = run.shard_counts(shard)
        return {"shard": shard, "images": None, "pairs": sum(counts["kept"].values()), **counts}
    _drop_stage(run, shard)
    if len(present) != len(parts):
        raise RuntimeError(f"shard {shard}: {len(parts) - len(present)} of its retry parts are missing")
    new = pa.concat_tables([writer._read_part(run, p) for p in parts], promote_options="permissive")
    numbers = new.column(ROW_COLUMN).to_numpy()
    _, first = np.unique(numbers, return_index=True)
    new = new.take(pa.array(first))
    if new.num_rows != expected:
        raise RuntimeError(f"shard {shard}: {new.num_rows} retried rows in its parts, expected {expected}")
    with run.fs.open(run.shard_path(SAMPLES_DIR, shard), "rb") as stream:
        old = pq.read_table(stream)
    old = old.replace_schema_metadata(None)
    old_rows = np.arange(old.num_rows, dtype=np.int64) + shard * rows_per_shard
    keep = ~np.isin(old_rows, new.column(ROW_COLUMN).to_numpy())
    old = old.append_column(ROW_COLUMN, pa.array(old_rows)).filter(pa.array(keep))
    members = {
        f"{k}.{image_ext}"
        for k, s in zip(old.column("key").to_pylist(), old.column("status").to_pylist(), strict=True)
        if s == Status.ok
    }
    images = _old_images(run, shard, members)
    old = old.append_column(
        "image",
        pa.array(
            [
                images.get(f"{k}.{image_ext}", b"") if s == Status.ok else b""
                for k, s in zip(old.column("key").to_pylist(), old.column("status").to_pylist(), strict=True)
            ],
            type=pa.binary(),
        ),
    )
    fresh = writer.samples_table(new, keep_cols=keep_cols)
    fresh = fresh.append_column(ROW_COLUMN, new.column(ROW_COLUMN))
    fresh = fresh.append_column(
        "image", new.column("image") if "image" in new.column_names else pa.nulls(new.num_rows, pa.binary())
    )
    merged = pa.concat_tables([old, fresh], promote_options="permissive").sort_by(ROW_COLUMN)
    if merged.num_rows != old_rows.size:
        raise RuntimeError(f"shard {shard}: {merged.num_rows} rows after the merge, expected {old_rows.size}")
    paths = {kind: _stage_path(run, shard, kind) for kind in SHARD_DIRS}
    summary = writer.write_shard(run, shard, merged, keep_cols=keep_cols, image_ext=image_ext, paths=paths)
    _publish(run, shard)
    run.remove(parts)
    return {"shard": shard, "images": summary.images, "pairs": summary.pairs, **(summary.counts or {})}


def check_finished(missing: dict[int, int], url: str) -> None:
    """--retry needs a finished run: every shard committed."""
    if missing:
        first = min(missing)
        raise UserError(
            f"--retry: {url} is not finished ({len(missing)} shards not committed, e.g. shard {first}); "
            "run it without --retry first"
        )
