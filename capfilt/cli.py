"""The `capfilt` command line: parses, validates, dispatches. No logic of its own.

Every command imports its module lazily so `capfilt --help` stays fast, and turns the errors
meant for users (`capfilt.errors.UserError`, `model.errors.CheckpointError`) into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# OpenMP threads that busy-wait starve the data-loader workers and Ray tasks sharing the cores:
# on 2 busy cores a pre-training step ran at 5 samples/s with the default policy and 45 with
# PASSIVE (benchmarks/README.md). Set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="capfilt",
    help="BLIP-style CapFilt: caption and filter noisy web image-text pairs, then pre-train on the result.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Import, export and inspect MED checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field: --set section.key=value (repeatable)."),
]


def _user_errors(fn):
    """Print user-facing errors as one line and exit 2 (no traceback).

    User-facing: :class:`capfilt.errors.UserError`, :class:`model.errors.CheckpointError`, and
    an ``OSError`` about the disk or permissions (read-only, full, no access, a path through
    a file; see ``capfilt.errors.USER_ERRNOS``). Any other exception is a bug and keeps its
    traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from capfilt.errors import UserError, user_os_error
        from model.errors import CheckpointError  # torch-free: the driver of `capfilt run` never loads torch

        try:
            return fn(*args, **kwargs)
        except (UserError, CheckpointError) as err:
            message = str(err)
        except OSError as err:
            if (user := user_os_error(err)) is None:
                raise
            message = str(user)
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        raise typer.Exit(2)

    return wrapper


# --------------------------------------------------------------------------- pipeline


@app.command()
@_user_errors
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML (see pipelines/).")],
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; no work.")] = False,
    retry: Annotated[
        str | None,
        typer.Option(
            "--retry",
            metavar="STATUS[,STATUS...]",
            help="Re-process in place only the rows of a finished run with these statuses; "
            "'transient' = download failures worth another try (timeouts, connection errors, HTTP 408/429/5xx).",
        ),
    ] = None,
):
    """Run the CapFilt pipeline: read -> download -> caption -> filter -> select -> write."""
    from capfilt import config as cfgmod
    from capfilt import pipeline

    cfg = cfgmod.load(config, set_ or [])
    result = pipeline.run(cfg, dry_run=dry_run, retry=retry)
    if result is not None:
        typer.echo(str(result))


@app.command()
@_user_errors
def validate(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML to check.")],
    set_: SetOpt = None,
):
    """Check a pipeline YAML (and overrides) and print the resolved config."""
    from capfilt import config as cfgmod

    cfg = cfgmod.load(config, set_ or [])
    typer.echo(cfgmod.dump(cfg), nl=False)


# --------------------------------------------------------------------------- data


@app.command()
@_user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output directory for the synthetic corpus.")],
    images: Annotated[
        int,
        typer.Option(
            help="Number of web images; human images default to a third of this, test images to a tenth (at least 100)."
        ),
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")] = 0,
    noise: Annotated[
        float, typer.Option(help="Share of noisy web texts (mismatched, junk, wrong attribute).")
    ] = 0.4,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 96,
    human: Annotated[int | None, typer.Option(help="Human-captioned images (default: a third of --images).")] = None,
    test: Annotated[int | None, typer.Option(help="Held-out test images (default: a tenth of --images, >= 100).")] = None,
    world: Annotated[str, typer.Option(help="World preset: standard (7 shapes x 8 colours, textured backgrounds) or demo (4 x 4, plain backgrounds, larger objects).")] = "standard",
):
    """Render the procedural image-text world: human, web (with noise labels) and test splits."""
    from capfilt import synth as synthmod

    summary = synthmod.make_corpus(
        out, images=images, seed=seed, noise=noise, size=size, human_images=human, test_images=test, world=world
    )
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
@_user_errors
def serve(
    directory: Annotated[Path, typer.Argument(help="Directory to serve on 127.0.0.1.")],
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 8000,
):
    """Serve a directory over HTTP on loopback (the synthetic corpus's images)."""
    from capfilt import serve as servemod

    servemod.serve_forever(directory, port)


# --------------------------------------------------------------------------- training


@app.command()
@_user_errors
def train(
    kind: Annotated[str, typer.Argument(help="pretrain (ITC+ITM+LM) | captioner (LM) | filter (ITC+ITM).")],
    config: Annotated[Path, typer.Argument(help="Training YAML.")],
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in output.dir.")
    ] = False,
):
    """Pre-train MED or fine-tune a captioner / filter."""
    from capfilt import train as trainmod
    from capfilt.errors import UserError

    if kind not in ("pretrain", "captioner", "filter"):
        raise UserError(f"train: unknown kind {kind!r}; expected pretrain, captioner or filter")
    out = trainmod.run_training(kind, config, set_ or [], resume=resume)
    typer.echo(str(out))


@app.command("eval")
@_user_errors
def eval_(
    model_path: Annotated[Path, typer.Argument(help="capfilt checkpoint dir or HF BLIP dir.")],
    data: Annotated[Path, typer.Option(help="Test Parquet (image bytes + reference captions).")],
    filter_data: Annotated[
        Path | None, typer.Option(help="Web Parquet with noise labels, for filter metrics.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the JSON here as well as to stdout.")] = None,
    k_test: Annotated[
        int, typer.Option(help="ITM re-ranks the top k of the ITC ranking (BLIP k_test).")
    ] = 128,
    threshold: Annotated[float, typer.Option(help="Filter threshold on the ITM match probability.")] = 0.5,
    limit: Annotated[int | None, typer.Option(help="Evaluate on the first N rows only.")] = None,
):
    """Retrieval R@1/5/10, caption BLEU-4/CIDEr and, with noise labels, filter ROC-AUC."""
    from capfilt import eval as evalmod
    from capfilt.errors import UserError

    for p in [model_path, data] + ([filter_data] if filter_data else []):
        if not Path(p).exists():
            raise UserError(f"{p}: no such file or directory")
    result = evalmod.evaluate(
        model_path, data, filter_data=filter_data, k_test=k_test, threshold=threshold, limit=limit
    )
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    typer.echo(text)


@app.command()
@_user_errors
def bootstrap(
    config: Annotated[
        Path | None, typer.Argument(help="Bootstrap YAML (default: the embedded demo).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help="Rounds of CapFilt (overrides the config).")
    ] = None,
    set_: SetOpt = None,
    ablation: Annotated[
        bool, typer.Option("--ablation", help="Also pre-train on raw / filter-only / captioner-only data.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/bootstrap).")] = None,
):
    """Multi-round CapFilt: train captioner and filter, clean the web pairs, pre-train on them, repeat."""
    from capfilt.bootstrap import run_bootstrap

    run_dir = run_bootstrap(config, set_ or [], rounds=rounds, out=out, ablation=ablation)
    typer.echo(str(run_dir))


# --------------------------------------------------------------------------- results


@app.command()
@_user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (capfilt run) or a bootstrap directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the exported dataset.")],
    format_: Annotated[str, typer.Option("--format", help="webdataset | parquet | jsonl")] = "webdataset",
    round_: Annotated[
        int | None, typer.Option("--round", help="Bootstrap round (default: the latest).")
    ] = None,
    rows_per_shard: Annotated[int, typer.Option(help="Pairs per output shard.")] = 10_000,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing export in --out.")
    ] = False,
):
    """Export the cleaned pairs (image, text, source, score) with a dataset card."""
    from capfilt import export as exportmod

    summary = exportmod.export(
        run_dir, out, format=format_, round=round_, rows_per_shard=rows_per_shard, overwrite=overwrite
    )
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
@_user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or a bootstrap directory.")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML path (default RUN/report.html).")] = None,
    round_: Annotated[
        int | None, typer.Option("--round", help="Bootstrap round (default: the latest).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Example pairs per section.")] = 48,
):
    """Write one self-contained HTML report: what was kept, what was removed, and why."""
    from capfilt import report as reportmod

    path = reportmod.build_report(run_dir, out, samples_per_section=samples, round=round_)
    typer.echo(str(path))


# --------------------------------------------------------------------------- model


@model_app.command("import")
@_user_errors
def model_import(
    out: Annotated[Path, typer.Option("--out", help="capfilt checkpoint directory to write.")],
    captioner: Annotated[Path | None, typer.Option(help="HF BlipForConditionalGeneration dir.")] = None,
    filter_: Annotated[
        Path | None, typer.Option("--filter", help="HF BlipForImageTextRetrieval dir.")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow .bin/.pt weights (unsafe).")
    ] = False,
    itm_enc_token: Annotated[
        bool,
        typer.Option("--itm-enc-token/--no-itm-enc-token", help="Insert [ENC] for ITM (BLIP) or not (HF)."),
    ] = False,
):
    """Import Hugging Face BLIP checkpoints into a capfilt MED checkpoint."""
    from capfilt.errors import UserError
    from model import hf

    if captioner is None and filter_ is None:
        raise UserError("model import: give --captioner HF_DIR and/or --filter HF_DIR")
    for p in (captioner, filter_):
        if p is not None and not Path(p).exists():
            raise UserError(f"{p}: no such directory")
    med, tokenizer = hf.import_hf(
        captioner=captioner, filter=filter_, allow_pickle=allow_pickle, itm_use_enc_token=itm_enc_token
    )
    med.save(out, tokenizer=tokenizer)
    typer.echo(str(out))


@model_app.command("export")
@_user_errors
def model_export(
    checkpoint: Annotated[Path, typer.Argument(help="capfilt checkpoint directory.")],
    out: Annotated[Path, typer.Option("--out", help="Writes OUT/captioner and OUT/filter (HF BLIP format).")],
):
    """Export a MED as HF BLIP captioner and filter directories."""
    from capfilt.errors import UserError
    from model import hf
    from model.med import MED

    if not Path(checkpoint).exists():
        raise UserError(f"{checkpoint}: no such directory")
    med, tokenizer = MED.load(checkpoint)
    hf.export_captioner(med, tokenizer, Path(out) / "captioner")
    hf.export_filter(med, tokenizer, Path(out) / "filter")
    typer.echo(f"{Path(out) / 'captioner'}\n{Path(out) / 'filter'}")


@model_app.command("info")
@_user_errors
def model_info(
    target: Annotated[
        str, typer.Argument(help="Preset name (tiny, base, large), capfilt checkpoint or HF dir.")
    ],
):
    """Print parameter counts per part of the MED."""
    from capfilt.errors import UserError
    from model import hf
    from model.med import MED, MEDConfig, parameter_counts

    if Path(target).exists():
        med, _ = hf.load_any(Path(target))
    else:
        try:
            cfg = MEDConfig.preset(target)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise UserError(f"{target}: neither a path nor a preset ({err})") from None
        med = MED(cfg)
    counts = parameter_counts(med)
    width = max(len(k) for k in counts)
    for name, n in counts.items():
        typer.echo(f"{name:<{width}}  {n:>13,}  ({n / 1e6:.1f}M)")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
