"""Shared test builders: tiny MED and Hugging Face BLIP models, hand-built run directories, CLIP.

Imported by name from tests (pytest's ``pythonpath`` includes ``tests/``), so fixtures are
written once instead of being copied between test modules.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image, ImageDraw

from capfilt.rundir import DATASET_SCHEMA, SAMPLE_SCHEMA

#: Words the tiny test tokenizer knows; captions in tests are drawn from them.
WORDS = (
    "a picture of red blue green yellow circle square triangle star on the left right top small big".split()
)


# --------------------------------------------------------------------------- tiny models
# Every test model has the one shape below (32 px, width 32, one layer per tower); a variant
# changes the shape only where a test needs another one, and says why. What is not shape (the
# vocabulary and special-token ids, queue size, momentum, init std) is passed per test.

TINY_MED: dict[str, int] = {
    "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1, "vision_heads": 2,
    "vision_intermediate": 64, "text_width": 32, "text_layers": 1, "text_heads": 2, "text_intermediate": 64,
    "queue_size": 64, "embed_dim": 16, "max_position_embeddings": 48,
}  # fmt: skip
"""The test suite's MED shape (over ``MEDConfig.preset("tiny")``)."""

TINY_VARIANTS: dict[str, dict[str, int]] = {
    "tiny": {},
    # two layers per tower: per-layer state (decoder/encoder sharing of layer 1, per-layer KV caches)
    "deep": {"vision_layers": 2, "text_layers": 2},
    # image width 48 != text width 32 and 4 heads: cross-attention key/value shapes (HF parity)
    "cross": {"vision_width": 48, "vision_intermediate": 96, "vision_layers": 2, "vision_heads": 4,
              "text_layers": 2, "text_heads": 4},
    # 16 px (4 patches): training runs through the CLI, where steps dominate the test's time
    "micro": {"image_size": 16},
}  # fmt: skip


def tiny_shape(variant: str = "tiny") -> dict[str, int]:
    """The MEDConfig fields of ``variant`` (one of ``TINY_VARIANTS``)."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; known: {sorted(TINY_VARIANTS)}")
    return {**TINY_MED, **TINY_VARIANTS[variant]}


def tiny_overrides(variant: str = "tiny") -> str:
    """``variant`` as a YAML flow mapping, for ``--set model.overrides=...`` of training configs."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in tiny_shape(variant).items()) + "}"


def tiny_tokenizer(words=WORDS, *, vocab_size: int = 120):
    """A WordPiece tokenizer trained on ``words`` (the project's helper: BERT's own maps words to [UNK])."""
    from model.tokenizer import train_tokenizer

    return train_tokenizer([" ".join(words)] * 4, vocab_size=vocab_size)


def tiny_config(variant: str = "tiny", **fields: Any):
    """``MEDConfig`` of ``variant``; ``fields`` set the rest (e.g. ``**special_ids(tokenizer)``)."""
    from model.med import MEDConfig

    return MEDConfig.preset("tiny").replace(**{**tiny_shape(variant), **fields})


def tiny_med(*, seed: int, variant: str = "tiny", tokenizer: Any = None, **fields: Any):
    """A randomly initialised tiny MED (eval mode) and its tokenizer (``tiny_tokenizer()`` by default)."""
    import torch

    from model.med import MED
    from model.tokenizer import special_ids

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = tiny_config(variant, **{**special_ids(tokenizer), **fields})
    torch.manual_seed(seed)
    return MED(config).eval(), tokenizer


def save_tiny_model(
    directory: Path, *, seed: int, variant: str = "tiny", calibrate_itm: bool = False
) -> Path:
    """``tiny_med`` saved as a capfilt checkpoint (weights, config, tokenizer); returns ``directory``.

    A random ITM head gives every pair nearly the same probability (~0.47). With
    ``calibrate_itm`` the head is rescaled so that, on images and texts like the tests', the
    match probabilities spread around 0.5: a 0.5 threshold then keeps some texts and drops others.
    """
    med, tokenizer = tiny_med(seed=seed, variant=variant)
    if calibrate_itm:
        _calibrate_itm(med, tokenizer)
    med.save(directory, tokenizer)
    return directory


def _calibrate_itm(med: Any, tokenizer: Any) -> None:
    """Scale the ITM head so (match - no match) logits have spread ~2 and median ~0."""
    import numpy as np
    import torch

    from capfilt.stages.caption import decode_image, pixel_values

    side = med.config.image_size
    pixels = np.stack([decode_image(image_bytes("RGB", "JPEG", color=c), side) for c in range(12)])
    texts = [" ".join(WORDS[(3 * i) % len(WORDS) : (3 * i) % len(WORDS) + 3]) for i in range(12)]
    tokens = tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        embeds = med.encode_image(pixel_values(pixels, device=torch.device("cpu"), dtype=torch.float32))
        head = med.itm_head
        hidden_logits = med.itm_logits(embeds, tokens["input_ids"], tokens["attention_mask"]) - head.bias
        u = hidden_logits[:, 1] - hidden_logits[:, 0]
        scale = 2.0 / float(u.std().clamp_min(1e-8))
        head.weight.mul_(scale)
        head.bias.zero_()
        head.bias[1] = -scale * float(u.median())


def image_bytes(
    mode: str, fmt: str, *, size: tuple[int, int] = (48, 40), color: int = 0, **save: object
) -> bytes:
    """An image of ``mode`` (RGB, CMYK, P, I;16, RGBA, ...) encoded as ``fmt``, different per ``color``."""
    rgb = Image.new("RGB", size, (40 + color * 7 % 200, 120, 200 - color * 5 % 150))
    rgb.paste((250, 250, 20), (0, 0, size[0] // 2, size[1] // 3))
    if mode == "I;16":
        image = rgb.convert("L").convert("I;16")
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


# --------------------------------------------------------------------------- tiny Hugging Face BLIP

HF_LAYOUTS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")
"""How hub repos hold BLIP weights: ``model.safetensors``; ``model-0000k-of-0000n.safetensors`` +
index (``save_pretrained(max_shard_size=...)``); ``pytorch_model.bin`` only (older transformers,
blip-itm-large-coco's main branch); ``pytorch_model-0000k-of-0000n.bin`` + index."""


def tiny_blip_config(tokenizer: Any, variant: str = "tiny"):
    """A ``transformers.BlipConfig`` of ``variant``'s shape, written field by field (not through
    ``model.hf.hf_config``, so the import and parity tests do not trust the converter they test)."""
    from transformers import BlipConfig

    from model.tokenizer import special_ids

    shape, ids = tiny_shape(variant), special_ids(tokenizer)
    text = {
        "vocab_size": ids["vocab_size"], "hidden_size": shape["text_width"],
        "intermediate_size": shape["text_intermediate"], "num_hidden_layers": shape["text_layers"],
        "num_attention_heads": shape["text_heads"], "max_position_embeddings": shape["max_position_embeddings"],
        "bos_token_id": ids["bos_token_id"], "sep_token_id": ids["sep_token_id"],
        "pad_token_id": ids["pad_token_id"], "eos_token_id": ids["sep_token_id"],
    }  # fmt: skip
    vision = {
        "hidden_size": shape["vision_width"], "intermediate_size": shape["vision_intermediate"],
        "num_hidden_layers": shape["vision_layers"], "num_attention_heads": shape["vision_heads"],
        "image_size": shape["image_size"], "patch_size": shape["patch_size"],
    }  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=shape["embed_dim"])


def randomise(model: Any, seed: int) -> Any:
    """Give every weight a visible magnitude (HF initialises the ViT with std ~1e-10); eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.2))
    return model.eval()


def save_hf_blip(
    directory: Path,
    *,
    kind: str = "filter",
    layout: str = "safetensors",
    seed: int = 0,
    tokenizer: Any = None,
) -> Path:
    """A tiny random ``BlipForImageTextRetrieval`` (``kind="filter"``) or
    ``BlipForConditionalGeneration`` (``"captioner"``) with its tokenizer, saved as a hub repo holds
    it in ``layout`` (one of ``HF_LAYOUTS``); returns ``directory``.

    transformers 5 no longer writes ``.bin`` files (``safe_serialization=False`` is ignored), so
    those layouts are written by hand in the format older versions used.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    if layout not in HF_LAYOUTS:
        raise ValueError(f"layout {layout!r} not in {HF_LAYOUTS}")
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    cls = BlipForImageTextRetrieval if kind == "filter" else BlipForConditionalGeneration
    torch.manual_seed(seed)
    model = randomise(cls(tiny_blip_config(tokenizer)), seed)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "sharded-safetensors":
        model.save_pretrained(directory, max_shard_size="40KB")
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if layout in ("bin", "sharded-bin"):
        state = load_file(directory / "model.safetensors")
        (directory / "model.safetensors").unlink()
        if layout == "bin":
            torch.save(state, directory / "pytorch_model.bin")
        else:
            names = sorted(state)
            chunks = [names[i : i + 8] for i in range(0, len(names), 8)]
            weight_map = {}
            for k, chunk in enumerate(chunks, start=1):
                shard = f"pytorch_model-{k:05d}-of-{len(chunks):05d}.bin"
                torch.save({n: state[n] for n in chunk}, directory / shard)
                weight_map.update(dict.fromkeys(chunk, shard))
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": weight_map}  # fmt: skip
            (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index), encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- run directories
# A run directory written the way the README's "Run directory" section specifies (pyarrow for the parquet
# files, webdataset's TarWriter for the image shards), independently of the pipeline's writer, so
# export and report are checked against the contract rather than against what the pipeline writes.

THRESHOLD = 0.5
COLORS = ["red", "green", "blue", "orange", "purple", "teal", "olive", "navy"]

CONFIG_YAML = """\
input:
  path: urls.parquet
  format: parquet
  url_col: URL
  text_col: TEXT
  keep_cols: [similarity]
caption:
  model: runs/captioner-tiny
  num_captions: 2
  top_p: 0.9
filter:
  model: runs/filter-tiny
  threshold: {threshold}
  keep_web: true
  keep_synthetic: 2
output:
  dir: {dir}
  rows_per_shard: {rows_per_shard}
"""


def _status(r: int) -> tuple[str, str]:
    """A mix of outcomes: most rows ok, some failed in the ways the download stage reports."""
    if r % 7 == 3:
        return "download_failed", "HTTP 404"
    if r % 11 == 5:
        return "invalid_url", "scheme 'ftp' is not http(s)"
    if r % 13 == 8:
        return "decode_failed", "cannot identify image file"
    return "ok", ""


def _image(r: int) -> bytes:
    """A small JPEG: a coloured square on a contrasting background, different per row."""
    image = Image.new("RGB", (64, 48), (40 * (r % 6), 200 - 10 * (r % 9), 30 + 20 * (r % 5)))
    draw = ImageDraw.Draw(image)
    x = 4 + (r * 7) % 30
    draw.rectangle([x, 8, x + 24, 36], fill=COLORS[r % len(COLORS)])
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _score(r: int, salt: int, offset: float) -> float:
    return round(min(1.0, max(0.0, ((r * salt + 11) % 100) / 100 + offset)), 4)


def make_run(
    run_dir: Path,
    *,
    shard_sizes: tuple[int, ...] = (6, 6, 4),
    offset: float = 0.0,
    with_manifest: bool = True,
) -> dict[str, Any]:
    """Write a run directory; returns what it holds (rows, kept pairs by source, samples).

    ``offset`` shifts every ITM score, so bootstrap rounds can differ. Row 0 has an empty web
    text (never kept, scored NaN); failed rows have no captions and NaN scores.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    rows_per_shard = max(shard_sizes)
    (run_dir / "config.yaml").write_text(
        CONFIG_YAML.format(threshold=THRESHOLD, dir=run_dir, rows_per_shard=rows_per_shard), encoding="utf-8"
    )
    for sub in ("samples", "images", "dataset"):
        (run_dir / sub).mkdir(exist_ok=True)
    all_samples: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    r = 0
    for shard, size in enumerate(shard_sizes):
        stem = f"shard-{shard:05d}"
        samples: list[dict[str, Any]] = []
        dataset: list[dict[str, Any]] = []
        with wds.TarWriter(str(run_dir / "images" / f"{stem}.tar")) as tar:
            for _ in range(size):
                key = f"00000_{r:09d}"
                status, error = _status(r)
                row: dict[str, Any] = {
                    "key": key,
                    "url": f"http://127.0.0.1:9/img/{r}.jpg",
                    "web_text": "" if r == 0 else f"photo {r} of a {COLORS[r % len(COLORS)]} square",
                    "status": status,
                    "error": error,
                    "synthetic_texts": [],
                    "web_itm": math.nan,
                    "synthetic_itm": [],
                    "web_kept": False,
                    "synthetic_kept": [],
                    "similarity": 0.3 + r / 100,
                }
                if status == "ok":
                    tar.write({"__key__": key, "jpg": _image(r), "json": {"key": key, "url": row["url"]}})
                    texts = [f"a picture of a {COLORS[r % len(COLORS)]} box {r}", f"a picture of thing {r}"]
                    scores = [_score(r, 53, offset), _score(r, 71, offset)]
                    web_itm = math.nan if not row["web_text"] else _score(r, 37, offset)
                    row.update(
                        synthetic_texts=texts,
                        web_itm=web_itm,
                        synthetic_itm=scores,
                        web_kept=bool(row["web_text"]) and web_itm >= THRESHOLD,
                        synthetic_kept=[s >= THRESHOLD for s in scores],
                    )
                    kept = [(row["web_text"], "web", web_itm)] if row["web_kept"] else []
                    kept += [
                        (t, "synthetic", s)
                        for t, s, k in zip(texts, scores, row["synthetic_kept"], strict=True)
                        if k
                    ]
                    for text, source, itm in kept:
                        dataset.append(
                            {
                                "key": key,
                                "text": text,
                                "source": source,
                                "itm": itm,
                                "shard": shard,
                                "image_tar": f"images/{stem}.tar",
                                "image_member": f"{key}.jpg",
                            }
                        )
                samples.append(row)
                r += 1
        pq.write_table(
            pa.Table.from_pylist(samples, schema=_SAMPLES_SCHEMA), run_dir / "samples" / f"{stem}.parquet"
        )
        pq.write_table(
            pa.Table.from_pylist(dataset, schema=_DATASET_SCHEMA), run_dir / "dataset" / f"{stem}.parquet"
        )
        all_samples += samples
        pairs += dataset
    kept = dict(Counter(p["source"] for p in pairs))
    status_counts = dict(Counter(s["status"] for s in all_samples))
    if with_manifest:
        manifest = {
            "input_rows": len(all_samples),
            "rows": len(all_samples),
            "complete": True,
            "shards": {"total": len(shard_sizes), "committed": len(shard_sizes)},
            "status": status_counts,
            "kept": {"web": kept.get("web", 0), "synthetic": kept.get("synthetic", 0)},
            "models": {"caption": ["runs/captioner-tiny"], "filter": ["runs/filter-tiny"]},
            "versions": {"capfilt": "0.1.0", "torch": "2.13.0", "ray": "2.60.0"},
            "started_at": "2025-01-01T00:00:00+00:00",
            "finished_at": "2025-01-01T00:01:40+00:00",
            "timing": {
                "wall_s": 100.0,
                "rows_per_s": 0.16,
                "stages": [
                    {"operator": "MapBatches(download)", "rows": 16, "wall_s": 3.1, "rows_per_s": 5.2}
                ],
            },
        }
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return {
        "rows": len(all_samples),
        "kept": kept,
        "status": status_counts,
        "samples": all_samples,
        "pairs": pairs,
    }


# The columns are the contract's one definition (capfilt.rundir); the rows above are written by hand.
_SAMPLES_SCHEMA = SAMPLE_SCHEMA.append(pa.field("similarity", pa.float64()))  # + input.keep_cols
_DATASET_SCHEMA = DATASET_SCHEMA


def make_bootstrap(root: Path, *, rounds: int = 2, unfinished: bool = True) -> list[dict[str, Any]]:
    """A bootstrap directory: round-K/pipeline runs, round-K/eval.json, metrics.jsonl.

    With ``unfinished`` an extra round directory exists without pipeline output, as while a
    round is still running; the latest *finished* round is the default.
    """
    infos, lines = [], []
    for k in range(1, rounds + 1):
        infos.append(make_run(root / f"round-{k}" / "pipeline", shard_sizes=(6, 5), offset=0.1 * (k - 1)))
        metrics = {
            "round": k,
            "txt_r1": 0.2 + 0.1 * k,
            "img_r1": 0.15 + 0.1 * k,
            "cider": 0.4 + 0.2 * k,
            "bleu4": 0.05 * k,
            "filter_auc": 0.6 + 0.05 * k,
            "kept_web": infos[-1]["kept"].get("web", 0),
            "kept_synthetic": infos[-1]["kept"].get("synthetic", 0),
        }
        (root / f"round-{k}" / "eval.json").write_text(json.dumps(metrics), encoding="utf-8")
        lines.append(json.dumps(metrics))
    if unfinished:
        (root / f"round-{rounds + 1}" / "pipeline").mkdir(parents=True)
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return infos


# --------------------------------------------------------------------------- tiny CLIP

CLIP_BOS, CLIP_EOS, CLIP_PAD, CLIP_UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"


def clip_tokenizer():
    """A word-level CLIP-style tokenizer over WORDS, built with ``tokenizers`` and wrapped.

    transformers 5's slow CLIP/BERT tokenizers built from vocab files map words to the unknown
    token, so the backend is built directly: lowercase, whitespace split, ``<bos> text <eos>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([CLIP_PAD, CLIP_UNK, CLIP_BOS, CLIP_EOS, *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=CLIP_UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_PAD,
        unk_token=CLIP_UNK,
        model_max_length=16,
    )


def save_tiny_clip(directory: Path, *, seed: int = 0) -> Path:
    """A randomly initialised, very small ``CLIPModel`` (32 px, width 32) with tokenizer and processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        },
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


def scene(seed: int, size: tuple[int, int] = (320, 240)):
    """A photo-like picture (gradient, random shapes, noise), different per seed: dedup tests."""
    import random

    import numpy as np

    rng = random.Random(seed)
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    channels = [rng.random() * 255 * x + rng.random() * 80 * y, rng.random() * 255 * y + 0 * x]
    channels.append(rng.random() * 255 * (1 - x) + 0 * y)
    image = Image.fromarray(np.concatenate(channels, axis=2).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        box = (x0, y0, x0 + rng.randrange(30, 140), y0 + rng.randrange(30, 120))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noise = np.random.default_rng(seed).normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray((np.asarray(image, dtype=float) + noise).clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- driver subprocesses and run contents


def spawn_run(config: Path, out: Path, ray_address: str, *overrides: str, cwd: Path | None = None):
    """Start ``capfilt run CONFIG`` as a subprocess joining the test run's Ray session.

    Returns the ``subprocess.Popen`` (stdout discarded, stderr piped), for tests that kill the
    driver (SIGKILL) at some point and then rerun. ``overrides`` are ``--set`` values.
    """
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("capfilt", path=str(Path(sys.executable).parent)) or "capfilt"
    command = [exe, "run", str(config), "--set", f"output.dir={out}", "--set", f"ray.address={ray_address}"]
    for override in overrides:
        command += ["--set", override]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})  # fmt: skip


def run_contents(run_dir: Path) -> dict[str, Any]:
    """Everything a run directory holds that must not depend on interruption, exactly.

    Every ``samples/`` and ``dataset/`` Parquet shard's rows (all columns, per file), every
    ``images/`` tar's member names and bytes (in order), and the manifest without times.
    """
    import tarfile

    contents: dict[str, Any] = {}
    for sub in ("samples", "dataset"):
        for path in sorted((run_dir / sub).glob("*.parquet")):
            contents[f"{sub}/{path.name}"] = pq.read_table(path).to_pylist()
    for path in sorted((run_dir / "images").glob("*.tar")):
        with tarfile.open(path) as tar:
            contents[f"images/{path.name}"] = [
                (m.name, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()
            ]
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    contents["manifest.json"] = {
        k: v for k, v in manifest.items() if k not in ("started_at", "finished_at", "timing")
    }
    return contents


def assert_identical_runs(run_dir: Path, reference: Path) -> None:
    """``run_contents`` equal file by file (NaN scores compare equal to NaN)."""
    got, want = run_contents(run_dir), run_contents(reference)
    assert sorted(got) == sorted(want), "the runs hold different files"
    for name in want:
        assert _nan_safe(got[name]) == _nan_safe(want[name]), f"{name} differs from the reference run"


def _nan_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, dict):
        return {k: _nan_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_nan_safe(v) for v in value)
    return value


def load_benchmark(name: str) -> Any:
    """``benchmarks/NAME.py`` imported as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
