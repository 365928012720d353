"""Filter: BLIP's image-text matching score for the web text and every synthetic caption.

:class:`Filter` loads the filter model(s) in ``__init__`` (Ray batch-inference style) and in
``__call__`` adds, for each row:

* ``web_itm`` (float): the ITM head's match probability ``softmax(logits)[:, 1]`` of the web
  text; NaN when the row is not ok or its web text is empty/null.
* ``synthetic_itm`` (list of float): the same for each of the row's ``synthetic_texts``.
* with ``filter.itc_column`` or ``filter.itc_weight`` > 0: ``web_itc`` / ``synthetic_itc``, the
  cosine similarity of the ITC features (useful for CLIP-style re-ranking as BLIP-2 and LAION-COCO
  did; with ``itc_weight`` part of the score the threshold applies to, see
  :func:`capfilt.stages.select.filter_score`).
* ``synthetic_agreement`` (list of float): per synthetic caption, the mean cosine of its ITC
  text feature with the row's other synthetic captions (:func:`capfilt.inference.text_agreement`;
  NaN when the row has one caption). Captions sampled for one image that say the same thing are
  ones the captioner was sure of; ``select.min_agreement`` keeps only those.

Cost: each image is encoded ONCE per model, and its cross-attention keys/values are
projected once for all of its K+1 texts (``capfilt.inference.itm_scores``, ``MED.image_context``):
no vision pass and no image-side projection is repeated per text. With an ensemble
(``filter.models``) a text's score is the mean over the models.

Failure is data, except a lost GPU: out-of-memory halves the micro-batch (``filter.batch_size``
images); a model error is retried row by row and rows that still fail become ``filter_failed``
with the error; a CUDA error that poisons the context ends the actor so Ray restarts it and
retries the batch (``capfilt.inference.run_chunks``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from capfilt.inference import (
    ITM_MAX_TOKENS,  # noqa: F401 - re-exported
    DeviceLost,
    abandon_actor,
    error_text,
    itm_scores,
    load_med,
    pixel_values,
    resolve_device,
    resolve_dtype,
    run_chunks,
    text_agreement,
    texts_to_score,
)
from capfilt.stages.caption import batch_pixels, is_ok, model_specs
from capfilt.stages.select import object_array
from capfilt.stages.status import Status

Batch = dict[str, np.ndarray]


class Filter:
    """Adds ``web_itm``, ``synthetic_itm`` (and ITC columns when asked) to a batch."""

    def __init__(self, cfg: Any, *, device: str | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device, num_gpus=cfg.num_gpus)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.itc = bool(getattr(cfg, "itc_column", False)) or bool(getattr(cfg, "itc_weight", 0.0))
        self.models = [load_med(spec, device=self.device, dtype=self.dtype) for spec in model_specs(cfg)]

    def _score(
        self, index: int, pixels: np.ndarray, texts: Sequence[Sequence[str]], first: Sequence[int]
    ) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
        """ITM probabilities (and ITC cosines) of one model: per image, one per text; and the
        agreement of each of image j's synthetic captions, ``texts[j][first[j]:]``.

        ``texts[j]`` are image j's texts. One ``encode_image`` call for all images; pairs are
        scored by :func:`capfilt.inference.itm_scores` (image keys/values once per image).
        """
        med, tokenizer = self.models[index]
        owner = [j for j, row in enumerate(texts) for _ in row]
        flat = [t for row in texts for t in row]
        with torch.inference_mode():
            image_embeds = med.encode_image(pixel_values(pixels, device=self.device, dtype=self.dtype))
            image_feat = med.image_features(image_embeds) if self.itc else None
            itm, itc = itm_scores(
                med, tokenizer, image_embeds, flat, owner, batch_size=max(1, self.cfg.batch_size),
                image_feat=image_feat,
            )  # fmt: skip
            synthetic_owner = [j for j, row in enumerate(texts) for _ in row[first[j] :]]
            agreement = text_agreement(
                med, tokenizer, [t for j, row in enumerate(texts) for t in row[first[j] :]], synthetic_owner,
                batch_size=max(1, self.cfg.batch_size),
            )  # fmt: skip
        split_itm: list[list[float]] = [[] for _ in texts]
        split_itc: list[list[float]] = [[] for _ in texts]
        split_agreement: list[list[float]] = [[] for _ in texts]
        for p, j in enumerate(owner):
            split_itm[j].append(float(itm[p]))
            if itc is not None:
                split_itc[j].append(float(itc[p]))
        for p, j in enumerate(synthetic_owner):
            split_agreement[j].append(float(agreement[p]))
        return split_itm, split_itc, split_agreement

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        try:
            return self.score(batch)
        except DeviceLost as err:
            abandon_actor(err)
            raise

    def score(self, batch: Mapping[str, np.ndarray]) -> Batch:
        """``__call__`` without the device-loss handling (raises :class:`DeviceLost`)."""
        out, status, error, rows, has_web, texts = texts_to_score(batch)
        n = len(status)
        # Sums over the ensemble, divided at the end.
        itm_sum = [np.zeros(len(t)) for t in texts]
        itc_sum = [np.zeros(len(t)) for t in texts]
        first = [1 if has_web[i] else 0 for i in rows]  # texts[j][first[j]:] are the synthetic captions
        agreement_sum = [np.zeros(len(t) - f) for t, f in zip(texts, first, strict=True)]
        for index, (med, _) in enumerate(self.models):
            pixels, failed = batch_pixels(batch, rows, med.config.image_size)
            for i, message in failed.items():
                status[i], error[i] = Status.decode_failed.value, message
            results = run_chunks(
                lambda a, b, index=index, pixels=pixels: list(
                    zip(*self._score(index, pixels[a:b], texts[a:b], first[a:b]), strict=True)
                ),
                len(rows),
                self.cfg.batch_size,
            )
            for j, result in enumerate(results):
                i = rows[j]
                if isinstance(result, BaseException):
                    if is_ok(status[i]):
                        status[i], error[i] = Status.filter_failed.value, error_text(result)
                    continue
                itm_sum[j] += np.asarray(result[0], dtype=float)
                agreement_sum[j] += np.asarray(result[2], dtype=float)
                if self.itc:
                    itc_sum[j] += np.asarray(result[1], dtype=float)
        m = len(self.models)
        web_itm = np.full(n, math.nan)
        web_itc = np.full(n, math.nan)
        synthetic_itm: list[list[float]] = [[] for _ in range(n)]
        synthetic_itc: list[list[float]] = [[] for _ in range(n)]
        synthetic_agreement: list[list[float]] = [[] for _ in range(n)]
        for j, i in enumerate(rows):
            if not is_ok(status[i]):
                continue
            synthetic_agreement[i] = (agreement_sum[j] / m).tolist()
            itm = (itm_sum[j] / m).tolist()
            itc = (itc_sum[j] / m).tolist()
            if has_web[i]:
                web_itm[i], web_itc[i] = itm.pop(0), itc.pop(0)
            synthetic_itm[i] = itm
            synthetic_itc[i] = itc
        out["web_itm"] = web_itm
        out["synthetic_itm"] = object_array(synthetic_itm)
        out["synthetic_agreement"] = object_array(synthetic_agreement)
        if self.itc:
            out["web_itc"] = web_itc
            out["synthetic_itc"] = object_array(synthetic_itc)
        out["status"] = status
        out["error"] = error
        return out
