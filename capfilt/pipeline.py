"""`capfilt run`: the CapFilt pipeline as one streaming Ray Data DAG; workers read and write.

::

    driver: list input files, row counts (Parquet footers; a counting task per text/tar file)
    read (tasks, one per file or group of Parquet row groups) [-> where (tasks), with input.where]
      -> download (tasks, threads inside) [-> phash (tasks), with dedup] -> preprocess (tasks)
      -> caption (actor pool, GPUs) -> filter (actor pool, GPUs; drops the pixel columns)
      [-> clip (actor pool, GPUs)] -> select (tasks) -> write parts (tasks: _parts/shard-N/part-*.parquet)
    driver: per-part summaries (shard, rows, path) -> commit task per complete shard
      (worker: images tar, dataset parquet, samples parquet) -> manifest.json
    [then, with dedup: run_dedup over every committed shard (Ray Data groupby + one task per shard)]

This module is the ONLY place that decides how the stages run: tasks or actors, CPUs and
GPUs per replica, replica counts and batch sizes (:func:`make_plan`). The stages themselves
(``capfilt/stages``) are plain callables that know nothing about Ray.

The driver holds no data: it sees the input's file list and row counts, then one small
summary row per part file and per committed shard. Image bytes and pixels stay in the workers
and the object store.

Sharding and resume: input row ``r`` (its index in the whole input, files in key order)
belongs to shard ``r // output.rows_per_shard``, a pure function of the input, so a rerun
assigns the same rows to the same shards. Shards whose ``samples/shard-*.parquet`` exists are
committed and skipped (their rows are dropped by the read tasks); rows stream through Ray in
any order, and the driver starts a shard's commit task as soon as its parts hold all its rows.
Because every stage is per-row deterministic (captions are seeded by (seed, key)), a resumed
run ends with the same files as an uninterrupted one, and ``manifest.json`` is recomputed from
all shards. See docs/architecture.md, "Cluster runs", for the commit protocol.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from capfilt import __version__, rundir
from capfilt.config import PipelineConfig, dump
from capfilt.download_stats import download_stats, images_per_s
from capfilt.errors import UserError
from capfilt.guards import check_models
from capfilt.rundir import RunDir, dumps_json
from capfilt.stages import write as writer
from capfilt.stages.caption import is_hub_id, model_specs, pixel_column, resolve_model
from capfilt.stages.select import select, selection_options

DOWNLOAD_ROWS_PER_THREAD = 4
"""A download task takes ``threads * this`` rows: enough to keep its thread pool busy."""
DOWNLOAD_MAX_BATCH = 1024
"""Upper bound on a download task's rows, so one slow host cannot hold back a huge batch."""

# CPUs Ray reserves per replica. With GPUs, a download task (decode + resize on one thread)
# and a preprocess task reserve a core, and each model replica one core to feed its GPU.
# CPU-only (a laptop, the tests) every stage reserves a fraction of a core so that download,
# preprocess, caption and filter can all be scheduled at once on two cores; the OS shares
# the cores, and reserving whole cores there would leave the download tasks waiting behind
# the model actors.
CPUS_GPU_RUN = {"read": 1.0, "download": 1.0, "preprocess": 1.0, "model": 1.0, "select": 0.25, "commit": 1.0}
CPUS_CPU_RUN = {
    "read": 0.25,
    "download": 0.25,
    "preprocess": 0.25,
    "model": 0.5,
    "select": 0.1,
    "commit": 0.1,
}
COMMIT_RETRIES = 3
"""Ray retries of a shard's commit task and of a row-counting task (both idempotent)."""

RESOURCE_FIELDS = {"batch_size", "concurrency", "num_gpus", "threads", "fused"}
"""Config fields that change how fast a run goes but not what it writes (free to change on resume)."""


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StagePlan:
    """How one stage runs on Ray."""

    name: str
    kind: str  # "tasks" | "actors" | "driver"
    batch_size: int | None = None
    num_cpus: float | None = None
    num_gpus: float = 0.0
    concurrency: int | None = None  # actor pool size
    models: list[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """Everything ``run`` will do, decided before any work (printed by ``--dry-run``)."""

    input: str
    input_format: str
    output: str
    rows_per_shard: int
    ray_address: str | None
    stages: list[StagePlan]

    def describe(self) -> str:
        """Human-readable plan, one stage per line."""
        lines = [
            f"input:  {self.input} ({self.input_format})",
            f"output: {self.output} ({self.rows_per_shard} rows per shard)",
            f"ray:    {self.ray_address or 'local (ray.init())'}",
            "stages:",
        ]
        for s in self.stages:
            resources = []
            if s.num_cpus is not None:
                resources.append(f"num_cpus={s.num_cpus:g}")
            if s.num_gpus:
                resources.append(f"num_gpus={s.num_gpus:g}")
            if s.concurrency is not None:
                resources.append(f"actors={s.concurrency}")
            if s.batch_size is not None:
                resources.append(f"batch_size={s.batch_size}")
            line = f"  {s.name:<10} {s.kind:<7} {' '.join(resources)}"
            if s.models:
                line += f"  models: {', '.join(s.models)}"
            if s.note:
                line += f"  ({s.note})"
            lines.append(line)
        return "\n".join(lines)


def _model_note(specs: list[str]) -> str:
    """Where each model comes from; raises UserError for a path that does not exist."""
    notes = []
    for spec in specs:
        if Path(spec).expanduser().exists():
            notes.append(f"{spec}: local")
        elif is_hub_id(spec):
            notes.append(f"{spec}: Hugging Face hub, downloaded at run time")
        else:
            raise UserError(f"model {spec}: no such directory (and not a Hugging Face hub id org/name)")
    return "; ".join(notes)


def _model_stage(name: str, cfg: Any, *, cpus: float, dtype_note: str) -> StagePlan:
    on_gpu = cfg.num_gpus > 0
    specs = model_specs(cfg)
    return StagePlan(
        name=name,
        kind="actors",
        batch_size=cfg.batch_size,
        num_cpus=cpus,
        num_gpus=float(cfg.num_gpus),
        concurrency=cfg.concurrency,
        models=specs,
        note=f"{'cuda' if on_gpu else 'cpu'}, dtype {cfg.dtype}{dtype_note}; {_model_note(specs)}",
    )


def make_plan(cfg: PipelineConfig) -> Plan:
    """Decide tasks vs actors, resources and batch sizes; validate what can be checked offline."""
    path = cfg.input.path
    for entry in [path] if isinstance(path, str) else path:
        if (
            "://" not in entry
            and not any(c in entry for c in "*?[{")
            and not Path(entry).expanduser().exists()
        ):
            raise UserError(f"input.path: {entry} does not exist")
    counted = "Parquet footers" if cfg.input.format == "parquet" else "a counting task per file"
    model_cfgs = [c for c in (cfg.caption, cfg.filter) if c is not None]
    gpu_run = any(c.num_gpus > 0 for c in (*model_cfgs, cfg.clip) if c is not None)
    cpus = CPUS_GPU_RUN if gpu_run else CPUS_CPU_RUN
    download_batch = max(
        1, min(cfg.download.threads * DOWNLOAD_ROWS_PER_THREAD, DOWNLOAD_MAX_BATCH, cfg.output.rows_per_shard)
    )
    stages = [
        StagePlan(
            name="read",
            kind="tasks",
            num_cpus=cpus["read"],
            note=f"one task per file or {read_unit_rows()}+ rows of Parquet row groups; "
            f"the driver lists files and counts rows ({counted})"
            + (f"; first {cfg.input.limit} rows" if cfg.input.limit else ""),
        ),
    ]
    # input.where (checked against a local input's schema; never over the network here).
    if cfg.input.where:
        from capfilt.stages.where import check_where_against_schema

        check_where_against_schema(cfg.input)
        stages.append(StagePlan(name="where", kind="tasks", num_cpus=cpus["select"], note=cfg.input.where))
    stages += [
        StagePlan(
            name="download",
            kind="tasks",
            batch_size=download_batch,
            num_cpus=cpus["download"],
            note=f"{cfg.download.threads} threads per task, resize {cfg.download.resize_mode} "
            f"{cfg.download.image_size}px",
        ),
    ]
    if model_cfgs:
        stages.append(
            StagePlan(
                name="preprocess",
                kind="tasks",
                batch_size=min(c.batch_size for c in model_cfgs),
                num_cpus=cpus["preprocess"],
                note="decode + resize to the models' input size (uint8)",
            )
        )
    if cfg.caption is not None:
        c = cfg.caption
        mode = f"nucleus top_p={c.top_p}" if c.sample else f"beam num_beams={c.num_beams}"
        stages.append(
            _model_stage("caption", c, cpus=cpus["model"], dtype_note=f"; {c.num_captions} per image, {mode}")
        )
    if cfg.filter is not None:
        f = cfg.filter
        stages.append(_model_stage("filter", f, cpus=cpus["model"], dtype_note=f"; threshold {f.threshold}"))
    stages = _fuse_caption_filter(cfg, stages)
    if cfg.clip is not None:
        stages.append(
            _model_stage("clip", cfg.clip, cpus=cpus["model"], dtype_note=f"; threshold {cfg.clip.threshold}")
        )
    stages.append(StagePlan(name="select", kind="tasks", num_cpus=cpus["select"]))
    stages.append(
        StagePlan(
            name="write",
            kind="tasks",
            num_cpus=cpus["select"],
            note="part files per block in _parts/ (fused with select); the driver gets (shard, rows, path)",
        )
    )
    stages.append(
        StagePlan(
            name="commit",
            kind="tasks",
            num_cpus=cpus["commit"],
            note="one per complete shard: images tar, dataset, then samples parquet (the marker)",
        )
    )
    if cfg.dedup.enabled:
        if "://" in cfg.output.dir and not cfg.output.dir.startswith("file://"):
            raise UserError("dedup.enabled: needs a local or shared output.dir for now (not an object-store URL)")
        d = cfg.dedup
        kinds = [k for k, on in (("url", d.url), ("sha256", d.sha256)) if on]
        if d.near_distance is not None:
            kinds.append(f"phash distance <= {d.near_distance}")
        stages.append(
            StagePlan(
                name="dedup",
                kind="tasks",
                note=f"after all shards: {', '.join(kinds) or 'nothing'}; groupby on the cluster, "
                f"duplicates {'kept in' if d.keep_in_dataset else 'left out of'} dataset/",
            )
        )
    return Plan(
        input=path if isinstance(path, str) else ", ".join(path),
        input_format=cfg.input.format,
        output=cfg.output.dir,
        rows_per_shard=cfg.output.rows_per_shard,
        ray_address=cfg.ray.address,
        stages=stages,
    )


def _fuse_caption_filter(cfg: PipelineConfig, stages: list[StagePlan]) -> list[StagePlan]:
    """With ``filter.fused``: the caption and filter stages become one ``caption+filter`` actor
    pool (capfilt/stages/fused.py) sized by the caption section's resources."""
    if cfg.filter is None or not cfg.filter.fused:
        return stages
    if cfg.caption is None:
        raise UserError("filter.fused: needs a caption section (the fused stage captions, then filters)")
    by_name = {s.name: s for s in stages}
    c, f = by_name["caption"], by_name["filter"]
    fused = StagePlan(
        name="fused",
        kind="actors",
        batch_size=c.batch_size,
        num_cpus=c.num_cpus,
        num_gpus=c.num_gpus,
        concurrency=c.concurrency,
        models=c.models + f.models,
        note=f"caption then filter in one actor (filter micro-batch {cfg.filter.batch_size}); "
        f"caption: {c.note}; filter: {f.note}",
    )
    return [s for s in stages if s.name not in ("caption", "filter")] + [fused]


# --------------------------------------------------------------------------- helpers


def _outcome_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that decides what a run writes (resources and paths removed)."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("ray", "output")}
    out["rows_per_shard"] = (cfg_dict.get("output") or {}).get("rows_per_shard")
    for name, section in list(out.items()):
        if isinstance(section, dict):
            out[name] = {k: v for k, v in section.items() if k not in RESOURCE_FIELDS}
    return out


def _check_resumable(run: RunDir, cfg: PipelineConfig) -> None:
    """Refuse to resume a run directory written with a config that changes the outputs."""
    saved = run.read_text("config.yaml")
    if saved is None or not run.committed_shards():
        return
    old = yaml.safe_load(saved) or {}
    new = cfg.model_dump(mode="json")
    if _outcome_config(old) != _outcome_config(new):
        raise UserError(
            f"output.dir: {run.url} holds shards written with a different config (see its config.yaml); "
            "use another output.dir or delete it"
        )


def _image_size(spec: str) -> int:
    """The model's input side, from its config file (capfilt med_config.json or HF config.json)."""
    directory = resolve_model(spec)
    med_config = directory / "med_config.json"
    if med_config.is_file():
        return int(json.loads(med_config.read_text(encoding="utf-8"))["image_size"])
    hf_config = directory / "config.json"
    if hf_config.is_file():
        data = json.loads(hf_config.read_text(encoding="utf-8"))
        return int((data.get("vision_config") or {}).get("image_size", 384))
    raise UserError(f"model {spec}: neither med_config.json nor config.json in {directory}")


def _versions() -> dict[str, str]:
    """Library versions for the manifest, from package metadata: the driver does not import torch
    or transformers (hundreds of MB of RSS) just to name their versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "capfilt": __version__,
        "python": platform.python_version(),
        "torch": installed("torch"),
        "transformers": installed("transformers"),
        "ray": installed("ray"),
        "pyarrow": pa.__version__,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_unit_rows() -> int:
    from capfilt.stages.read import UNIT_ROWS

    return UNIT_ROWS


def _limited(inputs: Any, limit: int | None) -> Any:
    """``input.limit``: only units holding rows below ``limit`` (their read tasks drop the rest)."""
    if limit is None:
        return inputs
    units = [dataclasses.replace(u, row_limit=limit) for u in inputs.units if u.first_row < limit]
    return dataclasses.replace(inputs, units=units)


def _user_message(err: BaseException) -> str:
    """``err``'s own message, without what Ray Data appends to a failed task's error."""
    return str(err).split("\nFailed to apply UDF transform", 1)[0].strip()


def _user_error_in(err: BaseException) -> BaseException | None:
    """The user-facing error (UserError, CheckpointError) a Ray task or actor raised, if any.

    Ray wraps it: RayTaskError.cause, or an ActorDiedError whose constructor argument is the
    RayTaskError of a failed ``__init__`` (e.g. a checkpoint that does not load).
    """
    from model.med import CheckpointError

    seen: set[int] = set()
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, BaseException):  # a RayTaskError, possibly posing as its cause's class
            pending.append(cause)
            continue
        if isinstance(current, UserError | CheckpointError):
            return current
        inner = [current.__cause__, *current.args]
        pending.extend(e for e in inner if isinstance(e, BaseException))
    return None


_SELECT_TYPES = {
    name: type_
    for name, type_ in rundir.SAMPLE_TYPES.items()
    if pa.types.is_list(type_) or name in ("status", "error")
}
"""Samples columns the select step types explicitly: lists (an all-empty batch would be list<null>)
and the status strings."""


def finish_batch(
    batch: dict[str, np.ndarray],
    *,
    threshold: float | None,
    keep_web: bool,
    keep_synthetic: int,
    drop: list[str],
    **options: Any,
) -> pa.Table:
    """Select step: kept flags, then the model-only columns dropped; typed for the writer.

    Returned as an Arrow table with explicit list types so that a batch whose lists are all
    empty (every row failed) does not become ``list<null>``.
    """
    out = select(batch, threshold=threshold, keep_web=keep_web, keep_synthetic=keep_synthetic, **options)
    typed = {**_SELECT_TYPES, rundir.IMAGE_COLUMN: pa.binary()}
    columns: dict[str, pa.Array] = {}
    for name, values in out.items():
        if name in drop:
            continue
        if name in typed:
            items = [list(v) if isinstance(v, np.ndarray) else v for v in values]
            if name == "image":
                items = [bytes(v) if v is not None else b"" for v in values]
            columns[name] = pa.array(items, type=typed[name])
        else:
            columns[name] = pa.array(list(values) if values.dtype == object else values)
    return pa.table(columns)


def _download_batch(batch: dict[str, np.ndarray], *, cfg: Any) -> dict[str, np.ndarray]:
    """Download task body (a function, so Ray runs it as tasks, not actors)."""
    from capfilt.stages.download import Downloader

    return Downloader(cfg=cfg)(batch)


def _preprocess_batch(
    batch: dict[str, np.ndarray], *, sizes: list[int], resize_mode: str | None = None
) -> dict[str, np.ndarray]:
    from capfilt.stages.caption import preprocess

    return preprocess(batch, sizes=sizes, resize_mode=resize_mode)


def _stage_stats(ds: Any) -> list[dict[str, Any]]:
    """Per-operator rows and throughput from Ray Data's stats of the finished execution."""
    try:
        summary = ds._get_stats_summary()  # noqa: SLF001 - the structured form of ds.stats()
    except Exception:  # noqa: BLE001 - stats are best effort; never fail a finished run
        return []
    chain = []
    pending = [summary]
    while pending:  # the summary is a tree: the last operators, then their parents
        node = pending.pop()
        chain.append(node)
        pending.extend(node.parents)
    stages = []
    for node in reversed(chain):
        for op in node.operators_stats:
            if op.operator_name.startswith(("Input", "FromArrow", "FromItems")):
                continue
            rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
            size = int(op.output_size_bytes.sum) if op.output_size_bytes else 0
            stages.append(
                {
                    "operator": op.operator_name,
                    "rows": rows,
                    "wall_s": round(float(op.time_total_s or 0.0), 3),
                    "rows_per_s": round(float(op.num_rows_per_s), 2),
                    "output_bytes": size,  # what the operator put into the object store
                    "output_bytes_per_row": round(size / rows, 1) if rows else 0.0,
                }
            )
    return stages


# --------------------------------------------------------------------------- run


def _init_ray(address: str | None) -> bool:
    """Connect to Ray; returns whether this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as err:
        raise UserError(f"ray.address: cannot connect to Ray at {address!r}: {err}") from None
    return True


def _read_batch(batch: pa.Table, *, cfg: Any, rows_per_shard: int) -> pa.Table:
    """Read task body: each row of ``batch`` is one serialised :class:`ReadUnit`."""
    from capfilt.stages.read import ReadUnit, read_unit

    tables = []
    for text in batch.column("unit").to_pylist():
        fields = json.loads(text)
        unit = ReadUnit(
            **{
                **fields,
                "row_groups": tuple(fields["row_groups"]),
                "skip_shards": tuple(fields["skip_shards"]),
            }
        )
        tables.append(read_unit(unit, cfg, rows_per_shard=rows_per_shard))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _count_file(file: str, file_index: int, cfg: Any) -> int:
    from capfilt.stages.read import count_rows

    return count_rows(file, file_index, cfg)


def _count_in_tasks(cfg: PipelineConfig, cpus: float) -> Any:
    """``count(files)`` for :func:`plan_input`: one Ray task per file (csv/tsv/jsonl/tar)."""

    def count(files: list[str]) -> list[int]:
        import ray

        task = ray.remote(_count_file).options(num_cpus=cpus, max_retries=COMMIT_RETRIES)
        refs = [task.remote(file, index, cfg.input) for index, file in enumerate(files)]
        try:
            return [int(n) for n in ray.get(refs)]
        except Exception as err:
            user = _user_error_in(err)
            if user is not None:
                raise UserError(_user_message(user)) from None
            raise

    return count


def _dropping(stage_cls: type, drop: list[str]) -> type:
    """``stage_cls`` whose output loses ``drop`` (the pixel columns: no later stage reads them).

    A subclass rather than a wrapper so Ray Data's stats keep the stage's name.
    """
    if not drop:
        return stage_cls

    def __call__(self: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: N807
        out = stage_cls.__call__(self, batch)
        for name in drop:
            out.pop(name, None)
        return out

    return type(stage_cls.__name__, (stage_cls,), {"__call__": __call__, "__module__": stage_cls.__module__})


def _write_parts(block: pa.Table, *, run: RunDir) -> pa.Table:
    return writer.write_parts(block, run=run)


def _split_blocks(ds: Any, rows: int, *, num_cpus: float) -> Any:
    """``ds.repartition(target_num_rows_per_block=rows)`` (streaming: no shuffle, no barrier)
    whose tasks reserve ``num_cpus`` instead of Ray's default whole CPU.

    Ray 2.60's ``repartition`` takes no resource arguments; its tasks asking for one whole CPU
    never get scheduled when the model actors hold all but a fraction of the cluster's CPUs
    (e.g. two caption actors and a filter on 2 CPUs), and the run would hang. The logical
    operator carries ``ray_remote_args``, set here; if a later Ray renames it, the default stays.
    """
    ds = ds.repartition(target_num_rows_per_block=rows)
    op = ds._logical_plan.dag  # noqa: SLF001
    if isinstance(getattr(op, "ray_remote_args", None), dict):
        object.__setattr__(op, "ray_remote_args", {**op.ray_remote_args, "num_cpus": num_cpus})
    return ds


def _build_dataset(
    cfg: PipelineConfig,
    plan: Plan,
    units: list[Any],
    run: RunDir,
    retry_rows: list[tuple[int, list[int]]] | None = None,
) -> Any:
    """The streaming DAG over the read units (nothing runs until it is iterated).

    Its output is one small row per part file written (``shard``, ``rows``, ``part``). With
    ``retry_rows`` ((shard, row positions) of a finished run, ``capfilt run --retry``) the rows
    are read back from the samples files instead (capfilt/retry.py) and input.where is skipped.
    """
    import ray

    from capfilt.stages.where import read_config  # the columns input.where reads travel with the rows

    # A stage's UserError (a bad key, invalid UTF-8, a checkpoint that does not load) reaches the
    # driver as itself, not as Ray Data's UserCodeException, so it stays a one-line error.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    stages = {s.name: s for s in plan.stages}
    if retry_rows is not None:
        from capfilt.retry import read_retry_rows

        items = [{"shard": shard, "rows": json.dumps(rows)} for shard, rows in retry_rows]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(
            read_retry_rows,
            fn_kwargs={
                "run": run,
                "keep_cols": list(cfg.input.keep_cols),
                "rows_per_shard": cfg.output.rows_per_shard,
            },
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=stages["read"].num_cpus,
            **cfg.ray.task_options(),
        )
    else:
        items = [{"unit": json.dumps(dataclasses.asdict(u))} for u in units]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(
            _read_batch,
            fn_kwargs={"cfg": read_config(cfg.input), "rows_per_shard": cfg.output.rows_per_shard},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=stages["read"].num_cpus,
            **cfg.ray.task_options(),
        )
    download = stages["download"]
    # A read task returns a whole file or row-group range as one block; cut it (streaming, no
    # shuffle) into download-batch blocks so that the download tasks run in parallel.
    ds = _split_blocks(ds, download.batch_size or 1, num_cpus=stages["read"].num_cpus or 1.0)
    if "where" in stages and retry_rows is None:  # rows input.where rejects get status filtered_metadata
        from capfilt.stages.where import apply_where

        ds = ds.map_batches(
            apply_where,
            fn_kwargs={"cfg": cfg.input},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=stages["where"].num_cpus,
            **cfg.ray.task_options(),
        )
    ds = ds.map_batches(
        _download_batch,
        fn_kwargs={"cfg": cfg.download},
        batch_size=download.batch_size,
        num_cpus=download.num_cpus,
        **cfg.ray.task_options(),
    )
    if cfg.dedup.enabled and cfg.dedup.near_distance is not None:
        from capfilt.stages.dedup import add_phash

        ds = ds.map_batches(
            add_phash, batch_size=download.batch_size, num_cpus=download.num_cpus, **cfg.ray.task_options()
        )
    drop: list[str] = []
    if "preprocess" in stages:
        sizes = sorted({_image_size(spec) for c in (cfg.caption, cfg.filter) if c for spec in model_specs(c)})
        drop = [pixel_column(s) for s in sizes]
        pre = stages["preprocess"]
        ds = ds.map_batches(
            _preprocess_batch,
            fn_kwargs={"sizes": sizes, "resize_mode": cfg.download.resize_mode},
            batch_size=pre.batch_size,
            num_cpus=pre.num_cpus,
            **cfg.ray.task_options(),
        )
    # The last model stage drops the pixel columns: past it only image bytes, texts and scores travel.
    last_model = "filter" if cfg.filter is not None else "caption"
    if "fused" in stages:
        from capfilt.stages.fused import CaptionFilter

        s = stages["fused"]
        ds = ds.map_batches(
            _dropping(CaptionFilter, drop),
            fn_constructor_kwargs={"caption": cfg.caption, "filter": cfg.filter},
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            batch_size=s.batch_size,
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            **cfg.ray.actor_options(),
        )
    elif cfg.caption is not None:
        from capfilt.stages.caption import Captioner

        s = stages["caption"]
        ds = ds.map_batches(
            _dropping(Captioner, drop if last_model == "caption" else []),
            fn_constructor_kwargs={"cfg": cfg.caption},
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            batch_size=s.batch_size,
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            **cfg.ray.actor_options(),
        )
    if cfg.filter is not None and "fused" not in stages:
        from capfilt.stages.filter import Filter

        s = stages["filter"]
        ds = ds.map_batches(
            _dropping(Filter, drop),
            fn_constructor_kwargs={"cfg": cfg.filter},
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            batch_size=s.batch_size,
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            **cfg.ray.actor_options(),
        )
    if cfg.clip is not None:
        from capfilt.stages.clip import ClipScorer

        s = stages["clip"]
        ds = ds.map_batches(
            ClipScorer,
            fn_constructor_kwargs={"cfg": cfg.clip},
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            batch_size=s.batch_size,
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            **cfg.ray.actor_options(),
        )
    ds = ds.map_batches(
        finish_batch,
        fn_kwargs={**selection_options(cfg), "drop": drop},
        batch_size=None,
        num_cpus=stages["select"].num_cpus,
        **cfg.ray.task_options(),
    )
    ds = ds.map_batches(
        _write_parts,
        fn_kwargs={"run": run},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=stages["write"].num_cpus,
        **cfg.ray.task_options(),
    )
    return ds


def shard_sizes(total_rows: int, rows_per_shard: int, done: set[int]) -> dict[int, int]:
    """Rows per shard still to write: every shard of the input except the committed ones."""
    total = math.ceil(total_rows / rows_per_shard) if total_rows else 0
    return {s: min(rows_per_shard, total_rows - s * rows_per_shard) for s in range(total) if s not in done}


def run(cfg: PipelineConfig, *, dry_run: bool = False, retry: str | None = None) -> Path | str | None:
    """Run (or with ``dry_run`` only plan) the pipeline; returns the run directory.

    The dry run validates the config, input path and model locations and prints the plan;
    it reads no input, touches no network and loads no model, and returns None. The run
    directory is a Path for a local ``output.dir``, else its URL.

    ``retry`` (``--retry``: ``transient`` and/or status names, comma-separated) re-processes
    only the matching rows of a finished run and rewrites their shards (capfilt/retry.py).
    """
    from capfilt.stages.read import plan_input
    from capfilt.stages.where import check_where_against_schema

    plan = make_plan(cfg)
    if retry is not None:
        from capfilt.retry import parse_statuses

        parse_statuses(retry)  # a bad status list is one line before any work
        if cfg.input.format == "webdataset":
            raise UserError(
                "--retry: a webdataset input carries its images; there is nothing to download again"
            )
    if dry_run:
        print(plan.describe())
        return None
    if cfg.caption is not None or cfg.filter is not None:
        # Corrupt checkpoints and max_length: one line before Ray starts. Only with models: it
        # imports model.med and so torch (~190 MB of driver RSS a download-only run does not need).
        check_models(cfg)

    started = _now()
    t0 = time.perf_counter()
    run_dir = RunDir(cfg.output.dir)
    run_dir.makedirs()
    _check_resumable(run_dir, cfg)
    run_dir.write_text("config.yaml", dump(cfg))
    from capfilt.retry import finish_staged

    finish_staged(run_dir)  # a shard a crashed --retry staged completely is published first
    run_dir.clean_partial()
    done = run_dir.committed_shards()
    _check_models(run_dir, cfg, resuming=bool(done))

    started_ray = False
    stage_stats: list[dict[str, Any]] = []
    summaries: dict[int, dict[str, Any]] = {}
    dedup_ran = False
    try:
        count = None
        if cfg.input.format != "parquet":  # no footers: count rows in tasks
            started_ray = _init_ray(cfg.ray.address)
            cpus = {s.name: s.num_cpus for s in plan.stages}["read"] or 1.0
            count = _count_in_tasks(cfg, cpus)
        check_where_against_schema(cfg.input, network=True)
        inputs = plan_input(cfg.input, rows_per_shard=cfg.output.rows_per_shard, done=done, count=count)
        inputs = _limited(inputs, cfg.input.limit)
        if done:  # verified resume: the input is the same, and every committed shard is whole
            started_ray = _init_ray(cfg.ray.address) or started_ray
            bad = _verify_committed(cfg, plan, run_dir, inputs, done)
            for shard, reason in sorted(bad.items()):
                print(f"capfilt: shard {shard}: {reason}; redoing it", file=sys.stderr)
                rundir.remove_shard(run_dir, shard)
            if bad:
                done = done - set(bad)
                inputs = _limited(inputs.with_done(done, cfg.output.rows_per_shard), cfg.input.limit)
        input_rows = min(inputs.total_rows, cfg.input.limit or inputs.total_rows)
        expected = shard_sizes(input_rows, cfg.output.rows_per_shard, done)
        retry_rows: list[tuple[int, list[int]]] | None = None
        if retry is not None:
            from capfilt.retry import check_finished

            check_finished(expected, run_dir.url)
            started_ray = _init_ray(cfg.ray.address) or started_ray
            retry_rows = _find_retry_rows(cfg, plan, run_dir, done, retry)
            expected = {shard: len(rows) for shard, rows in retry_rows}
        todo_rows = sum(expected.values())
        total_shards = math.ceil(input_rows / cfg.output.rows_per_shard) if input_rows else 0
        if retry_rows is None:
            print(
                f"capfilt: {input_rows} rows in {len(inputs.files)} files, {total_shards} shards; "
                f"{len(done)} already committed, {todo_rows} rows to process",
                file=sys.stderr,
            )
        else:
            print(
                f"capfilt: --retry {retry}: {todo_rows} rows in {len(expected)} of {total_shards} shards to retry",
                file=sys.stderr,
            )
        if expected:
            started_ray = _init_ray(cfg.ray.address) or started_ray
            summaries, stage_stats = _execute(cfg, plan, run_dir, inputs.units, expected, retry_rows)
        if cfg.dedup.enabled:  # after the shard loop: marks duplicates across all committed shards
            from capfilt.stages.dedup import dedup_done, run_dedup

            local = Path(run_dir.root)
            if expected or not dedup_done(local, cfg.dedup):
                started_ray = _init_ray(cfg.ray.address) or started_ray
                run_dedup(local, cfg.dedup, image_ext=cfg.download.encode_format)
                dedup_ran = True
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    wall = time.perf_counter() - t0
    manifest = build_manifest(
        run_dir,
        cfg,
        input_rows=input_rows,
        total_shards=total_shards,
        started=started,
        known=None if dedup_ran or retry is not None else summaries,  # shards rewritten: count again
        timing={
            "wall_s": round(wall, 3),
            "rows_processed": int(todo_rows),
            "shards_written": len(summaries),
            "rows_per_s": round(todo_rows / wall, 2) if wall > 0 else 0.0,
            "stages": stage_stats,
        },
    )
    run_dir.remove_parts_dir()
    finish_staged(run_dir)  # every retried shard is published: this drops the empty _retry/
    run_dir.write_text("manifest.json", dumps_json(manifest))
    return Path(run_dir.root) if run_dir.local else run_dir.url


# --------------------------------------------------------------------------- verified resume

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_fingerprints(cfg: PipelineConfig) -> dict[str, dict[str, str]]:
    """sha256 over each local model's weight files (names and bytes, read in chunks).

    Hub ids are recorded as such (their files are only fetched when a run loads them); pin a
    revision to make a hub model reproducible.
    """
    import hashlib

    out: dict[str, dict[str, str]] = {}
    for stage, section in (("caption", cfg.caption), ("filter", cfg.filter)):
        if section is None:
            continue
        out[stage] = {}
        for spec in model_specs(section):
            directory = Path(spec).expanduser()
            if not directory.is_dir():
                out[stage][spec] = "hub id (not hashed)"
                continue
            digest = hashlib.sha256()
            for file in sorted(
                p for p in directory.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
            ):
                digest.update(file.relative_to(directory).as_posix().encode() + b"\x00")
                with open(file, "rb") as stream:
                    while chunk := stream.read(1 << 22):
                        digest.update(chunk)
            out[stage][spec] = digest.hexdigest()
    return out


def _check_models(run: RunDir, cfg: PipelineConfig, *, resuming: bool) -> None:
    """Refuse to resume with other model weights; record the fingerprints of a new run."""
    current = model_fingerprints(cfg)
    saved = run.read_text(rundir.FINGERPRINT_FILE)
    if resuming and saved is not None:
        old = (json.loads(saved) or {}).get("models", {})
        for stage, specs in current.items():
            for spec, sha in specs.items():
                before = (old.get(stage) or {}).get(spec)
                if before is not None and before != sha:
                    raise UserError(
                        f"{stage}.model: the weights of {spec} changed since shards of {run.url} were committed "
                        f"(sha256 {before[:12]} -> {sha[:12]}); use another output.dir or delete it"
                    )
    if not resuming or saved is None:
        run.write_text(rundir.FINGERPRINT_FILE, dumps_json({"models": current}))


def _verify_shards(run: RunDir, items: list[tuple[int, int]]) -> list[tuple[int, str | None, dict[str, Any]]]:
    """Verification task body: (shard, reason it is bad or None, what its commit recorded)."""
    out = []
    for shard, expected in items:
        reason = rundir.verify_shard(run, shard, expected)
        try:
            recorded = rundir.shard_meta(run, shard)[1]
        except Exception:  # noqa: BLE001 - an unreadable footer is already the reason
            recorded = {}
        out.append((shard, reason, recorded))
    return out


def _fingerprint_unit(unit: Any, cfg: Any, rows_per_shard: int) -> dict[int, list[int]]:
    from capfilt.stages.read import fingerprint_unit

    return fingerprint_unit(unit, cfg, rows_per_shard=rows_per_shard)


VERIFY_SHARDS_PER_TASK = 16


def _verify_committed(
    cfg: PipelineConfig, plan: Plan, run: RunDir, inputs: Any, done: set[int]
) -> dict[int, str]:
    """Check every committed shard in Ray tasks; returns the bad ones with the reason.

    An input that no longer gives a committed shard the rows it was written from (keys, URLs,
    texts or row count; compared with the fingerprint its commit recorded) is a UserError:
    mixing old and new rows in one run would be silent corruption.
    """
    import ray

    rps = cfg.output.rows_per_shard
    cpus = {s.name: s.num_cpus for s in plan.stages}["commit"]
    sizes = {s: max(0, min(rps, inputs.total_rows - s * rps)) for s in done}
    gone = sorted(s for s, n in sizes.items() if n == 0)
    if gone:
        raise UserError(
            f"input.path: the input has {inputs.total_rows} rows, fewer than committed shard {gone[0]} of "
            f"{run.url} needs; the input changed (use another output.dir or delete it)"
        )
    verify = ray.remote(_verify_shards).options(num_cpus=cpus, max_retries=COMMIT_RETRIES)
    fingerprint = ray.remote(_fingerprint_unit).options(num_cpus=cpus, max_retries=COMMIT_RETRIES)
    items = sorted(sizes.items())
    checks = [
        verify.remote(run, items[i : i + VERIFY_SHARDS_PER_TASK])
        for i in range(0, len(items), VERIFY_SHARDS_PER_TASK)
    ]
    units = [u for u in _limited(inputs.with_done(done, rps, keep_done=True), cfg.input.limit).units if u.skip_shards]
    partials = [fingerprint.remote(unit, cfg.input, rps) for unit in units]
    try:
        results = [r for chunk in ray.get(checks) for r in chunk]
        sums: dict[int, list[int]] = {}
        for partial in ray.get(partials):
            for shard, (n, term) in partial.items():
                entry = sums.setdefault(int(shard), [0, 0])
                entry[0] += n
                entry[1] = (entry[1] + term) % 2**64
    except Exception as err:
        user = _user_error_in(err)
        if user is not None:
            raise UserError(_user_message(user)) from None
        raise
    bad: dict[int, str] = {}
    for shard, reason, recorded in results:
        if "input_fingerprint" in recorded:
            rows, value = sums.get(shard, [0, 0])
            if rows != recorded.get("rows") or f"{value:016x}" != recorded["input_fingerprint"]:
                raise UserError(
                    f"input.path: the input changed since shard {shard} of {run.url} was committed "
                    f"(its keys, URLs, texts or row count differ); use another output.dir or delete it"
                )
        if reason is not None:
            bad[shard] = reason
    return bad


def _bound_queues(context: Any) -> Any:
    """:func:`capfilt.queues.bound_queues`; a Ray without the names it needs keeps its defaults."""
    try:
        from capfilt.queues import bound_queues
    except ImportError:  # pragma: no cover - a later Ray moved them: its defaults apply
        return lambda: None
    return bound_queues(context)


def _driver_batches(ds: Any) -> Any:
    """What the driver receives from the DAG: small part summaries (tests wrap this)."""
    return ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _commit_task(
    run: RunDir, shard: int, parts: list[str], expected: int, keep_cols: list[str], image_ext: str, _rps: int
) -> dict[str, Any]:
    return writer.commit_shard(run, shard, parts, expected=expected, keep_cols=keep_cols, image_ext=image_ext)


def _commit_retry_task(
    run: RunDir, shard: int, parts: list[str], expected: int, keep_cols: list[str], image_ext: str, rps: int
) -> dict[str, Any]:
    from capfilt.retry import commit_retry

    return commit_retry(
        run, shard, parts, expected=expected, rows_per_shard=rps, keep_cols=keep_cols, image_ext=image_ext
    )


def _find_retry_rows(
    cfg: PipelineConfig, plan: Plan, run: RunDir, shards: set[int], retry: str
) -> list[tuple[int, list[int]]]:
    """(shard, row positions) to retry, found by Ray tasks over the committed samples files."""
    import ray

    from capfilt.retry import SHARDS_PER_FIND_TASK, find_rows, parse_statuses

    statuses, transient = parse_statuses(retry)
    cpus = {s.name: s.num_cpus for s in plan.stages}["commit"]
    find = ray.remote(find_rows).options(num_cpus=cpus, max_retries=COMMIT_RETRIES)
    ordered = sorted(shards)
    refs = [
        find.remote(run, ordered[i : i + SHARDS_PER_FIND_TASK], statuses, transient)
        for i in range(0, len(ordered), SHARDS_PER_FIND_TASK)
    ]
    return sorted(item for chunk in ray.get(refs) for item in chunk)


def _execute(
    cfg: PipelineConfig,
    plan: Plan,
    run_dir: RunDir,
    units: list[Any],
    expected: dict[int, int],
    retry_rows: list[tuple[int, list[int]]] | None = None,
) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Stream the DAG; commit each shard in a task once its parts are in.

    With ``retry_rows`` (``--retry``) the DAG reads those rows back, ``expected`` counts the
    retried rows per shard and the commit task merges them into the committed shard.
    Returns (per-shard summaries of the shards committed now, per-stage stats).
    """
    import ray
    from tqdm import tqdm

    cpus = {s.name: s.num_cpus for s in plan.stages}
    task = _commit_task if retry_rows is None else _commit_retry_task
    commit = ray.remote(task).options(num_cpus=cpus["commit"], max_retries=COMMIT_RETRIES)
    keep_cols = list(cfg.input.keep_cols)
    ext = cfg.download.encode_format
    remaining = dict(expected)
    received: dict[int, int] = {}
    parts: dict[int, list[str]] = {}
    in_flight: dict[Any, int] = {}
    summaries: dict[int, dict[str, Any]] = {}
    bar = tqdm(
        total=sum(expected.values()),
        unit="row",
        desc="capfilt committed",
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def collect(timeout: float | None) -> None:
        if not in_flight:
            return
        ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight), timeout=timeout)
        for ref in ready:
            shard = in_flight.pop(ref)
            summary = ray.get(ref)
            summaries[shard] = summary
            bar.update(summary["rows"] if retry_rows is None else expected[shard])  # retry: rows redone
            bar.set_postfix(shards=f"{len(summaries)}/{len(expected)}", pairs=summary["pairs"])

    # Keep one commit task's CPUs out of Ray Data's budget, so commits are not starved by the DAG.
    options = ray.data.DataContext.get_current().execution_options
    excluded = options.exclude_resources
    options.exclude_resources = ray.data.ExecutionResources(cpu=cpus["commit"])
    restore_queues = _bound_queues(ray.data.DataContext.get_current())
    try:
        ds = _build_dataset(cfg, plan, units, run_dir, retry_rows)
        for batch in _driver_batches(ds):
            for shard, rows, part in zip(
                batch.column("shard").to_pylist(),
                batch.column("rows").to_pylist(),
                batch.column("part").to_pylist(),
                strict=True,
            ):
                if shard not in remaining:
                    raise RuntimeError(f"rows for shard {shard}, which this run does not write")
                received[shard] = received.get(shard, 0) + rows
                parts.setdefault(shard, []).append(part)
                if received[shard] > remaining[shard]:
                    raise RuntimeError(
                        f"shard {shard}: {received[shard]} rows arrived, expected {remaining[shard]}"
                    )
                if received[shard] == remaining[shard]:
                    ref = commit.remote(
                        run_dir,
                        shard,
                        parts.pop(shard),
                        remaining.pop(shard),
                        keep_cols,
                        ext,
                        cfg.output.rows_per_shard,
                    )
                    in_flight[ref] = shard
                    del received[shard]
            collect(timeout=0)
        collect(timeout=None)
    except Exception as err:
        user = _user_error_in(err)
        if user is not None:
            raise UserError(_user_message(user)) from None
        lost = _lost_work(err, remaining, cfg)
        if lost is not None:
            raise UserError(lost) from None
        raise
    finally:
        restore_queues()
        options.exclude_resources = excluded
        bar.close()
    if remaining:
        missing = {s: n - received.get(s, 0) for s, n in remaining.items()}
        raise RuntimeError(f"pipeline ended with rows missing for shards {missing}")
    return summaries, _stage_stats(ds)


def _lost_work(err: BaseException, waiting: Iterable[int], cfg: PipelineConfig) -> str | None:
    """One line naming the shards a batch was lost from, when a Ray worker died too often.

    With finite ``ray.max_retries`` a batch whose worker keeps dying (OOM kill, segfault in a
    decoder) ends the run instead of retrying forever; its rows never reach the writer, so the
    shards still waiting for rows (``waiting``) are where the poison batch is.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, OutOfMemoryError, WorkerCrashedError

    lost_types = (WorkerCrashedError, OutOfMemoryError, ActorDiedError, ActorUnavailableError)
    seen: set[int] = set()
    pending: list[BaseException] = [err]
    found: BaseException | None = None
    while pending and found is None:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, lost_types):
            found = current
            break
        pending.extend(e for e in (current.__cause__, current.__context__, getattr(current, "cause", None))
                       if isinstance(e, BaseException))  # fmt: skip
    if found is None:
        return None
    per_shard = cfg.output.rows_per_shard
    waiting = sorted(waiting)
    shards = ", ".join(f"{s} (input rows {s * per_shard}-{(s + 1) * per_shard - 1})" for s in waiting[:5])
    more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
    reason = " ".join(str(found).split())[:200]
    return (
        f"a pipeline batch failed {cfg.ray.max_retries + 1} times (ray.max_retries={cfg.ray.max_retries}), "
        f"its worker died: {type(found).__name__}: {reason}; shards not completed: {shards or 'none'}{more}"
    )


def build_manifest(
    run_dir: RunDir,
    cfg: PipelineConfig,
    *,
    input_rows: int,
    total_shards: int,
    started: str,
    timing: dict[str, Any],
    known: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """manifest.json: recomputed from every committed shard, so a resumed run's equals a full run's.

    ``known`` are the counts the commit tasks of this invocation returned; only shards
    committed earlier are read (their status and source columns). Only ``started_at``,
    ``finished_at`` and ``timing`` (this invocation's throughput) differ between an
    interrupted-then-resumed run and an uninterrupted one.
    """
    counts = run_dir.summarize(known)
    download = download_stats(Path(run_dir.root)) if run_dir.local else None
    timing = {
        **timing,
        "images_per_s": images_per_s(download, float(timing.get("rows_per_s") or 0.0)) if download else None,
    }
    dedup_state = run_dir.read_text("dedup.json")
    return {
        "input_rows": input_rows,
        "rows": counts["rows"],
        "complete": counts["shards"] == total_shards and counts["rows"] == input_rows,
        "shards": {"total": total_shards, "committed": counts["shards"]},
        "status": counts["status"],
        "kept": counts["kept"],
        "download": download,
        "dedup": json.loads(dedup_state) if dedup_state else None,
        "models": {
            "caption": model_specs(cfg.caption) if cfg.caption else [],
            "filter": model_specs(cfg.filter) if cfg.filter else [],
            "clip": [cfg.clip.model] if cfg.clip else [],
        },
        "versions": _versions(),
        "started_at": started,
        "finished_at": _now(),
        "timing": timing,
    }
