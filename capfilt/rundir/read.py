"""Reading a run directory: locate it, read its image tars, expand its kept texts, count it.

The writing side (layout, atomic writes, commits, resume checks) is :mod:`capfilt.rundir`;
this module is what export, report, bootstrap, ``capfilt run --retry`` and the download
statistics read a finished (or interrupted) run with:

* :func:`resolve_run` -> :class:`RunView`: a plain run, or one round of a bootstrap directory
  (``round-K/pipeline``); its config, manifest, metrics and committed shard files.
* :func:`scan_images_tar` (stream every image member of one tar, or only some; sizes from
  the headers without reading bytes) and :class:`TarImages` (random access by member or key
  across many tars, one open at a time): the two ways to read ``images/shard-*.tar``, both
  with one rule for what an image member is (:func:`is_image_member`).
* :func:`kept_texts`: the kept texts of a samples table as ``(key, text, source, itm)``, web
  text first, then kept synthetic captions in caption order: the expansion the writer's
  ``dataset/`` files and the bootstrap's selected pairs are both made of.
* :func:`collect_stats` -> :class:`RunStats`: counts and ITM histograms for cards and reports.
"""

from __future__ import annotations

import json
import math
import re
import tarfile
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from capfilt.errors import UserError
from capfilt.guards import inside
from capfilt.rundir import DATASET_DIR, SAMPLES_DIR, shard_number, value_counts

if TYPE_CHECKING:
    from capfilt.stages.select import Selection

_ROUND_DIR = re.compile(r"^round-(\d+)$")


# --------------------------------------------------------------------------- locating a run


@dataclass(frozen=True)
class RunView:
    """One pipeline run's files, whether ``run_dir`` is a plain run or a bootstrap directory.

    ``pipeline_dir`` holds ``samples/``, ``images/``, ``dataset/``, ``config.yaml`` and
    ``manifest.json``; for a bootstrap directory it is ``round-K/pipeline`` of the chosen
    round and ``rounds`` lists every round found, so the report can chart them all.
    """

    root: Path
    pipeline_dir: Path
    round: int | None = None
    rounds: tuple[int, ...] = ()

    @property
    def is_bootstrap(self) -> bool:
        return self.round is not None

    def config(self) -> dict[str, Any]:
        """The resolved pipeline config (``config.yaml``), ``{}`` when absent."""
        path = self.pipeline_dir / "config.yaml"
        if not path.is_file():
            return {}
        from capfilt.config import parse_yaml  # capfilt.config imports this package's columns

        # The strict config loader: a config.yaml edited into an alias bomb is one line, not a hang.
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
        return data if isinstance(data, dict) else {}

    def config_text(self) -> str:
        path = self.pipeline_dir / "config.yaml"
        return path.read_text(encoding="utf-8") if path.is_file() else ""

    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (written when a pipeline run finishes), ``{}`` when absent."""
        return _read_json(self.pipeline_dir / "manifest.json")

    def eval(self) -> dict[str, Any]:
        """The round's ``eval.json`` in a bootstrap directory, ``{}`` otherwise."""
        if self.round is None:
            return {}
        return _read_json(self.root / f"round-{self.round}" / "eval.json")

    def metrics(self) -> list[dict[str, Any]]:
        """Rows of ``metrics.jsonl`` (one per finished bootstrap round), sorted by round."""
        path = self.root / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {number} is not JSON ({err.msg})") from None
            if isinstance(row, dict):
                rows.append(row)
        return sorted(rows, key=lambda r: (r.get("round") is None, r.get("round") or 0))

    def itc_weight(self) -> float:
        """The weight of ITC in the run's filter score (``filter.itc_weight``; 0 without a rule)."""
        rule = self.selection()
        return rule.itc_weight if rule is not None else 0.0

    def selection(self) -> Selection | None:
        """The run's selection rule (:class:`~capfilt.stages.select.Selection`) from its
        ``config.yaml``; None when the config is absent or is not a valid pipeline config."""
        from capfilt.config import PipelineConfig
        from capfilt.stages.select import Selection

        try:
            cfg = PipelineConfig.model_validate(self.config())
        except ValidationError:
            return None
        return Selection.from_config(cfg)

    def samples_files(self) -> list[Path]:
        return shard_files(self.pipeline_dir / SAMPLES_DIR)

    def dataset_files(self) -> list[Path]:
        return shard_files(self.pipeline_dir / DATASET_DIR)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None
    return data if isinstance(data, dict) else {}


def shard_files(directory: Path) -> list[Path]:
    """The committed-shard Parquet files of a run's ``samples/`` or ``dataset/``, in shard order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if shard_number(p.name) is not None)


def _has_run(directory: Path) -> bool:
    return bool(shard_files(directory / SAMPLES_DIR) or shard_files(directory / DATASET_DIR))


def _round_pipeline_dir(root: Path, k: int) -> Path:
    nested = root / f"round-{k}" / "pipeline"
    return nested if nested.is_dir() else root / f"round-{k}"


def resolve_run(run_dir: str | Path, *, round: int | None = None) -> RunView:  # noqa: A002 - CLI name
    """Locate the pipeline output in ``run_dir``: a plain run, or round ``round`` of a bootstrap.

    For a bootstrap directory (``round-1/``, ``round-2/``, ...) the default is the latest
    round whose pipeline has committed output, since a round in progress may not have any.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such run directory")
    rounds = tuple(
        sorted(int(m.group(1)) for p in root.iterdir() if (m := _ROUND_DIR.match(p.name)) and p.is_dir())
    )
    if not rounds:
        if round is not None:
            raise UserError(f"--round: {root} is a single run, not a bootstrap directory (no round-K/)")
        if not _has_run(root):
            raise UserError(f"{root}: not a run directory (no {SAMPLES_DIR}/ or {DATASET_DIR}/ shards)")
        return RunView(root=root, pipeline_dir=root)
    if round is not None:
        if round not in rounds:
            raise UserError(f"--round: {root} has no round {round} (rounds: {', '.join(map(str, rounds))})")
        pipeline_dir = _round_pipeline_dir(root, round)
        if not _has_run(pipeline_dir):
            raise UserError(f"--round: round {round} of {root} has no pipeline output yet ({pipeline_dir})")
        return RunView(root=root, pipeline_dir=pipeline_dir, round=round, rounds=rounds)
    for k in reversed(rounds):
        pipeline_dir = _round_pipeline_dir(root, k)
        if _has_run(pipeline_dir):
            return RunView(root=root, pipeline_dir=pipeline_dir, round=k, rounds=rounds)
    raise UserError(f"{root}: no round has pipeline output yet (looked in round-K/pipeline/)")


# --------------------------------------------------------------------------- images


def is_image_member(info: tarfile.TarInfo) -> bool:
    """Whether a tar member is an image (a regular file other than the ``KEY.json`` sidecar)."""
    return info.isfile() and not info.name.endswith(".json")


def scan_images_tar(
    source: Path | str | IO[bytes], *, members: Container[str] | None = None, read: bool = True
) -> Iterator[tuple[str, int, bytes | None]]:
    """``(member, size, bytes)`` of each image member of one images tar, in tar order.

    ``source`` is a path or a binary stream (a :class:`~capfilt.rundir.RunDir` file);
    ``members`` limits it to those names; ``read=False`` gives ``None`` for the bytes and reads
    the member headers only (sizes without the image data).
    """
    opened = (
        tarfile.open(fileobj=source) if hasattr(source, "read") else tarfile.open(source)  # type: ignore[arg-type]
    )
    with opened as tar:
        for info in tar:
            if not is_image_member(info) or (members is not None and info.name not in members):
                continue
            if not read:
                yield info.name, info.size, None
                continue
            handle = tar.extractfile(info)
            assert handle is not None  # regular files always have a handle
            yield info.name, info.size, handle.read()


def member_key(member: str) -> str:
    """The sample key of an image member: its name without the extension."""
    return member.rsplit(".", 1)[0]


class TarImages:
    """Reads members from the run's image tars, keeping one tar open at a time.

    Dataset rows come grouped by shard, so a one-tar cache reads every tar once; the member
    index (name -> TarInfo) lets reads seek directly instead of scanning.
    """

    def __init__(self, *, root: Path) -> None:
        self.root = Path(root)
        self._path: Path | None = None
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._by_key: dict[str, str] = {}

    def _open(self, tar_name: str) -> None:
        path = inside(self.root, tar_name, what="image_tar")  # a tampered name must not leave the run
        if path == self._path:
            return
        self.close()
        if not path.is_file():
            raise UserError(f"{path}: image tar named by the dataset is missing")
        try:
            self._tar = tarfile.open(path)
            infos = [m for m in self._tar.getmembers() if m.isfile()]  # json sidecars too: read() serves them
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"{path}: cannot read image tar ({err})") from None
        self._path = path
        self._members = {m.name: m for m in infos}
        self._by_key = {member_key(m.name): m.name for m in infos if is_image_member(m) and "." in m.name}

    def read(self, tar_name: str, member: str) -> bytes:
        """Bytes of ``member`` in ``tar_name`` (relative to the run directory, inside it)."""
        self._open(tar_name)
        info = self._members.get(member)
        if info is None or self._tar is None:
            raise UserError(f"{self._path}: no member {member!r}, which the dataset refers to")
        handle = self._tar.extractfile(info)
        assert handle is not None  # regular files always have a handle
        return handle.read()

    def image_for_key(self, tar_name: str, key: str) -> tuple[str, bytes] | None:
        """``(member, bytes)`` of the image stored for ``key`` (any extension), None if absent."""
        try:
            self._open(tar_name)
        except UserError:
            return None
        member = self._by_key.get(key)
        return None if member is None else (member, self.read(tar_name, member))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._path, self._members, self._by_key = None, None, {}, {}

    def __enter__(self) -> TarImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- kept texts

KEPT_COLUMNS = (
    "key",
    "web_text",
    "web_itm",
    "web_kept",
    "synthetic_texts",
    "synthetic_itm",
    "synthetic_kept",
)
"""The samples columns :func:`kept_texts` reads."""


def kept_texts(samples: pa.Table) -> Iterator[tuple[str, str, str, float]]:
    """``(key, text, source, itm)`` for every kept text of a samples table, in row order.

    Per row: the web text when ``web_kept`` (source ``web``), then each synthetic caption whose
    ``synthetic_kept`` flag is set (source ``synthetic``), in caption order. ``itm`` is the
    filter's score, NaN when the text was not scored. This is the one expansion of the kept
    flags into pairs: ``dataset/`` files (:func:`capfilt.stages.write.dataset_table`) and the
    bootstrap's selected pairs are both built from it.
    """
    for row in samples.select(list(KEPT_COLUMNS)).to_pylist():
        if row["web_kept"]:
            itm = row["web_itm"]
            yield row["key"], row["web_text"], "web", math.nan if itm is None else itm
        scores = row["synthetic_itm"] or []
        for j, (text, kept) in enumerate(
            zip(row["synthetic_texts"] or [], row["synthetic_kept"] or [], strict=True)
        ):
            if kept:
                itm = scores[j] if j < len(scores) else math.nan
                yield row["key"], text, "synthetic", math.nan if itm is None else itm


# --------------------------------------------------------------------------- statistics


@dataclass
class ScoreHistogram:
    """Counts of scored texts per ITM bin, split into kept and removed; NaN scores apart."""

    edges: list[float]
    kept: list[int]
    removed: list[int]
    unscored: int = 0

    @property
    def total(self) -> int:
        return sum(self.kept) + sum(self.removed)


@dataclass
class RunStats:
    """The counts a dataset card and a report show, recomputed from the run's files."""

    rows: int = 0
    status: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)  # pairs by source, from dataset/
    images_with_kept: int = 0
    web_scored: int = 0
    web_kept: int = 0
    synthetic_total: int = 0
    synthetic_kept: int = 0
    web_hist: ScoreHistogram | None = None
    synthetic_hist: ScoreHistogram | None = None

    @property
    def pairs(self) -> int:
        return sum(self.kept.values())


def _hist_update(hist: ScoreHistogram, scores: np.ndarray, kept: np.ndarray) -> None:
    nan = np.isnan(scores)
    hist.unscored += int(nan.sum())
    scores, kept = np.clip(scores[~nan], 0.0, 1.0), kept[~nan]
    edges = np.asarray(hist.edges)
    for target, mask in ((hist.kept, kept), (hist.removed, ~kept)):
        counts, _ = np.histogram(scores[mask], bins=edges)
        for i, c in enumerate(counts):
            target[i] += int(c)


def _float_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(
        pc.fill_null(column.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False), dtype=float
    )


def _bool_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(column.cast(pa.bool_()), False).to_numpy(zero_copy_only=False), dtype=bool)


def filter_scores(table: pa.Table, itc_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The filter scores its threshold applied to (:func:`capfilt.stages.select.filter_score`):
    one per web text, and every synthetic caption's, flattened in row order. NaN: not scored."""
    from capfilt.stages.select import filter_score

    def web(name: str) -> np.ndarray:
        return _float_array(table.column(name))

    def synthetic(name: str) -> np.ndarray:
        return _float_array(pc.list_flatten(table.column(name).combine_chunks()))

    return (
        filter_score(web("web_itm"), web("web_itc") if itc_weight else None, itc_weight),
        filter_score(
            synthetic("synthetic_itm"), synthetic("synthetic_itc") if itc_weight else None, itc_weight
        ),
    )


def score_columns(itc_weight: float) -> list[str]:
    """The samples columns :func:`filter_scores` reads."""
    return ["web_itm", "synthetic_itm"] + (["web_itc", "synthetic_itc"] if itc_weight else [])


def collect_stats(view: RunView, *, bins: int = 10) -> RunStats:
    """Status counts, kept counts and score histograms over every committed shard.

    Reads the files shard by shard (only the columns it needs), so memory stays flat for
    runs of any size. Kept counts come from ``dataset/`` because that is what exports hold.
    """
    edges = [i / bins for i in range(bins + 1)]
    stats = RunStats(
        web_hist=ScoreHistogram(edges=edges, kept=[0] * bins, removed=[0] * bins),
        synthetic_hist=ScoreHistogram(edges=edges, kept=[0] * bins, removed=[0] * bins),
    )
    assert stats.web_hist is not None and stats.synthetic_hist is not None
    itc_weight = view.itc_weight()
    scored = score_columns(itc_weight)
    wanted = ["status", "web_kept", "synthetic_kept", *scored]
    for path in view.samples_files():
        present = [c for c in wanted if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=present)
        stats.rows += table.num_rows
        if "status" in present:
            for name, n in value_counts(table.column("status")).items():
                stats.status[name] = stats.status.get(name, 0) + n
        if not set(wanted) - {"status"} <= set(present):
            continue
        web_scores, flat_scores = filter_scores(table, itc_weight)
        web_kept = _bool_array(table.column("web_kept"))
        stats.web_scored += int((~np.isnan(web_scores)).sum())
        stats.web_kept += int(web_kept.sum())
        _hist_update(stats.web_hist, web_scores, web_kept)
        syn_kept = table.column("synthetic_kept").combine_chunks()
        flat_kept = _bool_array(pc.list_flatten(syn_kept))
        if len(flat_scores) == len(flat_kept):
            _hist_update(stats.synthetic_hist, flat_scores, flat_kept)
        stats.synthetic_total += len(flat_kept)
        stats.synthetic_kept += int(flat_kept.sum())
        stats.images_with_kept += int((web_kept | _any_true(syn_kept)).sum())
    stats.status = dict(sorted(stats.status.items(), key=lambda kv: (-kv[1], kv[0])))
    for path in view.dataset_files():
        table = pq.read_table(path, columns=["source"])
        for name, n in value_counts(table.column("source")).items():
            stats.kept[name] = stats.kept.get(name, 0) + n
    stats.kept = dict(sorted(stats.kept.items()))
    return stats


def _any_true(lists: pa.ListArray) -> np.ndarray:
    """Per row: whether any element of a list<bool> is true (False for empty or null lists)."""
    flat = _bool_array(pc.list_flatten(lists))
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), dtype=np.int64)
    out = np.zeros(len(lists), dtype=bool)
    out[parents[flat]] = True
    return out
