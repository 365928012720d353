"""Two demo trainings one after the other (all cores each) vs at the same time (a share each).

Why ``capfilt bootstrap`` trains independent models concurrently on CPU (``concurrent_training``):
the demo's MED is small enough that one training keeps about one core busy however many torch
threads it gets. This script measures that on this machine, with the bootstrap's own code:

* sequential: two fine-tunes of the demo's captioner settings, one after the other, each in this
  process with torch's default thread count (what the bootstrap did before, and does on GPU);
* concurrent: the same two trainings at once, each in its own process with cores/2 threads
  (:func:`capfilt.bootstrap.backend.train_isolated`, what the bootstrap's groups do now).

Both start from the same pre-trained MED and train on the same pairs of a small demo corpus
(human pairs; for ``--kind pretrain`` human + raw web pairs, as MED_0), so they do identical work. Prints wall seconds and samples/s of each mode and the ratio.

``--compare loader`` measures the other overlap the demo uses: ONE training, its batches decoded
and tokenized in the training process (``num_workers`` 0) vs in one DataLoader worker process
while the model trains (``num_workers`` 1, the demo's ``pretrain.num_workers``), alternating
``--repeats`` times so a drift in the machine's speed hits both.

``--compare alone`` measures where a training that runs alone (MED_r's pre-training) goes: ONE
training of the demo's batch (a) in this process (torch's default threads, the config's
``num_workers``, OpenMP's wait policy as the ``capfilt`` CLI sets it: PASSIVE), (b) in a child
process with every core's thread, which busy-waits (what ``capfilt bootstrap`` does), (c) split
across ``--processes`` data-parallel processes (``data_parallel``), each with its share of the batch
and no loader worker; alternating as above. ``--kind pretrain`` trains from scratch on human + raw
web pairs, as MED_0 does (its texts, and so its steps, are longer than the human captions).

    python benchmarks/concurrent_training.py --steps 150
    python benchmarks/concurrent_training.py --compare loader --kind pretrain --steps 120
    python benchmarks/concurrent_training.py --compare alone --kind pretrain --steps 120
    python benchmarks/concurrent_training.py --compare uneven --steps 400

``--compare uneven`` measures what the bootstrap does when the trainings of a group end at
different times: a captioner (the demo's captioner:filter step ratio, 900:1,200) and a filter of
``--steps`` at the same time, one core each; (a) each keeps its one thread, (b) each follows its
share of :class:`~capfilt.bootstrap.backend.CoreShares`, so the filter trains on every core once the
captioner ends (what ``capfilt bootstrap`` does). Alternating ``--repeats`` times.
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the capfilt CLI, which runs the bootstrap, sets it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per training")
    parser.add_argument("--kind", default="captioner", choices=("pretrain", "captioner", "filter"))
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument(
        "--compare",
        default="trainings",
        choices=("trainings", "loader", "alone", "uneven"),
        help="trainings: two in turn vs at once; loader: one with 0 vs 1 DataLoader worker; "
        "alone: one in this process vs a child with every core vs --processes data-parallel processes; "
        "uneven: a captioner and a longer filter at once, with fixed threads vs threads that follow CoreShares",
    )
    parser.add_argument("--repeats", type=int, default=2, help="--compare loader/data-parallel: runs per setting")
    parser.add_argument("--processes", type=int, default=2, help="--compare alone: data-parallel processes")
    args = parser.parse_args(argv)

    import torch

    from capfilt.bootstrap import load_config
    from capfilt.bootstrap.backend import CoreShares, train, train_isolated
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
            corpus, images=200, human_images=200, test_images=10, seed=0, size=cfg.corpus.size, world="demo",
            progress=False,
        )
    human = corpus / "human.parquet"
    if args.kind == "pretrain":  # what MED_0 trains on: human + raw web pairs (longer, noisier texts)
        import pyarrow as pa

        from capfilt.bootstrap.pairs import human_pairs, web_pairs, write_pairs

        human = work / "pairs.parquet"
        if not human.is_file():
            write_pairs(pa.concat_tables([human_pairs(corpus / "human.parquet"), web_pairs(corpus / "web.parquet")]), human, seed=0)

    def config(
        name: str, init: ModelSection, steps: int, num_workers: int | None = None, batch: int | None = None,
        step_settings=None,
    ):  # fmt: skip
        if name != "base":
            shutil.rmtree(work / name, ignore_errors=True)  # a rerun measures afresh
        out = (step_settings or settings).training_config(model=init, data=human, out=work / name, seed=0, progress=False)
        train_update = {"steps": steps, "save_every": steps, "batch_size": batch or out.train.batch_size}
        update: dict = {"train": out.train.model_copy(update=train_update)}
        if num_workers is not None:
            update["data"] = out.data.model_copy(update={"num_workers": num_workers})
        return out.model_copy(update=update)

    base = work / "base"
    if not (base / "model").is_dir():  # a short pre-training to start the fine-tunes from
        scratch = ModelSection(init="scratch", **cfg.model.model_dump())
        train("pretrain", config("base", scratch, 20), False)
    init = ModelSection(init=str(base / "model"))
    batch = settings.train.batch_size
    if args.compare == "loader":
        runs = {
            f"num_workers {w}": (lambda name, w=w: train(args.kind, config(name, init, args.steps, w), False))
            for w in (0, 1)
        }
        print(
            f"one {args.kind} training of {args.steps} steps x batch {batch}, {torch.get_num_threads()} threads, "
            f"{args.repeats} run(s) per setting, alternating",
            flush=True,
        )
        seconds = _alternate(runs, args.repeats, args.steps * batch)
        print(f"1 worker / in-process throughput: {seconds['num_workers 0'] / seconds['num_workers 1']:.2f}x "
              "(each includes loading the model and data)")  # fmt: skip
        return {"in_process_s": seconds["num_workers 0"], "one_worker_s": seconds["num_workers 1"]}
    if args.compare == "alone":
        n = args.processes
        if batch % n:
            parser.error(f"--processes {n} does not split the batch of {batch}")
        if args.kind == "pretrain":  # as MED_0: from scratch (a tokenizer trained on the pairs)
            init = ModelSection(init="scratch", **cfg.model.model_dump())
        runs = {
            "in this process": lambda name: train(args.kind, config(name, init, args.steps), False),
            f"child process, {cores} threads": lambda name: train_isolated(
                args.kind, config(name, init, args.steps), False, cores, 1
            ),
            f"{n} data-parallel processes": lambda name: train_isolated(
                args.kind, config(name, init, args.steps, 0, batch // n), False, max(1, cores // n), n
            ),
        }
        print(
            f"one {args.kind} training of {args.steps} steps x batch {batch}, alone on {cores} cores "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} here); {args.repeats} run(s) per setting, "
            "alternating",
            flush=True,
        )
        seconds = _alternate(runs, args.repeats, args.steps * batch)
        for label, mean in seconds.items():
            print(f"{label}: {seconds['in this process'] / mean:.2f}x the throughput of this process")
        return seconds
    if args.compare == "uneven":
        # the demo's round: captioner and filter at once, the captioner ending first
        short = max(1, args.steps * cfg.captioner.train.steps // cfg.filter.train.steps)
        threads = max(1, cores // 2)

        def group(name: str, follow: bool) -> None:
            shares = CoreShares(cores)

            def one(kind: str, steps: int) -> None:
                step_settings = cfg.captioner if kind == "captioner" else cfg.filter
                c = config(f"{name}-{kind}", init, steps, step_settings=step_settings)
                if not follow:
                    train_isolated(kind, c, False, threads, 1)
                    return
                with shares.taken() as threads_file:
                    train_isolated(kind, c, False, threads, 1, threads_file=threads_file)

            with ThreadPoolExecutor(max_workers=2) as pool:
                for job in [pool.submit(one, "captioner", short), pool.submit(one, "filter", args.steps)]:
                    job.result()

        runs = {
            f"{threads} thread(s) each throughout": lambda name: group(name, False),
            "the filter takes the captioner's cores when it ends": lambda name: group(name, True),
        }
        print(
            f"a captioner of {short} steps and a filter of {args.steps} steps (batch {batch}) at the same time "
            f"on {cores} cores, {threads} thread(s) each at the start; {args.repeats} run(s) per setting, alternating",
            flush=True,
        )
        seconds = _alternate(runs, args.repeats, (short + args.steps) * batch)
        fixed, follow = seconds.values()
        print(f"the group ends {fixed - follow:.1f} s sooner ({fixed / follow:.2f}x) when the cores follow")
        return seconds
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


def _alternate(runs: dict, repeats: int, samples: int) -> dict[str, float]:
    """Run each of ``runs`` (label -> fn(work name)) ``repeats`` times, alternating; mean seconds by label."""
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    for repeat in range(repeats):
        for i, (label, run) in enumerate(runs.items()):
            started = time.perf_counter()
            run(f"run{i}-{repeat}")
            seconds[label].append(time.perf_counter() - started)
            print(f"{label}, run {repeat + 1}: {seconds[label][-1]:6.1f} s", flush=True)
    means = {label: sum(v) / len(v) for label, v in seconds.items()}
    for label, mean in means.items():
        print(f"{label}: mean {mean:6.1f} s ({samples / mean:6.1f} samples/s)")
    return means


if __name__ == "__main__":
    main()
