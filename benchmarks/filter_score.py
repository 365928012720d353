"""The filter's score: ITM alone against ITM mixed with ITC, on finished bootstrap runs.

For each bootstrap run directory given (``capfilt bootstrap`` on a synthetic corpus, e.g. the
main job's ``runs/bootstrap``), its round-1 filter re-scores the round's web texts and synthetic
captions with the pipeline's own ``Filter`` stage, ITC cosines included (no Ray, no training;
the images are the corpus's own files). Then, for each rule, the pipeline's selection
(:func:`capfilt.stages.select.select_table`, with the round's ``keep_synthetic`` and
``select.min_agreement``) and the bootstrap's judge (:func:`capfilt.bootstrap.summary.capfilt_summary`)
say how well the score ranks each kind of web noise (ROC-AUC) and how noisy the kept set is.

Usage::

    python benchmarks/filter_score.py runs/bootstrap [RUN ...] [--rules itm:0.3,0.5:0.55]

``--rules`` is a list of ``itc_weight:threshold`` (weight 0 = BLIP's ITM-only rule). Prints one
line per run and rule, then the range over runs per rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

NOISE = ("junk", "mismatched", "wrong_attribute")


def rescored(run: Path):  # -> pa.Table
    """Round 1's samples with the round's own filter's ITM and ITC scores, recomputed."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.bootstrap.summary import samples_files
    from capfilt.stages.filter import Filter
    from capfilt.stages.select import object_array

    files = samples_files(run / "round-1" / "pipeline")
    if not files:
        raise SystemExit(f"{run}: no committed round-1 samples (run `capfilt bootstrap` first)")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    rows = table.select(["key", "status", "error", "web_text", "synthetic_texts"]).to_pylist()
    images = run / "corpus" / "images" / "web"
    batch = {name: object_array([row[name] for row in rows]) for name in rows[0]}
    batch["synthetic_texts"] = object_array([row["synthetic_texts"] or [] for row in rows])
    batch["image"] = object_array([(images / f"{row['key']}.jpg").read_bytes() for row in rows])
    cfg = SimpleNamespace(
        models=[str(run / "round-1" / "filter" / "model")], model=None, num_gpus=0, dtype="float32",
        itc_column=True, itc_weight=0.0, batch_size=64,
    )  # fmt: skip
    scores = Filter(cfg, device="cpu").score(batch)
    for name in ("web_itm", "web_itc"):
        table = table.drop_columns([name]) if name in table.column_names else table
        table = table.append_column(name, pa.array(np.asarray(scores[name], dtype=float)))
    for name in ("synthetic_itm", "synthetic_itc"):
        table = table.drop_columns([name]) if name in table.column_names else table
        values = [[float(v) for v in cell] for cell in scores[name]]
        table = table.append_column(name, pa.array(values, type=pa.list_(pa.float64())))
    return table


def main(argv: list[str] | None = None) -> dict[tuple[float, float], list[dict[str, float]]]:
    """Prints the comparison; returns, per (itc_weight, threshold), one dict of figures per run."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="bootstrap run directories (synthetic corpus)")
    parser.add_argument("--rules", default="0:0.3,0.5:0.55", help="itc_weight:threshold, comma-separated")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    from capfilt.bootstrap.summary import capfilt_summary
    from capfilt.eval import auc_text
    from capfilt.rundir.read import resolve_run
    from capfilt.stages.select import score_words

    rules = [tuple(float(x) for x in rule.split(":")) for rule in args.rules.split(",")]
    results: dict[tuple[float, float], list[dict[str, float]]] = {rule: [] for rule in rules}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            labels = run / "corpus" / "web.parquet"
            if not labels.is_file():
                raise SystemExit(f"{run}: no corpus/web.parquet; this needs a synthetic corpus's labels")
            own = resolve_run(run, round=1).selection()
            if own is None:
                raise SystemExit(f"{run}: round 1 has no pipeline config.yaml")
            table = rescored(run)
            for weight, threshold in rules:
                rule = dataclasses.replace(own, threshold=threshold, itc_weight=weight)
                path = Path(tmp) / "samples.parquet"
                pq.write_table(rule.apply(table), path)
                s = capfilt_summary(
                    [path], labels, threshold=threshold, itc_weight=weight, min_agreement=rule.min_agreement
                )
                by_type = s["filter"]["by_type"]
                figures = {name: by_type[name]["auc"] for name in NOISE}
                figures.update(
                    kept_set=s["noise"]["kept_set"], kept_web=s["pairs"]["kept_web"],
                    clean_removed=by_type["clean"]["removed"],
                )  # fmt: skip
                results[(weight, threshold)].append(figures)
                print(
                    f"{run}  {score_words(weight)} >= {threshold:g}:  ROC-AUC junk / mismatched / wrong attribute "
                    f"{' / '.join(auc_text(figures[name]) for name in NOISE)};  kept set {_pct(figures['kept_set'])} "
                    f"noisy;  web texts kept {figures['kept_web']}, correct ones removed {_pct(figures['clean_removed'])}",
                    flush=True,
                )
    print(
        f"\nrange over {len(args.runs)} run(s): junk | mismatched | wrong attribute | kept set noisy | web kept"
    )
    for (weight, threshold), rows in results.items():
        cells = [_span(rows, name, auc_text) for name in NOISE]
        cells += [_span(rows, "kept_set", _pct), _span(rows, "kept_web", str)]
        print(f"  {score_words(weight)} >= {threshold:g}: " + " | ".join(cells))
    return results


def _span(rows: list[dict[str, float]], name: str, show: Callable[[Any], str]) -> str:
    """min-max of one figure over the runs that have it."""
    values = [r[name] for r in rows if r[name] is not None]
    return f"{show(min(values))}-{show(max(values))}" if values else "n/a"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    main()
