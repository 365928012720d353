"""Caption: K synthetic captions per downloaded image (BLIP's captioner).

Two callables over dict-of-numpy batches, following Ray's batch-inference pattern:

* :func:`preprocess` (cheap, CPU, stateless): decodes the ``image`` bytes of ok rows and
  prepares each model's input as BLIP's test transform does (the picture squashed to the
  model side, bicubic; letterbox padding of ``border``-stored images cut off first), as
  ``uint8`` arrays in ``pixels_<size>`` columns. It is its own map step so decoding overlaps
  model inference, and it ships uint8 pixels (4x smaller than float32) to the model actors,
  which normalise on their device.
* :class:`Captioner` (stateful): loads the model(s) once in ``__init__`` and writes
  ``synthetic_texts`` in ``__call__``.

Determinism: every row's sampling is driven by a seed that is a stable hash of
``(caption.seed, key)`` and the MED draws counter-based uniforms from
(seed, caption index, step). A sample's captions therefore depend on the model, the image,
the seed and the key only, not on batch size, actor count or where a resumed run restarted.

torch is imported inside the functions that use it: Ray's download, preprocess and select
tasks import this module (through ``capfilt.pipeline``) and must not pay torch's multi-second
import in every worker process, which on a small CPU box delays the first batch.

Failure is data, except a lost GPU (see ``capfilt.inference.run_chunks``): out-of-memory
halves the micro-batch; a model error on a micro-batch is retried row by row and the rows
that still fail get status ``caption_failed`` with the error; a CUDA error that poisons the
context ends the actor, so Ray restarts it and retries the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from capfilt.inference import (  # noqa: F401 - re-exported for the pipeline and tests
    BLIP_MEAN,
    BLIP_STD,
    DeviceLost,
    abandon_actor,
    decode_image,
    error_text,
    is_hub_id,
    load_med,
    pixel_values,
    prompt_ids,
    resolve_device,
    resolve_dtype,
    resolve_model,
    row_box,
    run_chunks,
)
from capfilt.stages.select import object_array
from capfilt.stages.status import Status

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- preprocessing


def pixel_column(size: int) -> str:
    """Name of the preprocessed-pixels column for a model input side."""
    return f"pixels_{size}"


def is_ok(status: Any) -> bool:
    return str(status) == Status.ok


def preprocess(
    batch: Mapping[str, np.ndarray], *, sizes: Sequence[int], resize_mode: str | None = None
) -> Batch:
    """Add ``pixels_<size>`` (uint8, (B, size, size, 3)) for every size; zeros for non-ok rows.

    ``resize_mode`` is how the batch's images were stored (``download.resize_mode``): with
    ``border`` the padding is cut off before squashing, so the model input is BLIP's test
    transform of the picture whatever the storage. An ok row whose bytes do not decode becomes
    ``decode_failed`` (the download stage has already re-encoded every image, so this only
    happens with a corrupt store).
    """
    out = dict(batch)
    n = len(batch["status"])
    status = object_array(list(batch["status"]))
    error = object_array(list(batch["error"])) if "error" in batch else object_array([""] * n)
    columns = {size: np.zeros((n, size, size, 3), dtype=np.uint8) for size in sorted(set(sizes))}
    for i in range(n):
        if not is_ok(status[i]):
            continue
        try:
            box = row_box(batch, i, resize_mode)
            for size, column in columns.items():
                column[i] = decode_image(bytes(batch["image"][i]), size, box=box)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a row status
            status[i] = Status.decode_failed.value
            error[i] = error_text(err)
    for size, column in columns.items():
        out[pixel_column(size)] = column
    out["status"] = status
    out["error"] = error
    return out


def batch_pixels(
    batch: Mapping[str, np.ndarray], rows: Sequence[int], size: int
) -> tuple[np.ndarray, dict[int, str]]:
    """uint8 pixels of ``rows`` at ``size``: from the preprocess column, else decoded here.

    Returns the pixels and ``{row: error}`` for rows whose bytes did not decode (their
    pixels are zeros and the caller marks them ``decode_failed``).
    """
    column = batch.get(pixel_column(size))
    if column is not None:
        return np.asarray(column)[list(rows)], {}
    pixels = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
    failed: dict[int, str] = {}
    for j, i in enumerate(rows):
        try:
            pixels[j] = decode_image(bytes(batch["image"][i]), size)
        except Exception as err:  # noqa: BLE001
            failed[i] = error_text(err)
    return pixels, failed


# --------------------------------------------------------------------------- captioner


def caption_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (seed, key): stable across processes, Python runs and machines.

    ``hash()`` is salted per process, so a cryptographic digest is used instead. Ensemble
    members share the row's seed: their captions then equal what each model writes alone.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def model_specs(cfg: Any) -> list[str]:
    """The model(s) of a caption/filter config section (``model`` or the ``models`` ensemble)."""
    ids = getattr(cfg, "model_ids", None)
    if ids is not None:
        return list(ids)
    return [cfg.model] if getattr(cfg, "model", None) else list(cfg.models)


class Captioner:
    """Writes ``synthetic_texts``: ``num_captions`` captions per ok image and model.

    With an ensemble (``caption.models``) the row's captions are the union of every model's,
    in model order, exact duplicates and empty captions removed (a duplicate caption would only
    be scored twice and could be kept twice). Non-ok rows get an empty list.
    """

    def __init__(self, cfg: Any, *, device: str | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(device, num_gpus=cfg.num_gpus)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.models = [load_med(spec, device=self.device, dtype=self.dtype) for spec in model_specs(cfg)]
        self.prompt_ids = [prompt_ids(tokenizer, cfg.prompt) for _, tokenizer in self.models]

    def _generate(self, index: int, pixels: np.ndarray, seeds: np.ndarray) -> list[list[str]]:
        """Captions of one model for a chunk of images: a list of K strings per image."""
        import torch

        med, tokenizer = self.models[index]
        cfg = self.cfg
        k = cfg.num_captions
        with torch.inference_mode():
            ids = med.generate(
                pixel_values(pixels, device=self.device, dtype=self.dtype),
                prompt_ids=self.prompt_ids[index],
                num_captions=k,
                sample=cfg.sample,
                top_p=cfg.top_p,
                num_beams=max(cfg.num_beams, k) if not cfg.sample else cfg.num_beams,
                max_length=cfg.max_length,
                min_length=cfg.min_length,
                repetition_penalty=cfg.repetition_penalty,
                seeds=torch.from_numpy(seeds).to(self.device),
            )
        texts = tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=True)
        texts = [" ".join(t.split()) for t in texts]
        return [texts[j * k : (j + 1) * k] for j in range(len(pixels))]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        try:
            return self.caption(batch)
        except DeviceLost as err:
            abandon_actor(err)
            raise

    def caption(self, batch: Mapping[str, np.ndarray]) -> Batch:
        """``__call__`` without the device-loss handling (raises :class:`DeviceLost`)."""
        out = dict(batch)
        n = len(batch["status"])
        status = object_array(list(batch["status"]))
        error = object_array(list(batch["error"])) if "error" in batch else object_array([""] * n)
        captions: list[list[str]] = [[] for _ in range(n)]
        rows = [i for i in range(n) if is_ok(status[i])]
        keys = [str(batch["key"][i]) for i in rows]
        seeds = np.array([caption_seed(self.cfg.seed, key) for key in keys], dtype=np.int64)
        for index, (med, _) in enumerate(self.models):
            pixels, failed = batch_pixels(batch, rows, med.config.image_size)
            for i, message in failed.items():
                status[i], error[i] = Status.decode_failed.value, message
            results = run_chunks(
                lambda a, b, index=index, pixels=pixels: self._generate(index, pixels[a:b], seeds[a:b]),
                len(rows),
                self.cfg.batch_size,
            )
            for i, result in zip(rows, results, strict=True):
                if isinstance(result, BaseException):
                    if is_ok(status[i]):
                        status[i], error[i] = Status.caption_failed.value, error_text(result)
                    continue
                captions[i].extend(result)
        out["synthetic_texts"] = object_array(
            [_union(c) if is_ok(status[i]) else [] for i, c in enumerate(captions)]
        )
        out["status"] = status
        out["error"] = error
        return out


def _union(texts: Sequence[str]) -> list[str]:
    """Non-empty texts in order, each once."""
    return list(dict.fromkeys(t for t in texts if t))
