"""Caption + filter model throughput: capfilt's stages against Hugging Face, same weights, one run.

The claim (issue #11): capfilt's caption and filter stages run BLIP's CapFilt at several times
the images/s of the Hugging Face calls a user would write, on the same weights, images and
machine, and this script says how close that is to the hardware's limit.

What runs, in one process, back to back:

1. A randomly initialised MED of BLIP-base or BLIP-large shape (``model/configs/{base,large}.json``;
   throughput does not need trained weights) with a 30,524-entry WordPiece vocabulary (synthetic
   words ``w0 .. w30516``, BERT's special-token layout, [DEC]/[ENC] last), exported with
   ``model.hf.export_captioner`` / ``export_filter``. BOTH contenders load these two HF
   directories, so they run the same weights. ``itm_use_enc_token`` is off so capfilt's ITM
   is HF's function.
2. ``--images`` synthetic photo-like JPEGs (640x480) and one web text each.
3. capfilt: ``capfilt.stages.caption.preprocess`` + ``Captioner`` + ``Filter`` (the pipeline's
   own stage classes, as one actor runs them) with ``num_captions=K``, nucleus sampling
   (top_p 0.9), max_length 30, min_length 5, the "a picture of " prompt; caption batch
   ``--batch-size`` images, filter micro-batch ``--batch-size`` images.
4. Hugging Face: ``BlipProcessor`` on the decoded images, ``BlipForConditionalGeneration.generate(
   do_sample=True, top_p=0.9, top_k=0, num_return_sequences=K, max_length=30, min_length=5)``
   on batches of ``--batch-size`` images (``top_k=0``: HF's default would add top-k 50, a
   different distribution), then ``BlipForImageTextRetrieval(use_itm_head=True)`` per
   (image, text) pair for the web text and the K captions (its API takes one image per text),
   batched ``--batch-size`` pairs at a time.

Both are timed from encoded JPEG bytes to ITM scores (image decoding and preprocessing
included), after one warm-up batch each; models are loaded before the clock starts. Random
weights rarely emit [SEP], so captions run to max_length: the decoding work is the worst case
and the same for both.

FLOP limit: the model FLOPs per image are counted from the shapes (ViT once per image for each
model, K captions of the measured token count with the image keys/values projected once per
image, K + 1 ITM passes of the measured text lengths), and the device's dense-matmul rate is
measured here before and after the contenders, the best kept (a square matmul in the run's
dtype). limit = rate / FLOPs per image; the achieved fraction is capfilt's images/s over that
limit. That is an upper bound no implementation of these FLOPs can pass on this device, not a
datasheet figure.

Usage::

    python benchmarks/gpu_throughput.py --device cpu --shape base --num-captions 5 --images 16
    python benchmarks/gpu_throughput.py --device cuda --shape large --num-captions 5 --images 2048 --batch-size 256

The last line is ``speed-up vs Hugging Face: N.NNx`` (caption+filter images/s, capfilt over HF).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PROMPT = "a picture of "
TOP_P = 0.9
MAX_LENGTH = 30
MIN_LENGTH = 5


@dataclass
class Result:
    name: str
    images: int
    seconds: float
    texts: list[list[str]]
    scores: list[list[float]]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


# --------------------------------------------------------------------------- inputs


def make_tokenizer():
    """A BERT-layout WordPiece tokenizer with a full-size vocabulary of synthetic words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    from model.tokenizer import BERT_SPECIAL_TOKENS, CLS, DEC, ENC, MASK, PAD, SEP, UNK, add_blip_tokens

    vocab = {token: i for i, token in enumerate(BERT_SPECIAL_TOKENS)}
    for i in range(30522 - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([DEC, ENC])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, sep_token=SEP, pad_token=PAD, cls_token=CLS,
        mask_token=MASK, bos_token=DEC, additional_special_tokens=[ENC],
    )  # fmt: skip
    return add_blip_tokens(tokenizer)  # the prompt's words are [UNK]: three prompt ids, as BLIP's


def export_models(shape: str, root: Path) -> tuple[Path, Path, object]:
    import torch

    from model.hf import export_captioner, export_filter
    from model.med import MED, MEDConfig
    from model.tokenizer import special_ids

    tokenizer = make_tokenizer()
    config = MEDConfig.preset(shape).replace(queue_size=0, itm_use_enc_token=False, **special_ids(tokenizer))
    torch.manual_seed(0)
    med = MED(config).eval()
    captioner = export_captioner(med, tokenizer, root / "captioner")
    filt = export_filter(med, tokenizer, root / "filter")
    del med
    return captioner, filt, tokenizer


def make_images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([128 + 100 * np.sin(x / (5 + i % 7)), 128 + 100 * np.cos(y / 9), (x + y) / 4.5], -1)
        base = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(base, "RGB")
        ImageDraw.Draw(image).ellipse((100 + i, 80, 400, 300 + i), fill=(220, 40 + i, 30))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def web_texts(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(f"w{int(j)}" for j in rng.integers(5, 30000, size=12)) for _ in range(n)]


# --------------------------------------------------------------------------- contenders


def run_capfilt(
    captioner_dir, filter_dir, images, texts, *, k, batch, device, dtype
) -> tuple[Result, object]:
    from capfilt.config import CaptionConfig, FilterConfig
    from capfilt.stages.caption import Captioner, preprocess
    from capfilt.stages.filter import Filter
    from capfilt.stages.select import object_array

    ccfg = CaptionConfig(
        model=str(captioner_dir), num_captions=k, top_p=TOP_P, max_length=MAX_LENGTH, min_length=MIN_LENGTH,
        prompt=PROMPT, batch_size=batch, dtype=dtype,
    )  # fmt: skip
    fcfg = FilterConfig(model=str(filter_dir), batch_size=batch * (k + 1), dtype=dtype)
    captioner = Captioner(ccfg, device=device)
    filt = Filter(fcfg, device=device)
    size = captioner.models[0][0].config.image_size

    def work(lo: int, hi: int) -> dict:
        n = hi - lo
        batch_ = {
            "key": object_array([f"{i:08d}" for i in range(lo, hi)]),
            "status": object_array(["ok"] * n),
            "error": object_array([""] * n),
            "image": object_array(images[lo:hi]),
            "web_text": object_array(texts[lo:hi]),
        }
        return filt(captioner(preprocess(batch_, sizes=[size])))

    work(0, min(batch, len(images), 2))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    outs = [work(lo, min(lo + batch, len(images))) for lo in range(0, len(images), batch)]
    _sync(device)
    seconds = time.perf_counter() - t0
    caps = [list(c) for o in outs for c in o["synthetic_texts"]]
    scores = [
        [float(w), *map(float, s)]
        for o in outs
        for w, s in zip(o["web_itm"], o["synthetic_itm"], strict=True)
    ]
    assert all(str(s) == "ok" for o in outs for s in o["status"]), "capfilt rows failed"
    return Result("capfilt", len(images), seconds, caps, scores), captioner.models[0][1]


def run_hf(captioner_dir, filter_dir, images, texts, *, k, batch, device, dtype) -> Result:
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    torch_dtype = _torch_dtype(dtype, device)
    processor = BlipProcessor.from_pretrained(str(captioner_dir))
    cap = (
        BlipForConditionalGeneration.from_pretrained(str(captioner_dir), dtype=torch_dtype).to(device).eval()
    )
    itm = BlipForImageTextRetrieval.from_pretrained(str(filter_dir), dtype=torch_dtype).to(device).eval()
    tokenizer = processor.tokenizer
    prompt = tokenizer(PROMPT.strip(), return_tensors="pt")["input_ids"]  # [CLS] prompt [SEP]

    def work(lo: int, hi: int) -> tuple[list[list[str]], list[list[float]]]:
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[lo:hi]]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(device, torch_dtype)
        with torch.inference_mode():
            out = cap.generate(
                pixel_values=pixels, input_ids=prompt.expand(len(pil), -1).clone().to(device), do_sample=True,
                top_p=TOP_P, top_k=0, num_return_sequences=k, max_length=MAX_LENGTH, min_length=MIN_LENGTH,
            )  # fmt: skip
        decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
        caps = [[" ".join(t.split()) for t in decoded[j * k : (j + 1) * k]] for j in range(len(pil))]
        pairs = [(j, t) for j in range(len(pil)) for t in [texts[lo + j], *caps[j]]]
        probs: list[float] = []
        for a in range(0, len(pairs), batch):
            chunk = pairs[a : a + batch]
            tok = tokenizer([t for _, t in chunk], padding="longest", truncation=True, max_length=35,
                            return_tensors="pt").to(device)  # fmt: skip
            idx = torch.tensor([j for j, _ in chunk], device=device)
            with torch.inference_mode():
                logits = itm(pixel_values=pixels.index_select(0, idx), **tok, use_itm_head=True).itm_score
            probs.extend(torch.softmax(logits.float(), -1)[:, 1].tolist())
        return caps, [probs[j * (k + 1) : (j + 1) * (k + 1)] for j in range(len(pil))]

    work(0, min(batch, len(images), 2))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    caps: list[list[str]] = []
    scores: list[list[float]] = []
    for lo in range(0, len(images), batch):
        c, s = work(lo, min(lo + batch, len(images)))
        caps.extend(c)
        scores.extend(s)
    _sync(device)
    return Result("Hugging Face", len(images), time.perf_counter() - t0, caps, scores)


# --------------------------------------------------------------------------- FLOPs and the limit


def flops_per_image(config, *, k: int, caption_tokens: float, text_tokens: float) -> dict[str, float]:
    """Model FLOPs (2 x multiply-adds) per image for caption (K captions) + filter (K + 1 texts).

    ``caption_tokens``: decoder positions run per caption ([DEC] + prompt + generated, the last
    excepted); ``text_tokens``: mean tokenized ITM text length.
    """
    n = config.num_patches + 1
    dv, iv, lv = config.vision_width, config.vision_intermediate, config.vision_layers
    dt, it, lt, vocab = config.text_width, config.text_intermediate, config.text_layers, config.vocab_size
    vit = n * 3 * config.patch_size**2 * dv + lv * n * (4 * dv * dv + 2 * dv * iv + 2 * n * dv)
    image_kv = lt * 2 * n * dv * dt  # cross-attention keys/values, once per image

    def text(tokens: float, causal: bool) -> float:
        ctx = tokens / 2 if causal else tokens
        per_token = lt * (4 * dt * dt + 2 * ctx * dt + 2 * dt * dt + 2 * n * dt + 2 * dt * it)
        return tokens * per_token

    lm_head = caption_tokens * (dt * dt + dt * vocab)
    caption = vit + image_kv + k * (text(caption_tokens, True) + lm_head)
    filt = vit + image_kv + (k + 1) * (text(text_tokens, False) + dt * 2)
    return {"caption": 2 * caption, "filter": 2 * filt, "total": 2 * (caption + filt)}


def matmul_rate(device: str, dtype: str) -> float:
    """Measured dense-matmul FLOP/s on ``device`` in the run's dtype (best of a few)."""
    import torch

    torch_dtype = _torch_dtype(dtype, device)
    side = 4096 if device.startswith("cuda") else 1536
    a = torch.randn(side, side, device=device, dtype=torch_dtype)
    b = torch.randn(side, side, device=device, dtype=torch_dtype)
    best = 0.0
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        reps = 20 if device.startswith("cuda") else 3
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, reps * 2 * side**3 / (time.perf_counter() - t0))
    return best


# --------------------------------------------------------------------------- helpers


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (1/5/15 min)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--shape", choices=["base", "large"], default="base")
    parser.add_argument("--num-captions", type=int, default=5, help="K captions per image")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per batch (HF: also pairs per ITM call)"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    k, device = args.num_captions, args.device
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="capfilt-gpu-bench-") as tmp:
        captioner_dir, filter_dir, _ = export_models(args.shape, Path(tmp))
        images = make_images(args.images)
        texts = web_texts(args.images)
        setup_s = time.perf_counter() - t_setup
        print(f"# {args.shape} shape, K={k}, {args.images} images, batch {args.batch_size}, device {device}, "
              f"dtype {args.dtype}; setup (random weights + HF export) {setup_s:.0f} s", flush=True)  # fmt: skip
        print(f"# machine: {machine(device)}", flush=True)
        rate_before = matmul_rate(device, args.dtype)  # before and after: the best is the device's rate
        ours, tokenizer = run_capfilt(
            captioner_dir,
            filter_dir,
            images,
            texts,
            k=k,
            batch=args.batch_size,
            device=device,
            dtype=args.dtype,
        )
        print(f"# capfilt done: {ours.seconds:.1f} s", flush=True)
        hf = run_hf(
            captioner_dir,
            filter_dir,
            images,
            texts,
            k=k,
            batch=args.batch_size,
            device=device,
            dtype=args.dtype,
        )
        print(f"# Hugging Face done: {hf.seconds:.1f} s; load after both: {machine(device)}", flush=True)
        from model.med import MEDConfig

        side = json.loads((Path(captioner_dir) / "capfilt.json").read_text())["med_config"]
        config = MEDConfig.from_dict(side)
        prefix = 1 + len(tokenizer(PROMPT.strip(), add_special_tokens=False)["input_ids"])
        caption_words = np.mean([len(c.split()) for caps in ours.texts for c in caps] or [0])
        caption_tokens = prefix + caption_words  # positions run: [DEC] + prompt + generated ([SEP] excluded)
        all_texts = [t for row, web in zip(ours.texts, texts, strict=True) for t in [web, *row]]
        text_tokens = float(np.mean([min(35, len(tokenizer(t)["input_ids"])) for t in all_texts]))
        flops = flops_per_image(config, k=k, caption_tokens=caption_tokens, text_tokens=text_tokens)
        rate = max(rate_before, matmul_rate(device, args.dtype))
    limit = rate / flops["total"]
    rows = [
        ("contender", "seconds", "images/s", "vs HF", "of FLOP limit"),
        ("Hugging Face", f"{hf.seconds:.1f}", f"{hf.images_per_s:.3f}", "1.00x", f"{hf.images_per_s / limit:.1%}"),
        ("capfilt", f"{ours.seconds:.1f}", f"{ours.images_per_s:.3f}",
         f"{ours.images_per_s / hf.images_per_s:.2f}x", f"{ours.images_per_s / limit:.1%}"),
    ]  # fmt: skip
    print()
    print(f"caption (K={k}) + filter, {args.shape} shape, {args.images} images on {device} ({args.dtype}):")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    print(
        f"FLOP limit: {flops['total'] / 1e9:.0f} GFLOP per image (caption {flops['caption'] / 1e9:.0f}, "
        f"filter {flops['filter'] / 1e9:.0f}; caption {caption_tokens:.1f} decoder positions, ITM text "
        f"{text_tokens:.1f} tokens) at a measured matmul rate of {rate / 1e12:.3f} TFLOP/s = {limit:.3f} images/s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shape": args.shape,
                    "k": k,
                    "images": args.images,
                    "batch_size": args.batch_size,
                    "device": device,
                    "dtype": args.dtype,
                    "machine": machine(device),
                    "capfilt_images_per_s": ours.images_per_s,
                    "hf_images_per_s": hf.images_per_s,
                    "speedup": ours.images_per_s / hf.images_per_s,
                    "flops_per_image": flops,
                    "matmul_flops_per_s": rate,
                    "flop_limit_images_per_s": limit,
                    "capfilt_fraction_of_limit": ours.images_per_s / limit,
                },
                indent=2,
            )  # fmt: skip
            + "\n"
        )
    print(f"speed-up vs Hugging Face: {ours.images_per_s / hf.images_per_s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
