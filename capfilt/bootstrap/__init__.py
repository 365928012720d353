"""``capfilt bootstrap``: BLIP's CapFilt loop, round after round, resumable at step granularity.

The package, top down:

- :mod:`~capfilt.bootstrap.planner`: :func:`run_bootstrap` and :class:`Bootstrap`, which turns a
  config into the run's steps (corpus, round 0, rounds 1..N, the ablation) and runs them;
- :mod:`~capfilt.bootstrap.steps`: the step engine (:class:`Step`, :class:`State`,
  :func:`run_steps`, the fault-injection variables);
- :mod:`~capfilt.bootstrap.backend`: the heavy work the steps hand off (:class:`Backend`:
  corpus, training, pipeline, evaluation, serving, report), injected, real by default;
- :mod:`~capfilt.bootstrap.pairs`: human, web and selected pre-training pairs;
- :mod:`~capfilt.bootstrap.summary`: metrics.jsonl, the CapFilt summary, the ablation table;
- :mod:`~capfilt.bootstrap.config`: :class:`BootstrapConfig` and its sections, :func:`load_config`.

Every name other modules, benchmarks and tests use is importable from ``capfilt.bootstrap``.
"""

from capfilt.bootstrap.backend import REAL, Backend, serve_corpus
from capfilt.bootstrap.config import (
    DEFAULT_CONFIG,
    MODEL_PLACEHOLDER,
    BootstrapCaption,
    BootstrapConfig,
    BootstrapFilter,
    BootstrapOutput,
    CorpusSection,
    EnsembleSection,
    EvalSection,
    PipelineOutput,
    PipelineSection,
    PretrainStep,
    StepTraining,
    default_config_text,
    load_config,
)
from capfilt.bootstrap.pairs import PAIRS_SCHEMA_NAMES, selected_pairs
from capfilt.bootstrap.planner import Bootstrap, CorpusPaths, run_bootstrap
from capfilt.bootstrap.steps import (
    FAIL_AFTER_ENV,
    FAIL_DURING_ENV,
    STATE_FILE,
    InjectedFault,
    State,
    Step,
    run_steps,
    step_table,
)
from capfilt.bootstrap.summary import (
    ABLATION_FILE,
    ABLATION_VARIANTS,
    METRICS_FILE,
    capfilt_summary,
    metrics_row,
    summary_text,
    write_ablation,
    write_metrics,
)
from capfilt.config import _Section  # noqa: F401 - the one section base (tests check it is shared)

__all__ = [
    "ABLATION_FILE",
    "ABLATION_VARIANTS",
    "DEFAULT_CONFIG",
    "FAIL_AFTER_ENV",
    "FAIL_DURING_ENV",
    "METRICS_FILE",
    "MODEL_PLACEHOLDER",
    "PAIRS_SCHEMA_NAMES",
    "REAL",
    "STATE_FILE",
    "Backend",
    "Bootstrap",
    "BootstrapCaption",
    "BootstrapConfig",
    "BootstrapFilter",
    "BootstrapOutput",
    "CorpusPaths",
    "CorpusSection",
    "EnsembleSection",
    "EvalSection",
    "InjectedFault",
    "PipelineOutput",
    "PipelineSection",
    "PretrainStep",
    "State",
    "Step",
    "StepTraining",
    "capfilt_summary",
    "default_config_text",
    "load_config",
    "metrics_row",
    "run_bootstrap",
    "run_steps",
    "selected_pairs",
    "serve_corpus",
    "step_table",
    "summary_text",
    "write_ablation",
    "write_metrics",
]
