"""``capfilt bootstrap``: BLIP's CapFilt loop, round after round, resumable at step granularity.

::

    corpus -> round 0: pre-train MED_0 on human pairs (+ the raw web pairs)
           -> round r = 1..N: fine-tune captioner_r (LM) and filter_r (ITC+ITM) from MED_{r-1} on
              human pairs -> run the pipeline over the web URL list (the corpus is served on
              loopback) -> D_r = human + kept web + kept synthetic -> pre-train MED_r on D_r
              (from scratch, BLIP Table 13, or continuing MED_{r-1}) -> evaluate MED_r

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
import math
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from capfilt.config import (
    CaptionConfig,
    DownloadConfig,
    FilterConfig,
    InputConfig,
    OutputConfig,
    PipelineConfig,
    RayConfig,
    _Section,
    dump,
    load_model,
    load_model_text,
)
from capfilt.errors import UserError
from capfilt.train import AugmentSection, OptimSection, TrainSection

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
ABLATION_FILE = "ablation.json"
FAIL_AFTER_ENV = "CAPFILT_FAIL_AFTER_STEP"
"""Fault injection: crash right after the named step is committed (``round-1/filter``, or ``*``)."""
FAIL_DURING_ENV = "CAPFILT_FAIL_DURING_STEP"
"""Fault injection: crash after the named step did its work but before it is committed."""
MODEL_PLACEHOLDER = "(bootstrap)"
"""Stands for the captioner/filter a round trains; the user may not set pipeline models."""
ABLATION_VARIANTS: tuple[str, ...] = ("raw", "filter", "captioner", "capfilt")
"""BLIP Table 1's rows: no CapFilt, filter only, captioner only, captioner + filter."""
DEFAULT_CONFIG = "bootstrap_demo.yaml"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection variables, to test that a rerun recovers."""


# --------------------------------------------------------------------------- config schema


class CorpusSection(_Section):
    """The data: a synthetic corpus generated into RUN/corpus, or existing files.

    With ``dir`` or all of ``human``/``urls``/``test`` unset, a synthetic corpus is generated
    (``images``, ``human_images``, ``test_images``, ``seed``, ``noise``, ``size``) and served on
    127.0.0.1 while the pipeline downloads it. ``dir`` reuses a corpus made by ``capfilt synth``
    (served the same way). Otherwise ``urls`` is a LAION-style URL list that the pipeline
    downloads as is, ``human`` and ``test`` are Parquet files with ``image`` + ``captions``.
    """

    images: int = Field(default=400, ge=1, description="Synthetic web images (the noisy pairs).")
    human_images: int = Field(default=200, ge=1, description="Synthetic human-annotated images.")
    test_images: int = Field(default=100, ge=1, description="Synthetic held-out test images.")
    seed: int = 0
    noise: float = Field(default=0.4, ge=0, le=1, description="Share of noisy synthetic web texts.")
    size: int = Field(default=64, ge=16, description="Synthetic image side in pixels.")
    world: str = Field(
        default="standard", description="Synthetic world preset (capfilt.synth.WORLDS): standard or demo."
    )
    dir: str | None = Field(default=None, description="An existing `capfilt synth` corpus directory.")
    human: str | None = Field(default=None, description="Human pairs Parquet: image, captions.")
    urls: str | None = Field(default=None, description="Web URL list (Parquet with url_col, text_col).")
    test: str | None = Field(default=None, description="Held-out test Parquet: image, captions.")
    web_pairs: str | None = Field(
        default=None, description="Raw web pairs with image bytes (image, text) for round 0's pre-training."
    )
    url_col: str = "URL"
    text_col: str = "TEXT"
    key_col: str | None = Field(default=None, description="URL-list column used as sample key.")

    @model_validator(mode="after")
    def _one_kind(self) -> CorpusSection:
        given = [name for name in ("human", "urls", "test") if getattr(self, name)]
        if given and len(given) < 3:
            missing = sorted({"human", "urls", "test"} - set(given))
            raise ValueError(f"with existing files give human, urls and test (missing: {', '.join(missing)})")
        if given and self.dir:
            raise ValueError("give either dir (a synth corpus) or human/urls/test files, not both")
        return self

    @property
    def synthetic(self) -> bool:
        """Whether the corpus is a synth corpus (generated or ``dir``), served on loopback."""
        return not self.urls


class ModelInit(_Section):
    """The round-0 model: built from a preset, tokenizer trained on the round's texts."""

    preset: str = Field(default="tiny", min_length=1)
    vocab_size: int = Field(default=4000, ge=16)
    overrides: dict[str, Any] = Field(default_factory=dict, description="MEDConfig fields to change.")


class StepTraining(_Section):
    """One training step's settings (the pieces of ``capfilt train``'s own schema)."""

    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    max_length: int = Field(default=35, ge=4)
    num_workers: int = Field(default=0, ge=0)


class PretrainStep(StepTraining):
    round0_web: bool = Field(
        default=True,
        description="Round 0 also pre-trains on the raw web pairs (BLIP's first model sees them).",
    )


def _rounds_own_model(value: Any) -> Any:
    """Pipeline models are the round's own captioner/filter: a user-set model is an error."""
    if value not in (MODEL_PLACEHOLDER, []):
        raise ValueError("set by bootstrap to the round's own model(s); remove it")
    return value


class BootstrapCaption(CaptionConfig):
    model: str | None = MODEL_PLACEHOLDER
    _own_model = field_validator("model", "models")(_rounds_own_model)


class BootstrapFilter(FilterConfig):
    model: str | None = MODEL_PLACEHOLDER
    _own_model = field_validator("model", "models")(_rounds_own_model)


class PipelineOutput(_Section):
    rows_per_shard: int = Field(default=10_000, ge=1)


class PipelineSection(_Section):
    """Pipeline settings merged into each round's PipelineConfig (models and paths are filled in)."""

    download: DownloadConfig = Field(default_factory=DownloadConfig)
    caption: BootstrapCaption = Field(default_factory=BootstrapCaption)
    filter: BootstrapFilter = Field(default_factory=BootstrapFilter)
    output: PipelineOutput = Field(default_factory=PipelineOutput)
    ray: RayConfig = Field(default_factory=RayConfig)


class EvalSection(_Section):
    """How each MED_r is evaluated on the test set (see ``capfilt eval``)."""

    limit: int | None = Field(default=None, ge=1, description="First N test images; None: all.")
    k_test: int = Field(default=128, ge=1, description="Candidates re-ranked by ITM per query.")
    batch_size: int = Field(default=64, ge=1)
    num_beams: int = Field(default=3, ge=1)
    max_length: int = Field(default=20, ge=1)
    min_length: int = Field(default=5, ge=0)
    prompt: str = Field(default="", description="Caption prompt; pre-training uses none, so none by default.")


class EnsembleSection(_Section):
    captioners: int = Field(default=1, ge=1, description="Captioners per round (different seeds).")
    filters: int = Field(default=1, ge=1, description="Filters per round; their ITM scores are averaged.")


class BootstrapOutput(_Section):
    dir: str = Field(default="runs/bootstrap", min_length=1)


class BootstrapConfig(_Section):
    """A ``capfilt bootstrap`` config file (pipelines/bootstrap_demo.yaml is the embedded default)."""

    corpus: CorpusSection = Field(default_factory=CorpusSection)
    model: ModelInit = Field(default_factory=ModelInit)
    pretrain: PretrainStep = Field(default_factory=PretrainStep)
    captioner: StepTraining = Field(default_factory=StepTraining)
    filter: StepTraining = Field(default_factory=StepTraining)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    rounds: int = Field(default=1, ge=1)
    from_scratch: bool = Field(
        default=True, description="Pre-train MED_r from scratch (BLIP Table 13) or continue."
    )
    ensemble: EnsembleSection = Field(default_factory=EnsembleSection)
    ablation: bool = False
    output: BootstrapOutput = Field(default_factory=BootstrapOutput)

    @model_validator(mode="after")
    def _round0_web_needs_pairs(self) -> BootstrapConfig:
        if self.pretrain.round0_web and not self.corpus.synthetic and not self.corpus.web_pairs:
            raise ValueError(
                "pretrain.round0_web needs corpus.web_pairs (web images with texts) for a URL-list corpus"
            )
        return self


# Fields that may change between a run and its rerun without changing what was written.
_FREE_FIELDS = {"rounds", "ablation", "output"}


def default_config_text() -> str:
    """The embedded demo config (``capfilt/data/bootstrap_demo.yaml``)."""
    return resources.files("capfilt").joinpath("data", DEFAULT_CONFIG).read_text(encoding="utf-8")


def load_config(config_path: str | Path | None, overrides: Sequence[str] = ()) -> BootstrapConfig:
    """The bootstrap config from a file (or the embedded default) with ``--set`` overrides."""
    if config_path is None:
        return load_model_text(
            BootstrapConfig, default_config_text(), source=f"<embedded {DEFAULT_CONFIG}>", overrides=overrides
        )
    return load_model(BootstrapConfig, config_path, overrides)


# --------------------------------------------------------------------------- state machine


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True, kw_only=True)
class Step:
    """One unit of work: ``run(staging, resuming)`` writes the artifact at ``staging``.

    ``target`` is where the artifact lives once committed (a directory or a file). With
    ``resumable`` a leftover staging path from an interrupted run is handed back to ``run``
    (``resuming=True``), which continues it; otherwise it is deleted and the step starts over.
    """

    name: str
    target: Path
    run: Callable[[Path, bool], None]
    resumable: bool = False

    @property
    def staging(self) -> Path:
        return self.target.with_name(f".{self.target.name}.partial")


class State:
    """``RUN/state.json``: which steps are committed and how long each took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: not valid JSON ({err.msg}); delete it to start over") from None
            self.steps = dict(data.get("steps", {}))

    def done(self, name: str) -> bool:
        return bool(self.steps.get(name, {}).get("done"))

    def mark(self, name: str, seconds: float | None) -> None:
        self.steps[name] = {
            "done": True,
            "seconds": None if seconds is None else round(seconds, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _atomic_write(self.path, json.dumps({"version": 1, "steps": self.steps}, indent=2) + "\n")


def _fault(variable: str, name: str) -> None:
    wanted = os.environ.get(variable)
    if wanted and wanted in (name, "*"):
        raise InjectedFault(f"{variable}={wanted}: injected failure at step {name}")


def run_steps(
    steps: Sequence[Step], state: State, *, echo: Callable[[str], None] = print
) -> dict[str, float]:
    """Run the steps in order, skipping committed ones; returns seconds of the steps run now.

    A step counts as committed when state.json says so AND its artifact exists. An artifact that
    exists without a state entry was renamed into place just before a crash: renaming is the
    last thing a step does, so it is complete and only its state entry is written now.
    """
    ran: dict[str, float] = {}
    total = len(steps)
    for index, step in enumerate(steps, start=1):
        if step.target.exists():
            if not state.done(step.name):
                state.mark(step.name, None)
            echo(f"[{index}/{total}] {step.name}: done, skipped")
            continue
        staging = step.staging
        resuming = staging.exists() and step.resumable
        if staging.exists() and not resuming:
            _remove(staging)
        echo(f"\n=== [{index}/{total}] {step.name}{' (resuming)' if resuming else ''} ===")
        started = time.perf_counter()
        staging.parent.mkdir(parents=True, exist_ok=True)
        step.run(staging, resuming)
        if not staging.exists():
            raise RuntimeError(f"step {step.name} wrote nothing at {staging}")
        _fault(FAIL_DURING_ENV, step.name)
        os.replace(staging, step.target)
        seconds = time.perf_counter() - started
        state.mark(step.name, seconds)
        ran[step.name] = seconds
        echo(f"=== {step.name}: {seconds:.1f}s ===")
        _fault(FAIL_AFTER_ENV, step.name)
    return ran


# --------------------------------------------------------------------------- heavy work
# Module-level names so that unit tests can replace the expensive parts with cheap fakes.


def make_corpus(out: Path, **kwargs: Any) -> dict[str, Any]:
    from capfilt import synth

    return synth.make_corpus(out, **kwargs)


def run_training(kind: str, config_path: Path, overrides: Sequence[str] = (), resume: bool = False) -> Path:
    from capfilt import train

    return train.run_training(kind, config_path, list(overrides), resume=resume)


def run_pipeline(cfg: PipelineConfig) -> Path | None:
    from capfilt import pipeline

    return pipeline.run(cfg)


def evaluate(model_path: Path, data_path: Path, **kwargs: Any) -> dict[str, Any]:
    from capfilt import eval as evalmod

    return evalmod.evaluate(model_path, data_path, **kwargs)


@contextmanager
def serve_corpus(corpus_dir: Path, port_file: Path) -> Iterator[str]:
    """Serve a synth corpus on loopback; yields its base URL.

    The port is remembered in ``port_file`` and reused when free, so the URLs written into
    ``samples/*.parquet`` are the same before and after a resume (a taken port falls back to a
    fresh one; the samples then differ in their ``url`` host part only).
    """
    from capfilt.serve import serve_directory

    port = 0
    if port_file.is_file():
        try:
            port = int(port_file.read_text().strip())
        except ValueError:
            port = 0
    with ExitStack() as stack:
        try:
            base_url = stack.enter_context(serve_directory(corpus_dir, port=port))
        except UserError:  # the remembered port is taken now
            base_url = stack.enter_context(serve_directory(corpus_dir))
        _atomic_write(port_file, base_url.rsplit(":", 1)[1] + "\n")
        yield base_url


# --------------------------------------------------------------------------- data assembly

PAIRS_SCHEMA_NAMES = ("key", "image", "captions", "source")


def _pairs_table(keys: list[str], images: list[bytes], captions: list[list[str]], sources: list[str]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "key": pa.array(keys, type=pa.string()),
            "image": pa.array(images, type=pa.binary()),
            "captions": pa.array(captions, type=pa.list_(pa.string())),
            "source": pa.array(sources, type=pa.string()),
        }
    )


def _human_pairs(path: Path) -> Any:
    """Human rows (image + all reference captions), source ``human``."""
    import pyarrow.parquet as pq

    has_key = "key" in pq.read_schema(path).names
    data = pq.read_table(path, columns=(["key"] if has_key else []) + ["image", "captions"]).to_pydict()
    keys = [str(k) for k in data["key"]] if has_key else [f"human-{i}" for i in range(len(data["image"]))]
    captions = [[c for c in (caps or []) if c and c.strip()] for caps in data["captions"]]
    return _pairs_table(keys, data["image"], captions, ["human"] * len(keys))


def _web_pairs(path: Path) -> Any:
    """Raw web rows (image + web text, unfiltered), source ``web``."""
    import pyarrow.parquet as pq

    data = pq.read_table(path, columns=["key", "image", "text"]).to_pydict()
    rows = [
        (k, i, t) for k, i, t in zip(data["key"], data["image"], data["text"], strict=True) if t and t.strip()
    ]
    return _pairs_table(
        [str(r[0]) for r in rows], [r[1] for r in rows], [[r[2]] for r in rows], ["web"] * len(rows)
    )


def _tar_images(path: Path) -> dict[str, bytes]:
    """``key -> image bytes`` of one webdataset shard (json sidecars skipped)."""
    images: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and not member.name.endswith(".json"):
                handle = tar.extractfile(member)
                if handle is not None:
                    images[member.name.rsplit(".", 1)[0]] = handle.read()
    return images


def selected_pairs(
    pipeline_dir: Path, *, threshold: float | None, keep_web: bool, keep_synthetic: int
) -> Any:
    """Pairs a selection rule keeps from a pipeline run's samples, with their downloaded images.

    One row per kept text (a web text and a synthetic caption of the same image are two rows,
    as they are two pairs in BLIP's D); the rule is :func:`capfilt.stages.select.select_table`.
    """
    import pyarrow.parquet as pq

    from capfilt.stages import write as writer
    from capfilt.stages.select import select_table

    keys: list[str] = []
    images: list[bytes] = []
    captions: list[list[str]] = []
    sources: list[str] = []
    for shard in sorted(writer.committed_shards(pipeline_dir)):
        samples = select_table(
            pq.read_table(writer.samples_path(pipeline_dir, shard)),
            threshold=threshold, keep_web=keep_web, keep_synthetic=keep_synthetic,
        )  # fmt: skip
        tar = writer.images_path(pipeline_dir, shard)
        shard_images = _tar_images(tar) if tar.is_file() else {}
        for row in samples.select(
            ["key", "web_text", "web_kept", "synthetic_texts", "synthetic_kept"]
        ).to_pylist():
            texts = [(row["web_text"], "web")] if row["web_kept"] else []
            pairs = zip(row["synthetic_texts"] or [], row["synthetic_kept"] or [], strict=True)
            texts += [(text, "synthetic") for text, kept in pairs if kept]
            if not texts:
                continue
            image = shard_images.get(row["key"])
            if image is None:
                raise RuntimeError(f"{tar}: no image for kept sample {row['key']!r}")
            for text, source in texts:
                keys.append(row["key"])
                images.append(image)
                captions.append([text])
                sources.append(source)
    return _pairs_table(keys, images, captions, sources)


def _write_pairs(table: Any, path: Path, *, seed: int) -> None:
    """A pre-training pairs table, rows in a seeded random order, written atomically.

    The loader shuffles row groups, then rows inside a row group (reads stay local at scale), so a
    table written source by source (all human captions, then the web pairs) would give batches of
    one source, and human captions written image by image would put ~13 images x 5 captions in a
    batch of 64. Shuffling once here makes every row group, and so every batch, a random mix.
    """
    import numpy as np
    import pyarrow.parquet as pq

    order = np.random.default_rng(seed).permutation(table.num_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table.take(order), tmp, row_group_size=512)
    os.replace(tmp, path)


def _count_sources(table: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for source in table.column("source").to_pylist():
        counts[source] = counts.get(source, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- the bootstrap


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

    def __init__(self, *, cfg: BootstrapConfig, run_dir: Path, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
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
        cfg = self.cfg
        steps: list[Step] = []
        if cfg.corpus.synthetic and not cfg.corpus.dir:
            steps.append(Step(name="corpus", target=self.run_dir / "corpus", run=self._corpus_step))
        steps.append(
            Step(
                name="round-0/pretrain",
                target=self.round_dir(0) / "pretrain",
                run=self._pretrain_step(0),
                resumable=True,
            )
        )
        steps.append(
            Step(name="round-0/eval", target=self.round_dir(0) / "eval.json", run=self._eval_step(0))
        )
        for r in range(1, rounds + 1):
            rd = self.round_dir(r)
            for kind, count in (("captioner", cfg.ensemble.captioners), ("filter", cfg.ensemble.filters)):
                for i in range(count):
                    name = self.member_name(kind, i)
                    steps.append(
                        Step(
                            name=f"round-{r}/{name}",
                            target=rd / name,
                            run=self._finetune_step(kind, r, i),
                            resumable=True,
                        )
                    )
            steps.append(
                Step(
                    name=f"round-{r}/pipeline",
                    target=rd / "pipeline",
                    run=self._pipeline_step(r),
                    resumable=True,
                )
            )
            steps.append(
                Step(
                    name=f"round-{r}/pretrain",
                    target=rd / "pretrain",
                    run=self._pretrain_step(r),
                    resumable=True,
                )
            )
            steps.append(Step(name=f"round-{r}/eval", target=rd / "eval.json", run=self._eval_step(r)))
        if ablation:
            for variant in self.ablation_variants_to_train():
                base = self.run_dir / "ablation" / variant
                steps.append(
                    Step(
                        name=f"ablation/{variant}/pretrain",
                        target=base / "pretrain",
                        run=self._ablation_pretrain_step(variant),
                        resumable=True,
                    )
                )
                steps.append(
                    Step(
                        name=f"ablation/{variant}/eval",
                        target=base / "eval.json",
                        run=self._ablation_eval_step(variant),
                    )
                )
        return steps

    def _corpus_step(self, staging: Path, resuming: bool) -> None:
        c = self.cfg.corpus
        make_corpus(
            staging,
            images=c.images,
            seed=c.seed,
            noise=c.noise,
            size=c.size,
            world=c.world,
            human_images=c.human_images,
            test_images=c.test_images,
            progress=self.progress,
        )

    # ---- training
    def _training_yaml(
        self,
        kind: str,
        settings: StepTraining,
        *,
        init: str,
        sources: list[dict[str, Any]],
        out: Path,
        seed: int,
    ) -> dict[str, Any]:
        model: dict[str, Any] = {"init": init}
        if init == "scratch":
            m = self.cfg.model
            model.update(preset=m.preset, vocab_size=m.vocab_size, overrides=dict(m.overrides))
        train = settings.train.model_dump(mode="json")
        train["seed"] = seed
        train["progress"] = self.progress and train["progress"]
        return {
            "model": model,
            "data": {
                "sources": sources,
                "augment": settings.augment.model_dump(mode="json"),
                "max_length": settings.max_length,
                "num_workers": settings.num_workers,
            },
            "optim": settings.optim.model_dump(mode="json"),
            "train": train,
            "output": {"dir": str(out)},
        }

    def _train(self, kind: str, config: dict[str, Any], staging: Path, resuming: bool) -> None:
        from model.train import list_checkpoints

        staging.mkdir(parents=True, exist_ok=True)
        path = staging / "bootstrap-train.yaml"
        _atomic_write(path, yaml.safe_dump(config, sort_keys=False))
        resume = resuming and bool(list_checkpoints(staging))
        if resuming and not resume:
            # Killed before the first checkpoint: nothing to continue, start this step afresh.
            for child in staging.iterdir():
                if child.name not in ("bootstrap-train.yaml", "data"):
                    _remove(child)
        run_training(kind, path, resume=resume)

    def _finetune_step(self, kind: str, r: int, i: int) -> Callable[[Path, bool], None]:
        settings = self.cfg.captioner if kind == "captioner" else self.cfg.filter

        def run(staging: Path, resuming: bool) -> None:
            sources = [{"path": str(self.corpus.human), "format": "parquet", "captions": "expand"}]
            config = self._training_yaml(
                kind,
                settings,
                init=str(self.model_dir(r - 1)),
                sources=sources,
                out=staging,
                seed=settings.train.seed + 1000 * r + i,
            )
            self._train(kind, config, staging, resuming)

        return run

    def _pretrain_step(self, r: int) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            data = staging / "data" / "pairs.parquet"
            if not data.is_file():
                _write_pairs(self.pretrain_pairs(r), data, seed=self.cfg.pretrain.train.seed + r)
            init = "scratch" if r == 0 or self.cfg.from_scratch else str(self.model_dir(r - 1))
            self._pretrain(data, init=init, staging=staging, resuming=resuming)

        return run

    def _pretrain(self, data: Path, *, init: str, staging: Path, resuming: bool) -> None:
        sources = [{"path": str(data), "format": "parquet", "captions": "expand"}]
        config = self._training_yaml(
            "pretrain",
            self.cfg.pretrain,
            init=init,
            sources=sources,
            out=staging,
            seed=self.cfg.pretrain.train.seed,
        )
        self._train("pretrain", config, staging, resuming)

    def pretrain_pairs(self, r: int) -> Any:
        """D_r: human pairs + (round 0) raw web pairs or (round r) round r's kept pairs."""
        import pyarrow as pa

        parts = [_human_pairs(self.corpus.human)]
        if r == 0:
            if self.cfg.pretrain.round0_web and self.corpus.web_pairs is not None:
                parts.append(_web_pairs(self.corpus.web_pairs))
        else:
            parts.append(self.variant_pairs("capfilt", r))
        return pa.concat_tables(parts)

    def raw_is_round0(self) -> bool:
        """Whether MED_0 already is the ablation's raw variant (so it is not pre-trained twice).

        True when round 0 pre-trains from scratch on human + raw web pairs with the same settings
        as every later pre-training: that is exactly the raw row's data and budget.
        """
        cfg = self.cfg
        return cfg.from_scratch and cfg.pretrain.round0_web and self.corpus.web_pairs is not None

    def ablation_variants_to_train(self) -> list[str]:
        """Variants with their own pre-training (capfilt is round 1's; raw may be round 0's)."""
        skip = {"capfilt"} | ({"raw"} if self.raw_is_round0() else set())
        return [v for v in ABLATION_VARIANTS if v not in skip]

    def variant_pairs(self, variant: str, r: int = 1) -> Any:
        """The web part of an ablation variant's data, cut from round ``r``'s pipeline output."""
        flt = self.cfg.pipeline.filter
        k = flt.keep_synthetic
        rules = {
            "raw": {"threshold": None, "keep_web": True, "keep_synthetic": 0},
            "filter": {"threshold": flt.threshold, "keep_web": True, "keep_synthetic": 0},
            "captioner": {"threshold": None, "keep_web": True, "keep_synthetic": k},
            "capfilt": {"threshold": flt.threshold, "keep_web": flt.keep_web, "keep_synthetic": k},
        }
        return selected_pairs(self.round_dir(r) / "pipeline", **rules[variant])

    def _ablation_pretrain_step(self, variant: str) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            import pyarrow as pa

            data = staging / "data" / "pairs.parquet"
            if not data.is_file():
                _write_pairs(
                    pa.concat_tables([_human_pairs(self.corpus.human), self.variant_pairs(variant)]),
                    data,
                    seed=self.cfg.pretrain.train.seed + 1,
                )
            # Same budget and start as round 1's MED: only the data differs.
            init = "scratch" if self.cfg.from_scratch else str(self.model_dir(0))
            self._pretrain(data, init=init, staging=staging, resuming=resuming)

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
            output=OutputConfig(dir=str(out), rows_per_shard=p.output.rows_per_shard),
            ray=p.ray,
        )

    def _pipeline_step(self, r: int) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            if self.corpus.served is None:
                assert self.corpus.urls is not None
                run_pipeline(self.pipeline_config(r, self.corpus.urls, staging))
                return
            from capfilt.synth import url_list

            with serve_corpus(self.corpus.served, self.run_dir / ".serve_port") as base_url:
                # The port changes from run to run, so the list is rewritten whenever it is served.
                urls = url_list(self.corpus.served, base_url, self.run_dir / ".urls_served.parquet")
                run_pipeline(self.pipeline_config(r, urls, staging))

        return run

    # ---- evaluation
    def _evaluate_model(self, model: Path) -> dict[str, Any]:
        e = self.cfg.eval
        return evaluate(
            model,
            self.corpus.test,
            batch_size=e.batch_size,
            k_test=e.k_test,
            num_beams=e.num_beams,
            max_length=e.max_length,
            min_length=e.min_length,
            prompt=e.prompt,
            limit=e.limit,
        )

    def _filter_metrics(self, r: int) -> dict[str, Any] | None:
        """Round r's filter judged on the web noise labels, from the scores the pipeline stored."""
        import numpy as np
        import pyarrow.parquet as pq

        from capfilt.eval import filter_metrics
        from capfilt.stages import write as writer

        pipeline_dir = self.round_dir(r) / "pipeline"
        files = [writer.samples_path(pipeline_dir, s) for s in sorted(writer.committed_shards(pipeline_dir))]
        if not files:
            return None
        names = pq.read_schema(files[0]).names
        if not {"noisy", "noise_type"} <= set(names):
            return None
        rows = [
            row
            for f in files
            for row in pq.read_table(f, columns=["status", "web_itm", "noisy", "noise_type"]).to_pylist()
            if row["status"] == "ok" and row["web_itm"] is not None and not math.isnan(row["web_itm"])
        ]
        if not rows:
            return None
        return filter_metrics(
            np.array([r["web_itm"] for r in rows]),
            [bool(r["noisy"]) for r in rows],
            [r["noise_type"] for r in rows],
            threshold=self.cfg.pipeline.filter.threshold,
        )

    def _capfilt_summary(self, r: int) -> dict[str, Any] | None:
        """What round r's CapFilt did to the web pairs, judged on the synthetic corpus's own truth."""
        if self.corpus.web_labels is None or not self.corpus.web_labels.is_file():
            return None
        from capfilt.stages import write as writer

        pipeline_dir = self.round_dir(r) / "pipeline"
        files = [writer.samples_path(pipeline_dir, s) for s in sorted(writer.committed_shards(pipeline_dir))]
        if not files:
            return None
        return capfilt_summary(files, self.corpus.web_labels, threshold=self.cfg.pipeline.filter.threshold)

    def _eval_step(self, r: int) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            import pyarrow.parquet as pq

            pairs = pq.read_table(
                self.round_dir(r) / "pretrain" / "data" / "pairs.parquet", columns=["source"]
            )
            result = {
                "round": r,
                "model": str(self.model_dir(r)),
                "data": {"pairs": pairs.num_rows, "by_source": _count_sources(pairs)},
                "eval": self._evaluate_model(self.model_dir(r)),
                "filter": self._filter_metrics(r) if r > 0 else None,
                "capfilt": self._capfilt_summary(r) if r > 0 else None,
            }
            _atomic_write(staging, json.dumps(result, indent=2, default=_json_default) + "\n")
            # metrics.jsonl is rebuilt from every committed eval.json, so a rerun never duplicates rows.

        return run

    def _ablation_eval_step(self, variant: str) -> Callable[[Path, bool], None]:
        def run(staging: Path, resuming: bool) -> None:
            import pyarrow.parquet as pq

            base = self.run_dir / "ablation" / variant
            pairs = pq.read_table(base / "pretrain" / "data" / "pairs.parquet", columns=["source"])
            result = {
                "variant": variant,
                "model": str(base / "pretrain" / "model"),
                "data": {"pairs": pairs.num_rows, "by_source": _count_sources(pairs)},
                "eval": self._evaluate_model(base / "pretrain" / "model"),
            }
            _atomic_write(staging, json.dumps(result, indent=2, default=_json_default) + "\n")

        return run


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------- summaries


def capfilt_summary(samples_files: Sequence[Path], web_labels: Path, *, threshold: float) -> dict[str, Any]:
    """Round r's CapFilt judged against the truth a synthetic corpus knows about every web image.

    ``samples_files``: the round's pipeline ``samples/*.parquet``; ``web_labels``: the corpus's
    ``web.parquet`` (key, noise_type, objects). Reported, over the rows whose image was downloaded:

    - ``filter``: per noise type, how many web texts there were, the share the filter removed
      (its recall on that type; for ``clean`` the false-removal rate), its ROC-AUC against clean texts,
      and its precision on that type (removed texts of the type / removed texts of the type or clean);
    - ``captions``: the attribute check (:func:`capfilt.synth.check_caption`) on every synthetic
      caption, and the share of images with at least one caption that passes;
    - ``noise``: the share of noisy web texts before the filter, among the kept web texts, and in
      the kept web part of D_r (kept web texts + kept synthetic captions, a synthetic caption counting
      as noise when it fails the attribute check);
    - ``pairs``: web pairs before, web texts kept, synthetic captions added.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from capfilt.eval import roc_auc
    from capfilt.synth import check_caption

    labels = pq.read_table(web_labels, columns=["key", "noise_type", "objects"]).to_pylist()
    truth = {row["key"]: row for row in labels}
    columns = ["key", "status", "web_itm", "web_kept", "synthetic_texts", "synthetic_kept"]
    rows = [
        row
        for f in samples_files
        for row in pq.read_table(f, columns=columns).to_pylist()
        if row["status"] == "ok" and row["key"] in truth
    ]
    types = [truth[row["key"]]["noise_type"] for row in rows]
    scores = np.array([math.nan if row["web_itm"] is None else row["web_itm"] for row in rows], dtype=float)
    removed = np.array([not row["web_kept"] for row in rows], dtype=bool)
    type_arr = np.array(types, dtype=object)
    scored = ~np.isnan(scores)
    clean = (type_arr == "clean") & scored
    per_type: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(types)):
        mine = type_arr == kind
        entry: dict[str, Any] = {
            "count": int(mine.sum()),
            "removed": float(removed[mine].mean()) if mine.any() else None,
        }
        if kind != "clean":
            true_removed = int((removed & mine).sum())
            false_removed = int((removed & (type_arr == "clean")).sum())
            entry["recall"] = entry["removed"]
            entry["precision"] = (
                true_removed / (true_removed + false_removed) if true_removed + false_removed else None
            )
            entry["auc"] = roc_auc(scores[clean], scores[mine & scored])
        per_type[kind] = entry

    captions_total = captions_right = images_with_right = images_captioned = 0
    kept_synth = kept_synth_wrong = 0
    for row in rows:
        objects = truth[row["key"]]["objects"]
        texts = row["synthetic_texts"] or []
        kept = row["synthetic_kept"] or [False] * len(texts)
        right = [check_caption(text, objects) for text in texts]
        captions_total += len(texts)
        captions_right += sum(right)
        if texts:
            images_captioned += 1
            images_with_right += any(right)
        for ok, keep in zip(right, kept, strict=True):
            if keep:
                kept_synth += 1
                kept_synth_wrong += not ok
    noisy = type_arr != "clean"
    kept_web = ~removed
    n_web, n_kept_web = len(rows), int(kept_web.sum())
    kept_web_noisy = int((kept_web & noisy).sum())

    def share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    return {
        "threshold": float(threshold),
        "filter": {"by_type": per_type, "auc": roc_auc(scores[clean], scores[noisy & scored])},
        "captions": {
            "captions": captions_total,
            "attribute_check": share(captions_right, captions_total),
            "images": images_captioned,
            "images_with_a_right_caption": share(images_with_right, images_captioned),
        },
        "noise": {
            "raw_web": share(int(noisy.sum()), n_web),
            "kept_web_texts": share(kept_web_noisy, n_kept_web),
            "kept_synthetic_wrong": share(kept_synth_wrong, kept_synth),
            "kept_set": share(kept_web_noisy + kept_synth_wrong, n_kept_web + kept_synth),
        },
        "pairs": {
            "raw_web": n_web,
            "kept_web": n_kept_web,
            "synthetic_added": kept_synth,
            "kept_set": n_kept_web + kept_synth,
        },
    }


def _pct_text(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _auc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def summary_text(summary: dict[str, Any], r: int = 1) -> str:
    """The plain-words account of :func:`capfilt_summary` that ``capfilt bootstrap`` prints."""
    flt, caps, noise, pairs = summary["filter"], summary["captions"], summary["noise"], summary["pairs"]
    by_type = flt["by_type"]
    lines = [
        f"What CapFilt did in round {r}, checked against the synthetic corpus's ground truth:",
        f"  The filter (ITM score < {summary['threshold']:g} removes a web text) — ROC-AUC: 0.5 is a coin flip, 1.0 "
        "ranks every correct text above every noisy one:",
    ]
    names = {
        "junk": "junk (file names, shop slogans)",
        "mismatched": "mismatched (another image's text)",
        "wrong_attribute": "wrong attribute (one colour or shape wrong)",
    }
    for kind in ("junk", "mismatched", "wrong_attribute"):
        if kind in by_type:
            e = by_type[kind]
            lines.append(
                f"    {names[kind]:<44} ROC-AUC {_auc_text(e.get('auc'))}, removed {_pct_text(e.get('recall'))} "
                f"(recall), precision {_pct_text(e.get('precision'))}, n={e['count']}"
            )
    if "clean" in by_type:
        lines.append(
            f"    {'correct web texts':<44} removed {_pct_text(by_type['clean'].get('removed'))} by mistake, "
            f"n={by_type['clean']['count']}"
        )
    lines += [
        f"  The captioner: {_pct_text(caps['attribute_check'])} of its {caps['captions']:,} synthetic captions name "
        f"every object's colour and shape correctly (attribute check); {_pct_text(caps['images_with_a_right_caption'])} "
        f"of {caps['images']:,} web images got at least one such caption.",
        f"  Noise: {_pct_text(noise['raw_web'])} of the raw web texts are wrong; after CapFilt "
        f"{_pct_text(noise['kept_set'])} of the kept web pairs are (kept web texts {_pct_text(noise['kept_web_texts'])}, "
        f"kept synthetic captions {_pct_text(noise['kept_synthetic_wrong'])}).",
        f"  Pairs: {pairs['raw_web']:,} raw web pairs -> {pairs['kept_web']:,} web texts kept + "
        f"{pairs['synthetic_added']:,} synthetic captions added = {pairs['kept_set']:,}.",
    ]
    return "\n".join(lines)


def metrics_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat, numeric summary of one eval.json (a metrics.jsonl row / an ablation table row)."""
    ev = result.get("eval") or {}
    retrieval = ev.get("retrieval") or {}
    captioning = ev.get("captioning") or {}
    flt = result.get("filter") or {}
    by_source = (result.get("data") or {}).get("by_source") or {}
    row: dict[str, Any] = {}
    if "round" in result:
        row["round"] = result["round"]
    if "variant" in result:
        row["variant"] = result["variant"]
    row.update(
        txt_r1=retrieval.get("txt_r1"), img_r1=retrieval.get("img_r1"),
        txt_r5=retrieval.get("txt_r5"), img_r5=retrieval.get("img_r5"),
        cider=captioning.get("cider"), bleu_4=captioning.get("bleu_4"),
        attribute_accuracy=captioning.get("attribute_accuracy"),
        filter_auc=flt.get("auc"), filter_precision=flt.get("precision"), filter_recall=flt.get("recall"),
        pairs=(result.get("data") or {}).get("pairs"),
        web_pairs=by_source.get("web", 0), synthetic_pairs=by_source.get("synthetic", 0),
        human_pairs=by_source.get("human", 0),
    )  # fmt: skip
    return {k: v for k, v in row.items() if v is not None}


def write_metrics(run_dir: Path) -> Path:
    """Rebuild ``metrics.jsonl`` (one row per evaluated round) from the committed eval.json files."""
    rows = []
    for path in sorted(run_dir.glob("round-*/eval.json"), key=lambda p: int(p.parent.name.split("-")[1])):
        rows.append(metrics_row(json.loads(path.read_text(encoding="utf-8"))))
    target = run_dir / METRICS_FILE
    _atomic_write(target, "".join(json.dumps(row) + "\n" for row in rows))
    return target


_ABLATION_LABELS = {
    "raw": "raw web + human (no CapFilt)",
    "filter": "filter only",
    "captioner": "captioner only",
    "capfilt": "captioner + filter (CapFilt)",
}


def write_ablation(run_dir: Path, *, raw_from_round0: bool = False) -> tuple[Path, str]:
    """``ablation.json`` and the printed table (TR@1, IR@1, CIDEr) from the variants' eval.json.

    ``raw_from_round0``: the raw row is MED_0's evaluation (see :meth:`Bootstrap.raw_is_round0`).
    """
    rows = []
    for variant in ABLATION_VARIANTS:
        if variant == "capfilt":
            path = run_dir / "round-1" / "eval.json"
        elif variant == "raw" and raw_from_round0:
            path = run_dir / "round-0" / "eval.json"
        else:
            path = run_dir / "ablation" / variant / "eval.json"
        result = json.loads(path.read_text(encoding="utf-8"))
        row = metrics_row({**result, "variant": variant, "filter": None})
        row.pop("round", None)
        rows.append(row)
    _atomic_write(run_dir / ABLATION_FILE, json.dumps({"variants": rows}, indent=2) + "\n")

    def cell(value: Any, scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.1f}"

    lines = [f"{'pre-training data':<32} {'pairs':>7} {'TR@1':>6} {'IR@1':>6} {'CIDEr':>6}"]
    for row in rows:
        lines.append(
            f"{_ABLATION_LABELS[row['variant']]:<32} {row.get('pairs', 0):>7} {cell(row.get('txt_r1')):>6} "
            f"{cell(row.get('img_r1')):>6} {cell(row.get('cider'), 100):>6}"
        )
    return run_dir / ABLATION_FILE, "\n".join(lines)


def _check_config(run_dir: Path, cfg: BootstrapConfig) -> None:
    """Refuse to continue a run directory written with a config that changes its artifacts."""
    saved = run_dir / "config.yaml"
    new = cfg.model_dump(mode="json")
    if saved.is_file():
        old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        strip = lambda d: {k: v for k, v in d.items() if k not in _FREE_FIELDS}  # noqa: E731
        if strip(old) != strip(new):
            changed = sorted(
                k for k in set(old) | set(new) if k not in _FREE_FIELDS and old.get(k) != new.get(k)
            )
            raise UserError(
                f"{run_dir}: holds a bootstrap run with a different config ({', '.join(changed)} changed); "
                "use another --out or delete it"
            )
    _atomic_write(saved, dump(cfg))


def run_bootstrap(
    config_path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    rounds: int | None = None,
    out: str | Path | None = None,
    ablation: bool = False,
    progress: bool = True,
) -> Path:
    """Run (or resume) a bootstrap; returns the run directory.

    ``config_path`` None uses the embedded demo config. ``rounds``, ``out`` and ``ablation``
    override the config's ``rounds``, ``output.dir`` and ``ablation``. A rerun on the same
    directory skips committed steps; more rounds than last time extends the run.
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

    boot = Bootstrap(cfg=cfg, run_dir=run_dir, progress=progress)
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
        run_steps(steps, state, echo=echo)
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
    report = _build_report(run_dir)
    if report is not None:
        print(f"report: {report}", flush=True)
    return run_dir


def step_table(steps: Sequence[Step], state: State) -> str:
    """Seconds per step as recorded in state.json (``-`` for steps committed by an older run)."""
    lines = [f"{'step':<28} {'seconds':>8}"]
    total = 0.0
    for step in steps:
        seconds = state.steps.get(step.name, {}).get("seconds")
        total += seconds or 0.0
        lines.append(f"{step.name:<28} {'-' if seconds is None else f'{seconds:.1f}':>8}")
    lines.append(f"{'total':<28} {total:>8.1f}")
    return "\n".join(lines)


def _check_inputs(cfg: BootstrapConfig) -> None:
    c = cfg.corpus
    if c.dir and not (Path(c.dir) / "urls.parquet").is_file():
        raise UserError(f"corpus.dir: {c.dir} is not a synth corpus (no urls.parquet); run `capfilt synth`")
    for name in ("human", "urls", "test", "web_pairs"):
        value = getattr(c, name)
        if value and not Path(value).exists():
            raise UserError(f"corpus.{name}: {value}: no such file or directory")


def _build_report(run_dir: Path) -> Path | None:
    """The HTML report of the last round with pipeline output (None when none has any yet)."""
    try:
        from capfilt.report import build_report
    except ImportError:
        return None
    if not any(run_dir.glob("round-*/pipeline")):
        return None
    return build_report(run_dir)


__all__ = [
    "ABLATION_VARIANTS",
    "Bootstrap",
    "BootstrapConfig",
    "InjectedFault",
    "State",
    "Step",
    "load_config",
    "run_bootstrap",
    "run_steps",
    "selected_pairs",
    "write_metrics",
]
