"""Tiny Hugging Face BLIP checkpoint directories in every layout the hub uses, built offline.

``save_hf_blip(directory, kind=..., layout=...)`` writes a randomly initialised, very small
``BlipForImageTextRetrieval`` (``kind="filter"``) or ``BlipForConditionalGeneration``
(``kind="captioner"``) with its tokenizer, as a hub repo would hold it:

* ``safetensors``: ``model.safetensors`` (what ``save_pretrained`` writes today);
* ``sharded-safetensors``: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
  (``save_pretrained(max_shard_size=...)``);
* ``bin``: ``pytorch_model.bin`` only, a ``torch.save``d state dict, as older transformers wrote
  (blip-itm-large-coco's main branch);
* ``sharded-bin``: ``pytorch_model-0000k-of-0000n.bin`` + ``pytorch_model.bin.index.json``.

transformers 5 no longer writes ``.bin`` files (``safe_serialization=False`` is ignored), so
those layouts are written by hand in the format older versions used.
"""

from __future__ import annotations

import json
from pathlib import Path

LAYOUTS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")


def tiny_blip_config(tokenizer, *, image_size: int = 32):
    from transformers import BlipConfig

    from model.tokenizer import special_ids

    ids = special_ids(tokenizer)
    text = {
        "vocab_size": ids["vocab_size"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 48, "bos_token_id": ids["bos_token_id"],
        "sep_token_id": ids["sep_token_id"], "pad_token_id": ids["pad_token_id"],
        "eos_token_id": ids["sep_token_id"],
    }  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 8}  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def save_hf_blip(
    directory: Path, *, kind: str = "filter", layout: str = "safetensors", seed: int = 0
) -> Path:
    """Write a tiny HF BLIP checkpoint directory in ``layout``; returns ``directory``."""
    import torch
    from safetensors.torch import load_file
    from support import WORDS
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from model.tokenizer import train_tokenizer

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} not in {LAYOUTS}")
    tokenizer = train_tokenizer([" ".join(WORDS)] * 4, vocab_size=120)
    cls = BlipForImageTextRetrieval if kind == "filter" else BlipForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(tiny_blip_config(tokenizer)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF's ViT init is ~1e-10; give every weight a visible magnitude
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.2))
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
