"""The heavy work a bootstrap step hands off, as one injected :class:`Backend` object.

:class:`~capfilt.bootstrap.planner.Bootstrap` and :func:`~capfilt.bootstrap.planner.run_bootstrap`
take ``backend=`` (default :data:`REAL`): corpus generation, training, the pipeline, evaluation,
serving the corpus on loopback and the HTML report. Tests pass a ``Backend`` whose training,
pipeline and evaluation are cheap deterministic fakes (``Backend(train=..., ...)``; the fields
not given keep the real implementation) instead of patching module functions.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capfilt.config import PipelineConfig
from capfilt.errors import UserError
from capfilt.rundir import atomic_write_text
from capfilt.train import TrainingConfig


def make_corpus(out: Path, **kwargs: Any) -> dict[str, Any]:
    """A synthetic corpus (:func:`capfilt.synth.make_corpus`)."""
    from capfilt import synth

    return synth.make_corpus(out, **kwargs)


def train(kind: str, cfg: TrainingConfig, resume: bool) -> Path:
    """Train ``kind`` (pretrain | captioner | filter) in this process (:func:`capfilt.train.train_model`)."""
    from capfilt.train import train_model

    return train_model(kind, cfg, resume=resume)


class CoreShares:
    """The cores of the trainings that run at the same time, divided again whenever one starts or ends.

    A round's captioner and filter train at once, one core each on 2 cores; the captioner ends
    minutes before the filter, whose second core would then sit idle. Each training takes a share
    (:meth:`taken`) and is given a small file that holds its thread count; its child process reads
    the file before every step (:func:`follow_threads`) and changes its torch threads when the
    count changes. ``cores // n`` each for n trainings (at least 1).
    """

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._files: list[Path] = []
        self._lock = threading.Lock()

    def _divide(self) -> None:
        share = max(1, self.cores // max(1, len(self._files)))
        for path in self._files:
            atomic_write_text(path, f"{share}\n")

    @contextmanager
    def taken(self) -> Iterator[Path]:
        """A share for one training, as long as the block runs: yields its thread-count file."""
        import tempfile

        handle, name = tempfile.mkstemp(prefix="capfilt-threads-", suffix=".txt")
        os.close(handle)
        path = Path(name)
        with self._lock:
            self._files.append(path)
            self._divide()
        try:
            yield path
        finally:
            with self._lock:
                self._files.remove(path)
                self._divide()
            path.unlink(missing_ok=True)


def read_threads(path: Path) -> int | None:
    """The thread count in a :class:`CoreShares` file; None when it is gone or being replaced."""
    try:
        return max(1, int(path.read_text(encoding="utf-8").strip()))
    except (OSError, ValueError):
        return None


def follow_threads(path: Path) -> Callable[[int], None]:
    """A per-step hook for :func:`capfilt.train.train_model`: keeps torch's thread count at what
    ``path`` holds (:class:`CoreShares`), read before each step."""
    import torch

    def on_step(step: int) -> None:
        threads = read_threads(path)
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    return on_step


def train_isolated(
    kind: str,
    cfg: TrainingConfig,
    resume: bool,
    threads: int,
    processes: int = 1,
    threads_file: Path | None = None,
) -> Path:
    """:func:`train` in child processes of its own: ``processes`` data-parallel ranks, ``threads`` CPU threads each.

    ``capfilt bootstrap`` trains independent models (a round's captioner and filter, the ablation's
    pre-trainings) at the same time this way: a small MED on CPU does not use many threads well,
    so on 2 cores two one-thread processes do 1.14-1.18x the work of two two-thread runs one after
    the other (benchmarks/concurrent_training.py; benchmarks/README.md, "Concurrent training"). A
    training that runs alone (MED_r's pre-training) gets all the cores in a child whose OpenMP
    threads busy-wait (``OMP_WAIT_POLICY=ACTIVE`` when ``threads`` > 1): the CLI sets PASSIVE for the
    pipeline's Ray tasks and loader workers, which made a two-thread pre-training 1.6x slower. With
    ``processes`` > 1 the training is split across ranks of torch DistributedDataParallel (gloo on
    CPU, one GPU each with CUDA), as ``torchrun`` would start them; ``cfg.train.batch_size`` is then
    each rank's share of the batch. With ``threads_file`` (one process; :class:`CoreShares`) the
    child follows the thread count in that file from step to step, so a training gets the cores
    its group's finished trainings gave back.
    Processes, not threads: training seeds and draws from torch's process-wide RNG, and each run
    must stay a deterministic function of its config. The children die with this process; rank
    0's ``metrics.jsonl`` drives a progress bar here. When one rank fails the others are stopped
    (they would wait for it in the next all-reduce). A :class:`UserError` (or a checkpoint that
    cannot be loaded) in a child is raised here as a :class:`UserError`; any other failure as a
    :class:`RuntimeError` with the child's traceback.
    """
    import multiprocessing

    from tqdm import tqdm

    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
    quiet = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})})
    port = _free_loopback_port() if processes > 1 else 0
    children, pipes = [], []
    for rank in range(processes):
        env = (
            {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
             "RANK": str(rank), "LOCAL_RANK": str(rank)}
            if processes > 1 else {}
        )  # fmt: skip
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_train_child,
            args=(kind, quiet, resume, threads, env, os.getpid(), send, threads_file if processes == 1 else None),
            name=f"capfilt-train-{kind}" + (f"-rank{rank}" if processes > 1 else ""),
        )
        may_grow = threads_file is not None and processes == 1
        with _spawn_environment({"OMP_WAIT_POLICY": "ACTIVE"} if threads > 1 or may_grow else {}):
            child.start()  # a spawned child imports torch (and reads OpenMP's settings) as it starts
        send.close()
        children.append(child)
        pipes.append(receive)
    metrics = Path(cfg.output.dir) / "metrics.jsonl"
    layout = f"{threads} thread{'s' if threads != 1 else ''}"
    if processes > 1:
        layout = f"{processes} processes x {layout}"
    bar = tqdm(
        total=cfg.train.steps, desc=f"{kind} ({layout})", unit="step",
        disable=not cfg.train.progress, dynamic_ncols=True, leave=True,
    )  # fmt: skip
    try:
        while running := [child for child in children if child.is_alive()]:
            running[0].join(timeout=1.0)
            bar.update(max(0, _last_step(metrics) - bar.n))
            if any(child.exitcode not in (None, 0) for child in children):
                break  # one rank failed: the others would block in their next all-reduce
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join()
        bar.close()
    outcomes = [_child_outcome(child, receive) for child, receive in zip(children, pipes, strict=True)]
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    for _, (what, message, _trace) in failed:
        if what == "user":
            raise UserError(message)
    if failed:
        # every rank that failed, and how: a rank killed from outside ("exit code -9") shows up next to
        # the rank that lost its peer in an all-reduce
        said = "; ".join(f"rank {rank}: {message}" if processes > 1 else message for rank, (_, message, _) in failed)
        trace = next((trace for _, (_, _, trace) in failed if trace), "")
        raise RuntimeError(f"{kind} training (child process) failed: {said}\n{trace}".rstrip())
    return Path(cfg.output.dir)


_ENVIRON_LOCK = threading.Lock()


@contextmanager
def _spawn_environment(changes: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``changes`` while a child process starts (it inherits them), then as before."""
    with _ENVIRON_LOCK:
        saved = {name: os.environ.get(name) for name in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _child_outcome(child: Any, receive: Any) -> tuple[str, str, str] | None:
    """What a finished :func:`_train_child` reported: None (done), or (kind, message, traceback)."""
    try:
        outcome = receive.recv() if receive.poll() else ("crash", f"exit code {child.exitcode}", "")
    except EOFError:  # died before it could say why (killed, out of memory)
        outcome = ("crash", f"exit code {child.exitcode}", "")
    receive.close()
    return outcome


def _free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now: rank 0 of a data-parallel training listens on it."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _last_step(metrics: Path) -> int:
    """The step of the last complete row of a trainer's metrics.jsonl (0 when none yet)."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue  # a row being written
    return 0


def _train_child(
    kind: str,
    cfg: TrainingConfig,
    resume: bool,
    threads: int,
    env: dict[str, str],
    parent: int,
    conn: Any,
    threads_file: Path | None = None,
) -> None:
    """Body of :func:`train_isolated`'s processes: train (as rank ``env["RANK"]`` when given), report through ``conn``."""
    _exit_with_parent(parent)
    os.environ.update(env)  # torch.distributed's env:// rendezvous (the trainer reads WORLD_SIZE)
    import torch

    from capfilt.train import train_model

    torch.set_num_threads(threads)
    on_step = follow_threads(threads_file) if threads_file else None
    _report_failure(conn, lambda: train_model(kind, cfg, resume=resume, on_step=on_step))
    conn.send(None)


def _report_failure(conn: Any, work: Callable[[], Any]) -> Any:
    """In a child process: ``work()``'s result; a failure is sent through ``conn`` as ("user" or
    "error", message, traceback) and ends the process (a child's report to its parent)."""
    from model.errors import CheckpointError

    try:
        return work()
    except (UserError, CheckpointError) as err:
        conn.send(("user", str(err), ""))
        raise SystemExit(1) from None
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then this process exits
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc()))
        raise SystemExit(1) from None


def _exit_with_parent(parent: int) -> None:
    """In a child process: exit as soon as ``parent`` is gone (a killed bootstrap must not leave
    trainings writing behind it, or evaluations running)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_pipeline(cfg: PipelineConfig) -> Path | None:
    """The ``capfilt run`` pipeline (:func:`capfilt.pipeline.run`)."""
    from capfilt import pipeline

    return pipeline.run(cfg)


def evaluate(model_path: Path, data_path: Path, **kwargs: Any) -> dict[str, Any]:
    """``capfilt eval`` of a model on the test set (:func:`capfilt.eval.evaluate`)."""
    from capfilt import eval as evalmod

    return evalmod.evaluate(model_path, data_path, **kwargs)


def evaluate_isolated(model_path: Path, data_path: Path, threads: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate` in a child process of its own with ``threads`` CPU threads; returns its result.

    ``capfilt bootstrap --ablation`` evaluates MED_1 and the ablation's rows at the same time this
    way, each with its share of the cores, as their pre-trainings train (a small MED does not use
    many threads well; on 2 cores the four took about as long at once as one after the other:
    benchmarks/README.md, "MED_1 and the ablation's rows together"). A process, not a thread:
    captioning is a Python loop per token that would hold the GIL. A :class:`UserError` in the child
    is raised here as one; any other failure as a :class:`RuntimeError` with the child's traceback.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_evaluate_child,
        args=(str(model_path), str(data_path), threads, kwargs, os.getpid(), send),
        name="capfilt-eval",
    )
    child.start()
    send.close()
    outcome = None
    try:
        outcome = receive.recv()
    except EOFError:
        child.join()  # it died before it could report (killed, out of memory)
    finally:
        if outcome is None and child.is_alive():
            child.terminate()  # interrupted here (Ctrl-C): the child must not outlive the step
        child.join()
        receive.close()
    what, payload, trace = outcome or ("error", f"exit code {child.exitcode}", "")
    if what == "done":
        return payload
    if what == "user":
        raise UserError(payload)
    raise RuntimeError(f"evaluation of {model_path} (child process) failed: {payload}\n{trace}".rstrip())


def _evaluate_child(
    model_path: str, data_path: str, threads: int, kwargs: dict[str, Any], parent: int, conn: Any
) -> None:
    """Body of :func:`evaluate_isolated`'s process: evaluate, send ("done", result, "") or the failure."""
    _exit_with_parent(parent)
    import torch

    torch.set_num_threads(threads)
    result = _report_failure(conn, lambda: evaluate(Path(model_path), Path(data_path), **kwargs))
    conn.send(("done", result, ""))


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
        atomic_write_text(port_file, base_url.rsplit(":", 1)[1] + "\n")
        yield base_url


def build_report(run_dir: Path) -> Path | None:
    """The HTML report of the last round with pipeline output (None when none has any yet)."""
    try:
        from capfilt.report import build_report as build
    except ImportError:
        return None
    if not any(run_dir.glob("round-*/pipeline")):
        return None
    return build(run_dir)


@dataclass(frozen=True, kw_only=True)
class Backend:
    """The operations a bootstrap runs; every field defaults to the real implementation above."""

    make_corpus: Callable[..., dict[str, Any]] = make_corpus
    """``make_corpus(out, images=, seed=, noise=, size=, world=, human_images=, test_images=, progress=)``."""
    train: Callable[[str, TrainingConfig, bool], Path] = train
    """``train(kind, cfg, resume)``: writes ``cfg.output.dir`` (``model/``, and ``hf/`` but for pretrain)."""
    train_isolated: Callable[..., Path] = train_isolated
    """``train_isolated(kind, cfg, resume, threads, processes, threads_file=)``: the same, in ``processes``
    data-parallel processes of their own with ``threads`` threads each (``cfg.train.batch_size`` per
    process); one process follows ``threads_file`` (:class:`CoreShares`) when given."""
    run_pipeline: Callable[[PipelineConfig], Path | None] = run_pipeline
    evaluate: Callable[..., dict[str, Any]] = evaluate
    """``evaluate(model_path, test_path, batch_size=, k_test=, num_beams=, ...)``."""
    evaluate_isolated: Callable[..., dict[str, Any]] = evaluate_isolated
    """``evaluate_isolated(model_path, test_path, threads, ...)``: the same, in a process of its own."""
    serve_corpus: Callable[[Path, Path], AbstractContextManager[str]] = serve_corpus
    build_report: Callable[[Path], Path | None] = build_report


REAL = Backend()
"""The default backend: real corpus, training, pipeline, evaluation, server and report."""
