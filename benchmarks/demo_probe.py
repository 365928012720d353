"""Judge a round-1 captioner and filter on a synthetic corpus without running the pipeline.

Used to choose the bootstrap demo's step counts (issue #13): after fine-tuning a captioner and a
filter from some MED_0 (``capfilt train captioner|filter``), how often do the captioner's sampled
captions name every object right, and how well does the filter separate the web texts by noise
kind? The pipeline's own stage classes (``Captioner``, ``Filter``, ``select``) with the demo's
caption and filter settings, in one process (no Ray), on the corpus's first ``--n`` web images:

- captions: nucleus sampling (``--top-p``, ``--k`` per image, the pipeline's per-row seeds and the
  prompt "a picture of "), judged by :func:`capfilt.synth.check_caption`: the share of captions
  that pass and the share of images with at least one that passes; the share per number of
  objects in the image, and on one-object images what was wrong (colour, shape: which shape was
  named for which, or no object named);
- filter: ITM match probability of each web text; ROC-AUC of clean texts against each noise kind;
  and, per threshold, what the selection rule (keep_web, keep_synthetic=1: the best caption if it
  passes) keeps and how noisy the kept web texts, kept captions and the whole kept set are;
- with both: how well the filter's ITM score separates right from wrong synthetic captions
  (``synthetic_wrong``) and how well their agreement with the image's other sampled captions does
  (``synthetic_wrong_by_agreement``, :func:`caption_agreement`).

Usage (the models as ``capfilt bootstrap`` leaves them)::

    python benchmarks/demo_probe.py --corpus runs/bootstrap/corpus \\
        --captioner runs/bootstrap/round-1/captioner/model --filter runs/bootstrap/round-1/filter/model

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a synthetic corpus dir (web.parquet)")
    parser.add_argument("--captioner", help="captioner model dir")
    parser.add_argument("--filter", dest="filter_model", help="filter model dir")
    parser.add_argument("--k", type=int, default=3, help="captions per image")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--n", type=int, default=1000, help="web images to judge")
    parser.add_argument("--thresholds", default="0.2,0.3,0.4,0.5")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from capfilt.bootstrap import load_config
    from capfilt.eval import roc_auc
    from capfilt.stages.caption import Captioner
    from capfilt.stages.filter import Filter
    from capfilt.stages.select import object_array, select
    from capfilt.synth import check_caption

    torch.set_num_threads(args.threads)
    web = pq.read_table(Path(args.corpus) / "web.parquet").to_pylist()[: args.n]
    out: dict[str, Any] = {"images": len(web), "k": args.k, "top_p": args.top_p}
    # The pipeline's own stage classes and rule, with the demo's caption/filter settings.
    demo = load_config(None).pipeline
    batch: dict[str, Any] = {
        "key": object_array([r["key"] for r in web]),
        "image": object_array([r["image"] for r in web]),
        "web_text": object_array([r["text"] for r in web]),
        "status": object_array(["ok"] * len(web)),
        "error": object_array([""] * len(web)),
    }
    objects = [r["objects"] for r in web]
    if args.captioner:
        cfg = demo.caption.model_copy(
            update={"model": args.captioner, "num_captions": args.k, "top_p": args.top_p}
        )
        batch = Captioner(cfg).caption(batch)
        right = [
            [check_caption(c, o) for c in cs] for cs, o in zip(batch["synthetic_texts"], objects, strict=True)
        ]
        out["captions_right"] = float(np.mean([x for rr in right for x in rr]))
        out["images_with_a_right_caption"] = float(np.mean([any(rr) for rr in right]))
        out["captions_right_by_objects"], out["single_object_errors"] = _by_objects(
            batch["synthetic_texts"], objects, right
        )
        out["examples"] = [list(c) for c in batch["synthetic_texts"][:3]]

    if args.filter_model:
        batch = Filter(demo.filter.model_copy(update={"model": args.filter_model})).score(batch)
        scores = np.asarray(batch["web_itm"], dtype=float)
        kinds = np.array([r["noise_type"] for r in web])
        clean = kinds == "clean"
        out["filter_auc"] = {
            k: roc_auc(scores[clean], scores[kinds == k]) for k in sorted(set(kinds)) if k != "clean"
        }
        if args.captioner:
            syn = np.array([p for ps in batch["synthetic_itm"] for p in ps], dtype=float)
            ok = np.array([x for rr in right for x in rr])
            if ok.any() and (~ok).any():
                out["filter_auc"]["synthetic_wrong"] = roc_auc(syn[ok], syn[~ok])
                # the same separation by how much a caption agrees with the image's other captions
                agree = caption_agreement(args.filter_model, batch["synthetic_texts"])
                out["filter_auc"]["synthetic_wrong_by_agreement"] = roc_auc(agree[ok], agree[~ok])
        out["selection"] = {}
        for thr in (float(t) for t in args.thresholds.split(",")):
            kept = select(batch, threshold=thr, keep_web=True, keep_synthetic=1)
            web_kept = np.asarray(kept["web_kept"], dtype=bool)
            row = {
                "web_kept": int(web_kept.sum()),
                "web_kept_noisy": float((~clean & web_kept).sum() / max(int(web_kept.sum()), 1)),
                "clean_removed": float((clean & ~web_kept).sum() / max(int(clean.sum()), 1)),
            }
            if args.captioner:
                flags = [
                    (f, r)
                    for fs, rr in zip(kept["synthetic_kept"], right, strict=True)
                    for f, r in zip(fs, rr, strict=True)
                ]
                wrong = sum(not r for f, r in flags if f)
                row["synthetic_kept"] = sum(f for f, _ in flags)
                row["synthetic_kept_wrong"] = wrong / max(row["synthetic_kept"], 1)
                noisy = int((~clean & web_kept).sum()) + wrong
                row["kept_set_noisy"] = noisy / max(int(web_kept.sum()) + row["synthetic_kept"], 1)
            out["selection"][f"{thr:g}"] = row
        out["raw_web_noisy"] = float((~clean).mean())
    print(json.dumps(out))
    return out


def caption_agreement(model: str, captions: Any) -> Any:
    """Per caption, the mean cosine of its ITC text feature (the filter's unimodal text encoder)
    with the other captions of the same image; NaN for an image's only caption. The same
    figure the filter writes as ``synthetic_agreement`` (:func:`capfilt.inference.text_agreement`).

    Sampled captions that disagree are ones the captioner was unsure about: on the demo corpus
    this separated right from wrong synthetic captions (ROC-AUC ~0.7) better than the filter's ITM
    score of each caption (~0.6), whose errors it shares with the captioner.
    """
    import numpy as np
    import torch

    from capfilt.inference import load_med, text_agreement

    med, tokenizer = load_med(model, device=torch.device("cpu"), dtype=torch.float32)
    groups = [list(texts) for texts in captions]
    owner = [i for i, texts in enumerate(groups) for _ in texts]
    with torch.no_grad():
        out = text_agreement(med, tokenizer, [t for texts in groups for t in texts], owner, batch_size=256)
    return np.asarray(out.tolist(), dtype=float)


def _by_objects(
    captions: Any, objects: list[Any], right: list[list[bool]]
) -> tuple[dict[str, float], dict[str, int]]:
    """Captions right per number of objects; on one-object images, counts of what went wrong."""
    from collections import Counter

    from capfilt.synth import _as_objects, caption_pairs

    by_count: dict[int, list[bool]] = {}
    errors: Counter[str] = Counter()
    for texts, objs, rr in zip(captions, objects, right, strict=True):
        truth = sorted(set(_as_objects(objs)))
        by_count.setdefault(len(truth), []).extend(rr)
        if len(truth) != 1:
            continue
        (colour, shape) = truth[0]
        for text, ok in zip(texts, rr, strict=True):
            if ok:
                continue
            stated = caption_pairs(text)
            if not stated:
                errors["no object named"] += 1
                continue
            said_colour, said_shape = stated[0]
            if said_shape != shape:
                errors[f"shape {shape} -> {said_shape}"] += 1
            if said_colour != colour:
                errors["colour wrong"] += 1
            if said_shape == shape and said_colour == colour:
                errors["an extra object"] += 1
    return (
        {f"{n} object{'s' if n != 1 else ''}": sum(v) / len(v) for n, v in sorted(by_count.items()) if v},
        dict(errors.most_common()),
    )


if __name__ == "__main__":
    main()
