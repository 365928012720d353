"""``capfilt train {pretrain,captioner,filter}``: the config schema and :func:`run_training`.

The three kinds differ only in which MED losses they optimise (BLIP's recipe):

- ``pretrain``: ITC + ITM + LM on image-text pairs (e.g. a run's kept pairs + human pairs);
- ``captioner``: LM only, with the prompt "a picture of " prepended and masked (BLIP caption_coco);
- ``filter``: ITC + ITM (BLIP retrieval_coco; captions of one image are ITC positives).

A model starts from scratch (a preset; a WordPiece tokenizer is trained on the data's captions and
fixes the vocabulary and special ids), from a capfilt checkpoint or Hugging Face BLIP directory
(``model.init``), or from HF captioner/filter directories (``model.captioner`` / ``model.filter``).

Output directory layout (``output.dir``):

- ``config.yaml``: the resolved training config;
- ``tokenizer/``: the tokenizer trained on the data (``model.init: scratch`` only);
- ``checkpoints/step_XXXXXXXX/``: resumable checkpoints (``--resume`` continues the newest);
- ``metrics.jsonl``: one row per ``train.log_every`` steps;
- ``model/``: the final capfilt checkpoint (MED + tokenizer), loadable with ``model.hf.load_any``;
- ``hf/``: for captioner and filter, the Hugging Face BLIP export of the trained model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator

from capfilt.config import _Section, dump, load_model
from capfilt.errors import UserError
from model.data import AugmentConfig, DataConfig, Source, SourceSpec, build_loader, load_source
from model.losses import alpha_ramp
from model.med import MED, TRAINING_FIELDS, MEDConfig
from model.train import TrainConfig, Trainer, list_checkpoints

KINDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("itc", "itm", "lm"),
    "captioner": ("lm",),
    "filter": ("itc", "itm"),
}


class ScratchModel(_Section):
    """A model built from scratch: a MEDConfig preset and a WordPiece tokenizer trained on the data.

    ``capfilt bootstrap``'s ``model`` section is this (its round-0 model); ``capfilt train``'s
    ``model`` section extends it with the other ways to start (:class:`ModelSection`).
    """

    preset: str = Field(default="tiny", min_length=1, description="MEDConfig preset for init: scratch.")
    vocab_size: int = Field(default=4000, ge=16, description="WordPiece vocabulary size for init: scratch.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="MEDConfig fields changed for init: scratch, e.g. {queue_size: 512}; on a loaded "
        "model only the training fields (" + ", ".join(TRAINING_FIELDS) + ").",
    )


class ModelSection(ScratchModel):
    """Where the model starts."""

    init: str = Field(
        default="scratch",
        min_length=1,
        description="'scratch' (build model.preset, train a tokenizer on the data), or a capfilt "
        "checkpoint dir / Hugging Face BLIP dir.",
    )
    captioner: str | None = Field(default=None, description="HF BLIP captioner dir to import (with filter).")
    filter: str | None = Field(default=None, description="HF BLIP retrieval dir to import (with captioner).")

    @model_validator(mode="after")
    def _one_start(self) -> ModelSection:
        if (self.captioner or self.filter) and self.init != "scratch":
            raise ValueError("set either init or captioner/filter, not both")
        return self


class SourceSection(_Section):
    """One data source; the validated front of :class:`model.data.SourceSpec` (same fields)."""

    path: str = Field(min_length=1)
    format: Literal["auto", "webdataset", "parquet", "run"] = "auto"
    weight: float = Field(default=1.0, ge=0)
    captions: Literal["sample", "expand"] = Field(
        default="sample", description="Several captions per image: draw one per visit, or one item each."
    )

    def spec(self) -> SourceSpec:
        return SourceSpec(**self.model_dump())


class AugmentSection(_Section):
    """The validated front of :class:`model.data.AugmentConfig` (its fields but ``ratio``)."""

    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    randaugment_ops: int = Field(default=2, ge=0)
    randaugment_magnitude: int = Field(default=5, ge=0, le=10)
    hflip: bool = Field(default=False, description="Never applied to captions that say left or right.")

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentSection:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {list(self.scale)}")
        return self

    def config(self) -> AugmentConfig:
        return AugmentConfig(**self.model_dump())


TokenLimit = Annotated[int, Field(ge=4, description="Token limit per text (prompt included).")]
"""``data.max_length`` here and each bootstrap step's ``max_length``."""
LoaderWorkers = Annotated[int, Field(ge=0, description="DataLoader worker processes (0: in the trainer).")]
"""``data.num_workers`` here and each bootstrap step's ``num_workers``."""


class DataSection(_Section):
    sources: list[SourceSection] = Field(min_length=1)
    image_size: int | None = Field(default=None, ge=8, description="None: the model's image_size.")
    augment: AugmentSection = Field(default_factory=AugmentSection)
    max_length: TokenLimit = 35
    prompt: str | None = Field(
        default=None, description="None: the model's prompt for captioner, none otherwise."
    )
    num_workers: LoaderWorkers = 2


class OptimSection(_Section):
    lr: float = Field(default=1e-4, gt=0, description="BLIP: 3e-4 pre-training, 1e-5 fine-tuning.")
    min_lr: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accum: int = Field(default=1, ge=1)
    clip_grad_norm: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _min_below_lr(self) -> OptimSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds lr {self.lr}")
        return self


class TrainSection(_Section):
    """With :class:`OptimSection`, the validated front of :class:`model.train.TrainConfig`."""

    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(
        default=32, ge=1, description="Per process; the ITC queue must divide by the global batch."
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    deterministic: bool = False
    save_every: int = Field(default=500, ge=1)
    keep_last: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    alpha_ramp_steps: int | None = Field(
        default=None,
        ge=1,
        description="Steps of the linear ITC distillation ramp; None: one pass over the data.",
    )
    progress: bool = True


class OutputSection(_Section):
    dir: str = Field(min_length=1)


class TrainingConfig(_Section):
    """``capfilt train KIND CONFIG.yaml`` file."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection

    def trainer_config(self, kind: str) -> TrainConfig:
        """The trainer's config: ``optim`` and ``train`` as they are (``alpha_ramp_steps`` is the loss's)."""
        return TrainConfig(
            **self.optim.model_dump(),
            **self.train.model_dump(exclude={"alpha_ramp_steps"}),
            out_dir=Path(self.output.dir),
            ddp_find_unused_parameters=kind != "pretrain",  # LM-only / ITC+ITM steps leave heads unused
        )


def _load_sources(specs: list[SourceSpec]) -> list[Source]:
    sources = []
    for i, spec in enumerate(specs):
        try:
            sources.append(load_source(spec))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise UserError(f"data.sources[{i}].path: {err}") from None
    if sum(spec.weight for spec in specs) <= 0:
        raise UserError("data.sources: at least one source needs a weight > 0")
    return sources


def _scratch_tokenizer(sources: list[Source], vocab_size: int, directory: Path) -> Any:
    """Train a WordPiece tokenizer on every caption of the data.

    Under torchrun only rank 0 trains it (the trainer's vocabulary order could differ between
    processes); it is saved to ``output.dir/tokenizer`` and the other ranks load that copy.
    """
    from model.tokenizer import load_tokenizer, train_tokenizer

    rank, world_size, _ = Trainer._setup_distributed()
    if rank == 0:
        tokenizer = train_tokenizer((t for s in sources for t in s.all_texts()), vocab_size=vocab_size)
        tokenizer.save_pretrained(str(directory))
    if world_size > 1:
        torch.distributed.barrier()
        if rank != 0:
            tokenizer = load_tokenizer(directory)
    return tokenizer


def _build_model(cfg: TrainingConfig, sources: list[Source], resume_from: Path | None) -> tuple[MED, Any]:
    """The MED and its tokenizer: from the checkpoint being resumed, a pre-trained dir, or scratch."""
    from model.hf import import_hf, load_any
    from model.tokenizer import special_ids

    m = cfg.model
    try:
        if resume_from is not None:
            # The checkpoint holds the config and tokenizer of the interrupted run (a scratch
            # tokenizer is not retrained); the trainer then restores weights and optimizer.
            med, tokenizer = MED.load(resume_from)
        elif m.captioner or m.filter:
            med, tokenizer = import_hf(captioner=m.captioner, filter=m.filter)
        elif m.init != "scratch":
            med, tokenizer = load_any(m.init)
        else:
            tokenizer = _scratch_tokenizer(sources, m.vocab_size, Path(cfg.output.dir) / "tokenizer")
            changes = {**special_ids(tokenizer), **m.overrides}
            if cfg.data.image_size is not None and "image_size" not in m.overrides:
                changes["image_size"] = cfg.data.image_size
            config = MEDConfig.preset(m.preset).replace(**changes)
            torch.manual_seed(cfg.train.seed)
            med = MED(config)
    except TypeError as err:  # dataclasses.replace with an unknown field
        raise UserError(f"model.overrides: {err}") from None
    except (ValueError, OSError) as err:
        field = "model.init" if (m.init != "scratch" or resume_from) else "model"
        raise UserError(f"{field}: {err}") from None
    if tokenizer is None:
        raise UserError(f"model.init: {m.init} has no tokenizer (save one with the checkpoint)")
    if resume_from is None and m.overrides and (m.init != "scratch" or m.captioner or m.filter):
        med.config = _override_loaded(med.config, m.overrides)
    return med, tokenizer


def _override_loaded(config: MEDConfig, overrides: dict[str, Any]) -> MEDConfig:
    """``model.overrides`` on a loaded model: TRAINING_FIELDS change, any other field must already
    hold the loaded model's value (a config that built the model from scratch may be reused)."""
    try:
        changed = config.replace(**overrides)
    except (TypeError, ValueError) as err:  # an unknown field, an invalid value
        raise UserError(f"model.overrides: {err}") from None
    differ = sorted(
        f.name for f in dataclasses.fields(config)
        if f.name not in TRAINING_FIELDS and getattr(changed, f.name) != getattr(config, f.name)
    )  # fmt: skip
    if differ:
        raise UserError(
            f"model.overrides: {', '.join(differ)} differ from the loaded model's and cannot change it "
            f"(model.init or captioner/filter); only {', '.join(TRAINING_FIELDS)} can"
        )
    return changed


def _steps_per_epoch(
    sources: list[Source], data: DataSection, train: TrainSection, optim: OptimSection, world_size: int
) -> int:
    """Optimizer steps for one pass over the (weighted) data: BLIP ramps alpha over epoch 0."""
    items = sum(len(s) for s, spec in zip(sources, data.sources, strict=True) if spec.weight > 0)
    return max(1, math.ceil(items / (train.batch_size * optim.grad_accum * world_size)))


def _losses(kind: str) -> tuple[str, ...]:
    if kind not in KINDS:
        raise UserError(f"unknown training kind {kind!r}; choose one of {', '.join(KINDS)}")
    return KINDS[kind]


def run_training(
    kind: str, config_path: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: bool = False
) -> Path:
    """Train a MED as ``kind`` (pretrain | captioner | filter) from a YAML config; returns ``output.dir``.

    ``overrides`` are ``--set section.key=value`` strings. Raises :class:`UserError` (one line) for a
    bad config, an unknown ``--set`` key, a missing data path, a model that cannot be loaded, or an
    output directory holding checkpoints when ``resume`` is False.
    """
    _losses(kind)
    return train_model(kind, load_model(TrainingConfig, config_path, list(overrides)), resume=resume)


def train_model(
    kind: str, cfg: TrainingConfig, *, resume: bool = False, on_step: Callable[[int], None] | None = None
) -> Path:
    """Train a MED as ``kind`` from an already validated config (``capfilt bootstrap`` builds one).

    The same checks and :class:`UserError` as :func:`run_training`, less the YAML parsing.
    ``on_step(step)`` runs before each step (``capfilt bootstrap`` adjusts the thread count there:
    :func:`capfilt.bootstrap.backend.follow_threads`).
    """
    losses = _losses(kind)
    out_dir = Path(cfg.output.dir)
    existing = list_checkpoints(out_dir)
    if existing and not resume:
        raise UserError(
            f"output.dir: {out_dir} already holds checkpoints; pass --resume or choose another dir"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    specs = [source.spec() for source in cfg.data.sources]
    sources = _load_sources(specs)
    med, tokenizer = _build_model(cfg, sources, existing[-1] if existing else None)

    image_size = cfg.data.image_size or med.config.image_size
    if image_size != med.config.image_size:
        raise UserError(
            f"data.image_size: {image_size} differs from the model's image_size {med.config.image_size}"
        )
    global_batch = cfg.train.batch_size * world_size
    if "itc" in losses and med.config.queue_size % global_batch:
        raise UserError(
            f"train.batch_size: the global batch {global_batch} must divide the model's ITC queue_size "
            f"{med.config.queue_size}"
        )
    if cfg.data.max_length > med.config.max_position_embeddings:
        raise UserError(
            f"data.max_length: {cfg.data.max_length} exceeds the model's max_position_embeddings "
            f"{med.config.max_position_embeddings}"
        )
    prompt = (
        cfg.data.prompt
        if cfg.data.prompt is not None
        else (med.config.prompt if kind == "captioner" else None)
    )
    data_config = DataConfig(
        sources=specs,
        batch_size=cfg.train.batch_size,
        image_size=image_size,
        max_length=cfg.data.max_length,
        prompt=prompt,
        augment=cfg.data.augment.config(),
        train=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
    )

    def loader_fn(*, start: int, rank: int, world_size: int):
        return build_loader(
            data_config, tokenizer=tokenizer, sources=sources, start=start, rank=rank, world_size=world_size
        )

    ramp = cfg.train.alpha_ramp_steps or _steps_per_epoch(sources, cfg.data, cfg.train, cfg.optim, world_size)

    def step_fn(model: torch.nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        if on_step is not None:
            on_step(step)
        alpha = alpha_ramp(step, ramp, med.config.alpha) if "itc" in losses else None
        return model(
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            image_ids=batch["image_ids"],
            alpha=alpha,
            losses=losses,
            prompt_length=batch["prompt_length"],
        )

    def save_model_fn(model: torch.nn.Module, directory: Path) -> None:
        model.save(directory, tokenizer=tokenizer)

    trainer = Trainer(
        model=med,
        loader_fn=loader_fn,
        config=cfg.trainer_config(kind),
        step_fn=step_fn,
        save_model_fn=save_model_fn,
    )
    if trainer.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump(cfg), encoding="utf-8")
    trainer.fit(resume=resume)

    if trainer.is_main:
        med = trainer.module  # type: ignore[assignment]
        med.save(out_dir / "model", tokenizer=tokenizer)
        if kind in ("captioner", "filter"):
            from model.hf import export_captioner, export_filter

            export = export_captioner if kind == "captioner" else export_filter
            export(med, tokenizer, out_dir / "hf")
    if trainer.world_size > 1:
        torch.distributed.barrier()  # the other ranks wait for rank 0's final save and export
        torch.distributed.destroy_process_group()
    return out_dir
