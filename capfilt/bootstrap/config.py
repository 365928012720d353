"""The ``capfilt bootstrap`` config file: one pydantic section per YAML section, and the loader.

``capfilt/data/bootstrap_demo.yaml`` is the embedded default (``capfilt bootstrap`` with no CONFIG).
A training step's section (:class:`StepTraining`) holds the pieces of ``capfilt train``'s own
schema (:mod:`capfilt.train`) and builds the step's :class:`capfilt.train.TrainingConfig` object,
which the trainer takes as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from capfilt.config import (
    CaptionConfig,
    DownloadConfig,
    FilterConfig,
    RayConfig,
    SelectConfig,
    _Section,
    agreement_problem,
    load_model,
    load_model_text,
)
from capfilt.train import (
    AugmentSection,
    DataSection,
    LoaderWorkers,
    ModelSection,
    OptimSection,
    OutputSection,
    ScratchModel,
    SourceSection,
    TokenLimit,
    TrainingConfig,
    TrainSection,
)

MODEL_PLACEHOLDER = "(bootstrap)"
"""Stands for the captioner/filter a round trains; the user may not set pipeline models."""
DEFAULT_CONFIG = "bootstrap_demo.yaml"
MIN_BATCH_PER_PROCESS = 16
"""``data_parallel: auto`` splits a training no further than this many samples of the batch per process."""


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


class StepTraining(_Section):
    """One training step's settings: ``capfilt train``'s sections less the data and model to use.

    :meth:`training_config` adds those (the round's data, the model to start from) and gives the
    step's :class:`~capfilt.train.TrainingConfig`. ``num_workers`` is 0 here (2 in ``capfilt train``):
    the loader runs inside the training process.
    """

    train: TrainSection = Field(default_factory=TrainSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    max_length: TokenLimit = 35
    num_workers: LoaderWorkers = 0
    captions: Literal["expand", "sample"] = Field(
        default="expand",
        description=(
            "A row with several captions (a human image and its references): expand = one item per "
            "caption; sample = one item per image, one of its captions drawn per visit. Web and "
            "synthetic pairs are one caption per row either way."
        ),
    )

    def training_config(
        self, *, model: ModelSection, data: Path, out: Path, seed: int, progress: bool
    ) -> TrainingConfig:
        """The step's training config on ``data`` (Parquet), its captions taken as ``captions`` says."""
        return TrainingConfig(
            model=model,
            data=DataSection(
                sources=[SourceSection(path=str(data), format="parquet", captions=self.captions)],
                augment=self.augment,
                max_length=self.max_length,
                num_workers=self.num_workers,
            ),
            optim=self.optim,
            train=TrainSection.model_validate(
                {**self.train.model_dump(), "seed": seed, "progress": progress and self.train.progress}
            ),
            output=OutputSection(dir=str(out)),
        )


class PretrainStep(StepTraining):
    round0_web: bool = Field(
        default=True,
        description="Round 0 also pre-trains on the raw web pairs (BLIP's first model sees them).",
    )
    round0_captions: Literal["expand", "sample"] | None = Field(
        default=None,
        description=(
            "``captions`` for round 0 only (MED_0, which the captioners and filters start from); "
            "None: as ``captions``. When it differs, the ablation pre-trains its own raw row."
        ),
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

    download: DownloadConfig = Field(
        default_factory=DownloadConfig, description="As `capfilt run`'s; a served corpus adds 127.0.0.1."
    )
    caption: BootstrapCaption = Field(
        default_factory=BootstrapCaption, description="As `capfilt run`'s, less the model (the round's)."
    )
    filter: BootstrapFilter = Field(
        default_factory=BootstrapFilter, description="As `capfilt run`'s, less the model (the round's)."
    )
    select: SelectConfig = Field(default_factory=SelectConfig, description="As `capfilt run`'s.")
    output: PipelineOutput = Field(default_factory=PipelineOutput, description="The dir is the round's.")
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
    model: ScratchModel = Field(default_factory=ScratchModel)
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
    concurrent_training: bool | Literal["auto"] = Field(
        default="auto",
        description=(
            "Train independent models at the same time, each in its own process with a share of the "
            "cores (a round's captioners and filters; the ablation's pre-trainings). auto: when "
            "training runs on CPU (no CUDA device)."
        ),
    )
    data_parallel: int | Literal["auto"] = Field(
        default=1,
        description=(
            "Processes one training is split across (torch DistributedDataParallel: gloo on CPU, one "
            "GPU each with CUDA; the global batch stays the configured batch_size, split evenly). "
            "Every rank scores its pairs against the whole global batch for ITC and draws ITM hard "
            "negatives from it, so the split changes speed, not the loss. 1: off (on this 2-core "
            "machine one process with both cores is faster: benchmarks/README.md, \"Data-parallel "
            f"pre-training\"). auto: on CPU as many as the training's share of the cores while each keeps "
            f">= {MIN_BATCH_PER_PROCESS} samples of the batch; with CUDA 1. N: N (2 on a 2-GPU node)."
        ),
    )
    output: BootstrapOutput = Field(default_factory=BootstrapOutput)

    @field_validator("data_parallel")
    @classmethod
    def _processes_at_least_one(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) < 1:
            raise ValueError("data_parallel: 1 or more processes, or auto")
        return value

    @model_validator(mode="after")
    def _round0_web_needs_pairs(self) -> BootstrapConfig:
        if self.pretrain.round0_web and not self.corpus.synthetic and not self.corpus.web_pairs:
            raise ValueError(
                "pretrain.round0_web needs corpus.web_pairs (web images with texts) for a URL-list corpus"
            )
        # checked when the config loads, not only when round 1's pipeline config is built after training
        problem = agreement_problem(
            self.pipeline.select,
            captions_per_image=self.pipeline.caption.num_captions * self.ensemble.captioners,
            has_filter=True,
            prefix="pipeline.",
        )
        if problem:
            raise ValueError(problem)
        return self


FREE_FIELDS = {"rounds", "ablation", "output", "concurrent_training", "data_parallel"}
"""Fields that may change between a run and its rerun without changing what was written."""


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
