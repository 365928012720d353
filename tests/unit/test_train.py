"""The model-agnostic trainer: losses fall, checkpoints round-trip, resume continues the same run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import tiny_overrides
from torch import nn

from model.train import TrainConfig, Trainer, list_checkpoints, lr_at, train


class ToyModel(nn.Module):
    """Returns a dict of two losses, uses dropout and a random draw so RNG state matters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4))
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.norm(self.net(x))
        noise = 0.01 * torch.randn_like(out)  # consumes the global RNG like hard-negative sampling
        return {
            "loss_fit": ((out + noise - y) ** 2).mean(),
            "loss_small": 0.01 * out.pow(2).mean(),
        }


TARGET = torch.nn.functional.layer_norm(torch.randn(8, 4, generator=torch.Generator().manual_seed(7)), (4,))


def toy_loader(*, start: int, rank: int, world_size: int, batch_size: int = 16):
    """A position-addressed stream: micro-batch k is a function of k only."""
    k = start
    while True:
        g = torch.Generator().manual_seed(1000 + k * world_size + rank)
        x = torch.randn(batch_size, 8, generator=g)
        yield {"x": x, "y": torch.tanh(x @ TARGET)}
        k += 1


def make_trainer(tmp: Path, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = ToyModel()
    settings = dict(
        steps=20,
        out_dir=tmp,
        lr=1e-2,
        warmup_steps=3,
        save_every=5,
        log_every=1,
        deterministic=True,
        progress=False,
        seed=3,
    )
    settings.update(overrides)
    return Trainer(model=model, loader_fn=toy_loader, config=TrainConfig(**settings))


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_losses_fall_and_metrics_are_written(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=30, clip_grad_norm=1.0)
    last = trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["loss_fit"] for r in rows[:3]) / 3
    final = sum(r["loss_fit"] for r in rows[-3:]) / 3
    assert final < 0.5 * first
    for key in ("loss", "loss_fit", "loss_small", "lr", "samples_per_s", "time", "grad_norm"):
        assert key in last
    assert last["loss"] == pytest.approx(last["loss_fit"] + last["loss_small"])
    assert rows[0]["samples_per_s"] > 0


def test_lr_schedule_warmup_then_cosine_to_min() -> None:
    cfg = TrainConfig(steps=110, out_dir=".", lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55)
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(cfg, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    const = TrainConfig(steps=10, out_dir=".", lr=0.5, schedule="constant")
    assert lr_at(const, 9) == 0.5


def test_cpu_ignores_mixed_precision(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=2, precision="bf16")
    assert trainer.autocast_dtype is None and not trainer.scaler.is_enabled()
    trainer.fit()
    assert all(p.dtype == torch.float32 for p in trainer.module.parameters())


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(steps=1, out_dir=".", grad_accum=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(steps=1, out_dir=".", precision="fp8")  # type: ignore[arg-type]


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """N steps, stop, resume N more == 2N steps in one go (CPU, deterministic)."""
    whole = make_trainer(tmp_path / "whole", steps=10, grad_accum=2)
    whole.fit()
    first = make_trainer(tmp_path / "split", steps=10, grad_accum=2)
    first.fit(stop_after=5)
    assert first.step == 5
    second = make_trainer(tmp_path / "split", steps=10, grad_accum=2)  # a fresh process, new init
    second.fit(resume=True)
    assert second.step == 10
    assert not torch.are_deterministic_algorithms_enabled()  # restored after fit
    for (name, a), (_, b) in zip(
        whole.module.state_dict().items(), second.module.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # The optimizer moments continued as well.
    sa, sb = whole.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for pid in sa:
        torch.testing.assert_close(sa[pid]["exp_avg_sq"], sb[pid]["exp_avg_sq"], rtol=0, atol=1e-9)
    # The metrics of the resumed run continue the interrupted one without duplicates.
    whole_rows, split_rows = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split_rows] == list(range(1, 11))
    assert [r["loss"] for r in split_rows] == pytest.approx([r["loss"] for r in whole_rows], abs=1e-6)


def test_resume_drops_steps_logged_after_the_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=10, save_every=4)
    trainer.fit(stop_after=6)  # checkpoints at 4 and (on stopping) at 6
    # Simulate a crash after step 6 but before a checkpoint at 8 existed: remove the step-6 one.
    (list_checkpoints(tmp_path)[-1] / "trainer.json").unlink()
    resumed = make_trainer(tmp_path, steps=10, save_every=4)
    resumed.fit(resume=True, stop_after=4)  # nothing to do past step 4
    assert resumed.step == 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_checkpoint_reload_equals_and_is_pickle_free(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, steps=6, save_every=2, keep_last=2)
    trainer.fit()
    checkpoints = list_checkpoints(tmp_path)
    assert [c.name for c in checkpoints] == ["step_00000004", "step_00000006"]  # keep_last
    latest = checkpoints[-1]
    assert sorted(p.name for p in latest.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng-rank0.json",
        "rng-rank0.safetensors",
        "trainer.json",
    ]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh = make_trainer(tmp_path, steps=6)
    fresh.load_checkpoint(latest)
    assert fresh.step == 6
    for (name, a), (_, b) in zip(
        trainer.module.state_dict().items(), fresh.module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    weights = load_file(str(latest / "model.safetensors"))
    assert set(weights) == set(trainer.module.state_dict())


def test_model_with_own_save_and_resume_with_nothing_to_do(tmp_path: Path) -> None:
    calls = []

    class Saving(ToyModel):
        def save(self, directory: Path) -> None:
            calls.append(directory)
            from safetensors.torch import save_model

            save_model(self, str(Path(directory) / "model.safetensors"))
            (Path(directory) / "med_config.json").write_text("{}")

    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, out_dir=tmp_path, save_every=1, progress=False)
    train(model=Saving(), loader_fn=toy_loader, config=cfg)
    assert len(calls) == 2
    assert (list_checkpoints(tmp_path)[-1] / "med_config.json").is_file()
    again = Trainer(model=Saving(), loader_fn=toy_loader, config=cfg)
    again.fit(resume=True)
    assert again.step == 2 and len(calls) == 2  # already finished: no step, no new checkpoint


def test_custom_step_fn_and_empty_loader(tmp_path: Path) -> None:
    seen_steps = []

    def step_fn(model, batch, step):
        seen_steps.append(step)
        return {"loss_fit": model(**batch)["loss_fit"]}

    torch.manual_seed(0)
    cfg = TrainConfig(steps=3, out_dir=tmp_path, progress=False, log_every=1)
    Trainer(model=ToyModel(), loader_fn=toy_loader, config=cfg, step_fn=step_fn).fit()
    assert seen_steps == [0, 1, 2]
    assert set(read_metrics(tmp_path)[-1]) == {"step", "loss", "loss_fit", "lr", "samples_per_s", "time"}

    def empty(**_):
        return iter(())

    with pytest.raises(ValueError, match="no batch"):
        Trainer(model=ToyModel(), loader_fn=empty, config=cfg).fit()


# ---- capfilt train: config handling and the real MED end to end ---------------------------------

MICRO_MED = tiny_overrides("micro")  # support's tiny MED at 16 px


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
    root = tmp_path_factory.mktemp("corpus")
    keys, images, captions = [], [], []
    for i, (name, rgb) in enumerate(list(colors.items()) * 2):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), rgb).save(buf, format="PNG")
        keys.append(f"k{i}")
        images.append(buf.getvalue())
        captions.append([f"a {name} square", f"a square that is {name}"])
    pq.write_table(pa.table({"key": keys, "image": images, "captions": captions}), root / "human.parquet")
    return root


def write_config(path: Path, corpus: Path, out: Path, extra: str = "") -> Path:
    path.write_text(
        f"model: {{preset: tiny, vocab_size: 120, overrides: {MICRO_MED}}}\n"
        f"data:\n  sources: [{{path: {corpus / 'human.parquet'}}}]\n  num_workers: 0\n  max_length: 16\n"
        "optim: {lr: 0.001, warmup_steps: 1}\n"
        "train: {steps: 4, batch_size: 8, save_every: 2, keep_last: 3, log_every: 1, progress: false, "
        "deterministic: true}\n"
        f"output: {{dir: {out}}}\n" + extra
    )
    return path


def test_training_config_errors_are_one_line_user_errors(tmp_path: Path, corpus: Path) -> None:
    from capfilt.errors import UserError
    from capfilt.train import run_training

    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "out")
    with pytest.raises(UserError, match="unknown training kind 'caption'"):
        run_training("caption", config)
    with pytest.raises(UserError, match="lrr"):
        run_training("pretrain", config, ["optim.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("optim: {", "optim: {momentumm: 3, "))
    with pytest.raises(UserError, match="momentumm"):
        run_training("pretrain", bad)
    with pytest.raises(UserError, match=r"data\.sources\[0\]\.path: .*nowhere\.parquet"):
        run_training("pretrain", config, [f"data.sources=[{{path: {tmp_path / 'nowhere.parquet'}}}]"])
    with pytest.raises(UserError, match="train.batch_size: the global batch 6 must divide"):
        run_training("pretrain", config, ["train.batch_size=6"])
    with pytest.raises(UserError, match="min_lr"):
        run_training("pretrain", config, ["optim.min_lr=0.5"])
    with pytest.raises(UserError, match="model.overrides"):
        run_training("pretrain", config, ["model.overrides={no_such_field: 1}"])
    with pytest.raises(UserError) as info:
        run_training("filter", config, [f"model.init={tmp_path / 'missing_model'}"])
    assert "model.init" in str(info.value) and "\n" not in str(info.value)


def test_sections_build_the_trainer_and_loader_configs_field_for_field(tmp_path: Path) -> None:
    """capfilt's pydantic sections are the validated front of model/'s dataclasses: same field names,
    so each dataclass is built once from its section, and a field added on one side only fails here."""
    from dataclasses import fields

    from capfilt.config import load_model
    from capfilt.train import AugmentSection, OptimSection, SourceSection, TrainingConfig, TrainSection
    from model.data import AugmentConfig, SourceSpec

    trainer_fields = {f.name for f in fields(TrainConfig)}
    section_fields = set(OptimSection.model_fields) | set(TrainSection.model_fields) - {"alpha_ramp_steps"}
    assert section_fields == trainer_fields - {"out_dir", "eps", "ddp_find_unused_parameters"}
    assert set(AugmentSection.model_fields) == {f.name for f in fields(AugmentConfig)} - {"ratio"}
    assert set(SourceSection.model_fields) == {f.name for f in fields(SourceSpec)}

    config = tmp_path / "c.yaml"
    config.write_text(
        "data: {sources: [{path: a.parquet, weight: 2, captions: expand}], augment: {scale: [0.3, 0.9]}}\n"
        "optim: {lr: 0.002, min_lr: 0.001, betas: [0.8, 0.9], warmup_steps: 3, schedule: constant,"
        " grad_accum: 2, clip_grad_norm: 1.5, weight_decay: 0.1}\n"
        "train: {steps: 7, batch_size: 4, seed: 9, save_every: 3, keep_last: 1, log_every: 2, progress: false,"
        " deterministic: true, alpha_ramp_steps: 5}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    cfg = load_model(TrainingConfig, config)
    trainer = cfg.trainer_config("captioner")
    for name in section_fields:
        section = cfg.optim if name in OptimSection.model_fields else cfg.train
        assert getattr(trainer, name) == getattr(section, name), name
    assert trainer.out_dir == tmp_path / "out" and trainer.ddp_find_unused_parameters
    assert not cfg.trainer_config("pretrain").ddp_find_unused_parameters
    assert cfg.data.augment.config() == AugmentConfig(scale=(0.3, 0.9))
    assert cfg.data.sources[0].spec() == SourceSpec(path="a.parquet", weight=2.0, captions="expand")


def test_pretrain_resume_equals_uninterrupted_then_finetune(tmp_path: Path, corpus: Path) -> None:
    """The acceptance test on the real MED (queues, momentum encoders, hard-negative sampling)."""
    from safetensors.torch import load_file

    from capfilt.errors import UserError
    from capfilt.train import run_training
    from model.hf import load_any

    whole = run_training("pretrain", write_config(tmp_path / "a.yaml", corpus, tmp_path / "whole"))
    rows = read_metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss_itc", "loss_itm", "loss_lm"} <= set(rows[0])
    assert (whole / "config.yaml").is_file() and (whole / "model" / "tokenizer.json").is_file()

    split_config = write_config(tmp_path / "b.yaml", corpus, tmp_path / "split")
    split = run_training("pretrain", split_config)
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_training("pretrain", split_config)
    # Interrupt after step 2: drop everything written later, then resume.
    shutil.rmtree(split / "checkpoints" / "step_00000004")
    shutil.rmtree(split / "model")
    run_training("pretrain", split_config, resume=True)
    a, b = (
        load_file(str(whole / "model" / "model.safetensors")),
        load_file(str(split / "model" / "model.safetensors")),
    )
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert [r["loss"] for r in read_metrics(split)] == pytest.approx([r["loss"] for r in rows], abs=1e-5)

    # Fine-tune both halves from the pre-trained checkpoint; each exports HF BLIP format.
    for kind, expected in (("captioner", {"loss_lm"}), ("filter", {"loss_itc", "loss_itm"})):
        out = run_training(
            kind,
            write_config(tmp_path / f"{kind}.yaml", corpus, tmp_path / kind),
            [f"model.init={whole / 'model'}", "train.steps=2"],
        )
        metrics = read_metrics(out)
        assert {k for k in metrics[-1] if k.startswith("loss_")} == expected
        assert (out / "hf" / "config.json").is_file()
        med, tokenizer = load_any(out / "hf")
        assert tokenizer is not None and med.config.image_size == 16


def _ddp_worker(rank: int, out_dir: str, port: int) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        seen: list[float] = []

        def step_fn(model, batch, step):
            seen.append(float(batch["x"][0, 0]))
            return model(**batch)

        torch.manual_seed(0)
        trainer = Trainer(
            model=ToyModel(),
            loader_fn=toy_loader,
            step_fn=step_fn,
            config=TrainConfig(steps=3, out_dir=out_dir, save_every=3, progress=False, lr=1e-2),
        )
        trainer.fit()
        flat = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
        torch.save({"weights": flat, "seen": seen}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_share_weights_and_split_the_stream(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(str(tmp_path), port), nprocs=2, start_method="fork")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["weights"], r1["weights"])  # gradients were all-reduced
    # Rank r reads global micro-batches 2k + r: disjoint, and together the single-process stream.
    expected = [float(next(toy_loader(start=g, rank=0, world_size=1))["x"][0, 0]) for g in range(6)]
    assert r0["seen"] == expected[0::2] and r1["seen"] == expected[1::2]
    checkpoint = list_checkpoints(tmp_path)[-1]
    assert (checkpoint / "rng-rank0.json").is_file() and (checkpoint / "rng-rank1.json").is_file()
    assert json.loads((checkpoint / "trainer.json").read_text())["world_size"] == 2


def test_real_med_captioner_loss_falls(tmp_path: Path, corpus: Path) -> None:
    from capfilt.train import run_training

    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "cap")
    out = run_training(
        "captioner",
        config,
        ["train.steps=30", "train.save_every=30", "optim.lr=0.003", "train.deterministic=false"],
    )
    losses = [r["loss_lm"] for r in read_metrics(out)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # 4.1 -> 2.3 here; smoothing floors it


# ---- training in a child process (capfilt bootstrap's concurrent groups) -----------------------


def _key_bias_entries(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Which entries of ``tensor`` are attention key biases: the middle third of a ViT layer's
    fused ``qkv.bias``, all of a text attention's ``key.bias``; none elsewhere."""
    keys = torch.zeros_like(tensor, dtype=torch.bool)
    if name.endswith("self_attn.qkv.bias"):
        third = tensor.shape[0] // 3
        keys[third : 2 * third] = True
    elif name.endswith("self.key.bias"):
        keys[:] = True
    return keys


def test_isolated_training_equals_in_process_and_reports_errors_as_here(tmp_path: Path, corpus: Path) -> None:
    """``train_isolated`` trains in a spawned process with its own RNG and thread count: the same
    weights as the same config trained here (up to float summation order), a UserError in the
    child arrives as a UserError, and a crash as a RuntimeError that says what happened."""
    from capfilt.bootstrap.backend import train_isolated
    from capfilt.config import load_model
    from capfilt.errors import UserError
    from capfilt.train import TrainingConfig, run_training

    here = run_training("pretrain", write_config(tmp_path / "a.yaml", corpus, tmp_path / "here"))
    cfg = load_model(TrainingConfig, write_config(tmp_path / "b.yaml", corpus, tmp_path / "child"))
    assert train_isolated("pretrain", cfg, False, 1) == tmp_path / "child"
    a = load_file(str(here / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "child" / "model" / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        same, noise = a[name].clone(), b[name].clone()
        # Attention's key biases get no gradient in exact arithmetic (a softmax does not change when
        # every score of a query moves by q . bias), so Adam moves them by ~lr per step in the sign of
        # rounding noise, which differs between thread counts: they are held to 4 steps x lr (0.001).
        keys = _key_bias_entries(name, a[name])
        assert torch.all((a[name][keys] - b[name][keys]).abs() <= 4e-3), name
        same[keys], noise[keys] = 0.0, 0.0
        torch.testing.assert_close(same, noise, rtol=0, atol=1e-5, msg=name)
    assert [r["step"] for r in read_metrics(tmp_path / "child")] == [1, 2, 3, 4]

    with pytest.raises(UserError, match="already holds checkpoints"):
        train_isolated("pretrain", cfg, False, 1)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [
        cfg.data.sources[0].model_copy(update={"path": str(broken)})]}),
        "output": cfg.output.model_copy(update={"dir": str(tmp_path / "bad")})})  # fmt: skip
    with pytest.raises((UserError, RuntimeError), match="broken.parquet|Parquet|parquet"):
        train_isolated("pretrain", bad, False, 1)


def test_isolated_training_splits_across_data_parallel_processes_and_resumes(tmp_path: Path, corpus: Path) -> None:
    """``train_isolated(..., processes=2)``: two gloo ranks of one thread train one model (each with
    its ``batch_size``), rank 0 writes the checkpoints (world_size 2) and the model, and the run
    resumes with two processes; the bootstrap reads that world size back to resume as it was."""
    from capfilt.bootstrap.backend import train_isolated
    from capfilt.bootstrap.planner import checkpoint_processes
    from capfilt.config import load_model
    from capfilt.train import TrainingConfig

    cfg = load_model(TrainingConfig, write_config(tmp_path / "c.yaml", corpus, tmp_path / "ddp"))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 4})})
    assert train_isolated("pretrain", cfg, False, 1, 2) == tmp_path / "ddp"
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "ddp")] == [1, 2, 3, 4]
    checkpoint = list_checkpoints(tmp_path / "ddp")[-1]
    assert json.loads((checkpoint / "trainer.json").read_text())["world_size"] == 2
    assert checkpoint_processes(tmp_path / "ddp") == 2 and checkpoint_processes(tmp_path / "none") is None
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 6})})
    train_isolated("pretrain", longer, True, 1, 2)
    assert [r["step"] for r in read_metrics(tmp_path / "ddp")][-2:] == [5, 6]


def test_a_failed_rank_stops_the_other_and_is_reported(tmp_path: Path, corpus: Path) -> None:
    """A rank killed in the middle (out of memory, a node lost) must not leave the other waiting
    in its next all-reduce: train_isolated stops it and raises, saying how the rank ended."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    from capfilt.bootstrap.backend import train_isolated
    from capfilt.config import load_model
    from capfilt.train import TrainingConfig

    cfg = load_model(TrainingConfig, write_config(tmp_path / "c.yaml", corpus, tmp_path / "long"))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 4, "steps": 100000})})
    raised: list[BaseException] = []

    def run() -> None:
        try:
            train_isolated("pretrain", cfg, False, 1, 2)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            raised.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not (tmp_path / "long" / "metrics.jsonl").is_file():  # both ranks are training
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.2)
    (rank1,) = [c for c in multiprocessing.active_children() if c.name.endswith("-rank1")]
    os.kill(rank1.pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "train_isolated still waits after a rank died"
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError) and "rank 1: exit code -9" in str(raised[0])
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("capfilt-train")]


def test_a_child_started_for_a_multi_threaded_training_busy_waits_and_the_parent_keeps_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI sets OMP_WAIT_POLICY=PASSIVE (for the pipeline); a lone training's child starts with
    ACTIVE (1.6x faster with 2 threads) and this process's environment is as it was."""
    import multiprocessing
    import os

    from capfilt.bootstrap.backend import _spawn_environment

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    ctx = multiprocessing.get_context("spawn")
    with _spawn_environment({"OMP_WAIT_POLICY": "ACTIVE"}):
        # a stdlib target: a spawned child cannot import this test module under every pytest rootdir
        child = ctx.Process(target=os.system, args=(f'printf %s "$OMP_WAIT_POLICY" > {tmp_path / "seen"}',))
        child.start()
    child.join(timeout=60)
    assert (tmp_path / "seen").read_text() == "ACTIVE" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    with _spawn_environment({"OMP_WAIT_POLICY": "ACTIVE"}):
        pass
    assert "OMP_WAIT_POLICY" not in os.environ


def test_isolated_training_dies_with_its_parent(tmp_path: Path, corpus: Path) -> None:
    """kill -9 of the process that started a child training (a bootstrap) stops the child too:
    nothing keeps writing into a staging directory that a rerun will take over."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    config = write_config(tmp_path / "c.yaml", corpus, tmp_path / "long")
    config.write_text(config.read_text().replace("steps: 4", "steps: 100000"))
    script = (
        "import sys; from capfilt.bootstrap.backend import train_isolated\n"
        "from capfilt.config import load_model; from capfilt.train import TrainingConfig\n"
        f"train_isolated('pretrain', load_model(TrainingConfig, {str(config)!r}), False, 1)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "long" / "metrics.jsonl").is_file():  # the child is training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        spawned = children(parent.pid)
        assert spawned
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in spawned if alive(pid)], "a child still runs after its parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_core_shares_give_a_finished_trainings_cores_to_the_ones_still_running() -> None:
    """The captioner and the filter train at once on one core each; when one ends, the other's
    thread-count file says 2 (and a child that follows it trains on both cores from its next step)."""
    from capfilt.bootstrap.backend import CoreShares, read_threads

    shares = CoreShares(2)
    with shares.taken() as first:
        assert read_threads(first) == 2  # alone: every core
        with shares.taken() as second:
            assert read_threads(first) == read_threads(second) == 1
            with shares.taken() as third:  # more trainings than cores: one thread each, never 0
                assert [read_threads(p) for p in (first, second, third)] == [1, 1, 1]
            assert not third.exists()
        assert read_threads(first) == 2
    assert not first.exists() and read_threads(first) is None


def test_follow_threads_sets_torch_threads_from_the_file_before_each_step(tmp_path: Path) -> None:
    from capfilt.bootstrap.backend import follow_threads

    before = torch.get_num_threads()
    path = tmp_path / "threads.txt"
    hook = follow_threads(path)
    try:
        torch.set_num_threads(2)
        hook(1)  # no file (yet, or being replaced): leave the threads as they are
        assert torch.get_num_threads() == 2
        path.write_text("1\n")
        hook(2)
        assert torch.get_num_threads() == 1
        path.write_text("2\n")
        hook(3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_train_model_runs_on_step_before_every_step(tmp_path: Path, corpus: Path) -> None:
    from capfilt.config import load_model
    from capfilt.train import TrainingConfig, train_model

    cfg = load_model(TrainingConfig, write_config(tmp_path / "c.yaml", corpus, tmp_path / "out"))
    seen: list[int] = []
    train_model("pretrain", cfg, on_step=seen.append)
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3, 4]
    assert len(seen) == 4 and seen == sorted(seen)


def test_training_fields_of_model_overrides_apply_to_a_loaded_model(tmp_path: Path, corpus: Path) -> None:
    """model.overrides on model.init: itm_negative_temp (a training field) reaches the fine-tune and its
    checkpoint; the scratch config's shape fields may stay when they match, and may not change it."""
    from capfilt.errors import UserError
    from capfilt.train import run_training
    from model.med import MED

    base = run_training("pretrain", write_config(tmp_path / "p.yaml", corpus, tmp_path / "pre"))
    init = f"model.init={base / 'model'}"
    config = write_config(tmp_path / "f.yaml", corpus, tmp_path / "filter")
    overrides = MICRO_MED.rstrip("}") + ", itm_negative_temp: 0.05}"
    out = run_training("filter", config, [init, f"model.overrides={overrides}"])
    med, _ = MED.load(out / "model")
    assert med.config.itm_negative_temp == 0.05
    assert MED.load(base / "model")[0].config.itm_negative_temp is None
    for bad, message in (
        ("{text_layers: 5}", "text_layers differ from the loaded model's"),
        ("{itm_negative_temp: 0}", "itm_negative_temp must be > 0"),
        ("{no_such_field: 1}", "model.overrides: .*'no_such_field'"),  # as for a scratch model
    ):
        with pytest.raises(UserError, match=message):
            run_training("filter", config, [init, f"model.overrides={bad}", f"output.dir={tmp_path / 'bad'}"])
