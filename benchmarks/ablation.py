"""BLIP Table 1 in small: does CapFilt's data pre-train a better MED than the raw web, over seeds?

For each seed, ``capfilt bootstrap --ablation`` (the embedded demo config unless ``--config``) runs
one CapFilt round and pre-trains MED four times at the same budget (same steps, batch and
settings; only the data differs), all cut from the same round-1 pipeline output:

    raw          human + raw web pairs (MED_0 when round 0 is pre-trained with the same settings;
                 the demo's MED_0 sees every human caption as its own item, so raw is its own run)
    filter       human + the web texts the filter kept
    captioner    human + every web text + one synthetic caption per image (unfiltered)
    capfilt      human + kept web texts + kept synthetic captions (round 1's D_1)

Seed ``s`` sets the corpus seed and every training seed (``--set corpus.seed=s`` etc.), so runs
differ in their data draw and in their initialisation. The script prints mean +- sd (sample sd,
n-1) of TR@1, IR@1 (test retrieval after ITM re-rank, %) and CIDEr (x100) per variant and says
whether CapFilt beats raw web on TR@1 and on CIDEr by more than one sd of the paired difference
(capfilt - raw of the same seed). Every variant is evaluated on ``--test-images`` held-out images
(default 1,000; the main job uses 200, where CIDEr swung +-15 between seeds). One seed has no sd: the table is then printed as a smoke test,
never as evidence.

    python benchmarks/ablation.py --seeds 3 --out runs/ablation-bench
    python benchmarks/ablation.py --seeds 1 --out /tmp/abl --set pretrain.train.steps=50   # smoke test

Writes ``OUT/ablation_seeds.json`` (every seed's rows, the summary, wall times per seed and per
step, load average);
each seed's bootstrap directory ``OUT/seed-S`` is kept (a rerun resumes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see synthetic_capfilt.py
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("raw", "filter", "captioner", "capfilt")
LABELS = {
    "raw": "raw web + human (no CapFilt)",
    "filter": "filter only",
    "captioner": "captioner only",
    "capfilt": "captioner + filter (CapFilt)",
}
METRICS = (("txt_r1", "TR@1", 1.0), ("img_r1", "IR@1", 1.0), ("cider", "CIDEr", 100.0))
"""(ablation.json key, column name, scale): retrieval is already in %, CIDEr is shown x100 as BLIP does."""


def seed_overrides(seed: int) -> list[str]:
    """``--set`` changes that make seed ``seed``'s run: its corpus draw and every training seed."""
    return [
        f"corpus.seed={seed}",
        f"pretrain.train.seed={seed}",
        f"captioner.train.seed={1000 + seed}",
        f"filter.train.seed={2000 + seed}",
        f"pipeline.caption.seed={seed}",
    ]


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per variant and metric: mean, sd, values; and CapFilt vs raw on TR@1 and CIDEr.

    ``runs``: one ``{variant: ablation.json row}`` per seed. The direction holds for a metric when
    the mean paired difference (capfilt - raw, same seed) exceeds the sd of those differences;
    with one seed it is undefined (None).
    """
    table: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        table[variant] = {"pairs": mean_sd([float(run[variant].get("pairs", 0)) for run in runs])[0]}
        for key, _, scale in METRICS:
            values = [float(run[variant].get(key, math.nan)) * scale for run in runs]
            mean, sd = mean_sd(values)
            table[variant][key] = {"mean": mean, "sd": sd, "values": values}
    direction: dict[str, Any] = {}
    for key in ("txt_r1", "cider"):
        scale = dict((k, s) for k, _, s in METRICS)[key]
        diffs = [(float(run["capfilt"][key]) - float(run["raw"][key])) * scale for run in runs]
        mean, sd = mean_sd(diffs)
        direction[key] = {"mean_diff": mean, "sd_diff": sd, "met": None if sd is None else bool(mean > sd)}
    return {"seeds": len(runs), "variants": table, "capfilt_vs_raw": direction}


def format_table(summary: dict[str, Any]) -> str:
    """The printed table: mean +- sd per cell (only the mean, flagged, for one seed)."""
    n = summary["seeds"]
    head = f"{'pre-training data':<32} {'pairs':>7}" + "".join(f" {name:>13}" for _, name, _ in METRICS)
    lines = [head]
    for variant in VARIANTS:
        row = summary["variants"][variant]
        cells = []
        for key, _, _ in METRICS:
            cell = row[key]
            cells.append(f"{cell['mean']:.1f}" + ("" if cell["sd"] is None else f" +- {cell['sd']:.1f}"))
        lines.append(f"{LABELS[variant]:<32} {row['pairs']:>7.0f}" + "".join(f" {c:>13}" for c in cells))
    lines.append(f"({n} seed{'s' if n != 1 else ''}; TR@1/IR@1 in %, CIDEr x100)")
    for key, name in (("txt_r1", "TR@1"), ("cider", "CIDEr")):
        d = summary["capfilt_vs_raw"][key]
        if d["sd_diff"] is None:
            lines.append(
                f"CapFilt - raw on {name}: {d['mean_diff']:+.1f} (one seed: no sd, NOT evidence either way)"
            )
        else:
            verdict = "more" if d["met"] else "NOT more"
            lines.append(
                f"CapFilt - raw on {name}: {d['mean_diff']:+.1f} +- {d['sd_diff']:.1f} (paired over seeds): "
                f"{verdict} than one sd"
            )
    return "\n".join(lines)


def step_seconds(run_dir: Path) -> dict[str, float | None]:
    """Each step's wall seconds in a bootstrap run directory (its ``state.json``; None: not timed)."""
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    return {name: entry.get("seconds") for name, entry in state.get("steps", {}).items()}


def run_seed(
    seed: int, *, config: str | None, out: Path, extra: Sequence[str]
) -> tuple[dict[str, Any], float, dict[str, float | None]]:
    """One seed's ``capfilt bootstrap --ablation``; returns its rows by variant, wall seconds and step seconds."""
    from capfilt.bootstrap import run_bootstrap

    started = time.perf_counter()
    run_dir = run_bootstrap(config, [*seed_overrides(seed), *extra], out=out, ablation=True, progress=False)
    seconds = time.perf_counter() - started
    rows = json.loads((run_dir / "ablation.json").read_text(encoding="utf-8"))["variants"]
    return {row["variant"]: row for row in rows}, seconds, step_seconds(run_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="Number of seeds (0..N-1); 3 or more for evidence."
    )
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="Bootstrap config (default: the embedded demo).")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation-bench"))
    parser.add_argument(
        "--test-images",
        type=int,
        default=1000,
        help=(
            "Held-out test images every variant is evaluated on (corpus.test_images). 1,000, not the "
            "main job's 200: on 200 CIDEr swung +-15 between seeds of one row and hid the direction."
        ),
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config change for every seed.",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds: must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    runs, per_seed = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        print(f"=== seed {seed} ===", flush=True)
        extra = [f"corpus.test_images={args.test_images}", *args.sets]
        rows, seconds, steps = run_seed(seed, config=args.config, out=args.out / f"seed-{seed}", extra=extra)
        runs.append(rows)
        per_seed.append(
            {"seed": seed, "seconds": round(seconds, 1), "load_avg": os.getloadavg(), "steps": steps, "rows": rows}
        )
        print(f"seed {seed}: {seconds:.0f}s, load average {os.getloadavg()[0]:.2f}", flush=True)
    summary = summarize(runs)
    total = time.perf_counter() - started
    result = {
        "summary": summary,
        "seeds": per_seed,
        "seconds": round(total, 1),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "config": args.config or "<embedded bootstrap_demo.yaml>",
        "sets": args.sets,
    }
    (args.out / "ablation_seeds.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n" + format_table(summary))
    print(
        f"\n{total:.0f}s for {args.seeds} seed(s); load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {args.out / 'ablation_seeds.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
