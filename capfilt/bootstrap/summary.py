"""What a bootstrap run reports: per-round metrics, the CapFilt summary, the ablation table.

- :func:`capfilt_summary` judges a round's filter, captioner and kept set against a synthetic
  corpus's labels (``eval.json``'s ``capfilt``); :func:`summary_text` prints it;
- :func:`filter_summary` is the round's filter scored on the web noise labels (``eval.json``'s
  ``filter``);
- :func:`metrics_row` / :func:`write_metrics` build ``RUN/metrics.jsonl`` from the eval.json files;
- :func:`write_ablation` writes ``RUN/ablation.json`` and the printed Table 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capfilt.rundir import atomic_write_text

METRICS_FILE = "metrics.jsonl"
ABLATION_FILE = "ablation.json"
ABLATION_VARIANTS: tuple[str, ...] = ("raw", "filter", "captioner", "capfilt")
"""BLIP Table 1's rows: no CapFilt, filter only, captioner only, captioner + filter."""


def samples_files(pipeline_dir: Path) -> list[Path]:
    """The committed ``samples/*.parquet`` of a round's pipeline run, in shard order."""
    from capfilt.stages import write as writer

    return [writer.samples_path(pipeline_dir, s) for s in sorted(writer.committed_shards(pipeline_dir))]


def _web_scores(rows: Sequence[dict[str, Any]], itc_weight: float) -> Any:
    """Each row's web-text filter score (:func:`capfilt.stages.select.filter_score`); NaN when not scored."""
    import numpy as np

    from capfilt.stages.select import filter_score

    def column(name: str) -> Any:
        return np.array([math.nan if row.get(name) is None else row[name] for row in rows], dtype=float)

    return filter_score(column("web_itm"), column("web_itc") if itc_weight else None, itc_weight)


def _score_columns(itc_weight: float) -> list[str]:
    """The samples columns the filter score is made of."""
    return ["web_itm", "web_itc"] if itc_weight else ["web_itm"]


def filter_summary(
    files: Sequence[Path], *, threshold: float, itc_weight: float = 0.0
) -> dict[str, Any] | None:
    """A round's filter judged on the web noise labels, from the scores the pipeline stored.

    The score is the one the threshold applied to (ITM, or ITM and ITC mixed by ``itc_weight``).
    None without committed samples, without the ``noisy``/``noise_type`` columns (a corpus
    without labels), or without a scored row.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from capfilt.eval import filter_metrics

    if not files:
        return None
    names = pq.read_schema(files[0]).names
    if not {"noisy", "noise_type"} <= set(names):
        return None
    rows = [
        row
        for f in files
        for row in pq.read_table(
            f, columns=["status", *_score_columns(itc_weight), "noisy", "noise_type"]
        ).to_pylist()
        if row["status"] == "ok"
    ]
    scores = _web_scores(rows, itc_weight)
    scored = ~np.isnan(scores)
    if not scored.any():
        return None
    return filter_metrics(
        scores[scored],
        [bool(r["noisy"]) for r, s in zip(rows, scored, strict=True) if s],
        [r["noise_type"] for r, s in zip(rows, scored, strict=True) if s],
        threshold=threshold,
    )


def capfilt_summary(
    samples_files: Sequence[Path],
    web_labels: Path,
    *,
    threshold: float,
    min_agreement: float | None = None,
    itc_weight: float = 0.0,
) -> dict[str, Any]:
    """Round r's CapFilt judged against the truth a synthetic corpus knows about every web image.

    ``samples_files``: the round's pipeline ``samples/*.parquet``; ``web_labels``: the corpus's
    ``web.parquet`` (key, noise_type, objects). Reported, over the rows whose image was downloaded:

    - ``filter``: per noise type, how many web texts there were, the share the filter removed
      (its recall on that type; for ``clean`` the false-removal rate), its ROC-AUC against clean texts,
      and its precision on that type (removed texts of the type / removed texts of the type or clean);
    - ``captions``: the attribute check (:func:`capfilt.synth.check_caption`) on every synthetic
      caption, and the share of images with at least one caption that passes;
    - ``noise``: the share of noisy web texts before the filter, among the kept web texts, and in
      the kept web part of D_r (kept web texts + kept synthetic captions, a synthetic caption counting
      as noise when it fails the attribute check);
    - ``pairs``: web pairs before, web texts kept, synthetic captions added;
    - ``caption_scores``: how well the filter's score and the agreement among an image's
      captions (``synthetic_agreement``) each tell right synthetic captions (attribute check) from
      wrong ones, as ROC-AUC (None when a score was not stored), and ``min_agreement``, the rule's.

    The filter's score is the one its threshold applied to: ITM, or ITM and ITC mixed by
    ``itc_weight`` (:func:`capfilt.stages.select.filter_score`).
    """
    import numpy as np
    import pyarrow.parquet as pq

    from capfilt.eval import roc_auc
    from capfilt.stages.select import filter_score
    from capfilt.synth import check_caption

    labels = pq.read_table(web_labels, columns=["key", "noise_type", "objects"]).to_pylist()
    truth = {row["key"]: row for row in labels}
    columns = ["key", "status", *_score_columns(itc_weight), "web_kept", "synthetic_texts", "synthetic_kept"]
    optional = ["synthetic_itm", "synthetic_agreement"] + (["synthetic_itc"] if itc_weight else [])
    rows = [
        row
        for f in samples_files
        for row in pq.read_table(
            f, columns=columns + [c for c in optional if c in pq.read_schema(f).names]
        ).to_pylist()
        if row["status"] == "ok" and row["key"] in truth
    ]
    types = [truth[row["key"]]["noise_type"] for row in rows]
    scores = _web_scores(rows, itc_weight)
    removed = np.array([not row["web_kept"] for row in rows], dtype=bool)
    type_arr = np.array(types, dtype=object)
    scored = ~np.isnan(scores)
    clean = (type_arr == "clean") & scored
    per_type: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(types)):
        mine = type_arr == kind
        entry: dict[str, Any] = {
            "count": int(mine.sum()),
            "removed": float(removed[mine].mean()) if mine.any() else None,
        }
        if kind != "clean":
            true_removed = int((removed & mine).sum())
            false_removed = int((removed & (type_arr == "clean")).sum())
            entry["recall"] = entry["removed"]
            entry["precision"] = (
                true_removed / (true_removed + false_removed) if true_removed + false_removed else None
            )
            entry["auc"] = roc_auc(scores[clean], scores[mine & scored])
        per_type[kind] = entry

    captions_total = captions_right = images_with_right = images_captioned = 0
    kept_synth = kept_synth_wrong = 0
    caption_scores: dict[str, tuple[list[float], list[float]]] = {
        name: ([], []) for name in ("synthetic_score", "synthetic_agreement")
    }
    for row in rows:
        objects = truth[row["key"]]["objects"]
        texts = row["synthetic_texts"] or []
        kept = row["synthetic_kept"] or [False] * len(texts)
        right = [check_caption(text, objects) for text in texts]
        itm = np.array([math.nan if v is None else v for v in row.get("synthetic_itm") or []], dtype=float)
        itc = np.array([math.nan if v is None else v for v in row.get("synthetic_itc") or []], dtype=float)
        score = filter_score(itm, itc if itc.size == itm.size else np.full(itm.size, math.nan), itc_weight)
        for name, (right_scores, wrong_scores) in caption_scores.items():
            values = list(score) if name == "synthetic_score" else row.get(name) or []
            if len(values) == len(texts):
                for ok, value in zip(right, values, strict=True):
                    if value is not None and not math.isnan(value):
                        (right_scores if ok else wrong_scores).append(value)
        captions_total += len(texts)
        captions_right += sum(right)
        if texts:
            images_captioned += 1
            images_with_right += any(right)
        for ok, keep in zip(right, kept, strict=True):
            if keep:
                kept_synth += 1
                kept_synth_wrong += not ok
    noisy = type_arr != "clean"
    kept_web = ~removed
    n_web, n_kept_web = len(rows), int(kept_web.sum())
    kept_web_noisy = int((kept_web & noisy).sum())

    def share(part: int, whole: int) -> float | None:
        return part / whole if whole else None

    return {
        "threshold": float(threshold),
        "itc_weight": float(itc_weight),
        "filter": {"by_type": per_type, "auc": roc_auc(scores[clean], scores[noisy & scored])},
        "captions": {
            "captions": captions_total,
            "attribute_check": share(captions_right, captions_total),
            "images": images_captioned,
            "images_with_a_right_caption": share(images_with_right, images_captioned),
        },
        "noise": {
            "raw_web": share(int(noisy.sum()), n_web),
            "kept_web_texts": share(kept_web_noisy, n_kept_web),
            "kept_synthetic_wrong": share(kept_synth_wrong, kept_synth),
            "kept_set": share(kept_web_noisy + kept_synth_wrong, n_kept_web + kept_synth),
        },
        "pairs": {
            "raw_web": n_web,
            "kept_web": n_kept_web,
            "synthetic_added": kept_synth,
            "kept_set": n_kept_web + kept_synth,
        },
        "caption_scores": {
            "score_auc": roc_auc(*caption_scores["synthetic_score"]),
            "agreement_auc": roc_auc(*caption_scores["synthetic_agreement"]),
            "min_agreement": min_agreement,
        },
    }


def _pct_text(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def summary_text(summary: dict[str, Any], r: int = 1) -> str:
    """The plain-words account of :func:`capfilt_summary` that ``capfilt bootstrap`` prints."""
    from capfilt.eval import auc_text
    from capfilt.stages.select import score_words

    flt, caps, noise, pairs = summary["filter"], summary["captions"], summary["noise"], summary["pairs"]
    by_type = flt["by_type"]
    lines = [
        f"What CapFilt did in round {r}, checked against the synthetic corpus's ground truth:",
        f"  The filter ({score_words(summary.get('itc_weight', 0.0))} < {summary['threshold']:g} removes a web text) — ROC-AUC: 0.5 is a coin flip, 1.0 "
        "ranks every correct text above every noisy one:",
    ]
    names = {
        "junk": "junk (file names, shop slogans)",
        "mismatched": "mismatched (another image's text)",
        "wrong_attribute": "wrong attribute (one colour or shape wrong)",
    }
    for kind in ("junk", "mismatched", "wrong_attribute"):
        if kind in by_type:
            e = by_type[kind]
            lines.append(
                f"    {names[kind]:<44} ROC-AUC {auc_text(e.get('auc'))}, removed {_pct_text(e.get('recall'))} "
                f"(recall), precision {_pct_text(e.get('precision'))}, n={e['count']}"
            )
    if "clean" in by_type:
        lines.append(
            f"    {'correct web texts':<44} removed {_pct_text(by_type['clean'].get('removed'))} by mistake, "
            f"n={by_type['clean']['count']}"
        )
    lines += [
        f"  The captioner: {_pct_text(caps['attribute_check'])} of its {caps['captions']:,} synthetic captions name "
        f"every object's colour and shape correctly (attribute check); {_pct_text(caps['images_with_a_right_caption'])} "
        f"of {caps['images']:,} web images got at least one such caption.",
        f"  Noise: {_pct_text(noise['raw_web'])} of the raw web texts are wrong; after CapFilt "
        f"{_pct_text(noise['kept_set'])} of the kept web pairs are (kept web texts {_pct_text(noise['kept_web_texts'])}, "
        f"kept synthetic captions {_pct_text(noise['kept_synthetic_wrong'])}).",
        f"  Pairs: {pairs['raw_web']:,} raw web pairs -> {pairs['kept_web']:,} web texts kept + "
        f"{pairs['synthetic_added']:,} synthetic captions added = {pairs['kept_set']:,}.",
    ]
    scores = summary.get("caption_scores") or {}
    if scores.get("agreement_auc") is not None:
        rule = (
            f"; a caption is kept only when its agreement is >= {scores['min_agreement']:g}"
            if scores.get("min_agreement") is not None
            else ""
        )
        lines.insert(
            -2,
            f"  Telling right captions from wrong ones (ROC-AUC): the filter's score {auc_text(scores.get('score_auc'))}, "
            f"agreement with the image's other sampled captions {auc_text(scores['agreement_auc'])}{rule}.",
        )
    return "\n".join(lines)


def metrics_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat, numeric summary of one eval.json (a metrics.jsonl row / an ablation table row)."""
    ev = result.get("eval") or {}
    retrieval = ev.get("retrieval") or {}
    captioning = ev.get("captioning") or {}
    flt = result.get("filter") or {}
    by_source = (result.get("data") or {}).get("by_source") or {}
    row: dict[str, Any] = {}
    if "round" in result:
        row["round"] = result["round"]
    if "variant" in result:
        row["variant"] = result["variant"]
    row.update(
        txt_r1=retrieval.get("txt_r1"), img_r1=retrieval.get("img_r1"),
        txt_r5=retrieval.get("txt_r5"), img_r5=retrieval.get("img_r5"),
        cider=captioning.get("cider"), bleu_4=captioning.get("bleu_4"),
        attribute_accuracy=captioning.get("attribute_accuracy"),
        filter_auc=flt.get("auc"), filter_precision=flt.get("precision"), filter_recall=flt.get("recall"),
        pairs=(result.get("data") or {}).get("pairs"),
        web_pairs=by_source.get("web", 0), synthetic_pairs=by_source.get("synthetic", 0),
        human_pairs=by_source.get("human", 0),
    )  # fmt: skip
    return {k: v for k, v in row.items() if v is not None}


def write_metrics(run_dir: Path) -> Path:
    """Rebuild ``metrics.jsonl`` (one row per evaluated round) from the committed eval.json files."""
    rows = []
    for path in sorted(run_dir.glob("round-*/eval.json"), key=lambda p: int(p.parent.name.split("-")[1])):
        rows.append(metrics_row(json.loads(path.read_text(encoding="utf-8"))))
    target = run_dir / METRICS_FILE
    atomic_write_text(target, "".join(json.dumps(row) + "\n" for row in rows))
    return target


_ABLATION_LABELS = {
    "raw": "raw web + human (no CapFilt)",
    "filter": "filter only",
    "captioner": "captioner only",
    "capfilt": "captioner + filter (CapFilt)",
}


def write_ablation(run_dir: Path, *, raw_from_round0: bool = False) -> tuple[Path, str]:
    """``ablation.json`` and the printed table (TR@1, IR@1, CIDEr) from the variants' eval.json.

    ``raw_from_round0``: the raw row is MED_0's evaluation (see :meth:`Bootstrap.raw_is_round0`).
    """
    rows = []
    for variant in ABLATION_VARIANTS:
        if variant == "capfilt":
            path = run_dir / "round-1" / "eval.json"
        elif variant == "raw" and raw_from_round0:
            path = run_dir / "round-0" / "eval.json"
        else:
            path = run_dir / "ablation" / variant / "eval.json"
        result = json.loads(path.read_text(encoding="utf-8"))
        row = metrics_row({**result, "variant": variant, "filter": None})
        row.pop("round", None)
        rows.append(row)
    atomic_write_text(run_dir / ABLATION_FILE, json.dumps({"variants": rows}, indent=2) + "\n")

    def cell(value: Any, scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.1f}"

    lines = [f"{'pre-training data':<32} {'pairs':>7} {'TR@1':>6} {'IR@1':>6} {'CIDEr':>6}"]
    for row in rows:
        lines.append(
            f"{_ABLATION_LABELS[row['variant']]:<32} {row.get('pairs', 0):>7} {cell(row.get('txt_r1')):>6} "
            f"{cell(row.get('img_r1')):>6} {cell(row.get('cider'), 100):>6}"
        )
    return run_dir / ABLATION_FILE, "\n".join(lines)
