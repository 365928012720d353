"""The round planner of ``capfilt bootstrap``: BLIP's CapFilt loop, round after round, resumable by step.

::

    corpus -> round 0: pre-train MED_0 on human pairs (+ the raw web pairs)
           -> round r = 1..N: fine-tune captioner_r (LM) and filter_r (ITC+ITM) from MED_{r-1} on
              human pairs -> run the pipeline over the web URL list (the corpus is served on
              loopback) -> D_r = human + kept web + kept synthetic -> pre-train MED_r on D_r
              (from scratch, BLIP Table 13, or continuing MED_{r-1}) -> evaluate MED_r

A round's captioner(s) and filter(s) depend only on MED_{r-1}, and MED_1 and the ablation's
pre-trainings only on round 1's output: with ``concurrent_training`` (on CPU by default) each such
group trains at the same time, one process per model with a share of the cores; MED_r's
pre-training, when alone, trains in a child process with every core (or, with ``data_parallel``,
across DDP processes).

Every step writes into a hidden staging path next to its artifact (``round-1/.filter.partial``)
and is committed by an atomic rename to ``round-1/filter`` followed by an atomic rewrite of
``RUN/state.json``. A rerun skips committed steps and restarts at the first unfinished one,
whose staging output is either discarded (cheap steps) or handed to the step's own resume
(training continues from its newest checkpoint, the pipeline skips committed shards). Every
step is a deterministic function of the config and earlier artifacts, so a run killed at any
moment and rerun ends with the same artifacts as an uninterrupted one.

``--ablation`` adds the small analogue of BLIP Table 1: at the same pre-training budget, MED
pre-trained on (a) raw web + human, (b) filtered web + human, (c) web + unfiltered synthetic
captions + human, (d) CapFilt's D_1; all four datasets are cut from round 1's pipeline output,
so they share images, captions and filter scores and differ only in the selection rule. When
round 0 pre-trains from scratch on human + raw web pairs (``pretrain.round0_web``, the default),
MED_0 is already (a) — same data, same settings — and is not trained a second time.

Run directory::

    RUN/config.yaml  state.json  metrics.jsonl  ablation.json  report.html
    RUN/corpus/                       synthetic corpus (when generated)
    RUN/round-0/pretrain/  eval.json
    RUN/round-K/captioner/ filter/ pipeline/ pretrain/ eval.json   (captioner-2/ ... for ensembles)
    RUN/ablation/{filter,captioner}/pretrain/  eval.json   (+ raw/ unless MED_0 is the raw row)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from capfilt.bootstrap.backend import REAL, Backend, CoreShares
from capfilt.bootstrap.config import (
    FREE_FIELDS,
    MIN_BATCH_PER_PROCESS,
    BootstrapConfig,
    BootstrapOutput,
    StepTraining,
    load_config,
)
from capfilt.bootstrap.pairs import count_sources, human_pairs, selected_pairs, web_pairs, write_pairs
from capfilt.bootstrap.steps import STATE_FILE, State, Step, remove_path, run_steps, step_table
from capfilt.bootstrap.summary import (
    ABLATION_VARIANTS,
    METRICS_FILE,
    capfilt_summary,
    filter_summary,
    samples_files,
    summary_text,
    write_ablation,
    write_metrics,
)
from capfilt.config import CaptionConfig, FilterConfig, InputConfig, OutputConfig, PipelineConfig, dump
from capfilt.errors import UserError
from capfilt.rundir import atomic_write_text
from capfilt.train import ModelSection


@dataclass(frozen=True, kw_only=True)
class CorpusPaths:
    """Where the corpus files are once the corpus step is done."""

    human: Path
    urls: Path | None  # the URL list as given (None: a synth corpus, listed when served)
    test: Path
    web_pairs: Path | None  # raw web pairs with images (round 0, ablation uses the downloaded ones)
    web_labels: Path | None  # web Parquet with noise labels (synth only)
    served: Path | None  # the synth corpus directory to serve


class Bootstrap:
    """Builds the step list of a bootstrap run from its config and runs it."""

    def __init__(
        self, *, cfg: BootstrapConfig, run_dir: Path, progress: bool = True, backend: Backend = REAL
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        self.backend = backend
        self.slots = training_slots(cfg.concurrent_training)
        """How many trainings of a group run at once (1: one after the other, in this process)."""
        self.cores = CoreShares(available_cores())
        """The cores that the trainings running at the same time divide among themselves."""
        corpus = cfg.corpus
        if corpus.synthetic:
            root = Path(corpus.dir) if corpus.dir else run_dir / "corpus"
            self.corpus = CorpusPaths(
                human=root / "human.parquet", urls=None, test=root / "test.parquet",
                web_pairs=root / "web.parquet", web_labels=root / "web.parquet", served=root,
            )  # fmt: skip
        else:
            self.corpus = CorpusPaths(
                human=Path(corpus.human or ""), urls=Path(corpus.urls or ""), test=Path(corpus.test or ""),
                web_pairs=Path(corpus.web_pairs) if corpus.web_pairs else None, web_labels=None, served=None,
            )  # fmt: skip

    # ---- layout
    def round_dir(self, r: int) -> Path:
        return self.run_dir / f"round-{r}"

    def member_name(self, kind: str, i: int) -> str:
        """``captioner``, ``captioner-2``, ...: ensemble members are separate steps and dirs."""
        return kind if i == 0 else f"{kind}-{i + 1}"

    def model_dir(self, r: int) -> Path:
        """MED_r, a capfilt checkpoint."""
        return self.round_dir(r) / "pretrain" / "model"

    # ---- steps
    def steps(self, *, rounds: int, ablation: bool) -> list[Step]:
        """The run's steps in order; training and pipeline steps resume, the others start over."""
        cfg = self.cfg
        steps: list[Step] = []

        def add(
            name: str,
            target: Path,
            run: Callable[[Path, bool], None],
            resumable: bool = True,
            group: str | None = None,
        ) -> None:
            steps.append(Step(name=name, target=target, run=run, resumable=resumable, group=group))

        variants = self.ablation_variants_to_train() if ablation else []
        if cfg.corpus.synthetic and not cfg.corpus.dir:
            add("corpus", self.run_dir / "corpus", self._corpus_step, resumable=False)
        add("round-0/pretrain", self.round_dir(0) / "pretrain", self._pretrain_step(0))
        add("round-0/eval", self.round_dir(0) / "eval.json", self._eval_step(0), resumable=False)
        for r in range(1, rounds + 1):
            rd = self.round_dir(r)
            group = cfg.ensemble.captioners + cfg.ensemble.filters
            for kind, count in (("captioner", cfg.ensemble.captioners), ("filter", cfg.ensemble.filters)):
                for i in range(count):
                    name = self.member_name(kind, i)
                    run = self._finetune_step(kind, r, i, group)
                    add(f"round-{r}/{name}", rd / name, run, group=f"round-{r}/fine-tune")
            add(f"round-{r}/pipeline", rd / "pipeline", self._pipeline_step(r))
            # The ablation's pre-trainings, like MED_1, need only round 1's pipeline output: they all
            # train at the same time, each with its share of the cores (benchmarks/README.md, "MED_1
            # and the ablation's rows together").
            together = variants if r == 1 else []
            pretrain_group = f"round-{r}/pre-train" if together else None
            size = 1 + len(together)
            add(f"round-{r}/pretrain", rd / "pretrain", self._pretrain_step(r, size), group=pretrain_group)
            for variant in together:
                base = self.run_dir / "ablation" / variant
                run = self._ablation_pretrain_step(variant, size)
                add(f"ablation/{variant}/pretrain", base / "pretrain", run, group=pretrain_group)
            # ... and their evaluations run at the same time too, each in a process of its own
            eval_group = f"round-{r}/evaluate" if together else None
            add(f"round-{r}/eval", rd / "eval.json", self._eval_step(r, size), resumable=False, group=eval_group)
            for variant in together:
                base = self.run_dir / "ablation" / variant
                run = self._ablation_eval_step(variant, size)
                add(f"ablation/{variant}/eval", base / "eval.json", run, resumable=False, group=eval_group)
        return steps

    def placement(self, group_size: int, batch_size: int) -> Placement | None:
        """Where each training of a group of ``group_size`` run at once trains (None: in this process).

        The group shares the cores (``concurrent_training``): each training in a child process with
        its share of them, a lone training (MED_r) with all of them (a child process, because the CLI
        sets ``OMP_WAIT_POLICY=PASSIVE``, which costs a multi-threaded training 1.6x, and a child
        can busy-wait: :func:`~capfilt.bootstrap.backend.train_isolated`). A share may be split
        across data-parallel processes (``data_parallel``) of ``batch_size // processes`` samples.
        """
        at_once = min(group_size, self.slots)
        share = max(1, available_cores() // at_once)
        processes = data_parallel_processes(self.cfg.data_parallel, share, batch_size)
        if processes <= 1 and (self.slots <= 1 or share * at_once <= 1):
            return None  # concurrent_training off, or one core: in this process
        return Placement(processes=processes, threads=max(1, share // processes))

    def _corpus_step(self, staging: Path, resuming: bool) -> None:
        drawn = {"images", "human_images", "test_images", "seed", "noise", "size", "world"}
        self.backend.make_corpus(staging, **self.cfg.corpus.model_dump(include=drawn), progress=self.progress)

    # ---- training
    def _train(
        self,
        kind: str,
        settings: StepTraining,
        *,
        init: str,
        data: Path,
        seed: int,
        staging: Path,
        resuming: bool,
        group: int = 1,
    ) -> None:
        """Train ``kind`` on ``data`` into ``staging`` (continuing its newest checkpoint when resuming).

        The step's :class:`~capfilt.train.TrainingConfig` goes to the trainer as an object; its YAML
        is written next to the output (``bootstrap-train.yaml``) only as the record of what ran.
        ``group``: how many trainings run at the same time as this one's group (:meth:`placement`).
        """
        from model.train import list_checkpoints

        if init == "scratch":
            model = ModelSection(init=init, **self.cfg.model.model_dump())
        else:
            model = ModelSection(init=init)
        config = settings.training_config(
            model=model, data=data, out=staging, seed=seed, progress=self.progress
        )
        resume = resuming and bool(list_checkpoints(staging))
        if resuming and not resume:
            # Killed before the first checkpoint: nothing to continue, start this step afresh.
            for child in staging.iterdir():
                if child.name not in ("bootstrap-train.yaml", "data"):
                    remove_path(child)
        batch = config.train.batch_size
        where = self.placement(group, batch)
        written_by = checkpoint_processes(staging) if resume else None
        if written_by is not None and written_by != (where.processes if where else 1):
            # continue as the checkpoint was written (its data stream is split that way)
            if batch % written_by:
                raise UserError(f"{staging}: its checkpoint was written by {written_by} processes; "
                                f"batch_size {batch} does not split evenly across them")  # fmt: skip
            cores = where.processes * where.threads if where else 1
            where = Placement(processes=written_by, threads=max(1, cores // written_by))
        header = ""
        if where is not None and where.processes > 1:
            config = config.model_copy(
                update={"train": config.train.model_copy(update={"batch_size": batch // where.processes})}
            )
            header = (f"# data-parallel: {where.processes} processes; train.batch_size is each one's share "
                      f"of the batch of {batch}\n")  # fmt: skip
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write_text(staging / "bootstrap-train.yaml", header + dump(config))
        if where is None:
            self.backend.train(kind, config, resume)
        elif where.processes > 1:
            self.backend.train_isolated(kind, config, resume, where.threads, where.processes)
        else:  # its share of the cores grows when a training of its group ends first
            with self.cores.taken() as threads_file:
                self.backend.train_isolated(kind, config, resume, where.threads, 1, threads_file=threads_file)

    def _finetune_step(self, kind: str, r: int, i: int, group: int) -> Callable[[Path, bool], None]:
        settings = self.cfg.captioner if kind == "captioner" else self.cfg.filter

        def run(staging: Path, resuming: bool) -> None:
            self._train(
                kind,
                settings,
                init=str(self.model_dir(r - 1)),
                data=self.corpus.human,
                seed=settings.train.seed + 1000 * r + i,
                staging=staging,
                resuming=resuming,
                group=group,
            )

        return run

    def _pretrain_step(self, r: int, group: int = 1) -> Callable[[Path, bool], None]:
        """MED_r's pre-training; ``group``: how many trainings run at the same time as it (:meth:`placement`)."""

        def run(staging: Path, resuming: bool) -> None:
            data = staging / "data" / "pairs.parquet"
            if not data.is_file():
                write_pairs(self.pretrain_pairs(r), data, seed=self.cfg.pretrain.train.seed + r)
            init = "scratch" if r == 0 or self.cfg.from_scratch else str(self.model_dir(r - 1))
            captions = self.cfg.pretrain.round0_captions if r == 0 else None
            self._pretrain(data, init=init, staging=staging, resuming=resuming, group=group, captions=captions)

        return run

    def _pretrain(
        self,
        data: Path,
        *,
        init: str,
        staging: Path,
        resuming: bool,
        group: int = 1,
        captions: str | None = None,
    ) -> None:
        settings = self.cfg.pretrain
        if captions is not None:
            settings = settings.model_copy(update={"captions": captions})
        self._train(
            "pretrain",
            settings,
            init=init,
            data=data,
            seed=settings.train.seed,
            staging=staging,
            resuming=resuming,
            group=group,
        )

    def pretrain_pairs(self, r: int) -> Any:
        """D_r: human pairs + (round 0) raw web pairs or (round r) round r's kept pairs."""
        import pyarrow as pa

        parts = [human_pairs(self.corpus.human)]
        if r == 0:
            if self.cfg.pretrain.round0_web and self.corpus.web_pairs is not None:
                parts.append(web_pairs(self.corpus.web_pairs))
        else:
            parts.append(self.variant_pairs("capfilt", r))
        return pa.concat_tables(parts)

    def raw_is_round0(self) -> bool:
        """Whether MED_0 already is the ablation's raw variant (so it is not pre-trained twice).

        True when round 0 pre-trains from scratch on human + raw web pairs with the same settings
        as every later pre-training (``pretrain.round0_captions`` unset or equal to ``captions``):
        that is exactly the raw row's data and budget.
        """
        cfg = self.cfg
        same_items = cfg.pretrain.round0_captions in (None, cfg.pretrain.captions)
        return (
            cfg.from_scratch and cfg.pretrain.round0_web and same_items and self.corpus.web_pairs is not None
        )

    def ablation_variants_to_train(self) -> list[str]:
        """Variants with their own pre-training (capfilt is round 1's; raw may be round 0's)."""
        skip = {"capfilt"} | ({"raw"} if self.raw_is_round0() else set())
        return [v for v in ABLATION_VARIANTS if v not in skip]

    def variant_pairs(self, variant: str, r: int = 1) -> Any:
        """The web part of an ablation variant's data, cut from round ``r``'s pipeline output."""
        from capfilt.rundir.read import RunView

        pipeline_dir = self.round_dir(r) / "pipeline"
        capfilt = RunView(root=pipeline_dir, pipeline_dir=pipeline_dir).selection()
        if capfilt is None:  # the run writes its config first: without it the round is not a run
            raise UserError(f"{pipeline_dir / 'config.yaml'}: missing or not a pipeline config")
        return selected_pairs(pipeline_dir, variant_rules(capfilt)[variant])

    def _ablation_pretrain_step(self, variant: str, group: int) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            import pyarrow as pa

            data = staging / "data" / "pairs.parquet"
            if not data.is_file():
                write_pairs(
                    pa.concat_tables([human_pairs(self.corpus.human), self.variant_pairs(variant)]),
                    data,
                    seed=self.cfg.pretrain.train.seed + 1,
                )
            # Same budget and start as round 1's MED: only the data differs.
            init = "scratch" if self.cfg.from_scratch else str(self.model_dir(0))
            self._pretrain(data, init=init, staging=staging, resuming=resuming, group=group)

        return run

    # ---- pipeline
    def pipeline_config(self, r: int, urls: Path, out: Path) -> PipelineConfig:
        """Round ``r``'s PipelineConfig: the bootstrap's pipeline settings + this round's models."""
        p = self.cfg.pipeline
        c = self.cfg.corpus
        rd = self.round_dir(r)
        captioners = [
            str(rd / self.member_name("captioner", i) / "hf") for i in range(self.cfg.ensemble.captioners)
        ]
        filters = [str(rd / self.member_name("filter", i) / "hf") for i in range(self.cfg.ensemble.filters)]
        models = {"caption": captioners, "filter": filters}

        def stage(section: BaseModel, name: str) -> dict[str, Any]:
            data = section.model_dump(mode="json", exclude={"model", "models"})
            ids = models[name]
            return {**data, **({"model": ids[0]} if len(ids) == 1 else {"models": ids})}

        synthetic = c.synthetic
        keep_cols = ["noise_type", "noisy"] if synthetic else []
        download = p.download
        if self.corpus.served is not None and "127.0.0.1" not in download.allowed_hosts:
            # The corpus is served by capfilt.serve on 127.0.0.1 for the round: the address policy
            # blocks loopback by default, so the round's config opts in to that one address.
            download = download.model_copy(update={"allowed_hosts": [*download.allowed_hosts, "127.0.0.1"]})
        return PipelineConfig(
            input=InputConfig(
                path=str(urls),
                format="parquet",
                url_col="URL" if synthetic else c.url_col,
                text_col="TEXT" if synthetic else c.text_col,
                key_col="key" if synthetic else c.key_col,
                keep_cols=keep_cols,
            ),
            download=download,
            caption=CaptionConfig(**stage(p.caption, "caption")),
            filter=FilterConfig(**stage(p.filter, "filter")),
            select=p.select,
            output=OutputConfig(dir=str(out), rows_per_shard=p.output.rows_per_shard),
            ray=p.ray,
        )

    def _pipeline_step(self, r: int) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            if self.corpus.served is None:
                assert self.corpus.urls is not None
                self.backend.run_pipeline(self.pipeline_config(r, self.corpus.urls, staging))
                return
            from capfilt.synth import url_list

            with self.backend.serve_corpus(self.corpus.served, self.run_dir / ".serve_port") as base_url:
                # The port changes from run to run, so the list is rewritten whenever it is served.
                urls = url_list(self.corpus.served, base_url, self.run_dir / ".urls_served.parquet")
                self.backend.run_pipeline(self.pipeline_config(r, urls, staging))

        return run

    # ---- evaluation
    def eval_threads(self, group_size: int) -> int | None:
        """Threads of each evaluation in a group of ``group_size`` run at once (None: in this process)."""
        at_once = min(group_size, self.slots)
        return None if at_once <= 1 else max(1, available_cores() // at_once)

    def _evaluate(self, pretrain: Path, group: int = 1) -> dict[str, Any]:
        """The pre-trained model under ``pretrain`` on the test set, and the pairs it was trained on.

        ``group``: how many evaluations run at the same time; more than one, each runs in a
        process of its own with its share of the cores (:meth:`eval_threads`).
        """
        import pyarrow.parquet as pq

        pairs = pq.read_table(pretrain / "data" / "pairs.parquet", columns=["source"])
        settings = self.cfg.eval.model_dump()
        threads = self.eval_threads(group)
        if threads is None:
            result = self.backend.evaluate(pretrain / "model", self.corpus.test, **settings)
        else:
            result = self.backend.evaluate_isolated(pretrain / "model", self.corpus.test, threads, **settings)
        return {
            "model": str(pretrain / "model"),
            "data": {"pairs": pairs.num_rows, "by_source": count_sources(pairs)},
            "eval": result,
        }

    def _round_summaries(self, r: int) -> dict[str, Any]:
        """Round r's filter on the web noise labels, and what its CapFilt did (synthetic corpus only)."""
        if r == 0:
            return {"filter": None, "capfilt": None}
        files = samples_files(self.round_dir(r) / "pipeline")
        flt = self.cfg.pipeline.filter
        labels = self.corpus.web_labels
        judged = labels is not None and labels.is_file() and bool(files)
        return {
            "filter": filter_summary(files, threshold=flt.threshold, itc_weight=flt.itc_weight),
            "capfilt": (
                capfilt_summary(
                    files, labels, threshold=flt.threshold, itc_weight=flt.itc_weight,
                    min_agreement=self.cfg.pipeline.select.min_agreement,
                )  # fmt: skip
                if judged
                else None
            ),
        }

    def _eval_step(self, r: int, group: int = 1) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            result = {
                "round": r,
                **self._evaluate(self.round_dir(r) / "pretrain", group),
                **self._round_summaries(r),
            }
            _write_json(staging, result)
            # metrics.jsonl is rebuilt from every committed eval.json, so a rerun never duplicates rows.

        return run

    def _ablation_eval_step(self, variant: str, group: int) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            pretrain = self.run_dir / "ablation" / variant / "pretrain"
            _write_json(staging, {"variant": variant, **self._evaluate(pretrain, group)})

        return run


def _write_json(path: Path, result: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _check_config(run_dir: Path, cfg: BootstrapConfig) -> None:
    """Refuse to continue a run directory written with a config that changes its artifacts."""
    saved = run_dir / "config.yaml"
    new = cfg.model_dump(mode="json")
    if saved.is_file():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        strip = lambda d: {k: v for k, v in d.items() if k not in FREE_FIELDS}  # noqa: E731
        if strip(old) != strip(new):
            changed = sorted(
                k for k in set(old) | set(new) if k not in FREE_FIELDS and old.get(k) != new.get(k)
            )
            raise UserError(
                f"{run_dir}: holds a bootstrap run with a different config ({', '.join(changed)} changed); "
                "use another --out or delete it"
            )
    atomic_write_text(saved, dump(cfg))


def run_bootstrap(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    rounds: int | None = None,
    out: str | Path | None = None,
    ablation: bool = False,
    progress: bool = True,
    backend: Backend = REAL,
) -> Path:
    """Run (or resume) a bootstrap; returns the run directory.

    ``config_path`` None uses the embedded demo config. ``rounds``, ``out`` and ``ablation``
    override the config's ``rounds``, ``output.dir`` and ``ablation``. A rerun on the same
    directory skips committed steps; more rounds than last time extends the run. ``backend``
    does the heavy work (:mod:`capfilt.bootstrap.backend`; tests pass cheap fakes).
    """
    cfg = load_config(config_path, overrides)
    updates: dict[str, Any] = {}
    if rounds is not None:
        if rounds < 1:
            raise UserError(f"--rounds: must be at least 1, got {rounds}")
        updates["rounds"] = rounds
    if out is not None:
        updates["output"] = BootstrapOutput(dir=str(out))
    if ablation:
        updates["ablation"] = True
    cfg = cfg.model_copy(update=updates)
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out: {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, cfg)
    _check_inputs(cfg)

    boot = Bootstrap(cfg=cfg, run_dir=run_dir, progress=progress, backend=backend)
    steps = boot.steps(rounds=cfg.rounds, ablation=cfg.ablation)
    state = State(run_dir / STATE_FILE)
    started = time.perf_counter()
    print(
        f"capfilt bootstrap: {run_dir} ({cfg.rounds} round(s){', ablation' if cfg.ablation else ''}, "
        f"{len(steps)} steps)",
        flush=True,
    )

    def echo(text: str) -> None:
        print(text, flush=True)

    # Ray is started by each pipeline step (capfilt.pipeline.run), not here: an idle Ray would
    # take CPU from the training steps, and an already initialised Ray is joined as is.
    try:
        run_steps(steps, state, echo=echo, max_parallel=boot.slots)
    finally:
        if any(run_dir.glob("round-*/eval.json")):
            write_metrics(run_dir)
    total = time.perf_counter() - started
    print("\n" + step_table(steps, state), flush=True)
    print(f"bootstrap: {total:.1f}s this invocation; metrics: {run_dir / METRICS_FILE}", flush=True)
    last = max((int(p.parent.name.split("-")[1]) for p in run_dir.glob("round-*/eval.json")), default=0)
    if last > 0:
        summary = json.loads((boot.round_dir(last) / "eval.json").read_text(encoding="utf-8")).get("capfilt")
        if summary:
            print("\n" + summary_text(summary, last), flush=True)
    if cfg.ablation:
        path, table = write_ablation(run_dir, raw_from_round0=boot.raw_is_round0())
        print(f"\nablation (same pre-training budget, test set):\n{table}\n{path}", flush=True)
    report = backend.build_report(run_dir)
    if report is not None:
        print(f"report: {report}", flush=True)
    return run_dir


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Placement:
    """How one training runs outside the bootstrap's process (:meth:`Bootstrap.placement`)."""

    processes: int
    """data-parallel ranks (1: one process)"""
    threads: int
    """CPU threads of each"""


def data_parallel_processes(setting: int | str, cores: int, batch_size: int) -> int:
    """How many data-parallel processes a training with ``cores`` cores to itself uses (``data_parallel``).

    auto: on CPU the most processes, up to ``cores``, that split ``batch_size`` evenly with at least
    :data:`MIN_BATCH_PER_PROCESS` samples each (MED_r alone on 2 cores, batch 32: 2 processes of 16,
    1.5x the samples/s of one process: benchmarks/README.md, "Data-parallel pre-training"); with
    CUDA one (a GPU is not split between processes unless asked). N: N, which must divide the batch.
    """
    if setting == "auto":
        import torch

        if torch.cuda.is_available():
            return 1
        fits = [n for n in range(1, cores + 1) if batch_size % n == 0 and batch_size // n >= MIN_BATCH_PER_PROCESS]
        return max(fits, default=1)
    processes = int(setting)
    if batch_size % processes:
        raise UserError(f"data_parallel: {processes} processes do not split train.batch_size {batch_size} evenly")
    return processes


def checkpoint_processes(out: Path) -> int | None:
    """How many data-parallel processes wrote ``out``'s newest checkpoint (None: no readable one)."""
    from model.train import STATE_FILE as TRAINER_STATE
    from model.train import list_checkpoints

    found = list_checkpoints(out)
    if not found:
        return None
    try:
        return int(json.loads((found[-1] / TRAINER_STATE).read_text(encoding="utf-8"))["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_slots(setting: bool | str) -> int:
    """How many independent trainings may run at once for ``concurrent_training`` = ``setting``.

    False: one. True: two per core (a group of three on two cores runs all three with one thread
    each rather than two, then one on a half-idle machine; one-thread trainings that share a core
    cost memory, not speed), one on a single core. ``auto``: as True when training runs on CPU,
    else one (a GPU is not shared between trainings unless asked).
    """
    if setting is False:
        return 1
    if setting == "auto":
        import torch

        if torch.cuda.is_available():
            return 1
    cores = available_cores()
    return 2 * cores if cores > 1 else 1


def _check_inputs(cfg: BootstrapConfig) -> None:
    c = cfg.corpus
    if c.dir and not (Path(c.dir) / "urls.parquet").is_file():
        raise UserError(f"corpus.dir: {c.dir} is not a synth corpus (no urls.parquet); run `capfilt synth`")
    for name in ("human", "urls", "test", "web_pairs"):
        value = getattr(c, name)
        if value and not Path(value).exists():
            raise UserError(f"corpus.{name}: {value}: no such file or directory")


def variant_rules(capfilt: Any) -> dict[str, Any]:
    """Each ablation variant's selection rule, from the round's own CapFilt rule (a ``Selection``).

    raw: every web text, no caption; filter only: the web texts the filter keeps, no caption;
    captioner only: every web text and ``keep_synthetic`` captions with nothing of the filter (no
    ITM threshold, no agreement, which the filter computes); capfilt: the round's rule itself.
    """
    from dataclasses import replace

    return {
        "raw": replace(capfilt, threshold=None, keep_web=True, keep_synthetic=0),
        "filter": replace(capfilt, keep_web=True, keep_synthetic=0),
        "captioner": replace(
            capfilt, threshold=None, keep_web=True, min_agreement=None,
            rank_by="itm" if capfilt.rank_by == "agreement" else capfilt.rank_by,
        ),  # fmt: skip
        "capfilt": capfilt,
    }
