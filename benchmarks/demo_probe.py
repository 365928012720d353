"""Judge a round-1 captioner and filter on a synthetic corpus without running the pipeline.

Used to choose the bootstrap demo's step counts (issue #13): after fine-tuning a captioner and a
filter from some MED_0 (``capfilt train captioner|filter``), how often do the captioner's sampled
captions name every object right, and how well does the filter separate the web texts by noise
kind? The same rules as the pipeline, in one process, on the corpus's first ``--n`` web images:

- captions: nucleus sampling (``--top-p``, ``--k`` per image, the pipeline's per-row seeds and the
  prompt "a picture of "), judged by :func:`capfilt.synth.check_caption`: the share of captions
  that pass and the share of images with at least one that passes;
- filter: ITM match probability of each web text; ROC-AUC of clean texts against each noise kind;
  and, per threshold, what the selection rule (keep_web, keep_synthetic=1: the best caption if it
  passes) keeps and how noisy the kept web texts, kept captions and the whole kept set are.

Usage (the models as ``capfilt bootstrap`` leaves them)::

    python benchmarks/demo_probe.py --corpus runs/bootstrap/corpus \\
        --captioner runs/bootstrap/round-1/captioner/model --filter runs/bootstrap/round-1/filter/model

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
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
    from PIL import Image

    from capfilt.eval import roc_auc
    from capfilt.inference import itm_scores, load_med, pixel_values, prompt_ids
    from capfilt.stages.caption import caption_seed
    from capfilt.synth import check_caption

    torch.set_num_threads(args.threads)
    web = pq.read_table(Path(args.corpus) / "web.parquet").to_pylist()[: args.n]
    device, dtype = torch.device("cpu"), torch.float32
    out: dict[str, Any] = {"images": len(web), "k": args.k, "top_p": args.top_p}

    def pixels_at(size: int) -> Any:
        return np.stack(
            [np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB").resize((size, size))) for r in web]
        )

    captions: list[list[str]] | None = None
    if args.captioner:
        med, tok = load_med(args.captioner, device=device, dtype=dtype)
        pix = pixels_at(med.config.image_size)
        seeds = torch.tensor([caption_seed(0, r["key"]) for r in web])
        texts: list[str] = []
        with torch.inference_mode():
            for s in range(0, len(web), 64):
                ids = med.generate(
                    pixel_values(pix[s : s + 64], device=device, dtype=dtype),
                    prompt_ids=prompt_ids(tok, "a picture of "),
                    num_captions=args.k,
                    sample=True,
                    top_p=args.top_p,
                    max_length=24,
                    min_length=5,
                    seeds=seeds[s : s + 64],
                )
                texts += [
                    " ".join(t.split()) for t in tok.batch_decode(ids.tolist(), skip_special_tokens=True)
                ]
        captions = [texts[i * args.k : (i + 1) * args.k] for i in range(len(web))]
        right = [[check_caption(c, r["objects"]) for c in cs] for cs, r in zip(captions, web, strict=True)]
        out["captions_right"] = float(np.mean([x for rr in right for x in rr]))
        out["images_with_a_right_caption"] = float(np.mean([any(rr) for rr in right]))
        out["examples"] = captions[:3]

    if args.filter_model:
        med, tok = load_med(args.filter_model, device=device, dtype=dtype)
        pix = pixels_at(med.config.image_size)
        with torch.inference_mode():
            embeds = torch.cat(
                [
                    med.encode_image(pixel_values(pix[s : s + 64], device=device, dtype=dtype))
                    for s in range(0, len(web), 64)
                ]
            )
            web_scores = itm_scores(
                med, tok, embeds, [r["text"] for r in web], range(len(web)), batch_size=64
            )[0]
            syn_scores = ok = owner = None
            if captions is not None:
                flat = [c for cs in captions for c in cs]
                owner = np.array([i for i, cs in enumerate(captions) for _ in cs])
                syn_scores = itm_scores(med, tok, embeds, flat, owner.tolist(), batch_size=64)[0].numpy()
                ok = np.array([check_caption(c, web[o]["objects"]) for c, o in zip(flat, owner, strict=True)])
        scores = web_scores.numpy()
        kinds = np.array([r["noise_type"] for r in web])
        clean = kinds == "clean"
        out["filter_auc"] = {
            k: roc_auc(scores[clean], scores[kinds == k]) for k in sorted(set(kinds)) if k != "clean"
        }
        if syn_scores is not None and ok.any() and (~ok).any():
            out["filter_auc"]["synthetic_wrong"] = roc_auc(syn_scores[ok], syn_scores[~ok])
        out["selection"] = {}
        for thr in (float(t) for t in args.thresholds.split(",")):
            kept = scores >= thr
            row = {
                "web_kept": int(kept.sum()),
                "web_kept_noisy": float((~clean & kept).sum() / max(int(kept.sum()), 1)),
                "clean_removed": float((clean & ~kept).sum() / max(int(clean.sum()), 1)),
            }
            if syn_scores is not None:
                best_n = best_wrong = 0
                for i in range(len(web)):
                    idx = np.flatnonzero(owner == i)
                    if len(idx) and syn_scores[idx[np.argmax(syn_scores[idx])]] >= thr:
                        best_n += 1
                        best_wrong += int(not ok[idx[np.argmax(syn_scores[idx])]])
                row["synthetic_kept"] = best_n
                row["synthetic_kept_wrong"] = best_wrong / max(best_n, 1)
                noisy = int((~clean & kept).sum()) + best_wrong
                row["kept_set_noisy"] = noisy / max(int(kept.sum()) + best_n, 1)
            out["selection"][f"{thr:g}"] = row
        out["raw_web_noisy"] = float((~clean).mean())
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
