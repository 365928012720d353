"""False negatives among ITM's hard negatives, by the temperature they are drawn at.

BLIP draws each image's ITM negative text (and each text's negative image) from the batch with
weights softmax(cosine / t), t the learned ITC temperature. In a short run that temperature falls
to its floor, the draw becomes an argmax, and in a world of few distinct captions the most similar
other text often describes the image itself: the "negative" is a false one. For each bootstrap run
directory given (``capfilt bootstrap`` on a synthetic corpus, whose human images carry their objects),
this loads the run's MED_0 and round-1 filter, draws hard negatives from batches of human pairs as
training does (``model.losses.hard_negative_indices``, the model's own features) at each
temperature, and prints the share of drawn negatives that are true of their anchor: the negative
text passes the corpus's attribute check (:func:`capfilt.synth.check_caption`: every object's colour
and shape named, nothing else) against the image, or the text passes it against the negative image.
No training; ``learned`` is the model's own temperature (``itm_negative_temp: null``).

Usage::

    python benchmarks/itm_negatives.py runs/bootstrap [RUN ...] [--temps learned,0.01,0.03,0.05,0.1]
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MODELS = ("round-0/pretrain", "round-1/filter")


def false_negative_share(
    texts: Sequence[str],
    objects: Sequence[Any],
    neg_image_for_text: Sequence[int],
    neg_text_for_image: Sequence[int],
) -> tuple[int, int]:
    """(false negatives, draws) over one batch's draws in both directions.

    Row i is image i with its text ``texts[i]``; ``objects[i]`` is image i's objects (the corpus's
    JSON or dicts). Image i's drawn text j is false when ``texts[j]`` passes the attribute check
    against image i; text j's drawn image i is false when ``texts[j]`` passes it against image i.
    """
    from capfilt.synth import check_caption

    false = sum(check_caption(texts[int(j)], objects[i]) for i, j in enumerate(neg_text_for_image))
    false += sum(check_caption(texts[j], objects[int(i)]) for j, i in enumerate(neg_image_for_text))
    return false, len(neg_text_for_image) + len(neg_image_for_text)


def _batches(run: Path, med: Any, tokenizer: Any, count: int, size: int, seed: int):
    """``count`` batches of ``size`` distinct human images, one of each image's captions drawn at
    random: (image ids, texts, objects, cosine matrix image x text) from the model's features."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from model.data import ImageTransform

    table = pq.read_table(run / "corpus" / "human.parquet", columns=["image", "captions", "objects"])
    rows = table.to_pylist()
    transform = ImageTransform(image_size=med.config.image_size, train=False)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        index = rng.choice(len(rows), size=size, replace=False)
        texts = [str(rng.choice(rows[i]["captions"])) for i in index]
        pixels = torch.stack([
            transform(Image.open(io.BytesIO(rows[i]["image"])).convert("RGB"), rng=rng) for i in index
        ])  # fmt: skip
        tokens = tokenizer(texts, padding="longest", return_tensors="pt")
        with torch.no_grad():
            image = med.image_features(med.encode_image(pixels))
            text = med.text_features(med.encode_text(tokens.input_ids, tokens.attention_mask))
        yield torch.as_tensor(index), texts, [rows[i]["objects"] for i in index], image @ text.T


def measure(run: Path, model: str, temps: Sequence[str], batches: int, size: int, draws: int) -> dict[str, float]:
    """Share of false negatives per temperature for one run's model (``model``: its run sub-directory)."""
    import torch

    from model import losses
    from model.med import MED

    med, tokenizer = MED.load(run / model / "model")
    med.eval()
    learned = float(med.temp.detach())
    counts = {t: [0, 0] for t in temps}
    generator = torch.Generator().manual_seed(0)
    for ids, texts, objects, cosine in _batches(run, med, tokenizer, batches, size, seed=0):
        for t in temps:
            temp = learned if t == "learned" else float(t)
            for _ in range(draws):
                neg_image, neg_text = losses.hard_negative_indices(
                    cosine / temp, cosine.T / temp, image_ids=ids, generator=generator
                )
                false, n = false_negative_share(texts, objects, neg_image.tolist(), neg_text.tolist())
                counts[t][0] += false
                counts[t][1] += n
    return {"learned_temp": learned, **{t: f / n for t, (f, n) in counts.items()}}


def main(argv: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="capfilt bootstrap run directories")
    parser.add_argument("--temps", default="learned,0.01,0.03,0.05,0.1", help="'learned' and/or floats")
    parser.add_argument("--models", default=",".join(MODELS), help="run sub-directories holding model/")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="the demo trains with batches of 32")
    parser.add_argument("--draws", type=int, default=5, help="draws per batch and temperature")
    args = parser.parse_args(argv)
    temps = [t.strip() for t in args.temps.split(",") if t.strip()]
    for t in temps:
        if t != "learned" and not float(t) > 0:
            parser.error(f"--temps: {t} is not 'learned' or a positive number")
    results = {}
    for run in args.runs:
        if not (run / "corpus" / "human.parquet").is_file():
            raise SystemExit(f"{run}: no corpus/human.parquet (this needs a synthetic corpus's objects)")
        for model in args.models.split(","):
            shares = measure(run, model, temps, args.batches, args.batch_size, args.draws)
            results[(str(run), model)] = shares
            cells = ", ".join(
                f"{t if t != 'learned' else 'learned (' + format(shares['learned_temp'], '.4f') + ')'} "
                f"{shares[t]:.1%}"
                for t in temps
            )
            print(f"{run} {model}: false negatives at temperature {cells}", flush=True)
    return results


if __name__ == "__main__":
    main()
