"""A training loop that knows nothing about the model (open_clip style).

The model (or a ``step_fn`` around it) returns a dict of named losses; the trainer sums them,
back-propagates, steps AdamW, and does the bookkeeping every run needs: warm-up + cosine learning
rate, gradient accumulation and clipping, mixed precision on GPU, DDP under ``torchrun``, a progress
bar and ``metrics.jsonl``, and resumable checkpoints.

Resuming continues the *same* trajectory: a checkpoint holds the weights, the optimizer state, the
GradScaler state, every RNG (torch CPU/CUDA, python, numpy) and the step; the data stream is
position-addressed (``loader_fn(start=...)``), so ``N`` steps, stop, resume, ``N`` more steps equals
``2N`` uninterrupted steps on CPU in deterministic mode. Checkpoints are safetensors + JSON only (no
pickle): optimizer tensors are flattened into a safetensors file, the rest goes to JSON. The
learning-rate schedule is a pure function of the step, so its state is the step counter.

Weight decay follows BLIP: AdamW with weight decay on every trainable parameter (biases and
LayerNorms included), ``0.05`` by default.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

StepFn = Callable[[nn.Module, dict[str, Any], int], dict[str, torch.Tensor]]
"""``step_fn(model, batch, step) -> {"loss_x": scalar tensor, ...}``; the trainer sums the values."""

LoaderFn = Callable[..., Iterable[dict[str, Any]]]
"""``loader_fn(*, start, rank, world_size)`` -> batches for this rank from its micro-batch ``start`` on."""

SaveModelFn = Callable[[nn.Module, Path], None]
"""``save_model_fn(model, directory)`` must write ``directory/model.safetensors`` (plus anything else)."""

CHECKPOINT_PREFIX = "step_"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer.json"


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping for one run. BLIP values are noted where they differ."""

    steps: int  # optimizer updates in the whole run (the cosine schedule spans them)
    out_dir: str | Path  # checkpoints/, metrics.jsonl
    batch_size: int = 32  # per-process micro-batch; informational (the loader builds batches)
    lr: float = 1e-4  # BLIP: 3e-4 pre-training, 1e-5 captioning/retrieval fine-tuning
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.05  # BLIP, applied to all trainable parameters
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0 to lr (BLIP pre-training: 3000)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_accum: int = 1  # micro-batches per update
    clip_grad_norm: float | None = None  # max global grad norm; None: no clipping (as BLIP)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype on GPU; CPU always fp32
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (needed for exact resume on GPU)
    save_every: int = 1000  # steps between checkpoints (the last step is always saved)
    keep_last: int = 2  # checkpoints kept; older ones are deleted
    log_every: int = 10  # steps between metrics.jsonl rows
    progress: bool = True  # tqdm bar on rank 0
    ddp_find_unused_parameters: bool = True  # a captioner step leaves the ITC/ITM heads unused

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps > 0,
            "batch_size": self.batch_size > 0,
            "lr": self.lr > 0,
            "min_lr": 0 <= self.min_lr <= self.lr,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "grad_accum": self.grad_accum > 0,
            "clip_grad_norm": self.clip_grad_norm is None or self.clip_grad_norm > 0,
            "save_every": self.save_every > 0,
            "keep_last": self.keep_last > 0,
            "log_every": self.log_every > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig value for {bad[0]}: {getattr(self, bad[0])!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_step_fn(model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
    """Calls ``model(**batch)``; the model returns its dict of losses."""
    return model(**batch)


def default_save_model(model: nn.Module, directory: Path) -> None:
    """The model's own ``save(dir)`` when it has one (MED), else safetensors ``save_model``."""
    save = getattr(model, "save", None)
    if callable(save):
        save(directory)
    else:
        save_model(model, str(directory / WEIGHTS_FILE))


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _batch_size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first (temp dirs are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


# ---- state (de)serialisation: tensors to safetensors, everything else to JSON ----------------


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{param_id}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        kind, param_id, name = key.split("/", 2)
        if kind == "optimizer":
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    meta = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_internal, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Trains ``model`` on batches from ``loader_fn`` by minimising the sum of ``step_fn``'s losses.

    ``step_fn(model, batch, step)`` defaults to ``model(**batch)``. ``save_model_fn(model, dir)``
    defaults to the model's own ``save`` or safetensors; it must write ``dir/model.safetensors``,
    which is what resuming loads. Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is
    initialised here, the model is wrapped in DDP and each rank reads its own share of the stream.
    """

    fused_optimizer = True
    """AdamW as one fused kernel on CPU and CUDA; False: torch's default, on CPU a Python loop over
    the tensors (the demo MED's ~180: 12.8 ms a step against 2.3 ms; ``benchmarks/train_speed.py``)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        loader_fn: LoaderFn,
        config: TrainConfig,
        step_fn: StepFn | None = None,
        save_model_fn: SaveModelFn | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.loader_fn = loader_fn
        self.step_fn = step_fn or default_step_fn
        self.save_model_fn = save_model_fn or default_save_model
        self.out_dir = Path(config.out_dir)
        self.rank, self.world_size, local_rank = self._setup_distributed()
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.module = model.to(self.device)  # the unwrapped model: what is saved and loaded
        self.model: nn.Module = self.module
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.ddp_find_unused_parameters,
            )
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
            fused=self.fused_optimizer and self.device.type in ("cpu", "cuda"),
        )  # fmt: skip
        use_amp = self.device.type == "cuda" and config.precision != "fp32"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and config.precision == "fp16")
        self.step = 0
        self.last_metrics: dict[str, Any] = {}

    # ---- distributed -------------------------------------------------------------------------

    @staticmethod
    def _setup_distributed() -> tuple[int, int, int]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return 0, 1, 0
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), local_rank

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_XXXXXXXX`` atomically (temp dir, then rename)."""
        root = self.out_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = root / f".tmp-{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        # Every rank keeps its own RNG streams (dropout, hard-negative sampling differ per rank).
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / f"rng-rank{self.rank}.safetensors"))
        (tmp / f"rng-rank{self.rank}.json").write_text(json.dumps(rng_meta))
        if self.is_main:
            self.save_model_fn(self.module, tmp)
            if not (tmp / WEIGHTS_FILE).is_file():
                raise ValueError(f"save_model_fn did not write {WEIGHTS_FILE} into the checkpoint directory")
            opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        self._barrier()
        if self.is_main:
            state = {
                "step": self.step,
                "world_size": self.world_size,
                "optimizer": opt_meta,
                "scaler": self.scaler.state_dict(),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            }
            # trainer.json is written last: its presence marks the checkpoint complete.
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.out_dir)[: -self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, scaler, step and this rank's RNG from a checkpoint dir."""
        path = Path(path)
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes, this run has {self.world_size}: "
                "the data stream would not continue where it stopped"
            )
        load_model(self.module, str(path / WEIGHTS_FILE), strict=True, device=str(self.device))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        self.optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng_file = path / f"rng-rank{self.rank}.safetensors"
        _set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))

    # ---- the loop ----------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches from the current step on; restarts a finite loader in place."""
        consumed = self.step * self.config.grad_accum
        while True:
            produced = False
            for batch in self.loader_fn(start=consumed, rank=self.rank, world_size=self.world_size):
                produced = True
                consumed += 1
                yield batch
            if not produced:
                raise ValueError(f"the data loader yielded no batch at micro-batch {consumed}")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self) -> None:
        """After a resume, drop metric rows the interrupted run logged past the checkpoint."""
        path = self.out_dir / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def fit(self, *, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Train until ``config.steps`` (or until step ``stop_after``, as if interrupted there).

        With ``resume``, continue from the newest complete checkpoint in ``out_dir`` (a fresh start
        when there is none). Returns the last metrics row.
        """
        with self._determinism():
            return self._fit(resume=resume, stop_after=stop_after)

    @contextlib.contextmanager
    def _determinism(self) -> Iterator[None]:
        """Deterministic algorithms for the duration of ``fit`` only (the setting is process-wide)."""
        if not self.config.deterministic:
            yield
            return
        previous = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            torch.backends.cudnn.benchmark = previous[2]

    def _fit(self, *, resume: bool, stop_after: int | None) -> dict[str, Any]:
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _seed_everything(cfg.seed + self.rank)
        checkpoints = list_checkpoints(self.out_dir) if resume else []
        if checkpoints:
            self.load_checkpoint(checkpoints[-1])
            self._truncate_metrics()
        elif self.is_main:
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        if self.step >= end:
            return self.last_metrics
        self.model.train()
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True, desc="train")
        window_start, window_samples = time.perf_counter(), 0
        run_start = time.perf_counter()
        try:
            while self.step < end:
                lr = lr_at(cfg, self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                totals: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    batch = _to_device(next(batches), self.device)
                    window_samples += _batch_size(batch) * self.world_size
                    last = micro == cfg.grad_accum - 1
                    sync = contextlib.nullcontext() if last or self.world_size == 1 else self.model.no_sync()
                    with sync:
                        with self._autocast():
                            losses = self.step_fn(self.model, batch, self.step)
                        if not losses:
                            raise ValueError("step_fn returned no losses")
                        loss = torch.stack([v.float() for v in losses.values()]).sum() / cfg.grad_accum
                        self.scaler.scale(loss).backward()
                    for name, value in losses.items():
                        totals[name] = totals.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
                if cfg.clip_grad_norm is not None:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad_norm)
                    totals["grad_norm"] = float(grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_start, 1e-9)
                    loss_terms = {k: v for k, v in totals.items() if k != "grad_norm"}
                    row = {"step": self.step, "loss": sum(loss_terms.values()), **totals, "lr": lr,
                           "samples_per_s": rate, "time": now - run_start}
                    self.last_metrics = row
                    self._log(row)
                    bar.set_postfix({**{k: f"{v:.4f}" for k, v in loss_terms.items()}, "samples/s": f"{rate:.1f}"})
                    window_start, window_samples = now, 0
                if self.step % cfg.save_every == 0 or self.step == end:
                    self.save_checkpoint()
        finally:
            bar.close()
            batches.close()
        return self.last_metrics


def train(
    *,
    model: nn.Module,
    loader_fn: LoaderFn,
    config: TrainConfig,
    step_fn: StepFn | None = None,
    save_model_fn: SaveModelFn | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """One-call form of :class:`Trainer`: build it and run :meth:`Trainer.fit`."""
    trainer = Trainer(model=model, loader_fn=loader_fn, config=config, step_fn=step_fn, save_model_fn=save_model_fn)
    return trainer.fit(resume=resume)
