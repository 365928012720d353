"""CLIP: cosine similarity of the web text and of every synthetic caption with the image.

DataComp's baselines filter on CLIP scores, and BLIP-2 and LAION-COCO rank the K synthetic
captions of an image (with its web text) by CLIP similarity and keep the best ones. This
stage adds those scores with any Hugging Face CLIP checkpoint (``transformers.CLIPModel``,
its image processor and tokenizer, from a local directory or a hub id):

* ``web_clip`` (float): cosine of the CLIP image and text embeddings for the web text; NaN
  when the row is not ok or its web text is empty/null.
* ``synthetic_clip`` (list of float): the same for each of the row's ``synthetic_texts``.

Scores are raw cosines in [-1, 1] (not multiplied by CLIP's logit scale), the quantity
DataComp thresholds. Which texts are kept is decided by :mod:`capfilt.stages.select`
(``clip.threshold``, ``select.rank_by: clip``, ``select.top_n``).

Cost: each image goes through the vision tower once; texts are encoded in chunks of
``batch_size``. Images are decoded here from the downloaded bytes and prepared by the
checkpoint's own image processor (resize + centre crop + CLIP normalisation), since CLIP's
input differs from BLIP's. Texts longer than the model's context are truncated.

Failure is data: a model error is retried row by row; rows that still fail become
``clip_failed`` with the error. A row that failed an earlier stage is not scored.
Weights are loaded from safetensors only, never with pickle or remote code.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from capfilt.errors import UserError
from capfilt.inference import DeviceLost, abandon_actor, run_chunks, texts_to_score
from capfilt.stages.caption import (
    error_text,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from capfilt.stages.select import object_array
from capfilt.stages.status import Status

Batch = dict[str, np.ndarray]


def _features(output: Any) -> Any:
    """Projected embeddings from ``get_*_features`` (a tensor, or in transformers 5 an output object)."""
    return getattr(output, "pooler_output", output)


def load_clip(spec: str, *, device: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """(CLIPModel, image processor, tokenizer) from a local dir or hub id, eval mode on ``device``."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    directory = resolve_model(spec)
    if not any(directory.glob("*.safetensors")):
        raise UserError(
            f"clip.model {spec}: no .safetensors weights in {directory} (pickle files are not loaded)"
        )
    try:
        model = CLIPModel.from_pretrained(directory, dtype=dtype, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"clip.model {spec}: cannot load a CLIP model from {directory}: {err}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model, processor, tokenizer


class ClipScorer:
    """Adds ``web_clip`` and ``synthetic_clip`` to a batch (Ray batch-inference callable)."""

    def __init__(self, cfg: Any, *, device: str | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device, num_gpus=cfg.num_gpus)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model, self.processor, self.tokenizer = load_clip(
            cfg.model, device=self.device, dtype=self.dtype
        )
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    def _pixels(self, images: Sequence[bytes]) -> Any:
        from PIL import Image

        decoded = []
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                decoded.append(image.convert("RGB"))
        pixels = self.processor(images=decoded, return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.dtype)

    def _score(self, images: Sequence[bytes], texts: Sequence[Sequence[str]]) -> list[list[float]]:
        """Cosine of each image with each of its texts: ``result[j][t]`` for image j's text t."""
        import torch

        owner = [j for j, row in enumerate(texts) for _ in row]
        flat = [t for row in texts for t in row]
        cosine = torch.empty(len(flat))
        with torch.inference_mode():
            image_feat = _features(self.model.get_image_features(pixel_values=self._pixels(images))).float()
            image_feat = torch.nn.functional.normalize(image_feat, dim=-1)
            step = max(1, self.cfg.batch_size)
            for start in range(0, len(flat), step):
                chunk = slice(start, start + step)
                tokens = self.tokenizer(
                    flat[chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                text_feat = _features(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                ).float()
                text_feat = torch.nn.functional.normalize(text_feat, dim=-1)
                pick = torch.tensor(owner[chunk], device=image_feat.device)
                cosine[chunk] = (image_feat.index_select(0, pick) * text_feat).sum(-1).cpu()
        result: list[list[float]] = [[] for _ in texts]
        for p, j in enumerate(owner):
            result[j].append(float(cosine[p]))
        return result

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        try:
            return self.score(batch)
        except DeviceLost as err:  # the GPU is gone: end the actor so Ray restarts it and retries
            abandon_actor(err)
            raise

    def score(self, batch: Mapping[str, np.ndarray]) -> Batch:
        """``__call__`` without the device-loss handling (raises :class:`DeviceLost`)."""
        out, status, error, rows, has_web, texts = texts_to_score(batch)
        n = len(status)
        images = [bytes(batch["image"][i]) for i in rows]
        web_clip = np.full(n, math.nan)
        synthetic_clip: list[list[float]] = [[] for _ in range(n)]
        # Micro-batches of clip.batch_size: halved on out-of-memory; a row that fails alone is
        # clip_failed; a lost GPU ends the actor (capfilt.inference.run_chunks).
        results = run_chunks(
            lambda a, b: self._score(images[a:b], texts[a:b]), len(rows), self.cfg.batch_size
        )
        for j, result in enumerate(results):
            i = rows[j]
            if isinstance(result, BaseException):
                status[i], error[i] = Status.clip_failed.value, error_text(result)
                continue
            scores = list(result)
            if has_web[i]:
                web_clip[i] = scores.pop(0)
            synthetic_clip[i] = scores
        out["web_clip"] = web_clip
        out["synthetic_clip"] = object_array(synthetic_clip)
        out["status"] = status
        out["error"] = error
        return out
