"""Caption: K synthetic captions per downloaded image (BLIP's captioner).

Two callables over dict-of-numpy batches, following Ray's batch-inference pattern:

* :func:`preprocess` (cheap, CPU, stateless): decodes the ``image`` bytes of ok rows and
  resizes them to each model's input side, as ``uint8`` arrays in ``pixels_<size>`` columns.
  It is its own map step so decoding overlaps model inference, and it ships uint8 pixels
  (4x smaller than float32) to the model actors, which normalise on their device.
* :class:`Captioner` (stateful): loads the model(s) once in ``__init__`` and writes
  ``synthetic_texts`` in ``__call__``.

Determinism: every row's sampling is driven by a seed that is a stable hash of
``(caption.seed, key)`` and the MED draws counter-based uniforms from
(seed, caption index, step). A sample's captions therefore depend on the model, the image,
the seed and the key only, not on batch size, actor count or where a resumed run restarted.

torch is imported inside the functions that use it: Ray's download, preprocess and select
tasks import this module (through ``capfilt.pipeline``) and must not pay torch's multi-second
import in every worker process, which on a small CPU box delays the first batch.

Failure is data: a model error on a batch is retried row by row, and the rows that still fail
get status ``caption_failed`` with the error; the stage never raises on bad rows.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from capfilt.errors import UserError
from capfilt.stages.select import object_array
from capfilt.stages.status import Status

if TYPE_CHECKING:
    import torch

BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of BLIP's image processor (the CLIP/OpenAI statistics)."""
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std of BLIP's image processor."""

# issue 10: an optional "@revision" pins a branch, tag, commit or refs/pr/N (model.hf.HUB_SPEC).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9_][\w./-]*)?$")
_MAX_ERROR = 500

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- models


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
    # issue 10: revision pin + whichever weight format the repo has (was: *.safetensors only).
    from model.hf import download_from_hub, split_revision
    from model.med import CheckpointError

    try:
        return download_from_hub(*split_revision(spec))
    except CheckpointError as err:  # network, auth, missing repo or weights: one line for the user
        raise UserError(f"model {spec}: {err}") from None


def resolve_device(num_gpus: float, device: str | None = None) -> torch.device:
    """``cuda`` when the stage was given GPUs and one is visible, else ``cpu``."""
    import torch

    if device is not None:
        return torch.device(device)
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

    med, tokenizer = load_any(resolve_model(spec))
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


# --------------------------------------------------------------------------- preprocessing


def pixel_column(size: int) -> str:
    """Name of the preprocessed-pixels column for a model input side."""
    return f"pixels_{size}"


def decode_image(data: bytes, size: int) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> RGB uint8 array (size, size, 3), bicubic as BLIP's processor."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)


def is_ok(status: Any) -> bool:
    return str(status) == Status.ok


def isolate_failures(run: Callable[[int, int], Sequence[Any]], size: int) -> list[Any]:
    """``run(start, stop)`` for all items; if it raises, retry item by item.

    Returns one result per item, the exception in place of an item that fails alone, so one
    bad sample costs its own row (caption_failed / filter_failed), never its batch's.
    """
    try:
        return list(run(0, size))
    except Exception as err:  # noqa: BLE001
        if size == 1:
            return [err]
    results: list[Any] = []
    for j in range(size):
        try:
            results.append(run(j, j + 1)[0])
        except Exception as err:  # noqa: BLE001
            results.append(err)
    return results


def preprocess(batch: Mapping[str, np.ndarray], *, sizes: Sequence[int]) -> Batch:
    """Add ``pixels_<size>`` (uint8, (B, size, size, 3)) for every size; zeros for non-ok rows.

    An ok row whose bytes do not decode becomes ``decode_failed`` (the download stage has
    already re-encoded every image, so this only happens with a corrupt store).
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
            for size, column in columns.items():
                column[i] = decode_image(bytes(batch["image"][i]), size)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a row status
            status[i] = Status.decode_failed.value
            error[i] = error_text(err)
    for size, column in columns.items():
        out[pixel_column(size)] = column
    out["status"] = status
    out["error"] = error
    return out


def pixel_values(pixels: np.ndarray, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W) on ``device`` (BLIP mean/std)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(BLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(BLIP_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


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
        self.device = resolve_device(cfg.num_gpus, device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.models = [load_med(spec, device=self.device, dtype=self.dtype) for spec in model_specs(cfg)]
        self.prompt_ids = [
            tokenizer(cfg.prompt.strip(), add_special_tokens=False)["input_ids"] if cfg.prompt.strip() else []
            for _, tokenizer in self.models
        ]

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

    def _captions_for(
        self, index: int, pixels: np.ndarray, seeds: np.ndarray
    ) -> list[list[str] | BaseException]:
        """Like ``_generate`` but never raises: a failing chunk is retried one image at a time."""
        return isolate_failures(lambda a, b: self._generate(index, pixels[a:b], seeds[a:b]), len(pixels))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        out = dict(batch)
        n = len(batch["status"])
        status = object_array(list(batch["status"]))
        error = object_array(list(batch["error"])) if "error" in batch else object_array([""] * n)
        captions: list[list[str]] = [[] for _ in range(n)]
        rows = [i for i in range(n) if is_ok(status[i])]
        keys = [str(batch["key"][i]) for i in rows]
        seeds = np.array([caption_seed(self.cfg.seed, key) for key in keys], dtype=np.int64)
        step = max(1, self.cfg.batch_size)
        for index, (med, _) in enumerate(self.models):
            pixels, failed = batch_pixels(batch, rows, med.config.image_size)
            for i, message in failed.items():
                status[i], error[i] = Status.decode_failed.value, message
            for start in range(0, len(rows), step):
                chunk = slice(start, start + step)
                for i, result in zip(
                    rows[chunk], self._captions_for(index, pixels[chunk], seeds[chunk]), strict=True
                ):
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
