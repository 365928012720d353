"""Model inference shared by the caption and filter stages and by `capfilt eval`.

One place for what every model-running part of capfilt needs:

* where a model comes from: :func:`is_hub_id`, :func:`resolve_model` (a local directory, or a
  Hugging Face hub snapshot fetched only when a model is actually loaded), :func:`load_med`;
* where and how it runs: :func:`resolve_device`, :func:`resolve_dtype`;
* model inputs prepared as BLIP's test transform does (``transforms.Resize((S, S),
  BICUBIC)``, ``ToTensor``, ``Normalize`` with BLIP's mean/std): the image is squashed to
  the model side with PIL's bicubic filter (:func:`decode_image`), shipped as uint8 and
  normalised on the model's device (:func:`pixel_values`). Images stored letterboxed
  (``download.resize_mode: border``) have their padding cut off first (:func:`content_box`),
  so the model sees the picture, not the bars, whatever the storage format;
* prompt ids (:func:`prompt_ids`) and ITM scoring with each image's cross-attention
  keys/values computed once for all its texts (:func:`itm_scores`);
* failure handling for accelerators (:func:`run_chunks`): out-of-memory halves the
  micro-batch; a CUDA error that leaves the context unusable raises :class:`DeviceLost`,
  which the stages turn into the end of the actor process (:func:`abandon_actor`) so that
  Ray restarts it and retries the batch instead of committing its rows as failed.

torch is imported inside functions: Ray's CPU tasks import this module (preprocessing)
and must not pay torch's import in every worker.
"""

from __future__ import annotations

import io
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from capfilt.errors import UserError

if TYPE_CHECKING:
    import torch

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of BLIP's image transform (the CLIP/OpenAI statistics)."""
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std of BLIP's image transform."""

ITM_MAX_TOKENS = 35
"""Texts are truncated to this many tokens for matching, as BLIP's retrieval models are trained."""

DEVICE_LOST_EXIT_CODE = 75
"""Exit status of an actor that gave up its GPU (EX_TEMPFAIL: Ray restarts it, the batch is retried)."""

# An optional "@revision" pins a branch, tag, commit or refs/pr/N (model.hf.split_revision).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9_][\w./-]*)?$")
_MAX_ERROR = 500


# --------------------------------------------------------------------------- where models come from


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face hub repo (``org/name[@revision]``) rather than a local path.

    A spec that exists on disk is always a path, whatever it looks like (and ``path@rev`` of an
    existing path is a mistake, not a hub id).
    """
    if Path(spec).expanduser().exists() or _HUB_ID.match(spec) is None:
        return False
    base, at, _ = spec.partition("@")
    return not (at and Path(base).expanduser().exists())


def resolve_model(spec: str) -> Path:
    """Local directory of a model: the path itself, or a hub snapshot downloaded NOW.

    Only called when a model is actually loaded (never by dry runs or tests), so nothing is
    fetched that the user did not ask for. ``org/name@revision`` pins a revision; configs,
    tokenizer files and one weight format (safetensors preferred, else pytorch_model.bin, read
    with weights_only) are fetched: ``model.hf.download_from_hub``.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not is_hub_id(spec):
        base, at, _ = spec.rpartition("@")
        if at and Path(base).expanduser().exists():
            raise UserError(
                f"model {spec}: a revision (@...) only applies to hub ids; {base} is a local path"
            )
        raise UserError(f"model {spec}: no such directory (and not a Hugging Face hub id org/name)")
    from model.hf import download_from_hub, split_revision
    from model.med import CheckpointError

    try:
        return download_from_hub(*split_revision(spec))
    except CheckpointError as err:  # network, auth, missing repo or weights: one line for the user
        raise UserError(f"model {spec}: {err}") from None


def resolve_device(device: str | None = "auto", *, num_gpus: float | None = None) -> torch.device:
    """The torch device to run on.

    ``device`` names one explicitly (``"cpu"``, ``"cuda"``, ``"cuda:1"``; asking for CUDA
    where there is none is a :class:`UserError`). ``"auto"`` or None: with ``num_gpus``
    given (a pipeline stage), CUDA when the stage was given GPUs and one is visible (a
    warning and the CPU otherwise); without it (``capfilt eval``), CUDA whenever available.
    """
    import torch

    if device not in (None, "auto"):
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise UserError(f"device: {device!r} is not a torch device ({exc})") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device: {device!r} asked for, but CUDA is not available")
        return resolved
    if num_gpus is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if num_gpus > 0:
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("num_gpus > 0 but no CUDA device is visible; running on CPU", stacklevel=2)
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPU (A100/H100 run it at full speed), float32 on CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_med(spec: str, *, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(MED, tokenizer) from a capfilt checkpoint or HF BLIP dir, in eval mode on ``device``.

    The momentum encoders and ITC queues only matter for pre-training; they are dropped so an
    inference replica holds one copy of the weights.
    """
    from model.hf import load_any
    from model.med import CheckpointError

    try:
        med, tokenizer = load_any(resolve_model(spec))
    except (CheckpointError, FileNotFoundError) as err:
        raise UserError(f"model {spec}: {err}") from None
    if tokenizer is None:
        raise UserError(f"model {spec}: checkpoint has no tokenizer")
    for name in ("vision_model_m", "text_encoder_m", "vision_proj_m", "text_proj_m"):
        if hasattr(med, name):
            delattr(med, name)
    med.to(device=device, dtype=dtype).eval()
    med.requires_grad_(False)
    return med, tokenizer


def error_text(err: BaseException) -> str:
    """One line for the ``error`` column."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text[:_MAX_ERROR]


# --------------------------------------------------------------------------- model inputs


def content_box(
    stored: tuple[int, int], original: tuple[int, int], resize_mode: str | None
) -> tuple[int, int, int, int] | None:
    """The picture's box (left, top, right, bottom) inside a stored image, or None for all of it.

    Only ``border`` pads (img2dataset scales the longer side to the image size, then pads the
    shorter one evenly with white); every other mode stores picture pixels only. ``original``
    is the downloaded image's (width, height) before resizing; (0, 0) when unknown.
    """
    width, height = stored
    ow, oh = original
    if resize_mode != "border" or ow <= 0 or oh <= 0 or width <= 0 or height <= 0:
        return None
    scale = min(width / ow, height / oh)
    cw, ch = max(1, min(width, round(ow * scale))), max(1, min(height, round(oh * scale)))
    left, top = (width - cw) // 2, (height - ch) // 2
    if (cw, ch) == (width, height):
        return None
    return left, top, left + cw, top + ch


def decode_image(
    data: bytes | Image.Image, size: int, *, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Encoded image (or a PIL image) -> RGB uint8 (size, size, 3): BLIP's test-transform resize.

    The picture (``box`` of it, see :func:`content_box`) is squashed to size x size with PIL's
    bicubic filter, exactly as ``torchvision.transforms.Resize((size, size), BICUBIC)`` does
    on a PIL image; aspect ratio is not kept, as in BLIP.
    """
    if isinstance(data, Image.Image):
        return _resize_rgb(data, size, box)
    with Image.open(io.BytesIO(data)) as image:
        return _resize_rgb(image, size, box)


def _resize_rgb(image: Image.Image, size: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    rgb = image.convert("RGB")
    if box is not None:  # crop first: resizing with box= would blend the padding in at the edges
        rgb = rgb.crop(box)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def pixel_values(pixels: np.ndarray, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W) on ``device`` (BLIP mean/std).

    The uint8 array crosses to the device (4x smaller than float32) and is normalised there.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(BLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(BLIP_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def row_box(
    batch: Mapping[str, np.ndarray], i: int, resize_mode: str | None
) -> tuple[int, int, int, int] | None:
    """:func:`content_box` of row ``i`` of a pipeline batch (needs its width/height columns)."""
    if resize_mode != "border" or "original_width" not in batch or "width" not in batch:
        return None
    return content_box(
        (int(batch["width"][i]), int(batch["height"][i])),
        (int(batch["original_width"][i]), int(batch["original_height"][i])),
        resize_mode,
    )


# --------------------------------------------------------------------------- text


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's word-piece ids without special tokens, as ``MED.generate`` takes them (it puts
    [DEC] in front itself). BLIP's "a picture of " keeps its trailing space only in the text."""
    prompt = prompt.strip()
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = ITM_MAX_TOKENS) -> dict[str, Any]:
    """[CLS] text [SEP], padded to the longest, truncated as BLIP does for retrieval (35 tokens)."""
    enc = tokenizer(
        [str(t) for t in texts],
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --------------------------------------------------------------------------- ITM scoring


def itm_scores(
    med: Any,
    tokenizer: Any,
    image_embeds: torch.Tensor,
    texts: Sequence[str],
    owner: Sequence[int],
    *,
    batch_size: int,
    image_feat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ITM match probability (and ITC cosine with ``image_feat``) of each (image owner[t], text t).

    ``image_embeds`` (I, 1 + N, Dv) are encoded once by the caller. Pairs are scored in
    chunks of about ``batch_size`` texts, whole images at a time: each image's cross-attention
    keys/values are computed once per chunk and read by all of its texts (``MED.image_context``).
    Returns float32 CPU tensors in text order.
    """
    import torch

    device = image_embeds.device
    n = len(texts)
    itm = torch.empty(n)
    itc = torch.empty(n) if image_feat is not None else None
    if n == 0:
        return itm, itc
    owner_t = torch.as_tensor(list(owner), dtype=torch.long)
    order = torch.argsort(owner_t, stable=True)  # texts grouped by image, images in order
    counts = torch.bincount(owner_t, minlength=image_embeds.shape[0]).tolist()
    chunks: list[tuple[int, int]] = []
    start = size = 0
    for count in counts:  # whole images per chunk, at least one
        if size and size + count > batch_size:
            chunks.append((start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append((start, start + size))
    for a, b in chunks:
        idx = order[a:b]
        tokens = tokenize(tokenizer, [texts[int(t)] for t in idx])
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        rows_image = owner_t[idx].to(device)
        used, local = torch.unique(rows_image, return_inverse=True)
        context = med.image_context(image_embeds.index_select(0, used), local)
        logits = med.itm_logits(None, ids, mask, image=context)
        itm[idx] = torch.softmax(logits.float(), dim=-1)[:, 1].cpu()
        if itc is not None and image_feat is not None:
            text_feat = med.text_features(med.encode_text(ids, mask))
            itc[idx] = (image_feat.index_select(0, rows_image).float() * text_feat.float()).sum(-1).cpu()
    return itm, itc


def text_agreement(
    med: Any, tokenizer: Any, texts: Sequence[str], owner: Sequence[int], *, batch_size: int
) -> torch.Tensor:
    """Per text, the mean cosine of its ITC text feature with the other texts of the same owner.

    The owner's texts are captions sampled for one image: where they say the same thing the
    captioner was sure, where they disagree it was guessing. Uses only the unimodal text encoder
    (no image). NaN for a text that is its owner's only one. Returns float32 CPU values in text order.
    """
    import torch

    out = torch.full((len(texts),), float("nan"))
    groups: dict[int, list[int]] = {}
    for t, o in enumerate(owner):
        groups.setdefault(int(o), []).append(t)
    # Only texts that have a sibling are encoded: one caption per image costs no text pass at all.
    shared = [t for members in groups.values() if len(members) > 1 for t in members]
    if not shared:
        return out
    device = next(med.parameters()).device
    step = max(1, batch_size)
    parts = []
    for a in range(0, len(shared), step):
        tokens = tokenize(tokenizer, [texts[t] for t in shared[a : a + step]])
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        parts.append(med.text_features(med.encode_text(ids, mask)).float().cpu())
    feats = torch.empty(len(texts), parts[0].shape[1])
    feats[torch.as_tensor(shared)] = torch.cat(parts)
    for members in groups.values():
        if len(members) < 2:
            continue
        idx = torch.as_tensor(members)
        sims = feats[idx] @ feats[idx].T
        out[idx] = (sims.sum(1) - sims.diagonal()) / (len(members) - 1)
    return out


# --------------------------------------------------------------------------- failures


class DeviceLost(RuntimeError):
    """The accelerator failed in a way that leaves its context unusable; the process must end."""


_DEVICE_LOST_MARKERS = (
    "cuda error",
    "cublas_status",
    "cudnn_status",
    "cudnn error",
    "nccl error",
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "an illegal instruction",
    "uncorrectable ecc error",
    "device not ready",
    "cuda driver",
    "no cuda gpus are available",
    "cuda-capable device(s) is/are busy or unavailable",
)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's out-of-memory error (``torch.OutOfMemoryError``, also raised as CUDA OOM)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(err, torch.OutOfMemoryError)


def is_device_lost(err: BaseException) -> bool:
    """A CUDA error after which the context cannot be trusted (not out-of-memory)."""
    if isinstance(err, DeviceLost):
        return True
    if is_out_of_memory(err):
        return False
    try:
        import torch

        if isinstance(err, getattr(torch, "AcceleratorError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return any(marker in text for marker in _DEVICE_LOST_MARKERS)


def _free_cached_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort after an OOM
        pass


def run_chunks(run: Callable[[int, int], Sequence[Any]], size: int, chunk: int) -> list[Any]:
    """``run(start, stop)`` over ``size`` items in micro-batches of ``chunk``; one result per item.

    * out of memory: the micro-batch is halved (and stays halved for the rest of the call)
      and retried; an item that runs out of memory alone gets the error as its result;
    * a lost device: :class:`DeviceLost` is raised at once (nothing is marked failed);
    * any other error: the micro-batch is retried item by item, and an item that fails
      alone gets the exception as its result, so one bad sample costs its own row only.
    """
    results: list[Any] = []
    start, chunk = 0, max(1, chunk)
    while start < size:
        stop = min(size, start + chunk)
        try:
            out = list(run(start, stop))
        except Exception as err:  # noqa: BLE001
            if is_device_lost(err):
                raise DeviceLost(error_text(err)) from err
            if is_out_of_memory(err):
                _free_cached_memory()
                if stop - start == 1:
                    results.append(err)
                    start = stop
                else:
                    chunk = max(1, (stop - start) // 2)
                continue
            out = []
            for j in range(start, stop):
                try:
                    out.append(run(j, j + 1)[0])
                except Exception as item_err:  # noqa: BLE001
                    if is_device_lost(item_err):
                        raise DeviceLost(error_text(item_err)) from item_err
                    out.append(item_err)
        results.extend(out)
        start = stop
    return results


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001
        return False


def abandon_actor(err: DeviceLost) -> None:
    """End this process when it is a Ray actor (Ray restarts it and retries the batch); else raise.

    A poisoned CUDA context fails every later kernel, so carrying on would mark every later
    row failed and commit those shards for good. Exiting uncleanly is how a Ray actor asks to
    be restarted: Ray Data's actor pools restart actors and retry their tasks by default
    (``max_restarts=-1``, ``max_task_retries=-1``), and a clean ``exit_actor`` would not.
    """
    if not _in_ray_actor():
        raise err
    print(f"capfilt: device lost, ending this actor so Ray restarts it: {err}", file=sys.stderr, flush=True)
    os._exit(DEVICE_LOST_EXIT_CODE)


def texts_to_score(
    batch: Mapping[str, Any],
) -> tuple[dict[str, Any], Any, Any, list[int], dict[int, bool], list[list[str]]]:
    """What a text-scoring stage (filter, CLIP) starts from: ``(out, status, error, rows, has_web,
    texts)``; ``rows`` are the ok rows, ``texts[j]`` the web text (when there is one) then the
    synthetic captions of row ``rows[j]``."""
    from capfilt.stages.select import has_text, object_array
    from capfilt.stages.status import Status

    out = dict(batch)
    n = len(batch["status"])
    status = object_array(list(batch["status"]))
    error = object_array(list(batch["error"])) if "error" in batch else object_array([""] * n)
    synthetic = batch.get("synthetic_texts")
    rows = [i for i in range(n) if str(status[i]) == Status.ok.value]
    has_web = {i: has_text(batch["web_text"][i]) for i in rows}
    texts = [
        ([str(batch["web_text"][i])] if has_web[i] else [])
        + ([str(t) for t in synthetic[i]] if synthetic is not None and synthetic[i] is not None else [])
        for i in rows
    ]
    return out, status, error, rows, has_web, texts
