"""Probe a training recipe in minutes: pre-train (and optionally fine-tune a captioner), then measure.

``synthetic_capfilt.py`` answers "does the whole recipe meet the targets in 30 minutes"; this
script answers the cheaper question asked while choosing that recipe: "after N steps, does setting
X learn faster than setting Y". It runs the public code path (``capfilt.train.run_training`` on the
example configs ``pipelines/train_{pretrain,captioner}_tiny.yaml`` with the corpus paths, step
counts and any ``--pset`` / ``--cset KEY=VALUE`` changes applied, as ``capfilt train --set``)
and prints one JSON line:

- retrieval on the first ``--limit`` test images: TR@1 / IR@1 after ITM re-rank, and ITC alone;
- captions (beam 3): CIDEr and the attribute check (``capfilt.synth.check_caption``);
- teacher-forced token accuracy of the decoder on the test references at the positions of colour
  words and of shape words. The attribute check needs every object right and is ~0 for a long time;
  this is the fine-grained signal: shape accuracy at chance (1/7) means the ViT has not learned
  shapes yet, whatever the loss says;
- the loss curve and samples/s of each training run.

Examples (the corpus as the benchmark makes it, ``capfilt synth`` or ``synthetic_capfilt.py``)::

    python benchmarks/recipe_probe.py --corpus runs/synth --pretrain 300 --captioner 150
    python benchmarks/recipe_probe.py --corpus runs/synth --pretrain 300 --captioner 150 \\
        --pset model.overrides.patch_size=4 --pset model.overrides.image_size=32 --pset data.image_size=32 \\
        --cset data.image_size=32
    # pre-training only, with the short-run ITC settings of the bootstrap demo:
    python benchmarks/recipe_probe.py --corpus runs/bootstrap/corpus --pretrain 150 \\
        --pset model.overrides.alpha=0.0 --pset model.overrides.momentum=0.99 --pset model.overrides.queue_size=256
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see synthetic_capfilt.py
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _bench() -> Any:
    """synthetic_capfilt.py's helpers (write_config, read_metrics, curve, throughput)."""
    spec = importlib.util.spec_from_file_location("synthetic_capfilt", HERE / "synthetic_capfilt.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def token_accuracy(model_path: str | Path, test: Path, limit: int, prompt: str) -> dict[str, float]:
    """Teacher-forced argmax accuracy at colour-word and shape-word positions of the references."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from capfilt.synth import COLORS, SHAPES
    from model.data import ImageTransform
    from model.hf import load_any

    med, tokenizer = load_any(model_path)
    med.eval()
    rows = pq.read_table(test, columns=["image", "captions"]).slice(0, limit).to_pylist()
    transform = ImageTransform(image_size=med.config.image_size, train=False)
    groups = {
        "shape": torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPES))),
        "color": torch.tensor(tokenizer.convert_tokens_to_ids(list(COLORS))),
    }
    if any(int(ids.eq(tokenizer.unk_token_id).sum()) for ids in groups.values()):
        raise SystemExit("the tokenizer splits a colour or shape word: token accuracy is undefined")
    hits = {name: [0, 0] for name in groups}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for start in range(0, len(rows), 50):
            batch = rows[start : start + 50]
            pixels = torch.stack([transform(Image.open(io.BytesIO(r["image"])), rng=rng) for r in batch])
            image_embeds = med.encode_image(pixels)
            for j in range(min(len(r["captions"]) for r in batch)):
                enc = tokenizer([prompt + r["captions"][j] for r in batch], padding=True, return_tensors="pt")
                ids = enc.input_ids.clone()
                ids[:, 0] = med.config.bos_token_id
                predicted = med.decoder_logits(image_embeds, ids, enc.attention_mask)[:, :-1].argmax(-1)
                target = ids[:, 1:]
                for name, group in groups.items():
                    mask = torch.isin(target, group)
                    hits[name][0] += int((predicted[mask] == target[mask]).sum())
                    hits[name][1] += int(mask.sum())
    return {f"{name}_token_accuracy": h[0] / max(h[1], 1) for name, h in hits.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="a synthetic corpus dir (human/web/test.parquet)")
    parser.add_argument("--out", default="runs/recipe-probe")
    parser.add_argument("--pretrain", type=int, default=0, help="pre-training steps (0: start from --init)")
    parser.add_argument("--captioner", type=int, default=0, help="captioner fine-tuning steps after that")
    parser.add_argument("--init", default=None, help="a model dir to start from instead of pre-training")
    parser.add_argument("--pset", action="append", default=[], metavar="KEY=VALUE",
                        help="change to the pretrain config, as capfilt train --set (repeatable)")
    parser.add_argument("--cset", action="append", default=[], metavar="KEY=VALUE",
                        help="change to the captioner config, as capfilt train --set (repeatable)")
    parser.add_argument("--limit", type=int, default=300, help="test images to measure on")
    parser.add_argument("--k-test", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.pretrain and not args.init:
        parser.error("give --pretrain N or --init MODEL")

    import torch

    from capfilt.config import apply_overrides
    from capfilt.eval import evaluate
    from capfilt.train import run_training

    bench = _bench()
    torch.set_num_threads(args.threads)
    corpus, out = Path(args.corpus), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result: dict[str, Any] = {"settings": vars(args), "loadavg_start": os.getloadavg()}
    model_path = args.init
    for kind, steps, changes in (("pretrain", args.pretrain, args.pset), ("captioner", args.captioner, args.cset)):
        if not steps:
            continue
        path = bench.write_config(kind, corpus=corpus, out_dir=out / kind, steps=steps, config_dir=out / "configs",
                                  init=None if kind == "pretrain" else model_path)
        cfg = apply_overrides(yaml.safe_load(path.read_text()), changes)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        started = time.perf_counter()
        run_training(kind, path)
        rows = bench.read_metrics(out / kind)
        result[kind] = {"steps": steps, "seconds": round(time.perf_counter() - started, 1),
                        "samples_per_s": bench.throughput(rows, cfg["train"]["batch_size"]),
                        "curve": bench.curve(rows, 6)}
        model_path = str(out / kind / "model")

    prompt = None if args.captioner else ""  # a pre-trained decoder never saw the captioning prompt
    ev = evaluate(model_path, corpus / "test.parquet", limit=args.limit, k_test=args.k_test, num_beams=3,
                  prompt=prompt, device="cpu")
    result["metrics"] = {
        "txt_r1": ev["retrieval"]["txt_r1"], "img_r1": ev["retrieval"]["img_r1"],
        "itc_txt_r1": ev["retrieval"]["itc"]["txt_r1"], "itc_img_r1": ev["retrieval"]["itc"]["img_r1"],
        "cider": ev["captioning"]["cider"], "attribute_accuracy": ev["captioning"].get("attribute_accuracy"),
        **token_accuracy(model_path, corpus / "test.parquet", args.limit, ev["settings"]["prompt"]),
    }
    result["examples"] = [e["prediction"] for e in ev["captioning"]["examples"]]
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["metrics"]))
    return result


if __name__ == "__main__":
    main()
