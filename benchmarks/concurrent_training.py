"""Two demo trainings one after the other (all cores each) vs at the same time (a share each).

Why ``capfilt bootstrap`` trains independent models concurrently on CPU (``concurrent_training``):
the demo's MED is small enough that one training keeps about one core busy however many torch
threads it gets. This script measures that on this machine, with the bootstrap's own code:

* sequential: two fine-tunes of the demo's captioner settings, one after the other, each in this
  process with torch's default thread count (what the bootstrap did before, and does on GPU);
* concurrent: the same two trainings at once, each in its own process with cores/2 threads
  (:func:`capfilt.bootstrap.backend.train_isolated`, what the bootstrap's groups do now).

Both start from the same pre-trained MED and train on the same human pairs of a small demo
corpus, so they do identical work. Prints wall seconds and samples/s of each mode and the ratio.

    python benchmarks/concurrent_training.py --steps 150
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per training")
    parser.add_argument("--kind", default="captioner", choices=("pretrain", "captioner", "filter"))
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    from capfilt.bootstrap import load_config
    from capfilt.bootstrap.backend import train, train_isolated
    from capfilt.bootstrap.planner import available_cores
    from capfilt.synth import make_corpus
    from capfilt.train import ModelSection

    cfg = load_config(None)
    settings = {"pretrain": cfg.pretrain, "captioner": cfg.captioner, "filter": cfg.filter}[args.kind]
    cores = available_cores()
    work = args.work or Path(tempfile.mkdtemp(prefix="capfilt-concurrent-"))
    corpus = work / "corpus"
    if not (corpus / "human.parquet").is_file():
        make_corpus(
            corpus, images=50, human_images=200, test_images=10, seed=0, size=32, world="demo", progress=False
        )
    human = corpus / "human.parquet"

    def config(name: str, init: ModelSection, steps: int):
        if name != "base":
            shutil.rmtree(work / name, ignore_errors=True)  # a rerun measures afresh
        out = settings.training_config(model=init, data=human, out=work / name, seed=0, progress=False)
        return out.model_copy(
            update={"train": out.train.model_copy(update={"steps": steps, "save_every": steps})}
        )

    base = work / "base"
    if not (base / "model").is_dir():  # a short pre-training to start the fine-tunes from
        scratch = ModelSection(init="scratch", **cfg.model.model_dump())
        train("pretrain", config("base", scratch, 20), False)
    init = ModelSection(init=str(base / "model"))
    batch = settings.train.batch_size
    samples = 2 * args.steps * batch
    print(f"{cores} cores; two {args.kind} trainings of {args.steps} steps x batch {batch} each", flush=True)

    started = time.perf_counter()
    for name in ("seq-a", "seq-b"):
        train(args.kind, config(name, init, args.steps), False)
    sequential = time.perf_counter() - started
    print(
        f"sequential, in this process, {torch.get_num_threads()} threads each: {sequential:6.1f} s "
        f"({samples / sequential:6.1f} samples/s)",
        flush=True,
    )

    threads = max(1, cores // 2)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(train_isolated, args.kind, config(name, init, args.steps), False, threads)
            for name in ("con-a", "con-b")
        ]
        for job in jobs:
            job.result()
    concurrent = time.perf_counter() - started
    print(
        f"concurrent, own process each, {threads} thread{'s' if threads != 1 else ''} each: {concurrent:6.1f} s "
        f"({samples / concurrent:6.1f} samples/s)",
        flush=True,
    )
    print(
        f"concurrent / sequential throughput: {sequential / concurrent:.2f}x "
        f"(each includes loading the model and data; a child process also imports torch)"
    )
    return {"sequential_s": sequential, "concurrent_s": concurrent}


if __name__ == "__main__":
    main()
