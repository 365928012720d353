"""`capfilt run`: the CapFilt pipeline as one streaming Ray Data DAG.

::

    read (driver) -> download (tasks, threads inside) -> preprocess (tasks)
      -> caption (actor pool, GPUs) -> filter (actor pool, GPUs) -> select (tasks)
      -> driver: ShardBuffer -> write_shard (images tar, dataset parquet, samples parquet)

This module is the ONLY place that decides how the stages run: tasks or actors, CPUs and
GPUs per replica, replica counts and batch sizes (:func:`make_plan`). The stages themselves
(``capfilt/stages``) are plain callables that know nothing about Ray.

Sharding and resume: input row ``r`` belongs to shard ``r // output.rows_per_shard``, a pure
function of the input, so a rerun assigns the same rows to the same shards. Shards whose
``samples/shard-*.parquet`` exists are committed and skipped; rows stream back from Ray in
any order and the driver commits a shard as soon as all its rows have arrived. Because every
stage is per-row deterministic (captions are seeded by (seed, key)), a resumed run ends with
the same files as an uninterrupted one, and ``manifest.json`` is recomputed from all shards.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from capfilt import __version__
from capfilt.config import PipelineConfig, dump
from capfilt.errors import UserError
from capfilt.stages import write as writer
from capfilt.stages.caption import is_hub_id, model_specs, pixel_column, resolve_model
from capfilt.stages.select import select

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
CPUS_GPU_RUN = {"download": 1.0, "preprocess": 1.0, "model": 1.0, "select": 0.25}
CPUS_CPU_RUN = {"download": 0.25, "preprocess": 0.25, "model": 0.5, "select": 0.1}

RESOURCE_FIELDS = {"batch_size", "concurrency", "num_gpus", "threads"}
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
    if "://" not in path and not any(c in path for c in "*?[") and not Path(path).expanduser().exists():
        raise UserError(f"input.path: {path} does not exist")
    model_cfgs = [c for c in (cfg.caption, cfg.filter) if c is not None]
    cpus = CPUS_GPU_RUN if any(c.num_gpus > 0 for c in model_cfgs) else CPUS_CPU_RUN
    download_batch = max(
        1, min(cfg.download.threads * DOWNLOAD_ROWS_PER_THREAD, DOWNLOAD_MAX_BATCH, cfg.output.rows_per_shard)
    )
    stages = [
        StagePlan(name="read", kind="driver", note="whole input read on the driver, rows sharded"),
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
    stages.append(StagePlan(name="select", kind="tasks", num_cpus=cpus["select"]))
    stages.append(StagePlan(name="write", kind="driver", note="commits each shard when all its rows arrived"))
    return Plan(
        input=path,
        input_format=cfg.input.format,
        output=cfg.output.dir,
        rows_per_shard=cfg.output.rows_per_shard,
        ray_address=cfg.ray.address,
        stages=stages,
    )


# --------------------------------------------------------------------------- helpers


def _outcome_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that decides what a run writes (resources and paths removed)."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("ray", "output")}
    out["rows_per_shard"] = (cfg_dict.get("output") or {}).get("rows_per_shard")
    for name, section in list(out.items()):
        if isinstance(section, dict):
            out[name] = {k: v for k, v in section.items() if k not in RESOURCE_FIELDS}
    return out


def _check_resumable(run_dir: Path, cfg: PipelineConfig) -> None:
    """Refuse to resume a run directory written with a config that changes the outputs."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not writer.committed_shards(run_dir):
        return
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = cfg.model_dump(mode="json")
    if _outcome_config(old) != _outcome_config(new):
        raise UserError(
            f"output.dir: {run_dir} holds shards written with a different config (see its config.yaml); "
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
    import ray
    import torch
    import transformers

    return {
        "capfilt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_input(cfg: PipelineConfig) -> pa.Table:
    from capfilt.stages.read import read_table

    return read_table(cfg.input.path, cfg.input)


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


def finish_batch(
    batch: dict[str, np.ndarray],
    *,
    threshold: float | None,
    keep_web: bool,
    keep_synthetic: int,
    drop: list[str],
) -> pa.Table:
    """Select step: kept flags, then the model-only columns dropped; typed for the writer.

    Returned as an Arrow table with explicit list types so that a batch whose lists are all
    empty (every row failed) does not become ``list<null>``.
    """
    out = select(batch, threshold=threshold, keep_web=keep_web, keep_synthetic=keep_synthetic)
    typed = {
        "synthetic_texts": pa.list_(pa.string()),
        "synthetic_itm": pa.list_(pa.float64()),
        "synthetic_itc": pa.list_(pa.float64()),
        "synthetic_kept": pa.list_(pa.bool_()),
        "status": pa.string(),
        "error": pa.string(),
        "image": pa.binary(),
    }
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


def _preprocess_batch(batch: dict[str, np.ndarray], *, sizes: list[int]) -> dict[str, np.ndarray]:
    from capfilt.stages.caption import preprocess

    return preprocess(batch, sizes=sizes)


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
            if op.operator_name.startswith("Input") or op.operator_name.startswith("FromArrow"):
                continue
            rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
            stages.append(
                {
                    "operator": op.operator_name,
                    "rows": rows,
                    "wall_s": round(float(op.time_total_s or 0.0), 3),
                    "rows_per_s": round(float(op.num_rows_per_s), 2),
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


def assign_shards(table: pa.Table, rows_per_shard: int, done: set[int]) -> tuple[pa.Table, dict[int, int]]:
    """Add ``_row``/``_shard``; drop committed shards; expected row count per remaining shard."""
    n = table.num_rows
    rows = np.arange(n, dtype=np.int64)
    shards = rows // rows_per_shard
    table = table.append_column(writer.ROW_COLUMN, pa.array(rows)).append_column(
        writer.SHARD_COLUMN, pa.array(shards)
    )
    keep = ~np.isin(shards, list(done)) if done else np.ones(n, dtype=bool)
    table = table.filter(pa.array(keep))
    counts = np.bincount(shards[keep], minlength=0) if keep.any() else np.array([], dtype=np.int64)
    expected = {int(s): int(c) for s, c in enumerate(counts) if c}
    return table, expected


def _build_dataset(cfg: PipelineConfig, plan: Plan, table: pa.Table) -> Any:
    """The streaming DAG over ``table``'s rows (nothing runs until it is iterated)."""
    import ray

    stages = {s.name: s for s in plan.stages}
    download = stages["download"]
    block = download.batch_size or 1
    blocks = [table.slice(start, block) for start in range(0, table.num_rows, block)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        _download_batch,
        fn_kwargs={"cfg": cfg.download},
        batch_size=download.batch_size,
        num_cpus=download.num_cpus,
        **cfg.ray.task_options(),
    )
    drop: list[str] = []
    if "preprocess" in stages:
        sizes = sorted({_image_size(spec) for c in (cfg.caption, cfg.filter) if c for spec in model_specs(c)})
        drop = [pixel_column(s) for s in sizes]
        pre = stages["preprocess"]
        ds = ds.map_batches(
            _preprocess_batch,
            fn_kwargs={"sizes": sizes},
            batch_size=pre.batch_size,
            num_cpus=pre.num_cpus,
            **cfg.ray.task_options(),
        )
    if cfg.caption is not None:
        from capfilt.stages.caption import Captioner

        s = stages["caption"]
        ds = ds.map_batches(
            Captioner,
            fn_constructor_kwargs={"cfg": cfg.caption},
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            batch_size=s.batch_size,
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            **cfg.ray.actor_options(),
        )
    if cfg.filter is not None:
        from capfilt.stages.filter import Filter

        s = stages["filter"]
        ds = ds.map_batches(
            Filter,
            fn_constructor_kwargs={"cfg": cfg.filter},
            compute=ray.data.ActorPoolStrategy(size=s.concurrency),
            batch_size=s.batch_size,
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            **cfg.ray.actor_options(),
        )
    f = cfg.filter
    if f is not None:
        selection = {"threshold": f.threshold, "keep_web": f.keep_web, "keep_synthetic": f.keep_synthetic}
    else:  # captioner-only CapFilt: keep the web text and every synthetic caption
        every = cfg.caption.num_captions * len(model_specs(cfg.caption)) if cfg.caption else 0
        selection = {"threshold": None, "keep_web": True, "keep_synthetic": every}
    ds = ds.map_batches(
        finish_batch,
        fn_kwargs={**selection, "drop": drop},
        batch_size=None,
        num_cpus=stages["select"].num_cpus,
        **cfg.ray.task_options(),
    )
    return ds


def run(cfg: PipelineConfig, *, dry_run: bool = False) -> Path | None:
    """Run (or with ``dry_run`` only plan) the pipeline; returns the run directory.

    The dry run validates the config, input path and model locations and prints the plan;
    it reads no input, touches no network and loads no model, and returns None.
    """
    plan = make_plan(cfg)
    if dry_run:
        print(plan.describe())
        return None

    started = _now()
    t0 = time.perf_counter()
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(run_dir, cfg)
    (run_dir / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    writer.clean_partial(run_dir)

    table = _read_input(cfg)
    input_rows = table.num_rows
    done = writer.committed_shards(run_dir)
    todo, expected = assign_shards(table, cfg.output.rows_per_shard, done)
    del table
    total_shards = math.ceil(input_rows / cfg.output.rows_per_shard) if input_rows else 0
    print(
        f"capfilt: {input_rows} rows in {total_shards} shards; {len(done)} already committed, "
        f"{todo.num_rows} rows to process",
        file=sys.stderr,
    )

    stage_stats: list[dict[str, Any]] = []
    written = 0
    if todo.num_rows:
        started_ray = _init_ray(cfg.ray.address)
        try:
            written, stage_stats = _execute(cfg, plan, run_dir, todo, expected)
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
        timing={
            "wall_s": round(wall, 3),
            "rows_processed": int(todo.num_rows),
            "shards_written": written,
            "rows_per_s": round(todo.num_rows / wall, 2) if wall > 0 else 0.0,
            "stages": stage_stats,
        },
    )
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return run_dir


def _execute(
    cfg: PipelineConfig, plan: Plan, run_dir: Path, todo: pa.Table, expected: dict[int, int]
) -> tuple[int, list[dict[str, Any]]]:
    """Stream the DAG into the shard writer; returns (shards written, per-stage stats)."""
    from tqdm import tqdm

    buffer = writer.ShardBuffer(expected=expected)
    ds = _build_dataset(cfg, plan, todo)
    keep_cols = list(cfg.input.keep_cols)
    ext = cfg.download.encode_format
    written = 0
    bar = tqdm(total=todo.num_rows, unit="row", desc="capfilt committed", file=sys.stderr, dynamic_ncols=True)
    try:
        # Finished rows as they complete, in whatever order Ray produces them.
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard, rows in buffer.add(batch):
                summary = writer.write_shard(run_dir, shard, rows, keep_cols=keep_cols, image_ext=ext)
                written += 1
                bar.update(summary.rows)
                bar.set_postfix(shards=f"{written}/{len(expected)}", pairs=summary.pairs)
    except Exception as err:
        user = _user_error_in(err)
        if user is not None:
            raise UserError(str(user)) from None
        lost = _lost_work(err, buffer, cfg)
        if lost is not None:
            raise UserError(lost) from None
        raise
    finally:
        bar.close()
    if buffer.expected:
        missing = {s: n - buffer.pending.get(s, 0) for s, n in buffer.expected.items()}
        raise RuntimeError(f"pipeline ended with rows missing for shards {missing}")
    return written, _stage_stats(ds)


def _lost_work(err: BaseException, buffer: writer.ShardBuffer, cfg: PipelineConfig) -> str | None:
    """One line naming the shards a batch was lost from, when a Ray worker died too often.

    With finite ``ray.max_retries`` a batch whose worker keeps dying (OOM kill, segfault in a
    decoder) ends the run instead of retrying forever; its rows never reach the writer, so the
    shards still waiting for rows are where the poison batch is.
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
    waiting = sorted(buffer.expected)
    shards = ", ".join(f"{s} (input rows {s * per_shard}-{(s + 1) * per_shard - 1})" for s in waiting[:5])
    more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
    reason = " ".join(str(found).split())[:200]
    return (
        f"a pipeline batch failed {cfg.ray.max_retries + 1} times (ray.max_retries={cfg.ray.max_retries}), "
        f"its worker died: {type(found).__name__}: {reason}; shards not completed: {shards or 'none'}{more}"
    )


def build_manifest(
    run_dir: Path,
    cfg: PipelineConfig,
    *,
    input_rows: int,
    total_shards: int,
    started: str,
    timing: dict[str, Any],
) -> dict[str, Any]:
    """manifest.json: recomputed from every committed shard, so a resumed run's equals a full run's.

    Only ``started_at``, ``finished_at`` and ``timing`` (this invocation's throughput) differ
    between an interrupted-then-resumed run and an uninterrupted one.
    """
    counts = writer.summarize(run_dir)
    return {
        "input_rows": input_rows,
        "rows": counts["rows"],
        "complete": counts["shards"] == total_shards and counts["rows"] == input_rows,
        "shards": {"total": total_shards, "committed": counts["shards"]},
        "status": counts["status"],
        "kept": counts["kept"],
        "models": {
            "caption": model_specs(cfg.caption) if cfg.caption else [],
            "filter": model_specs(cfg.filter) if cfg.filter else [],
        },
        "versions": _versions(),
        "started_at": started,
        "finished_at": _now(),
        "timing": timing,
    }
