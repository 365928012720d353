"""Read stage: input files -> a table of ``key``, ``url``, ``web_text`` (+ ``keep_cols``).

Ray-free so it can be unit-tested and reused; ``capfilt/pipeline.py`` decides how to
parallelise it (for example one task per file from :func:`list_input_files`, calling
:func:`read_file` or :func:`read_webdataset_shard`).

Normalisation every reader applies, so later stages can rely on it:

* ``key`` is a string, unique within the input and stable across reruns: by default
  ``"<file index:05d>_<row index:09d>"`` (file index in the sorted file list, row index
  within the file), e.g. ``"00000_000000042"``; with ``input.key_col`` it is that column
  as text, which must be non-empty, unique and free of ``/``, ``.``, ``\\`` and
  whitespace, because keys become member names in webdataset tars (``KEY.jpg``).
* ``url`` and ``web_text`` are strings, never null: a null becomes ``""``. Surrounding
  whitespace is stripped from URLs. A bad or empty URL is not an error here; the
  download stage gives that row the status ``invalid_url``. An empty text is not a
  reason to drop a row either (the captioner still writes synthetic captions).
* ``web_text`` is cut to :data:`MAX_TEXT_CHARS` characters (Unicode code points): web
  alt-texts occasionally hold whole pages, and no captioning model reads that far.
* Invalid UTF-8 in the URL or text column of a CSV/TSV file is replaced by U+FFFD
  rather than failing the run. In JSONL and Parquet files, whose string types promise
  UTF-8, it is an error naming the file, column and row (:func:`capfilt.guards.check_utf8`).
* Keys are checked by :func:`capfilt.guards.validate_keys` (no control characters either),
  and webdataset member names by :class:`capfilt.guards.SampleNames`.

Problems with the input itself (missing path, missing column, unreadable file,
duplicate keys) raise :class:`capfilt.errors.UserError` naming the path or column.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from capfilt.config import InputConfig
from capfilt.errors import UserError
from capfilt.guards import SampleNames, check_utf8, validate_keys
from capfilt.rundir import ROW_COLUMN, SHARD_COLUMN, is_local, url_to_fs

#: Web texts longer than this many characters are truncated (see the module docstring).
MAX_TEXT_CHARS = 2000

#: File name endings picked up when ``input.path`` is a directory, per format.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq", ".parq"),
    "csv": (".csv", ".csv.gz", ".csv.bz2", ".csv.xz", ".csv.zst"),
    "tsv": (".tsv", ".tsv.gz", ".tsv.bz2", ".tsv.xz", ".tsv.zst", ".txt"),
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".ndjson", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst"),
    "webdataset": (".tar",),
}

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def make_key(file_index: int, row_index: int) -> str:
    """The default sample key, e.g. ``make_key(0, 42) == "00000_000000042"``."""
    return f"{file_index:05d}_{row_index:09d}"


# --------------------------------------------------------------------------- files


def list_input_files(path: str | Sequence[str], fmt: str) -> list[str]:
    """Files behind ``path``: a file, a directory (searched recursively for the format's
    suffixes), a glob, a brace pattern like ``shards/{00000..00009}.tar``, or a list of
    those; local or any fsspec URL. Each entry's files are sorted; a list keeps its order
    (a file named twice counts once). The order defines the file index in default keys.
    """
    if not isinstance(path, str):
        if not path:
            raise UserError("input.path: the list of inputs is empty")
        files = [f for entry in path for f in list_input_files(entry, fmt)]
        return list(dict.fromkeys(files))
    if "{" in path:
        from braceexpand import braceexpand  # installed with webdataset

        files = [f for pattern in braceexpand(path) for f in list_input_files(pattern, fmt)]
        return sorted(dict.fromkeys(files))
    fs, root = url_to_fs(path, field="input.path")
    try:
        if any(ch in root for ch in "*?["):
            found = [f for f in fs.glob(root) if fs.isfile(f)]
        elif fs.isdir(root):
            suffixes = SUFFIXES[fmt]
            found = [f for f in fs.find(root) if f.lower().endswith(suffixes) and not _hidden(f, root)]
            if not found:
                raise UserError(f"input.path: no {', '.join(suffixes)} files in directory {path}")
        elif fs.exists(root):
            found = [root]
        else:
            raise UserError(f"input.path: {path} does not exist")
    except (OSError, ValueError) as err:  # e.g. no credentials, no such bucket
        raise UserError(f"input.path: cannot list {path}: {' '.join(str(err).split())[:300]}") from None
    if not found:
        raise UserError(f"input.path: no files match {path}")
    return sorted(f if is_local(fs) else fs.unstrip_protocol(f) for f in found)


def _hidden(file: str, root: str) -> bool:
    """Skip ``.hidden`` and ``_SUCCESS``-style files that Spark and friends leave behind."""
    relative = PurePosixPath(file[len(root) :].lstrip("/"))
    return any(part.startswith((".", "_")) for part in relative.parts)


# --------------------------------------------------------------------------- columns


def _missing_column(kind: str, name: str, file: str, available: list[str]) -> UserError:
    return UserError(
        f"input.{kind}: column {name!r} not found in {file}; available columns: {', '.join(available) or '(none)'}"
    )


def _as_text(column: pa.ChunkedArray | pa.Array, *, name: str, file: str) -> pa.ChunkedArray:
    """Any scalar column as a non-null UTF-8 string column (invalid UTF-8 replaced)."""
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if pa.types.is_null(kind):
        column = pa.chunked_array([pa.nulls(len(column), pa.string())])
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            column = column.cast(pa.string())
        except pa.ArrowInvalid:  # not valid UTF-8 somewhere: decode value by value
            values = [None if v is None else v.decode("utf-8", errors="replace") for v in column.to_pylist()]
            column = pa.chunked_array([pa.array(values, pa.string())])
    elif pa.types.is_large_string(kind):
        column = column.cast(pa.string())
    elif not pa.types.is_string(kind):
        try:
            column = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UserError(f"{name}: column in {file} has type {kind}, expected text") from None
    return pc.fill_null(column, "")


def _table_columns(
    table: pa.Table, cfg: InputConfig, *, file: str, file_index: int, row_offset: int = 0
) -> pa.Table:
    """Select and normalise the columns of one file's table (see the module docstring)."""
    available = table.column_names
    for kind, name in (("url_col", cfg.url_col), ("text_col", cfg.text_col), ("key_col", cfg.key_col)):
        if name is not None and name not in available:
            raise _missing_column(kind, name, file, available)
    for name in cfg.keep_cols:
        if name not in available:
            raise _missing_column("keep_cols", name, file, available)

    url = pc.utf8_trim_whitespace(_as_text(table[cfg.url_col], name="input.url_col", file=file))
    text = _as_text(table[cfg.text_col], name="input.text_col", file=file)
    text = pc.utf8_slice_codeunits(text, 0, MAX_TEXT_CHARS)  # code points, despite the name
    if cfg.key_col is None:
        key = pa.array([make_key(file_index, row_offset + i) for i in range(table.num_rows)], pa.string())
    else:
        key = _checked_keys(table[cfg.key_col], cfg.key_col, file)
    columns: dict[str, Any] = {"key": key, "url": url, "web_text": text}
    for name in cfg.keep_cols:
        columns[name] = table[name]
    return pa.table(columns)


def _checked_keys(column: pa.ChunkedArray, name: str, file: str) -> pa.ChunkedArray:
    if column.null_count:
        row = column.to_pylist().index(None)
        raise UserError(f"input.key_col: column {name!r} is null in row {row} of {file}")
    keys = _as_text(column, name="input.key_col", file=file)
    validate_keys(keys.to_pylist(), field="input.key_col", file=file)
    return keys


def _check_unique(keys: pa.ChunkedArray | pa.Array, where: str, *, field: str = "input.key_col") -> None:
    """Keys must be unique: they name output files and join samples to images."""
    counts = pc.value_counts(keys)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise UserError(f"{field}: key {first['values']!r} occurs {first['counts']} times in {where}")


# --------------------------------------------------------------------------- tables


def _read_raw(file: str, cfg: InputConfig) -> pa.Table:
    """One file as an Arrow table, every column as the format gives it."""
    with fsspec.open(file, "rb", compression="infer") as stream:
        if cfg.format == "parquet":
            parquet = pq.ParquetFile(stream)
            available = parquet.schema_arrow.names
            wanted = [cfg.url_col, cfg.text_col, *([cfg.key_col] if cfg.key_col else []), *cfg.keep_cols]
            for name in wanted:
                if name not in available:
                    kind = _kind_of(name, cfg)
                    raise _missing_column(kind, name, file, available)
            return parquet.read(columns=list(dict.fromkeys(wanted)))
        if cfg.format in ("csv", "tsv"):
            tsv = cfg.format == "tsv"
            return pacsv.read_csv(
                stream,
                parse_options=pacsv.ParseOptions(
                    delimiter="\t" if tsv else ",",
                    # TSV files of web captions (CC3M, ...) are not quoted: a '"' is text.
                    quote_char=False if tsv else '"',
                    newlines_in_values=not tsv,
                ),
                # Read the text columns as bytes so invalid UTF-8 is replaced, not fatal.
                convert_options=pacsv.ConvertOptions(
                    column_types={cfg.url_col: pa.binary(), cfg.text_col: pa.binary()},
                    strings_can_be_null=True,
                ),
            )
        if cfg.format == "jsonl":
            return pajson.read_json(stream)
    raise ValueError(f"_read_raw does not read format {cfg.format!r}")  # webdataset has its own reader


def _kind_of(name: str, cfg: InputConfig) -> str:
    if name == cfg.url_col:
        return "url_col"
    if name == cfg.text_col:
        return "text_col"
    if name == cfg.key_col:
        return "key_col"
    return "keep_cols"


def read_file(file: str, file_index: int, cfg: InputConfig) -> pa.Table:
    """Read one parquet/csv/tsv/jsonl file into ``key``, ``url``, ``web_text`` (+ keep_cols)."""
    try:
        raw = _read_raw(file, cfg)
    except UserError:
        raise
    except (OSError, pa.ArrowException, json.JSONDecodeError, EOFError) as err:
        raise UserError(
            f"input.path: cannot read {file} as {cfg.format}: {' '.join(str(err).split())[:300]}"
        ) from None
    check_utf8(raw, file)  # JSONL/Parquet strings that are not UTF-8: one line naming column and row
    table = _table_columns(raw, cfg, file=file, file_index=file_index)
    if cfg.key_col is not None:
        _check_unique(table["key"], file)
    return table


def check_input(cfg: InputConfig) -> list[str]:
    """Cheap up-front check for ``capfilt validate``: the input files and their columns.

    Lists the files behind ``cfg.path`` and checks the first one has the configured
    columns (a parquet file's schema only; a text file is read, as it has no schema).
    Returns the file list; raises :class:`UserError` like the readers would.
    """
    files = list_input_files(cfg.path, cfg.format)
    first = files[0]
    if cfg.format == "parquet":
        try:
            with fsspec.open(first, "rb") as stream:
                available = pq.ParquetFile(stream).schema_arrow.names
        except (OSError, pa.ArrowException) as err:
            raise UserError(
                f"input.path: cannot read {first} as parquet: {' '.join(str(err).split())[:300]}"
            ) from None
        wanted = [cfg.url_col, cfg.text_col, *([cfg.key_col] if cfg.key_col else []), *cfg.keep_cols]
        for name in wanted:
            if name not in available:
                raise _missing_column(_kind_of(name, cfg), name, first, available)
    elif cfg.format != "webdataset":
        read_file(first, 0, cfg)
    return files


def read_table(path: str | Sequence[str], cfg: InputConfig) -> pa.Table:
    """Read every input file behind ``path`` (format from ``cfg``) into one table.

    For ``format: webdataset`` this is :func:`read_webdataset`.
    """
    if cfg.format == "webdataset":
        return read_webdataset(path, cfg)
    files = list_input_files(path, cfg.format)
    tables = [read_file(file, index, cfg) for index, file in enumerate(files)]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if cfg.key_col is not None and len(tables) > 1:
        _check_unique(table["key"], _where(path))
    return table


# --------------------------------------------------------------------------- webdataset


def _tar_samples(stream: Any, file: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order; a sample's files are adjacent."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    names = SampleNames(file)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = PurePosixPath(member.name).name
                if name.startswith(".") or "." not in name:
                    continue
                extension = name.split(".", 1)[1]
                key = names.key_of(member.name)  # a/x.jpg + b/x.jpg: an error naming both
                data = tar.extractfile(member)
                payload = data.read() if data is not None else b""
                if key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = key, {}
                parts[extension.lower()] = payload
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"input.path: cannot read {file} as a webdataset tar: {err}") from None
    if current is not None:
        yield current, parts


def read_webdataset_shard(file: str, shard_index: int, cfg: InputConfig) -> pa.Table:
    """One img2dataset tar shard as ``key``, ``url``, ``web_text``, ``image`` (+ keep_cols).

    ``image`` holds the shard's encoded image (jpg/jpeg/png/webp member) so the download
    stage only decodes and resizes it; a sample without one gets ``b""`` and is then
    downloaded from its URL. The text is the ``.txt`` member, else ``json[text_col]``
    or ``json["caption"]``; the URL is ``json[url_col]`` or ``json["url"]``. The key is
    the tar member name (img2dataset's key) unless ``key_col`` names a json field.
    ``keep_cols`` are json fields (null where a sample lacks one). ``shard_index`` is
    unused but kept so every reader has the same signature.
    """
    del shard_index
    rows: dict[str, list[Any]] = {"key": [], "url": [], "web_text": [], "image": []}
    extra: dict[str, list[Any]] = {name: [] for name in cfg.keep_cols}
    with fsspec.open(file, "rb") as stream:
        for key, parts in _tar_samples(stream, file):
            meta = _json_of(parts.get("json"), file, key)
            text = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
            if text is None:
                text = meta.get(cfg.text_col, meta.get("caption"))
            url = meta.get(cfg.url_col, meta.get("url"))
            if cfg.key_col is not None:
                if meta.get(cfg.key_col) is None:
                    raise UserError(
                        f"input.key_col: json field {cfg.key_col!r} missing for sample {key} in {file}"
                    )
                key = str(meta[cfg.key_col])
            image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), b"")
            rows["key"].append(key)
            rows["url"].append(None if url is None else str(url))
            rows["web_text"].append(None if text is None else str(text))
            rows["image"].append(image)
            for name in cfg.keep_cols:
                extra[name].append(meta.get(name))
    validate_keys(rows["key"], field=_wds_key_field(cfg), file=file, unit="sample")
    keys = pa.array(rows["key"], pa.string())
    table = pa.table(
        {
            "key": keys,
            "url": pc.utf8_trim_whitespace(pc.fill_null(pa.array(rows["url"], pa.string()), "")),
            "web_text": pc.utf8_slice_codeunits(
                pc.fill_null(pa.array(rows["web_text"], pa.string()), ""), 0, MAX_TEXT_CHARS
            ),
            "image": pa.array(rows["image"], pa.binary()),
            **{name: pa.array(values) for name, values in extra.items()},
        }
    )
    _check_unique(table["key"], file, field=_wds_key_field(cfg))
    return table


def _wds_key_field(cfg: InputConfig) -> str:
    return "input.key_col" if cfg.key_col is not None else "input.path (webdataset member names)"


def _json_of(payload: bytes | None, file: str, key: str) -> dict[str, Any]:
    if payload is None:
        return {}
    try:
        value = json.loads(payload.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise UserError(f"input.path: {file}: {key}.json is not valid JSON: {err}") from None
    return value if isinstance(value, dict) else {}


def read_webdataset(path: str | Sequence[str], cfg: InputConfig) -> pa.Table:
    """Read every tar shard behind ``path`` (see :func:`read_webdataset_shard`)."""
    files = list_input_files(path, "webdataset")
    tables = [read_webdataset_shard(file, index, cfg) for index, file in enumerate(files)]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if len(tables) > 1:
        _check_unique(table["key"], _where(path), field=_wds_key_field(cfg))
    return table


def _where(path: str | Sequence[str]) -> str:
    return path if isinstance(path, str) else ", ".join(path)


# --------------------------------------------------------------------------- distributed reading
#
# The pipeline reads its input in Ray tasks, one per :class:`ReadUnit`. The driver only lists
# the files and learns their row counts (:func:`plan_input`): from the Parquet footers, or,
# for the text formats and webdataset tars which have no footer, from a counting pass that the
# caller runs where it likes (the pipeline: one Ray task per file, :func:`count_rows`).

#: A Parquet file is split into units of whole row groups holding at least this many rows.
UNIT_ROWS = 100_000


@dataclass(frozen=True)
class ReadUnit:
    """A slice of one input file that one read task turns into rows.

    ``start``/``stop`` are row indices within the file (default keys use them), ``first_row``
    the global index of row ``start`` (which decides its shard). ``row_groups`` selects the
    Parquet row groups holding exactly those rows (empty: the whole file). Rows of
    ``skip_shards`` (committed by an earlier run) are dropped by the task.
    """

    file: str
    file_index: int
    start: int
    stop: int
    first_row: int
    row_groups: tuple[int, ...] = ()
    skip_shards: tuple[int, ...] = ()
    row_limit: int | None = None  # input.limit: rows with a global index at or above it are dropped


@dataclass(frozen=True)
class InputPlan:
    """What the driver knows about the input: its files, their row counts and the read units."""

    files: list[str]
    rows: list[int]
    units: list[ReadUnit]
    row_groups: list[list[int]] = dataclasses.field(default_factory=list)  # parquet only

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def with_done(
        self, done: set[int] | frozenset[int], rows_per_shard: int, *, keep_done: bool = False
    ) -> InputPlan:
        """The same files cut again for another set of committed shards (no re-counting).

        ``keep_done`` keeps units wholly inside committed shards (to fingerprint their rows).
        """
        units = _cut_units(self.files, self.rows, self.row_groups, rows_per_shard, done, keep_done=keep_done)
        return dataclasses.replace(self, units=units)


def parquet_row_groups(file: str) -> list[int]:
    """Rows per row group, from the file's footer only."""
    try:
        with fsspec.open(file, "rb") as stream:
            meta = pq.ParquetFile(stream).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (OSError, pa.ArrowException) as err:
        raise UserError(
            f"input.path: cannot read {file} as parquet: {' '.join(str(err).split())[:300]}"
        ) from None


def count_rows(file: str, file_index: int, cfg: InputConfig) -> int:
    """Rows of one csv/tsv/jsonl file (parsed as the reader does) or samples of one tar shard."""
    if cfg.format == "webdataset":
        return _count_tar_samples(file)
    return read_file(file, file_index, cfg).num_rows


def _count_tar_samples(file: str) -> int:
    """Samples in a webdataset tar, grouping member names as :func:`_tar_samples` does (headers only)."""
    count = 0
    current: str | None = None
    try:
        with fsspec.open(file, "rb") as stream, tarfile.open(fileobj=stream, mode="r:*") as tar:
            for member in tar:  # seekable: member data is skipped, not read
                name = PurePosixPath(member.name).name
                if not member.isfile() or name.startswith(".") or "." not in name:
                    continue
                key = name.split(".", 1)[0]
                if key != current:
                    count += 1
                    current = key
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"input.path: cannot read {file} as a webdataset tar: {err}") from None
    return count


def plan_input(
    cfg: InputConfig,
    *,
    rows_per_shard: int,
    done: set[int] | frozenset[int] = frozenset(),
    count: Callable[[list[str]], list[int]] | None = None,
) -> InputPlan:
    """List the input files, learn their row counts and cut them into read units.

    ``count(files)`` returns the row counts of files that have no footer (csv, tsv, jsonl,
    webdataset); by default they are counted here, one after the other. Units whose rows all
    belong to committed shards (``done``) are left out.
    """
    files = list_input_files(cfg.path, cfg.format)
    if cfg.format == "parquet":
        groups = [parquet_row_groups(f) for f in files]
        rows = [sum(g) for g in groups]
    else:
        groups = []
        rows = count(files) if count is not None else [count_rows(f, i, cfg) for i, f in enumerate(files)]
    units = _cut_units(files, rows, groups, rows_per_shard, done)
    return InputPlan(files=files, rows=rows, units=units, row_groups=groups)


def _cut_units(
    files: list[str],
    rows: list[int],
    groups: list[list[int]],
    rows_per_shard: int,
    done: set[int] | frozenset[int],
    *,
    keep_done: bool = False,
) -> list[ReadUnit]:
    units: list[ReadUnit] = []
    offset = 0
    for index, file in enumerate(files):
        pieces: list[tuple[int, int, tuple[int, ...]]] = []
        if groups:
            start, chosen = 0, []
            for group in range(len(groups[index])):
                chosen.append(group)
                size = sum(groups[index][g] for g in chosen)
                if size >= UNIT_ROWS:
                    pieces.append((start, start + size, tuple(chosen)))
                    start, chosen = start + size, []
            if chosen:
                size = sum(groups[index][g] for g in chosen)
                pieces.append((start, start + size, tuple(chosen)))
        elif rows[index]:
            pieces.append((0, rows[index], ()))
        for start, stop, row_groups in pieces:
            if stop == start:
                continue
            first = offset + start
            shards = range(first // rows_per_shard, (first + stop - start - 1) // rows_per_shard + 1)
            skip = tuple(s for s in shards if s in done)
            if len(skip) == len(shards) and not keep_done:
                continue
            units.append(ReadUnit(file, index, start, stop, first, row_groups, skip))
        offset += rows[index]
    return units


def fingerprint_unit(unit: ReadUnit, cfg: InputConfig, *, rows_per_shard: int) -> dict[int, list[int]]:
    """Verification task body: ``{shard: [rows, fingerprint sum]}`` over the unit's rows that
    belong to its ``skip_shards`` (committed shards), to compare with what their commit recorded.
    """
    from capfilt.rundir import input_fingerprint_terms

    table = read_unit(dataclasses.replace(unit, skip_shards=()), cfg, rows_per_shard=rows_per_shard)
    shards = table.column(SHARD_COLUMN).to_numpy()
    mask = np.isin(shards, list(unit.skip_shards))
    table = table.filter(pa.array(mask))
    terms = input_fingerprint_terms(table)
    out: dict[int, list[int]] = {}
    for shard, term in zip(shards[mask].tolist(), terms, strict=True):
        entry = out.setdefault(int(shard), [0, 0])
        entry[0] += 1
        entry[1] = (entry[1] + term) % 2**64
    return out


def read_unit(unit: ReadUnit, cfg: InputConfig, *, rows_per_shard: int) -> pa.Table:
    """Read task body: the unit's rows with ``_row`` (global index) and ``_shard`` columns.

    Rows of the unit's ``skip_shards`` are dropped. A file whose row count differs from the
    plan's (rewritten while the run started) is a UserError.
    """
    if cfg.format == "webdataset":
        table = read_webdataset_shard(unit.file, unit.file_index, cfg)
    elif cfg.format == "parquet" and unit.row_groups:
        table = _read_row_groups(unit, cfg)
    else:
        table = read_file(unit.file, unit.file_index, cfg)
    if table.num_rows != unit.stop - unit.start:
        raise UserError(
            f"input.path: {unit.file} changed while the run was starting "
            f"({table.num_rows} rows where {unit.stop - unit.start} were counted)"
        )
    rows = np.arange(unit.first_row, unit.first_row + table.num_rows, dtype=np.int64)
    shards = rows // rows_per_shard
    table = table.append_column(ROW_COLUMN, pa.array(rows)).append_column(SHARD_COLUMN, pa.array(shards))
    keep = np.ones(len(rows), dtype=bool)
    if unit.skip_shards:
        keep &= ~np.isin(shards, list(unit.skip_shards))
    if unit.row_limit is not None:
        keep &= rows < unit.row_limit
    if not keep.all():
        table = table.filter(pa.array(keep))
    return table


def _read_row_groups(unit: ReadUnit, cfg: InputConfig) -> pa.Table:
    wanted = [cfg.url_col, cfg.text_col, *([cfg.key_col] if cfg.key_col else []), *cfg.keep_cols]
    try:
        with fsspec.open(unit.file, "rb") as stream:
            parquet = pq.ParquetFile(stream)
            available = parquet.schema_arrow.names
            for name in wanted:
                if name not in available:
                    raise _missing_column(_kind_of(name, cfg), name, unit.file, available)
            raw = parquet.read_row_groups(list(unit.row_groups), columns=list(dict.fromkeys(wanted)))
            check_utf8(raw, unit.file, row_offset=unit.start)
    except UserError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise UserError(
            f"input.path: cannot read {unit.file} as parquet: {' '.join(str(err).split())[:300]}"
        ) from None
    table = _table_columns(raw, cfg, file=unit.file, file_index=unit.file_index, row_offset=unit.start)
    if cfg.key_col is not None:
        _check_unique(table["key"], unit.file)
    return table
