"""Training steps before and after the CPU speed-ups of the training step, side by side.

Three switches, all exact or at float rounding (each on by default):

- ``TextModel.skip_padding``: the text layers' per-token work (projections, FFN, LayerNorms) runs
  on real tokens only (:class:`model.med.PaddedRows`); attention still sees the (B, L) layout;
- ``MED.share_image_context``: training's ITM and LM read one cross-attention key/value projection
  of the batch's images per text layer, instead of one per ITM row and again for the decoder;
- ``Trainer.fused_optimizer``: AdamW as one fused kernel, not torch's CPU default (a Python loop
  over the tensors).

This script re-runs the trainings of a finished bootstrap run (each step's own
``bootstrap-train.yaml``: MED_0's pre-training, the captioner, the filter, MED_1) for ``--steps``
steps with all three off ("before") and on ("now"), alternating, ``--repeats`` times each, in this
process with ``--threads`` threads (the bootstrap gives a training alone both cores), and prints:

- the share of the text transformer's token slots that are real tokens (the rest is padding);
- seconds per step, median over repeats of the median of steps 5..N (the first steps warm up);
- the first logged losses both ways: the same for the fine-tunes (they start from a saved model);
  the pre-trainings from scratch differ between any two runs in the third decimal, either arm,
  two runs of one arm included (not traced: building a model from scratch, its tokenizer
  included, is not bit-reproducible run to run).

    python benchmarks/train_speed.py runs/bootstrap --steps 40 --repeats 2

Nothing of the run is changed: the trainings write into a temporary directory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TRAININGS = (("pretrain", "round-0/pretrain"), ("captioner", "round-1/captioner"),
             ("filter", "round-1/filter"), ("pretrain", "round-1/pretrain"))  # fmt: skip
WARMUP = 5


def localise(value: str, recorded: str, run: Path) -> str:
    """A path the run's step config recorded (under the bootstrap's ``output.dir``, ``recorded``,
    possibly in a step's ``.NAME.partial`` directory before it was renamed) -> the same file under
    ``run``. Other values are returned unchanged."""
    prefix = recorded.rstrip("/") + "/"
    if not value.startswith(prefix):
        return value
    parts = [p[1:-len(".partial")] if p.startswith(".") and p.endswith(".partial") else p
             for p in Path(value[len(prefix):]).parts]  # fmt: skip
    return str(run.joinpath(*parts))


def step_config(run: Path, step: str, out: Path, steps: int) -> Any:
    """The step's training config with its paths under ``run``, ``steps`` steps, written to ``out``."""
    import yaml

    from capfilt.train import TrainingConfig

    recorded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["output"]["dir"]
    data = yaml.safe_load((run / step / "bootstrap-train.yaml").read_text(encoding="utf-8"))
    if isinstance(data["model"].get("init"), str):
        data["model"]["init"] = localise(data["model"]["init"], recorded, run)
    for source in data["data"]["sources"]:
        source["path"] = localise(source["path"], recorded, run)
    data["output"]["dir"] = str(out)
    data["train"].update(steps=steps, save_every=10 * steps, log_every=1, progress=False)
    return TrainingConfig.model_validate(data)


class TokenCount:
    """Real and padded token slots of every text-transformer call (wraps ``TextModel.forward``)."""

    def __init__(self) -> None:
        from model.med import TextModel

        self.real = self.slots = 0
        self.original = TextModel.forward

        def counted(module: Any, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
            if attention_mask is not None and kwargs.get("cache") is None:
                self.real += int(attention_mask.sum())
                self.slots += attention_mask.numel()
            return self.original(module, input_ids, attention_mask, **kwargs)

        TextModel.forward = counted  # type: ignore[method-assign]

    def remove(self) -> None:
        from model.med import TextModel

        TextModel.forward = self.original  # type: ignore[method-assign]


ARMS = ("before", "now")


def time_training(kind: str, cfg: Any, arm: str) -> tuple[float, dict[str, float]]:
    """Median seconds per step after the warm-up with the speed-ups off ("before") or on ("now"),
    and the first logged losses."""
    from capfilt.train import train_model
    from model.med import MED, TextModel
    from model.train import Trainer

    switches = ((TextModel, "skip_padding"), (MED, "share_image_context"), (Trainer, "fused_optimizer"))
    stamps: list[float] = []
    for owner, name in switches:
        setattr(owner, name, arm == "now")
    try:
        train_model(kind, cfg, on_step=lambda step: stamps.append(time.perf_counter()))
    finally:
        for owner, name in switches:
            setattr(owner, name, True)
    per_step = [b - a for a, b in itertools.pairwise(stamps[WARMUP:])]
    first = json.loads((Path(cfg.output.dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return statistics.median(per_step), {k: v for k, v in first.items() if k.startswith("loss")}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Prints the table; returns one row per training: step, real-token share, both arms' seconds
    per step and first losses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="A finished `capfilt bootstrap` run directory.")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="Comma-separated steps, e.g. round-0/pretrain.")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps: more than {WARMUP + 1}")
    import torch

    torch.set_num_threads(args.threads)
    wanted = None if args.only is None else set(args.only.split(","))
    counter = TokenCount()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind, step in TRAININGS:
                if (wanted is not None and step not in wanted) or not (args.run / step / "bootstrap-train.yaml").is_file():
                    continue
                times: dict[str, list[float]] = {arm: [] for arm in ARMS}
                losses: dict[str, dict[str, float]] = {}
                counter.real = counter.slots = 0
                for repeat in range(args.repeats):
                    for arm in ARMS:
                        out = Path(tmp) / f"{step.replace('/', '-')}-{arm}-{repeat}"
                        cfg = step_config(args.run, step, out, args.steps)
                        seconds, losses[arm] = time_training(kind, cfg, arm)
                        times[arm].append(seconds)
                        print(f"{step} {arm} repeat {repeat}: {seconds:.3f} s/step", flush=True)
                rows.append({
                    "step": step, "real_share": counter.real / max(counter.slots, 1),
                    **{f"{arm}_s": statistics.median(times[arm]) for arm in ARMS},
                    **{f"losses_{arm}": losses[arm] for arm in ARMS},
                })  # fmt: skip
    finally:
        counter.remove()
    print(f"\n{'training':<20} {'real tokens':>11} {'before s/step':>14} {'now s/step':>11} {'saved':>7}")
    for row in rows:
        saved = 1 - row["now_s"] / row["before_s"]
        print(f"{row['step']:<20} {row['real_share']:>10.0%} {row['before_s']:>14.3f} {row['now_s']:>11.3f} "
              f"{saved:>7.1%}")  # fmt: skip
    print(f"({args.steps} steps, median of steps {WARMUP}..{args.steps} and of {args.repeats} repeats, "
          f"{args.threads} threads)")  # fmt: skip
    for row in rows:
        print(f"{row['step']} first losses: before {row['losses_before']} | now {row['losses_now']}")
    return rows


if __name__ == "__main__":
    main()
