"""Training data for the MED: image-text sources, augmentation, a weighted deterministic stream.

Why it is shaped this way:

- **Position-addressed stream.** Every sample has a global position ``p`` (batch ``g`` holds
  positions ``g*B .. g*B+B-1``). Which source, which item, which caption and which augmentation a
  position gets is a pure function of ``(seed, p)``. Resuming a run is therefore "start at batch
  ``g``" (no replay of images, no saved iterator state), and the stream is the same whatever the
  number of DataLoader workers or where a run was interrupted.
- **Sources are indexes, images are read lazily.** A source keeps keys, captions and where each
  image lives (a Parquet row group + row, or a tar member offset); the image bytes are read when a
  position needs them. Each source is visited in a block-shuffled order (shuffled blocks = row
  groups / tar shards, shuffled rows inside a block), like webdataset's shard shuffle + buffer
  shuffle, so reads stay local while every item is seen once per source epoch.
- **Mixing.** Sources are drawn per position with the given weights from counter-based uniforms;
  how often each source was drawn before a position is a prefix count computed in fixed chunks, so
  any position is reachable in O(position / 65536) vectorised work.
- **No torchvision** (not a dependency): RandomResizedCrop and a light RandAugment are a few PIL
  calls each below.

Sources (see :class:`SourceSpec`):

- ``webdataset``: tar shards in the img2dataset layout, ``KEY.jpg|jpeg|png|webp`` plus ``KEY.txt``
  or ``KEY.json`` (``caption`` or ``text`` field). Members are grouped with webdataset's own key rule
  (:func:`webdataset.tariterators.base_plus_ext`); reads use the member offsets so access is random.
- ``parquet``: an ``image`` column (binary, or a struct with a ``bytes`` field as Hugging Face
  ``datasets`` writes it) and a ``text`` column or a ``captions`` list column (one caption sampled
  per visit, or every caption expanded into its own item); optional ``key`` column.
- ``run``: a capfilt run directory; reads ``RUN/dataset/*.parquet`` (``key``, ``text``, ...) with the
  image in an ``image`` bytes column or referenced into ``RUN/images/*.tar`` by (``image_tar``,
  ``image_member``), as capfilt's writer records it, or by (``shard``, ``key``).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

# BLIP (and CLIP) normalisation constants: the ViT was trained with these.
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_DIRECTION_WORDS = re.compile(r"\b(left|right)", re.IGNORECASE)
_CHUNK = 65536  # positions per block of mixing uniforms
# Distinct stream ids so the different random decisions of one position are independent.
_MIX, _ORDER, _CAPTION, _AUGMENT = 1, 2, 3, 4


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Training augmentation, BLIP-like by default.

    BLIP pre-training uses RandomResizedCrop(scale=(0.5, 1.0)) + RandAugment(2 ops, magnitude 5).
    Horizontal flip is off by default because it turns "a dog on the left" into a false caption;
    when on, it is still skipped for any sample whose caption mentions left or right.
    """

    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment_ops: int = 2  # ops drawn per image, each applied with probability 0.5; 0 disables
    randaugment_magnitude: int = 5  # 0..10
    hflip: bool = False


def has_direction_words(text: str) -> bool:
    """True when a caption says left or right (then a horizontal flip would falsify it)."""
    return bool(_DIRECTION_WORDS.search(text))


def _random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """The crop box of torchvision's RandomResizedCrop: area fraction in ``scale``, aspect in ``ratio``
    (log-uniform), ten tries, then a centre crop with the aspect clamped to ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _signed(level: float, rng: np.random.Generator) -> float:
    return level if rng.random() < 0.5 else -level


_GRAY = (128, 128, 128)


def _op_identity(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return img


def _op_autocontrast(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.autocontrast(img)


def _op_equalize(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.equalize(img)


def _op_brightness(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.0 + _signed(0.5 * m, rng))


def _op_contrast(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(1.0 + _signed(0.5 * m, rng))


def _op_sharpness(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(1.0 + _signed(0.9 * m, rng))


def _op_rotate(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    return img.rotate(_signed(30.0 * m, rng), resample=Image.Resampling.BILINEAR, fillcolor=_GRAY)


def _op_translate(img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
    dx = _signed(0.2 * m, rng) * img.width
    dy = _signed(0.2 * m, rng) * img.height
    return img.transform(img.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=_GRAY)


# The light subset of BLIP's RandomAugment list (no colour inversion, solarise or posterise:
# captions name colours, so ops that change hue would teach wrong pairs).
RANDAUGMENT_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "identity": _op_identity,
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize,
    "brightness": _op_brightness,
    "contrast": _op_contrast,
    "sharpness": _op_sharpness,
    "rotate": _op_rotate,
    "translate": _op_translate,
}


class ImageTransform:
    """PIL image -> normalised (3, S, S) float tensor; training augmentation or eval resize.

    Randomness comes only from the ``rng`` passed per call, so a sample's augmentation is a
    function of its stream position (resume and worker count do not change it).
    """

    def __init__(
        self,
        *,
        image_size: int,
        train: bool,
        augment: AugmentConfig | None = None,
        mean: Sequence[float] = BLIP_MEAN,
        std: Sequence[float] = BLIP_STD,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.train = train
        self.augment = augment if augment is not None else AugmentConfig()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image, *, rng: np.random.Generator, text: str = "") -> torch.Tensor:
        image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        aug = self.augment
        if self.train and aug.random_resized_crop:
            box = _random_resized_crop_box(image.width, image.height, aug.scale, aug.ratio, rng)
            image = image.resize(size, Image.Resampling.BICUBIC, box=box)
        else:
            # Eval (and no-crop training) is a plain resize to a square, as BLIP's test transform.
            image = image.resize(size, Image.Resampling.BICUBIC)
        if self.train:
            if aug.hflip and not has_direction_words(text) and rng.random() < 0.5:
                image = ImageOps.mirror(image)
            ops = list(RANDAUGMENT_OPS.values())
            level = aug.randaugment_magnitude / 10.0
            for _ in range(aug.randaugment_ops):
                op = ops[int(rng.integers(len(ops)))]
                if rng.random() < 0.5:
                    image = op(image, level, rng)
        array = np.asarray(image, dtype=np.uint8)
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

SourceFormat = Literal["auto", "webdataset", "parquet", "run"]


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """One data source of the mix.

    ``path``: a tar / Parquet file, a directory of them, a glob, or a capfilt run directory.
    ``weight``: relative sampling weight (positions are drawn from sources in these proportions).
    ``captions``: for sources with several captions per image, ``sample`` draws one per visit;
    ``expand`` makes each (image, caption) its own item (same image id, so ITC treats them as
    positives of each other).
    """

    path: str
    format: SourceFormat = "auto"
    weight: float = 1.0
    captions: Literal["sample", "expand"] = "sample"


@dataclass(frozen=True)
class _ParquetRef:
    file: int
    row_group: int
    row: int


@dataclass(frozen=True)
class _TarRef:
    file: int
    offset: int
    size: int


class Source:
    """An indexed image-text source: ``len`` items, each a key, candidate captions and an image.

    ``blocks`` lists the item ranges that share one unit of I/O (a Parquet row group or a tar
    shard); the stream shuffles blocks, then items inside a block, to keep reads local.
    """

    def __init__(
        self,
        *,
        name: str,
        keys: list[str],
        texts: list[list[str]],
        refs: list[_ParquetRef | _TarRef],
        files: list[str],
        blocks: list[tuple[int, int]],
        image_column: str = "image",
    ) -> None:
        if not keys:
            raise ValueError(f"data source {name} has no image-text pairs")
        self.name = name
        self.keys = keys
        self.texts = texts
        self.refs = refs
        self.files = files
        self.blocks = blocks
        self.image_column = image_column
        self._cached_group: tuple[int, int] | None = None
        self._cached_images: list[Any] = []
        self._handles: dict[int, int] = {}  # tar file index -> OS file descriptor
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def all_texts(self) -> Iterator[str]:
        """Every caption of the source (for training a tokenizer on the data)."""
        for candidates in self.texts:
            yield from candidates

    def image_bytes(self, index: int) -> bytes:
        ref = self.refs[index]
        if self._pid != os.getpid():
            # A forked DataLoader worker: never share file descriptors or caches with the parent.
            self._handles, self._cached_group, self._cached_images, self._pid = {}, None, [], os.getpid()
        if isinstance(ref, _TarRef):
            fd = self._handles.get(ref.file)
            if fd is None:
                fd = self._handles[ref.file] = os.open(self.files[ref.file], os.O_RDONLY)
            # pread: no shared file offset, so concurrent readers of one descriptor cannot interfere.
            data = os.pread(fd, ref.size, ref.offset)
            if len(data) != ref.size:
                raise ValueError(f"{self.name}: {self.files[ref.file]} is truncated at offset {ref.offset}")
            return data
        group = (ref.file, ref.row_group)
        if self._cached_group != group:
            table = pq.ParquetFile(self.files[ref.file]).read_row_group(ref.row_group, columns=[self.image_column])
            self._cached_images = table.column(0).to_pylist()
            self._cached_group = group
        value = self._cached_images[ref.row]
        if isinstance(value, dict):  # Hugging Face datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if not isinstance(value, bytes | bytearray):
            raise ValueError(f"{self.name}: row {ref.row} of {self.files[ref.file]} has no image bytes")
        return bytes(value)

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles and decoded row groups do not travel to DataLoader workers.
        state = self.__dict__.copy()
        state.update(_handles={}, _cached_group=None, _cached_images=[])
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_handles", {}).values():
                with contextlib.suppress(OSError):
                    os.close(fd)


def _expand_paths(path: str, suffixes: tuple[str, ...]) -> list[str]:
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"data path does not exist: {path}")
    files = [f for f in files if f.endswith(suffixes)]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {path}")
    return files


def _clean(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    return text or None


def _tar_members(path: str) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Tar members grouped by sample key with webdataset's rule (basename up to the first dot)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None or ext is None:
                continue
            samples.setdefault(key, {})[ext.lower()] = member
    return samples


def _read_member(handle: Any, member: tarfile.TarInfo) -> bytes:
    handle.seek(member.offset_data)
    return handle.read(member.size)


def _caption_from_members(handle: Any, members: dict[str, tarfile.TarInfo]) -> str | None:
    if "txt" in members:
        return _clean(_read_member(handle, members["txt"]).decode("utf-8", errors="replace"))
    if "json" in members:
        try:
            meta = json.loads(_read_member(handle, members["json"]))
        except json.JSONDecodeError:
            return None
        if isinstance(meta, dict):
            return _clean(meta.get("caption")) or _clean(meta.get("text"))
    return None


def _image_member(members: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None


def load_webdataset(path: str, *, name: str | None = None) -> Source:
    """Index img2dataset-style tar shards: samples with an image and a non-empty caption."""
    files = _expand_paths(path, (".tar",))
    keys: list[str] = []
    texts: list[list[str]] = []
    refs: list[_ParquetRef | _TarRef] = []
    blocks: list[tuple[int, int]] = []
    for file_index, file in enumerate(files):
        start = len(keys)
        with open(file, "rb") as handle:
            for key, members in _tar_members(file).items():
                image = _image_member(members)
                caption = _caption_from_members(handle, members)
                if image is None or caption is None:
                    continue
                keys.append(os.path.basename(key))
                texts.append([caption])
                refs.append(_TarRef(file_index, image.offset_data, image.size))
        if len(keys) > start:
            blocks.append((start, len(keys)))
    return Source(name=name or path, keys=keys, texts=texts, refs=refs, files=files, blocks=blocks)


def load_parquet(
    path: str, *, name: str | None = None, captions: Literal["sample", "expand"] = "sample"
) -> Source:
    """Index Parquet files with an ``image`` bytes column and ``text`` or ``captions`` (list) column."""
    files = _expand_paths(path, (".parquet",))
    keys: list[str] = []
    texts: list[list[str]] = []
    refs: list[_ParquetRef | _TarRef] = []
    blocks: list[tuple[int, int]] = []
    for file_index, file in enumerate(files):
        parquet = pq.ParquetFile(file)
        columns = set(parquet.schema_arrow.names)
        if "image" not in columns:
            raise ValueError(f"{file}: no 'image' column (columns: {sorted(columns)})")
        text_column = "text" if "text" in columns else "captions" if "captions" in columns else None
        if text_column is None:
            raise ValueError(f"{file}: needs a 'text' or 'captions' column (columns: {sorted(columns)})")
        wanted = [text_column] + (["key"] if "key" in columns else [])
        for group in range(parquet.num_row_groups):
            start = len(keys)
            table = parquet.read_row_group(group, columns=wanted).to_pydict()
            group_texts = table[text_column]
            group_keys = table.get("key") or [f"{Path(file).stem}:{group}:{r}" for r in range(len(group_texts))]
            for row, (key, value) in enumerate(zip(group_keys, group_texts, strict=True)):
                raw = value if isinstance(value, list) else [value]
                candidates = [c for c in (_clean(t) for t in raw) if c]
                if not candidates:
                    continue
                ref = _ParquetRef(file_index, group, row)
                per_item = [[c] for c in candidates] if captions == "expand" else [candidates]
                for item in per_item:
                    keys.append(str(key))
                    texts.append(item)
                    refs.append(ref)
            if len(keys) > start:
                blocks.append((start, len(keys)))
    return Source(name=name or path, keys=keys, texts=texts, refs=refs, files=files, blocks=blocks)


def _resolve_shard(run_dir: Path, shard: Any) -> Path:
    """A run's image shard from a reference: a path (relative to the run or its images/ dir, with or
    without ``.tar``) or a shard number (``images/shard-00007.tar``, capfilt's writer naming)."""
    names = [f"shard-{shard:05d}.tar"] if isinstance(shard, int) else [str(shard)]
    candidates = [c for name in names for c in (Path(name), run_dir / name, run_dir / "images" / name)]
    candidates += [c.with_name(c.name + ".tar") for c in candidates if not c.name.endswith(".tar")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{run_dir}: image shard {shard!r} not found under {run_dir / 'images'}")


def load_run(path: str, *, name: str | None = None) -> Source:
    """Index a capfilt run directory's kept pairs (``RUN/dataset/*.parquet``).

    Where a row's image lives, by the columns present: an ``image`` bytes column; or
    ``image_tar`` + ``image_member`` (what capfilt's writer records: a tar path relative to the
    run and a member name); or ``shard`` + ``key`` (the sample ``key`` inside that shard).
    """
    run_dir = Path(path)
    dataset_dir = run_dir / "dataset"
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"not a capfilt run directory (no dataset/): {path}")
    files = _expand_paths(str(dataset_dir), (".parquet",))
    columns = set(pq.ParquetFile(files[0]).schema_arrow.names)
    if "image" in columns:
        return load_parquet(str(dataset_dir), name=name or path)
    if {"image_tar", "image_member", "key", "text"} <= columns:
        wanted, by_member = ["image_tar", "image_member", "key", "text"], True
    elif {"shard", "key", "text"} <= columns:
        wanted, by_member = ["shard", "key", "key", "text"], False
    else:
        raise ValueError(
            f"{files[0]}: needs an 'image' column, 'image_tar' + 'image_member', or 'shard' + 'key' "
            f"(has {sorted(columns)})"
        )
    # Group the kept pairs by shard so each shard's tar header is scanned once.
    by_shard: dict[Any, list[tuple[str, str, str]]] = {}
    for file in files:
        table = pq.read_table(file, columns=sorted(set(wanted))).to_pydict()
        rows = zip(*(table[c] for c in wanted), strict=True)
        for shard, locator, key, text in rows:
            cleaned = _clean(text)
            if cleaned:
                by_shard.setdefault(shard, []).append((str(locator), str(key), cleaned))
    keys: list[str] = []
    texts: list[list[str]] = []
    refs: list[_ParquetRef | _TarRef] = []
    blocks: list[tuple[int, int]] = []
    tar_files: list[str] = []
    for shard in sorted(by_shard, key=str):
        tar_path = str(_resolve_shard(run_dir, shard))
        images: dict[str, tarfile.TarInfo] = {}
        for member_key, members in _tar_members(tar_path).items():
            if by_member:
                images.update({os.path.basename(m.name): m for m in members.values()})
            elif (image := _image_member(members)) is not None:
                images[os.path.basename(member_key)] = image
        start = len(keys)
        for locator, key, text in by_shard[shard]:
            image = images.get(os.path.basename(locator))
            if image is None:
                raise ValueError(f"{path}: {'member' if by_member else 'key'} {locator!r} has no image in {tar_path}")
            keys.append(key)
            texts.append([text])
            refs.append(_TarRef(len(tar_files), image.offset_data, image.size))
        tar_files.append(tar_path)
        blocks.append((start, len(keys)))
    return Source(name=name or path, keys=keys, texts=texts, refs=refs, files=tar_files, blocks=blocks)


def detect_format(path: str) -> Literal["webdataset", "parquet", "run"]:
    """Guess a source's format from its path: run dir, tar shards, or Parquet."""
    p = Path(path)
    if p.is_dir() and (p / "dataset").is_dir():
        return "run"
    if path.endswith(".tar") or (p.is_dir() and any(p.rglob("*.tar"))) or (
        any(ch in path for ch in "*?[") and any(f.endswith(".tar") for f in glob.glob(path))
    ):
        return "webdataset"
    if p.is_dir() and not any(p.rglob("*.parquet")):
        raise FileNotFoundError(f"no .tar shards, .parquet files or capfilt run (dataset/) under {path}")
    return "parquet"


def load_source(spec: SourceSpec) -> Source:
    """Build the index of one source (raises FileNotFoundError / ValueError naming the path)."""
    if not any(ch in spec.path for ch in "*?[") and not os.path.exists(spec.path):
        raise FileNotFoundError(f"data path does not exist: {spec.path}")
    fmt = detect_format(spec.path) if spec.format == "auto" else spec.format
    if fmt == "webdataset":
        return load_webdataset(spec.path)
    if fmt == "parquet":
        return load_parquet(spec.path, captions=spec.captions)
    if fmt == "run":
        return load_run(spec.path)
    raise ValueError(f"unknown data format {spec.format!r} for {spec.path}")


# --------------------------------------------------------------------------------------------
# Collate
# --------------------------------------------------------------------------------------------


def image_id(key: str) -> int:
    """A stable non-negative int64 per image key: captions of the same image share it (ITC positives)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class Collator:
    """Tokenises a list of (pixels, text, key) into a model batch.

    Texts are padded to the longest in the batch and truncated at ``max_length``. With a ``prompt``
    (captioner fine-tuning: "a picture of "), it is prepended to every text and ``prompt_length``
    counts [CLS]/[DEC] plus the prompt's tokens, the positions the LM loss must ignore (as BLIP's
    ``len(tokenizer(prompt).input_ids) - 1``).
    """

    def __init__(self, *, tokenizer: Any, max_length: int = 35, prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt = prompt or ""
        self.prompt_length = len(tokenizer(self.prompt).input_ids) - 1 if self.prompt else 0

    def __call__(self, samples: Sequence[tuple[torch.Tensor, str, str]]) -> dict[str, Any]:
        texts = [self.prompt + text for _, text, _ in samples]
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "pixel_values": torch.stack([pixels for pixels, _, _ in samples]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_ids": torch.tensor([image_id(key) for _, _, key in samples], dtype=torch.long),
            "prompt_length": self.prompt_length,
        }


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class _Mixer:
    """Which source each stream position draws from, and how many times that source was drawn
    before it. Uniforms come in fixed chunks seeded by (seed, chunk index), so the answer for any
    position is independent of how the stream was consumed."""

    def __init__(self, *, weights: Sequence[float], seed: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"source weights must be non-negative with a positive sum, got {list(weights)}")
        self.cumulative = np.cumsum(w / w.sum())
        self.cumulative[-1] = 1.0
        self.seed = seed
        self._prefix: list[np.ndarray] = [np.zeros(len(w), dtype=np.int64)]  # counts before chunk k

    def _chunk(self, k: int) -> np.ndarray:
        uniforms = np.random.default_rng([self.seed, _MIX, k]).random(_CHUNK)
        return np.searchsorted(self.cumulative, uniforms, side="right").clip(max=len(self.cumulative) - 1)

    def _counts_before_chunk(self, k: int) -> np.ndarray:
        while len(self._prefix) <= k:
            j = len(self._prefix) - 1
            counts = np.bincount(self._chunk(j), minlength=len(self.cumulative))
            self._prefix.append(self._prefix[-1] + counts)
        return self._prefix[k]

    def draw(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, occurrence) for positions ``start .. start+count-1``."""
        sources = np.empty(count, dtype=np.int64)
        occurrences = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            position = start + done
            k, offset = divmod(position, _CHUNK)
            chunk = self._chunk(k)
            take = min(count - done, _CHUNK - offset)
            before = self._counts_before_chunk(k).copy()
            before += np.bincount(chunk[:offset], minlength=len(before))
            picked = chunk[offset : offset + take]
            for i, s in enumerate(picked):
                sources[done + i] = s
                occurrences[done + i] = before[s]
                before[s] += 1
            done += take
        return sources, occurrences


def _block_order(source: Source, seed: int, source_index: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, _ORDER, source_index, epoch])
    parts = []
    for b in rng.permutation(len(source.blocks)):
        lo, hi = source.blocks[b]
        parts.append(lo + rng.permutation(hi - lo))
    return np.concatenate(parts)


class MixedStream(IterableDataset):
    """An endless, deterministic stream of collated batches over weighted sources.

    Rank ``r`` of ``world_size`` takes global batches ``g = k * world_size + r`` for
    ``k = start, start + 1, ...``; DataLoader worker ``w`` of ``W`` takes every ``W``-th of those,
    which the DataLoader's round-robin puts back in order. The batches a rank sees therefore do not
    depend on the number of workers, and ``start`` resumes exactly.
    """

    def __init__(
        self,
        *,
        sources: Sequence[Source],
        weights: Sequence[float],
        batch_size: int,
        transform: ImageTransform,
        collate: Callable[[list[tuple[torch.Tensor, str, str]]], dict[str, Any]],
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.sources = list(sources)
        self.weights = list(weights)
        self.batch_size = batch_size
        self.transform = transform
        self.collate = collate
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _item(self, source_index: int, occurrence: int) -> int:
        source = self.sources[source_index]
        epoch, offset = divmod(int(occurrence), len(source))
        order_key = (source_index, epoch)
        if order_key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source_index}
            self._orders[order_key] = _block_order(source, self.seed, source_index, epoch)
        return int(self._orders[order_key][offset])

    def sample(self, position: int, source_index: int, occurrence: int) -> tuple[torch.Tensor, str, str]:
        """The (pixels, text, key) at a stream position, a pure function of (seed, position)."""
        source = self.sources[source_index]
        index = self._item(source_index, occurrence)
        for attempt in range(10):
            candidates = source.texts[index]
            pick = 0
            if len(candidates) > 1:
                pick = int(np.random.default_rng([self.seed, _CAPTION, source_index, int(occurrence)]).integers(len(candidates)))
            text = candidates[pick]
            try:
                image = Image.open(io.BytesIO(source.image_bytes(index)))
                image.load()
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                # A broken image must not stop training nor make the stream depend on timing:
                # fall back to the next item of the same source, deterministically.
                warnings.warn(f"{source.name}: cannot decode image {source.keys[index]!r} ({err}); using the next item",
                              stacklevel=2)
                index = (index + 1) % len(source)
                if attempt == 9:
                    raise
                continue
            rng = np.random.default_rng([self.seed, _AUGMENT, position])
            return self.transform(image, rng=rng, text=text), text, source.keys[index]
        raise AssertionError("unreachable")

    def batch(self, global_batch: int, mixer: _Mixer | None = None) -> dict[str, Any]:
        mixer = mixer or _Mixer(weights=self.weights, seed=self.seed)
        first = global_batch * self.batch_size
        sources, occurrences = mixer.draw(first, self.batch_size)
        samples = [self.sample(first + i, int(s), int(o)) for i, (s, o) in enumerate(zip(sources, occurrences, strict=True))]
        return self.collate(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mixer = _Mixer(weights=self.weights, seed=self.seed)
        k = self.start + worker
        while True:
            yield self.batch(k * self.world_size + self.rank, mixer)
            k += workers


@dataclass(kw_only=True)
class DataConfig:
    """What :func:`build_loader` needs; mirrors the ``data`` section of the training YAML."""

    sources: list[SourceSpec]
    batch_size: int
    image_size: int
    max_length: int = 35
    prompt: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: bool = True
    num_workers: int = 0
    seed: int = 0


def _worker_init(_: int) -> None:
    # Workers decode and augment; one intra-op thread each keeps them from fighting the trainer.
    torch.set_num_threads(1)


def build_loader(
    config: DataConfig,
    *,
    tokenizer: Any,
    sources: Sequence[Source] | None = None,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over the weighted stream, starting at this rank's micro-batch ``start``.

    Pass already loaded ``sources`` to avoid re-indexing them (the trainer calls this again on
    every resume). The loader has its own torch generator so creating it does not consume the
    global RNG (which the trainer checkpoints).
    """
    loaded = list(sources) if sources is not None else [load_source(spec) for spec in config.sources]
    stream = MixedStream(
        sources=loaded,
        weights=[spec.weight for spec in config.sources],
        batch_size=config.batch_size,
        transform=ImageTransform(image_size=config.image_size, train=config.train, augment=config.augment),
        collate=Collator(tokenizer=tokenizer, max_length=config.max_length, prompt=config.prompt),
        seed=config.seed,
        start=start,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        worker_init_fn=_worker_init if config.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(config.seed),
        persistent_workers=False,
    )
