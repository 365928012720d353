"""The heavy work a bootstrap step hands off, as one injected :class:`Backend` object.

:class:`~capfilt.bootstrap.planner.Bootstrap` and :func:`~capfilt.bootstrap.planner.run_bootstrap`
take ``backend=`` (default :data:`REAL`): corpus generation, training, the pipeline, evaluation,
serving the corpus on loopback and the HTML report. Tests pass a ``Backend`` whose training,
pipeline and evaluation are cheap deterministic fakes (``Backend(train=..., ...)``; the fields
not given keep the real implementation) instead of patching module functions.
"""

from __future__ import annotations

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


def run_pipeline(cfg: PipelineConfig) -> Path | None:
    """The ``capfilt run`` pipeline (:func:`capfilt.pipeline.run`)."""
    from capfilt import pipeline

    return pipeline.run(cfg)


def evaluate(model_path: Path, data_path: Path, **kwargs: Any) -> dict[str, Any]:
    """``capfilt eval`` of a model on the test set (:func:`capfilt.eval.evaluate`)."""
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
    run_pipeline: Callable[[PipelineConfig], Path | None] = run_pipeline
    evaluate: Callable[..., dict[str, Any]] = evaluate
    """``evaluate(model_path, test_path, batch_size=, k_test=, num_beams=, ...)``."""
    serve_corpus: Callable[[Path, Path], AbstractContextManager[str]] = serve_corpus
    build_report: Callable[[Path], Path | None] = build_report


REAL = Backend()
"""The default backend: real corpus, training, pipeline, evaluation, server and report."""
