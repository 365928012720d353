"""The run directory: its layout, atomic writes, committed shards, partial-file cleanup, counts.

One home for what ``capfilt run`` writes and what a rerun trusts::

    RUN/config.yaml                   the resolved config (atomic)
    RUN/manifest.json                 counts recomputed from every committed shard (atomic)
    RUN/samples/shard-NNNNN.parquet   one row per input row: the commit marker, written last
    RUN/images/shard-NNNNN.tar        webdataset tar of the shard's ok images (KEY.jpg + KEY.json)
    RUN/dataset/shard-NNNNN.parquet   one row per kept (image, text) pair
    RUN/_parts/shard-NNNNN/part-*.parquet   finished rows of uncommitted shards (see below)

``RUN`` is a local or shared path or any fsspec URL (``file://``, ``s3://``, ``gs://``, ...).
A shard is committed when its samples file exists. Each of the three files is written
through :meth:`RunDir.write_atomic`: on a filesystem with rename (local, NFS, ``file://``) a
hidden ``.NAME.tmp`` is written, fsynced, renamed over ``NAME`` and the directory fsynced;
on an object store (no rename) the object is put under its final name, which object stores
make visible only once complete. Either way, the samples file is written last, so a shard is
visible only when its tar and dataset file are already there.

``_parts/`` holds the per-block part files that the pipeline's write tasks produce before a
shard's rows are all finished; the shard's commit task assembles them into the three files
and deletes them. :meth:`RunDir.clean_partial` removes parts, ``.tmp`` files and files of
uncommitted shards, so a rerun starts from committed shards only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.errors import UserError, user_os_error

SAMPLES_DIR = "samples"
IMAGES_DIR = "images"
DATASET_DIR = "dataset"
PARTS_DIR = "_parts"
SHARD_DIRS = (IMAGES_DIR, DATASET_DIR, SAMPLES_DIR)
"""The shard files in commit order: the samples file (last) is the commit marker."""

ROW_COLUMN = "_row"
"""Internal column: the row's index in the whole input (orders rows inside a shard)."""
SHARD_COLUMN = "_shard"
"""Internal column: the shard a row belongs to (``_row // rows_per_shard``)."""

# --------------------------------------------------------------------------- columns
# The one definition of what a run's Parquet files hold. Everything else derives from it:
# ``config.RESERVED_COLUMNS`` (names keep_cols may not reuse), the download stage's
# ``OUTPUT_COLUMNS``, the writer's tables and tar sidecars, the select step's Arrow types.

IMAGE_COLUMN = "image"
"""Encoded image bytes, carried between stages; stored in ``images/`` tars, never in samples."""
CARRIED_COLUMNS = (ROW_COLUMN, SHARD_COLUMN, IMAGE_COLUMN)
"""Columns the pipeline carries between stages that are not samples columns."""

IMAGE_META_COLUMNS = ("width", "height", "original_width", "original_height", "sha256")
"""What the download stage records about each image (also in each tar member's KEY.json)."""

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
"""The columns every samples file has, in this order; optional columns, then keep_cols follow them."""

OPTIONAL_SAMPLE_COLUMNS: dict[str, pa.DataType] = {
    "web_itc": pa.float64(),
    "synthetic_itc": pa.list_(pa.float64()),
    "synthetic_agreement": pa.list_(pa.float64()),
    **dict(zip(IMAGE_META_COLUMNS, (pa.int64(),) * 4 + (pa.string(),), strict=True)),
    "web_clip": pa.float64(),
    "synthetic_clip": pa.list_(pa.float64()),
    "phash": pa.string(),  # 16 hex digits
    "duplicate_of": pa.string(),
}
"""Columns copied into samples files when the stages produced them (ITC scores when
``filter.itc_column`` or ``filter.itc_weight`` > 0; the agreement of each synthetic caption with the image's others, from the
filter; image sizes and content hash from the download stage; CLIP scores
with a ``clip`` section; the perceptual hash and the dedup mark with ``dedup.enabled``)."""

SAMPLE_TYPES: dict[str, pa.DataType] = {
    **{f.name: f.type for f in SAMPLE_SCHEMA},
    **OPTIONAL_SAMPLE_COLUMNS,
}
"""Arrow type of every column a samples file may have (keep_cols aside)."""

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
"""One row per kept (image, text) pair: ``dataset/shard-NNNNN.parquet``."""


SHARD_RE = re.compile(r"^shard-(\d{5,})(\.[^/]+)?$")
"""Every shard name: ``shard-NNNNN`` (a shard's ``_parts/`` or staging directory) or
``shard-NNNNN.EXT`` (its files); group 1 is the shard number, group 2 the extension.
:func:`shard_number` is how callers read it."""


def shard_number(name: str, suffix: str | None = ".parquet") -> int | None:
    """The shard number of file or directory ``name``, or None when it is not a shard name.

    ``suffix``: the extension it must have (``".parquet"``: samples and dataset files,
    ``".tar"``, ``""``: a bare ``shard-NNNNN`` directory); None accepts any extension.
    """
    match = SHARD_RE.match(name)
    if match is None:
        return None
    ext = match.group(2) or ""
    if bool(ext) if suffix is None else ext == suffix:
        return int(match.group(1))
    return None


def shard_stem(shard: int) -> str:
    """``shard-00007`` for shard 7."""
    return f"shard-{shard:05d}"


def shard_name(kind: str, shard: int) -> str:
    """File name of a shard's ``kind`` file (``samples``/``dataset``: parquet, ``images``: tar)."""
    return f"{shard_stem(shard)}.{'tar' if kind == IMAGES_DIR else 'parquet'}"


# Plain-path helpers (local run directories; export, report and bootstrap use these).


def samples_path(run_dir: Path | str, shard: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / shard_name(SAMPLES_DIR, shard)


def images_path(run_dir: Path | str, shard: int) -> Path:
    return Path(run_dir) / IMAGES_DIR / shard_name(IMAGES_DIR, shard)


def dataset_path(run_dir: Path | str, shard: int) -> Path:
    return Path(run_dir) / DATASET_DIR / shard_name(DATASET_DIR, shard)


# --------------------------------------------------------------------------- filesystems


def url_to_fs(location: str, *, field: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a local path or URL; a missing protocol package is a UserError."""
    try:
        return fsspec.core.url_to_fs(location)
    except ImportError as err:
        protocol = location.split("://", 1)[0]
        package = _PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation for {protocol}://")
        raise UserError(f"{field}: {protocol}:// needs {package} (pip install {package}): {err}") from None
    except ValueError as err:
        raise UserError(f"{field}: cannot open {location!r}: {err}") from None


_PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "hf": "huggingface_hub",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "sftp": "paramiko",
}


def is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Any:
    """Write a local file atomically: ``write(stream)`` into ``.NAME.tmp``, fsync, rename, fsync dir.

    Returns what ``write`` returned. On any failure the temporary file is removed; a full or
    read-only disk (or missing permissions) becomes a one-line UserError naming ``path``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        with open(tmp, "wb") as stream:
            result = write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        user = user_os_error(err, final) if isinstance(err, OSError) else None
        if user is not None:
            raise user from None
        raise
    fsync_dir(final.parent)
    return result


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- the run directory


class RunDir:
    """A run directory at a local path or fsspec URL (picklable: Ray tasks get their own copy)."""

    def __init__(self, location: str | Path) -> None:
        location = str(location)
        if "://" not in location:  # workers on other nodes must not resolve it against their cwd
            location = os.path.abspath(os.path.expanduser(location))
        self.url = location
        self.fs, root = url_to_fs(location, field="output.dir")
        self.root = root.rstrip("/") or "/"
        self.local = is_local(self.fs)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (RunDir, (self.url,))

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def shard_path(self, kind: str, shard: int) -> str:
        return self.path(kind, shard_name(kind, shard))

    def parts_dir(self, shard: int) -> str:
        return self.path(PARTS_DIR, shard_stem(shard))

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def makedirs(self) -> None:
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as err:
            user = user_os_error(err, self.url)
            if user is not None:
                raise UserError(f"output.dir: {user}") from None
            raise UserError(f"output.dir: cannot create {self.url}: {err.strerror or err}") from None

    def _names(self, sub: str) -> list[str]:
        directory = self.path(sub)
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    # writing

    def write_atomic(self, path: str, write: Callable[[IO[bytes]], Any]) -> Any:
        """Write ``path`` so that readers see either nothing or the whole file (module docstring)."""
        if self.local:
            return atomic_write(path, write)
        parent = path.rsplit("/", 1)[0]
        with contextlib.suppress(OSError):
            self.fs.makedirs(parent, exist_ok=True)
        try:
            with self.fs.open(path, "wb") as stream:
                return write(stream)
        except OSError as err:
            user = user_os_error(err, path)
            if user is not None:
                raise user from None
            raise

    def write_text(self, name: str, text: str) -> None:
        self.write_atomic(self.path(name), lambda stream: stream.write(text.encode("utf-8")))

    def read_text(self, name: str) -> str | None:
        path = self.path(name)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as stream:
            return stream.read().decode("utf-8")

    def remove(self, paths: Iterable[str]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    # reading the state

    def committed_shards(self) -> set[int]:
        """Shards whose samples file exists, i.e. that a rerun must skip."""
        return {n for name in self._names(SAMPLES_DIR) if (n := shard_number(name)) is not None}

    def clean_partial(self) -> list[str]:
        """Remove what an interrupted run left: parts, temporary files, files of uncommitted shards.

        Returns the removed paths. Safe on a fresh or finished run directory.
        """
        done = self.committed_shards()
        removed: list[str] = []
        for sub in SHARD_DIRS:
            for name in self._names(sub):
                stale = name.startswith(".") and name.endswith(".tmp")
                number = shard_number(name, suffix=None)
                if stale or (number is not None and number not in done):
                    path = self.path(sub, name)
                    self.remove([path])
                    removed.append(path)
        parts = self.path(PARTS_DIR)
        if self.fs.exists(parts):
            found = self.fs.find(parts)
            self.remove(found)
            removed.extend(found)
            with contextlib.suppress(OSError):
                self.fs.rm(parts, recursive=True)
        for name in (".config.yaml.tmp", ".manifest.json.tmp"):
            if self.fs.exists(self.path(name)):
                self.remove([self.path(name)])
                removed.append(self.path(name))
        return removed

    def remove_parts_dir(self) -> None:
        """Drop the (empty) ``_parts/`` tree at the end of a completed run."""
        parts = self.path(PARTS_DIR)
        if self.fs.exists(parts):
            with contextlib.suppress(OSError):
                self.fs.rm(parts, recursive=True)

    def shard_counts(self, shard: int) -> dict[str, Any]:
        """One committed shard's counts: rows, rows by status, kept pairs by source."""
        with self.fs.open(self.shard_path(SAMPLES_DIR, shard), "rb") as stream:
            status = pq.read_table(stream, columns=["status"]).column("status")
        with self.fs.open(self.shard_path(DATASET_DIR, shard), "rb") as stream:
            source = pq.read_table(stream, columns=["source"]).column("source")
        return shard_counts(status, source)

    def summarize(self, known: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Counts over every committed shard; ``known`` holds counts already computed elsewhere
        (the commit tasks'), so only the other shards are read (their status/source columns).

        Recomputed from the files, so a resumed run reports the same numbers as an
        uninterrupted one.
        """
        known = known or {}
        shards = sorted(self.committed_shards())
        return merge_counts([known[s] if s in known else self.shard_counts(s) for s in shards])


def value_counts(column: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """``value -> rows`` of a string column (statuses, sources): the one status count."""
    return {i["values"]: i["counts"] for i in pc.value_counts(column).to_pylist()}


def shard_counts(status: pa.Array | pa.ChunkedArray, source: pa.Array | pa.ChunkedArray) -> dict[str, Any]:
    """A shard's counts from its samples ``status`` and dataset ``source`` columns: rows, rows by
    status, kept pairs by source (what manifest.json sums with :func:`merge_counts`)."""
    return {"rows": len(status), "status": value_counts(status), "kept": value_counts(source)}


def merge_counts(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-shard counts into a run's: rows, shards, status (sorted), kept by source."""
    rows = shards = 0
    status: dict[str, int] = {}
    kept = {"web": 0, "synthetic": 0}
    for item in items:
        shards += 1
        rows += item["rows"]
        for name, n in item["status"].items():
            status[name] = status.get(name, 0) + n
        for name, n in item["kept"].items():
            kept[name] = kept.get(name, 0) + n
    return {"rows": rows, "shards": shards, "status": dict(sorted(status.items())), "kept": kept}


# Local-path conveniences kept for callers that take a Path (tests, bootstrap, export).


def committed_shards(run_dir: Path | str) -> set[int]:
    return RunDir(run_dir).committed_shards()


def clean_partial(run_dir: Path | str) -> list[Path]:
    return [Path(p) for p in RunDir(run_dir).clean_partial()]


def summarize(run_dir: Path | str) -> dict[str, Any]:
    return RunDir(run_dir).summarize()


# --------------------------------------------------------------------------- verified resume

SHARD_META_KEY = b"capfilt.shard"
"""Schema metadata of a samples file: JSON with the shard's row count, its input fingerprint and
the sha256 of its tar and dataset file (written by the commit, checked on resume)."""
FINGERPRINT_FILE = "fingerprint.json"
"""The run's model fingerprints (weights sha256 per model), written before the first shard."""


def input_fingerprint_terms(rows: pa.Table) -> list[int]:
    """One 64-bit term per row from (input row index, key, url, web text)."""
    numbers = rows.column(ROW_COLUMN).to_pylist()
    terms = []
    for row, key, url, text in zip(
        numbers,
        rows.column("key").to_pylist(),
        rows.column("url").to_pylist(),
        rows.column("web_text").to_pylist(),
        strict=True,
    ):
        digest = hashlib.sha256(
            f"{row}\x00{key}\x00{url}\x00{text}".encode("utf-8", "surrogatepass")
        ).digest()
        terms.append(int.from_bytes(digest[:8], "little"))
    return terms


def input_fingerprint(rows: pa.Table) -> str:
    """The shard's input fingerprint: the terms' sum mod 2^64 (order-free, so read tasks can add
    up partial sums of a shard spread over several input units)."""
    return f"{sum(input_fingerprint_terms(rows)) % 2**64:016x}"


class HashingWriter:
    """A write-only stream that forwards to ``stream`` and hashes what passes (sha256)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.stream.write(data) or len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.stream.flush()


def file_sha256(run: RunDir, path: str) -> str:
    digest = hashlib.sha256()
    with run.fs.open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_meta(run: RunDir, shard: int) -> tuple[int, dict[str, Any]]:
    """(rows, recorded metadata) of a committed samples file; raises on an unreadable footer."""
    with run.fs.open(run.shard_path(SAMPLES_DIR, shard), "rb") as stream:
        meta = pq.ParquetFile(stream).metadata
    raw = (meta.metadata or {}).get(SHARD_META_KEY)
    return meta.num_rows, (json.loads(raw) if raw else {})


def verify_shard(run: RunDir, shard: int, expected_rows: int) -> str | None:
    """Why committed ``shard`` cannot be trusted, or None when it checks out.

    Checks: samples footer readable with the expected row count; tar and dataset present;
    dataset footer readable; the tar's and dataset's sha256 equal what the commit recorded
    (shards written before checksums were recorded are checked without them).
    """
    try:
        rows, recorded = shard_meta(run, shard)
    except (OSError, pa.ArrowException, ValueError) as err:
        return f"samples file unreadable ({' '.join(str(err).split())[:120]})"
    if rows != expected_rows:
        return f"{rows} rows in its samples file, the input gives it {expected_rows}"
    for kind in (IMAGES_DIR, DATASET_DIR):
        if not run.exists(run.shard_path(kind, shard)):
            return f"{kind}/{shard_name(kind, shard)} is missing"
    try:
        with run.fs.open(run.shard_path(DATASET_DIR, shard), "rb") as stream:
            pq.ParquetFile(stream).metadata  # noqa: B018 - reading the footer is the check
    except (OSError, pa.ArrowException) as err:
        return f"dataset file unreadable ({' '.join(str(err).split())[:120]})"
    for kind, name in ((IMAGES_DIR, "images_sha256"), (DATASET_DIR, "dataset_sha256")):
        if name in recorded and file_sha256(run, run.shard_path(kind, shard)) != recorded[name]:
            return f"{kind}/{shard_name(kind, shard)} does not match its recorded sha256"
    return None


def remove_shard(run: RunDir, shard: int) -> None:
    """Uncommit a shard: the samples file (the marker) first, then the others."""
    run.remove([run.shard_path(kind, shard) for kind in reversed(SHARD_DIRS)])


def dumps_json(data: Any) -> str:
    return json.dumps(data, indent=2) + "\n"
