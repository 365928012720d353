"""The compact MED (multimodal mixture of encoder-decoder) of BLIP, in one file.

One ViT encodes images; one BERT-style text transformer is used three ways:

- unimodal text encoder (``text_encoder`` without cross-attention; [CLS] feature) for ITC;
- image-grounded text encoder (``text_encoder`` with cross-attention to the image in every
  layer; [ENC] at position 0 when ``config.itm_use_enc_token``) for ITM;
- image-grounded text decoder (``text_decoder.bert``: causal self-attention, [DEC] first) for LM.

Encoder and decoder share every parameter except self-attention (BLIP's
``tie_encoder_decoder_weights(..., '/attention')``): ``text_decoder.bert.embeddings`` and each
layer's ``crossattention``, ``intermediate`` and ``output`` ARE the encoder's module objects,
while each layer's ``attention`` (self-attention and its output dense/LayerNorm) is its own.
The LM head's output matrix is the (shared) word-embedding matrix and its bias is
``cls.predictions.bias``, as Hugging Face ties them (``tie_word_embeddings=True``).  With that
tying the base preset counts ~252M trainable parameters, the paper's Table 3 figure.

Module names follow the Hugging Face BLIP checkpoints (``BlipVisionModel``, ``BlipTextModel``,
``BlipTextLMHeadModel``), so ``model/hf.py`` imports weights by key, without reshaping.

Pre-training state (BLIP ``blip_pretrain.py``): momentum copies of the ViT, text encoder and
both projections (``*_m``, EMA with ``config.momentum``), feature queues as buffers, and a
learnable temperature.  The losses themselves live in ``model/losses.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import losses as L
from model.errors import CheckpointError  # noqa: F401 - re-exported: model.med.CheckpointError

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "med_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


# MEDConfig fields that change how a model trains, not its shapes or weights: they may change on a
# loaded model (capfilt train's model.overrides with model.init); the others may not.
TRAINING_FIELDS = ("itm_negative_temp", "alpha", "momentum", "label_smoothing")


@dataclass(frozen=True, kw_only=True)
class MEDConfig:
    """Everything that fixes the MED's shapes and its pre-training behaviour."""

    # vision (ViT, HF BlipVisionConfig names in comments)
    image_size: int = 384  # input side in pixels; BLIP pre-trains at 224 and fine-tunes at 384
    patch_size: int = 16  # ViT patch side; (image_size // patch_size)**2 patches + [CLS]
    vision_width: int = 768  # hidden_size of the ViT; also the cross-attention key/value width
    vision_layers: int = 12  # ViT depth
    vision_heads: int = 12  # ViT attention heads
    vision_intermediate: int = 3072  # ViT MLP width
    vision_eps: float = 1e-5  # ViT LayerNorm eps (HF BLIP checkpoints use 1e-5)
    # text (BERT, HF BlipTextConfig)
    vocab_size: int = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
    text_width: int = 768  # BERT hidden size
    text_layers: int = 12  # BERT depth (each layer: self-attn, cross-attn, FFN)
    text_heads: int = 12  # BERT attention heads
    text_intermediate: int = 3072  # BERT FFN width
    max_position_embeddings: int = 512  # longest text (learned absolute positions)
    text_eps: float = 1e-12  # BERT LayerNorm eps
    # special token ids (must match the tokenizer; model/tokenizer.special_ids gives them)
    pad_token_id: int = 0  # [PAD]: masked in attention and in LM labels
    cls_token_id: int = 101  # [CLS]: position 0 of unimodal text, the ITC text feature
    sep_token_id: int = 102  # [SEP]: ends a caption; generation stops on it
    bos_token_id: int = 30522  # [DEC]: first decoder token (replaces [CLS])
    enc_token_id: int = 30523  # [ENC]: replaces [CLS] for ITM when itm_use_enc_token
    # heads and pre-training
    embed_dim: int = 256  # ITC feature size of vision_proj / text_proj
    queue_size: int = 57600  # ITC momentum queue length; must be divisible by the global batch
    momentum: float = 0.995  # EMA factor of the momentum encoders
    alpha: float = 0.4  # momentum-distillation weight (the trainer ramps it up over epoch 0)
    temp: float = 0.07  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    # ITM hard negatives are drawn with weights softmax(cosine / t): None = t is the learned ITC
    # temperature (BLIP). A fixed t (e.g. 0.05) keeps the draw from turning into an argmax when the
    # learned temperature falls to its floor, which in a world of few distinct captions makes the
    # "negative" a text that describes the image (a false negative) for a third of the pairs.
    itm_negative_temp: float | None = None
    label_smoothing: float = 0.1  # LM label smoothing as BLIP pre-training (HF's default is 0.0)
    itm_use_enc_token: bool = True  # BLIP puts [ENC] at position 0 for ITM; HF's retrieval model does not
    prompt: str = "a picture of "  # BLIP's captioning prompt; its tokens are masked in LM labels
    # initialisation (only for models trained from scratch; imported weights overwrite it)
    init_std: float = 0.02  # N(0, init_std) weights as BERT/ViT; narrow models need more: at 0.02 and
    # width 192 the attention paths start near zero, so every text's [CLS] feature starts identical

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads:
            problems.append(
                f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}"
            )
        if self.text_width % self.text_heads:
            problems.append(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "enc_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                problems.append(
                    f"{name} {getattr(self, name)} is outside the vocabulary [0, {self.vocab_size})"
                )
        if self.queue_size < 0:
            problems.append(f"queue_size must be >= 0, got {self.queue_size}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.001 <= self.temp <= 0.5:
            problems.append(f"temp must be in [0.001, 0.5], got {self.temp}")
        if self.itm_negative_temp is not None and not self.itm_negative_temp > 0:
            problems.append(f"itm_negative_temp must be > 0 or null, got {self.itm_negative_temp}")
        if problems:
            raise ValueError("invalid MEDConfig: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> MEDConfig:
        """A copy with some fields changed (e.g. the special ids of a freshly trained tokenizer)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MEDConfig:
        """Build from a dict; keys starting with '_' are notes and ignored, unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if not k.startswith("_")}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown MEDConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> MEDConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def preset(cls, name: str) -> MEDConfig:
        """A named preset from model/configs/NAME.json (tiny, base, large)."""
        path = CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise ValueError(f"unknown MED preset {name!r}; available: {', '.join(names)}")
        return cls.from_json(path)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@dataclass
class PaddedRows:
    """Where the real tokens of a padded (B, L) text batch sit, so that per-token work skips padding.

    The text layers run their projections, FFN and LayerNorms on the real tokens only, packed
    as (T, D); attention, which needs the (B, L) layout, unpacks its queries, keys and values
    (zeros at padding) and packs its output again. This is exact: a padded token is masked
    out as a key and nothing reads its output (ITC and ITM read [CLS], the LM loss skips
    padding), so only the hidden states at padding change (zeros instead of unused values).
    The demo's pre-training batches pad to ~1.7 times their real tokens; per step it saves
    what ``benchmarks/train_speed.py`` prints.
    """

    index: Tensor  # (T,) flat positions b * L + l of the real tokens
    batch: int
    length: int

    @classmethod
    def of(cls, attention_mask: Tensor) -> PaddedRows | None:
        """The real tokens of ``attention_mask`` (B, L); None when nothing is padding."""
        keep = attention_mask.reshape(-1).bool()
        if bool(keep.all()):
            return None
        batch, length = attention_mask.shape
        return cls(index=keep.nonzero().squeeze(1), batch=batch, length=length)

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (T, D): the real tokens only."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(T, D) -> (B, L, D), zeros at padding."""
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, -1)


def _additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean "may attend" (B, 1, Lq, Lk) -> additive float mask (0 or the dtype's minimum)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


# --------------------------------------------------------------------------------------------
# Vision transformer (names of HF BlipVisionModel)
# --------------------------------------------------------------------------------------------


class VisionEmbeddings(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        self.image_size = config.image_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(pixel_values.shape)}"
            )
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.heads = config.vision_heads
        self.qkv = nn.Linear(config.vision_width, 3 * config.vision_width)
        self.projection = nn.Linear(config.vision_width, config.vision_width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # qkv is laid out (3, heads, head_dim) along the output dim, as in HF and timm.
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.projection(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class VisionMLP(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.vision_width, config.vision_intermediate)
        self.fc2 = nn.Linear(config.vision_intermediate, config.vision_width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config=config)
        self.layer_norm1 = nn.LayerNorm(config.vision_width, eps=config.vision_eps)
        self.mlp = VisionMLP(config=config)
        self.layer_norm2 = nn.LayerNorm(config.vision_width, eps=config.vision_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config=config) for _ in range(config.vision_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """ViT: (B, 3, S, S) -> (B, 1 + N, Dv); position 0 ([CLS]) is the global image feature."""

    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(config=config)
        self.encoder = VisionEncoder(config=config)
        self.post_layernorm = nn.LayerNorm(config.vision_width, eps=config.vision_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


# --------------------------------------------------------------------------------------------
# Text transformer (names of HF BlipTextModel / BlipTextLMHeadModel)
# --------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Self-attention keys/values of one layer, (B, H, L, d) each; None until first filled.

    With ``capacity`` the buffers are allocated once for ``capacity`` positions and each step
    writes its keys/values in place (no concatenation per token); without it they grow by
    concatenation (beam search, which reorders rows every step anyway).
    """

    k: Tensor | None = None
    v: Tensor | None = None
    length: int = 0
    capacity: int | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions; returns the keys/values of every position so far."""
        n = k.shape[2]
        if self.capacity is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            self.length += n
            return self.k, self.v
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {self.length + n}")
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def select(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search reorders beams; sampling drops finished rows)."""
        if self.k is not None and self.v is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


@dataclass
class ImageContext:
    """Cross-attention keys/values computed ONCE per image, and which image each text row reads.

    ``kv[i]`` holds layer i's keys and values of the image tokens, (I, H, N, d) each, for I
    images. Text row r attends to image ``row_image[r]``; the rows of one image are packed into
    slots ``row_slot`` (0 .. ``group``-1) so that one attention call per image serves all of
    its rows: the queries become (I, H, group * L, d) against the image's (I, H, N, d) keys.
    That is exact because cross-attention has no mask (every image token is valid and every
    query is independent), and it replaces the K projections and K copies of an image's keys
    and values that repeating the image embeddings per row would cost (K captions while
    decoding, K + 1 texts in ITM). ``packed``: the rows are exactly image-major full groups
    (row r = image r // group), so no scatter/gather is needed. ``per_row``: the groups are
    uneven (training's ITM: an image is the hard negative of any number of texts), where slots
    would pad every image to the largest group; each row then gets a copy of its image's keys
    and values instead (still no projection repeated).
    """

    kv: list[tuple[Tensor, Tensor]]
    row_image: Tensor
    row_slot: Tensor
    group: int
    packed: bool
    per_row: bool = False

    @property
    def num_images(self) -> int:
        return self.kv[0][0].shape[0] if self.kv else 0

    def select_rows(self, index: Tensor) -> ImageContext:
        """The context of rows ``index`` only; images no row reads any more are dropped once
        they are at least half of them (one copy of the survivors' keys and values)."""
        row_image = self.row_image.index_select(0, index)
        row_slot = self.row_slot.index_select(0, index)
        kv = self.kv
        used = torch.unique(row_image)
        if used.numel() * 2 <= self.num_images:
            remap = torch.full((self.num_images,), -1, dtype=torch.long, device=row_image.device)
            remap[used] = torch.arange(used.numel(), device=row_image.device)
            row_image = remap[row_image]
            kv = [(k.index_select(0, used), v.index_select(0, used)) for k, v in kv]
        return ImageContext(
            kv=kv, row_image=row_image, row_slot=row_slot, group=self.group, packed=False, per_row=self.per_row
        )

    def one_row_per_image(self) -> ImageContext:
        """The same keys and values, read by one row per image in image order."""
        row_image = torch.arange(self.num_images, device=self.row_image.device)
        return ImageContext(kv=self.kv, row_image=row_image, row_slot=torch.zeros_like(row_image), group=1, packed=True)

    def attend(self, q: Tensor, layer: int) -> Tensor:
        """Cross-attention of queries (R, H, L, d) to their rows' images -> (R, H, L, d)."""
        k, v = self.kv[layer]
        if self.per_row:
            return F.scaled_dot_product_attention(q, k[self.row_image], v[self.row_image])
        rows, heads, length, dim = q.shape
        images, group = k.shape[0], self.group
        if self.packed:
            grouped = q.view(images, group, heads, length, dim)
        else:
            grouped = q.new_zeros(images, group, heads, length, dim)
            grouped[self.row_image, self.row_slot] = q
        grouped = grouped.permute(0, 2, 1, 3, 4).reshape(images, heads, group * length, dim)
        out = F.scaled_dot_product_attention(grouped, k, v)
        out = out.view(images, heads, group, length, dim).permute(0, 2, 1, 3, 4)
        if self.packed:
            return out.reshape(rows, heads, length, dim)
        return out[self.row_image, self.row_slot]


def image_row_slots(row_image: Tensor, num_images: int) -> tuple[Tensor, int, bool]:
    """Slot of each row among its image's rows (in row order), the largest group, and whether
    the rows are image-major full groups (``row_image == arange(I).repeat_interleave(group)``)."""
    rows = row_image.numel()
    if rows == 0:
        return row_image.clone(), 1, False
    order = torch.argsort(row_image, stable=True)
    counts = torch.bincount(row_image, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(row_image)
    slot[order] = torch.arange(rows, device=row_image.device) - starts[row_image[order]]
    group = int(counts.max())
    packed = rows == num_images * group and bool(
        torch.equal(row_image, torch.arange(num_images, device=row_image.device).repeat_interleave(group))
    )
    return slot, group, packed


class TextEmbeddings(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.text_width, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=config.text_eps)

    def forward(self, input_ids: Tensor, past_length: int = 0) -> Tensor:
        length = input_ids.shape[1]
        if past_length + length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {past_length + length} tokens exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(past_length, past_length + length, device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class TextSelfAttention(nn.Module):
    """Query/key/value projections (HF's ``BertSelfAttention`` names); :class:`TextAttention` runs
    them. Keys and values come from the text itself, or from image tokens for cross-attention."""

    def __init__(self, *, config: MEDConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = config.text_heads
        self.query = nn.Linear(config.text_width, config.text_width)
        self.key = nn.Linear(kv_width, config.text_width)
        self.value = nn.Linear(kv_width, config.text_width)

    def kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``source`` tokens (B, N, D) -> (B, H, N, d) each."""
        return _split_heads(self.key(source), self.heads), _split_heads(self.value(source), self.heads)


class TextOutput(nn.Module):
    """BERT's post-norm residual: ``LayerNorm(dense(x) + residual)``, from ``in_width`` to text width.

    After attention (``in_width`` = text width, HF's ``BertSelfOutput``) and after the FFN
    (``in_width`` = ``text_intermediate``, HF's ``BertOutput``); module names follow HF.
    """

    def __init__(self, *, config: MEDConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=config.text_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class TextAttention(nn.Module):
    """Post-norm attention block: ``self`` (q/k/v) then ``output`` (dense + residual LayerNorm)."""

    def __init__(self, *, config: MEDConfig, kv_width: int) -> None:
        super().__init__()
        self.self = TextSelfAttention(config=config, kv_width=kv_width)
        self.output = TextOutput(config=config, in_width=config.text_width)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        *,
        context: Tensor | None = None,
        cache: KVCache | None = None,
        image: ImageContext | None = None,
        layer: int = 0,
        rows: PaddedRows | None = None,
    ) -> Tensor:
        """Self-attention (keys from ``x``, optionally cached), or cross-attention to ``context``
        (image embeddings, one per row) or to ``image`` (keys/values computed once per image).
        With ``rows`` the text ``x`` is packed (T, D) (see :class:`PaddedRows`)."""
        attention = self.self

        def heads(t: Tensor) -> Tensor:
            return _split_heads(t if rows is None else rows.unpack(t), attention.heads)

        q = heads(attention.query(x))
        if image is not None:
            attended = image.attend(q, layer)
        else:
            if context is None:
                k, v = heads(attention.key(x)), heads(attention.value(x))
                if cache is not None:
                    k, v = cache.append(k, v)
            else:
                k, v = attention.kv(context)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        merged = _merge_heads(attended)
        return self.output(merged if rows is None else rows.pack(merged), x)


class TextIntermediate(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.text_width, config.text_intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """Self-attention, then cross-attention to the image (skipped when unimodal), then FFN.

    ``shared`` (the encoder's layer) makes this a decoder layer that reuses the encoder's
    cross-attention and FFN module objects and owns only its self-attention.
    """

    def __init__(self, *, config: MEDConfig, shared: TextLayer | None = None) -> None:
        super().__init__()
        self.attention = TextAttention(config=config, kv_width=config.text_width)
        if shared is None:
            self.crossattention = TextAttention(config=config, kv_width=config.vision_width)
            self.intermediate = TextIntermediate(config=config)
            self.output = TextOutput(config=config, in_width=config.text_intermediate)
        else:
            self.crossattention = shared.crossattention
            self.intermediate = shared.intermediate
            self.output = shared.output

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        *,
        image_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        image: ImageContext | None = None,
        layer: int = 0,
        rows: PaddedRows | None = None,
    ) -> Tensor:
        x = self.attention(x, mask, cache=cache, rows=rows)
        if image is not None:
            x = self.crossattention(x, None, image=image, layer=layer, rows=rows)
        elif image_embeds is not None:
            # All image tokens are valid, so cross-attention needs no mask.
            x = self.crossattention(x, None, context=image_embeds, rows=rows)
        return self.output(self.intermediate(x), x)


class TextStack(nn.Module):
    def __init__(self, *, config: MEDConfig, shared: TextStack | None = None) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            TextLayer(config=config, shared=shared.layer[i] if shared is not None else None)  # type: ignore[arg-type]
            for i in range(config.text_layers)
        )


class TextModel(nn.Module):
    """BERT with optional cross-attention: (B, L) ids -> (B, L, Dt) hidden states.

    ``shared`` builds the decoder's BERT: same embeddings, cross-attention and FFN objects as
    the encoder, own self-attention.
    """

    skip_padding = True
    """Run the per-token work on real tokens only (:class:`PaddedRows`); False: on the padded batch
    (the same results at every real token; ``benchmarks/train_speed.py`` compares the two)."""

    def __init__(self, *, config: MEDConfig, shared: TextModel | None = None) -> None:
        super().__init__()
        self.embeddings = shared.embeddings if shared is not None else TextEmbeddings(config=config)
        self.encoder = TextStack(config=config, shared=shared.encoder if shared is not None else None)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        image_embeds: Tensor | None = None,
        causal: bool = False,
        cache: list[KVCache] | None = None,
        past_length: int = 0,
        image: ImageContext | None = None,
    ) -> Tensor:
        """Encode ``input_ids``; with ``cache`` the ids continue a sequence of ``past_length`` tokens.

        With a cache every earlier token is valid (generation never pads the prompt), so the
        mask only needs causality within the new tokens. The image is given either as
        ``image_embeds`` (one per row) or as ``image`` (an :class:`ImageContext`).
        """
        x = self.embeddings(input_ids, past_length)
        b, n = input_ids.shape
        keep: Tensor | None = None
        if attention_mask is not None:
            if attention_mask.shape != (b, past_length + n):
                raise ValueError(
                    f"attention_mask must be {(b, past_length + n)}, got {tuple(attention_mask.shape)}"
                )
            keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk)
        if causal and n > 1:
            q_pos = torch.arange(past_length, past_length + n, device=input_ids.device)
            k_pos = torch.arange(past_length + n, device=input_ids.device)
            causal_keep = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Lq, Lk)
            keep = causal_keep if keep is None else keep & causal_keep
        mask = _additive_mask(keep, x.dtype) if keep is not None else None
        # Padding is skipped by the per-token work (exact, see PaddedRows); a cached sequence
        # (generation) is never padded.
        use_rows = self.skip_padding and attention_mask is not None and cache is None
        rows = PaddedRows.of(attention_mask) if use_rows else None
        if rows is not None:
            x = rows.pack(x)
        for i, layer in enumerate(self.encoder.layer):
            x = layer(
                x,
                mask,
                image_embeds=image_embeds,
                cache=cache[i] if cache is not None else None,
                image=image,
                layer=i,
                rows=rows,
            )
        return x if rows is None else rows.unpack(x)


class LMPredictionHeadTransform(nn.Module):
    def __init__(self, *, config: MEDConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.text_width, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=config.text_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """dense-gelu-LayerNorm, then the vocabulary projection.

    ``decoder.weight`` is the word-embedding matrix and ``bias`` is ``decoder.bias`` (the same
    Parameter under HF's two names), as HF BLIP ties them.
    """

    def __init__(self, *, config: MEDConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = LMPredictionHeadTransform(config=config)
        self.decoder = nn.Linear(config.text_width, config.vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.bias = self.decoder.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


class OnlyMLMHead(nn.Module):
    def __init__(self, *, config: MEDConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = LMPredictionHead(config=config, word_embeddings=word_embeddings)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


class TextDecoder(nn.Module):
    """Image-grounded causal decoder: ``bert`` (shares all but self-attention) + ``cls`` LM head."""

    def __init__(self, *, config: MEDConfig, encoder: TextModel) -> None:
        super().__init__()
        self.bert = TextModel(config=config, shared=encoder)
        self.cls = OnlyMLMHead(config=config, word_embeddings=self.bert.embeddings.word_embeddings)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_embeds: Tensor | None,
        *,
        cache: list[KVCache] | None = None,
        past_length: int = 0,
        image: ImageContext | None = None,
    ) -> Tensor:
        hidden = self.bert(
            input_ids,
            attention_mask,
            image_embeds=image_embeds,
            causal=True,
            cache=cache,
            past_length=past_length,
            image=image,
        )
        return self.cls(hidden)


# --------------------------------------------------------------------------------------------
# Counter-based random numbers for batch-independent sampling
# --------------------------------------------------------------------------------------------


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def counter_uniform(seeds: Tensor, caption_index: Tensor, step: int) -> Tensor:
    """Uniform [0, 1) float64 per row, a pure function of (seed, caption index, step).

    A row's draw depends on nothing else, so its captions do not change with batch size,
    batch composition or device.
    """
    h = _splitmix64(seeds.to(torch.int64))
    h = _splitmix64(h ^ caption_index.to(torch.int64))
    h = _splitmix64(h ^ step)
    return _shift_right(h, 11).to(torch.float64) * (2.0**-53)


def _top_p_sorted(probs: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Sort probabilities descending and zero all but the smallest prefix with mass >= top_p."""
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    sorted_probs = sorted_probs.masked_fill(
        ~_top_p_mask(sorted_probs, top_p), 0.0
    )  # the top token always stays
    return sorted_probs, sorted_ids


NUCLEUS_CANDIDATES = 64
"""Tokens considered before falling back to sorting the whole vocabulary (see _nucleus_sample)."""


def _nucleus_sample(probs: Tensor, top_p: float, u: Tensor, candidates: int = NUCLEUS_CANDIDATES) -> Tensor:
    """One token per row from the top-p nucleus, driven by uniforms ``u`` (R,) in [0, 1).

    The same token as sorting the whole vocabulary (:func:`_top_p_sorted`) and inverting the
    nucleus' CDF, without the sort: the ``candidates`` most probable tokens are taken with
    ``topk`` and put in the full sort's order (probability descending, ties by token id), so
    their running mass is the full sort's prefix. A row whose nucleus ends strictly inside the
    candidates (the last candidate is already outside it, and no token outside the candidates
    ties a kept probability) has exactly the full sort's nucleus; the other rows (a flat
    distribution) fall back to the full sort.
    """
    rows, vocab = probs.shape
    if candidates >= vocab:
        return _pick_from_sorted(*_top_p_sorted(probs, top_p), u)
    values, ids = probs.topk(candidates, dim=-1)
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    kept = _top_p_mask(values, top_p)
    smallest_kept = values.masked_fill(~kept, math.inf).amin(dim=-1)
    exact = ~kept[:, -1] & (smallest_kept > values[:, -1])
    token = _pick_from_sorted(values.masked_fill(~kept, 0.0), ids, u)
    if not bool(exact.all()):
        redo = (~exact).nonzero().squeeze(1)
        token[redo] = _pick_from_sorted(
            *_top_p_sorted(probs.index_select(0, redo), top_p), u.index_select(0, redo)
        )
    return token


def _top_p_mask(sorted_probs: Tensor, top_p: float) -> Tensor:
    """Which sorted positions are in the nucleus: the mass before them is below ``top_p``."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return mass_before < top_p


def _pick_from_sorted(sorted_probs: Tensor, sorted_ids: Tensor, u: Tensor) -> Tensor:
    """Invert the CDF of (zero-padded) sorted nucleus probabilities at ``u`` * nucleus mass."""
    cdf = torch.cumsum(sorted_probs.double(), dim=-1)
    target = u * cdf[:, -1]
    pick = torch.searchsorted(cdf, target[:, None], right=True).clamp(max=cdf.shape[1] - 1)
    # Never land on a filtered (zero-probability) token at the tail.
    pick = torch.minimum(pick, (sorted_probs > 0).sum(dim=-1, keepdim=True) - 1)
    return sorted_ids.gather(1, pick).squeeze(1)


def _apply_repetition_penalty(logits: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on every token already in the row (as HF's RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seqs)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seqs, score)


# --------------------------------------------------------------------------------------------
# MED
# --------------------------------------------------------------------------------------------

_MOMENTUM_PAIRS = (
    ("vision_model", "vision_model_m"),
    ("text_encoder", "text_encoder_m"),
    ("vision_proj", "vision_proj_m"),
    ("text_proj", "text_proj_m"),
)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT/ViT initialisation: N(0, std) weights (0.02 in BERT/ViT), zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, VisionEmbeddings):
        nn.init.trunc_normal_(module.class_embedding, std=std)
        nn.init.trunc_normal_(module.position_embedding, std=std)


class MED(nn.Module):
    """BLIP's multimodal mixture of encoder-decoder with its pre-training state."""

    share_image_context = True
    """On one process, training's ITM and LM read one :meth:`image_context` of the batch's images
    (each text layer projects their cross-attention keys/values once per step); False: once per ITM
    row and again for the decoder, as before (``benchmarks/train_speed.py`` compares the two)."""

    def __init__(self, config: MEDConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config=config)
        self.text_encoder = TextModel(config=config)
        self.text_decoder = TextDecoder(config=config, encoder=self.text_encoder)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.itm_head = nn.Linear(config.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        init = functools.partial(_init_weights, std=config.init_std)
        self.apply(init)
        # The LM head's Linear init above also rewrote the tied word embeddings: redo them.
        init(self.text_encoder.embeddings.word_embeddings)

        # Momentum encoders: EMA copies used for ITC targets and queue features, never trained.
        for online, momentum in _MOMENTUM_PAIRS:
            setattr(self, momentum, copy.deepcopy(getattr(self, online)))
            getattr(self, momentum).requires_grad_(False)

        q = config.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(config.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(config.embed_dim, q), dim=0))
        self.register_buffer("idx_queue", torch.full((1, q), L.EMPTY_QUEUE_ID, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ---- encoders and heads ----------------------------------------------------------------

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, 1 + N, Dv)."""
        return self.vision_model(pixel_values)

    def image_features(self, image_embeds: Tensor) -> Tensor:
        """Normalised ITC image feature (B, E) from the [CLS] token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unimodal text encoding (no cross-attention): (B, L) -> (B, L, Dt)."""
        return self.text_encoder(input_ids, attention_mask)

    def text_features(self, text_embeds: Tensor) -> Tensor:
        """Normalised ITC text feature (B, E) from the [CLS] token."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def image_context(
        self, image_embeds: Tensor, row_image: Tensor | None = None, *, group: int = 1
    ) -> ImageContext:
        """Cross-attention keys/values of every text layer, computed once per image.

        ``image_embeds`` (I, 1 + N, Dv) from :meth:`encode_image`; ``row_image`` (R,) names the
        image of each text row (default: ``group`` consecutive rows per image). Encoder and
        decoder share the cross-attention weights, so one context serves ITM and captioning.
        """
        images = image_embeds.shape[0]
        if row_image is None:
            row_image = torch.arange(images, device=image_embeds.device).repeat_interleave(group)
            slot = torch.arange(group, device=image_embeds.device).repeat(images)
            packed = True
        else:
            row_image = row_image.to(device=image_embeds.device, dtype=torch.long)
            slot, group, packed = image_row_slots(row_image, images)
        kv = [layer.crossattention.self.kv(image_embeds) for layer in self.text_encoder.encoder.layer]
        per_row = not packed and images * group > row_image.numel()  # uneven groups
        return ImageContext(kv=kv, row_image=row_image, row_slot=slot, group=group, packed=packed, per_row=per_row)

    def itm_logits(
        self,
        image_embeds: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        image: ImageContext | None = None,
    ) -> Tensor:
        """Image-grounded encoder + ITM head: (B, 2) logits, column 1 = match.

        The image comes as ``image_embeds`` (one row per text) or, cheaper when an image has
        several texts, as ``image`` from :meth:`image_context` (same result up to float rounding).
        """
        if self.config.itm_use_enc_token:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.config.enc_token_id
        if image is not None:
            hidden = self.text_encoder(input_ids, attention_mask, image=image)
        else:
            hidden = self.text_encoder(input_ids, attention_mask, image_embeds=image_embeds)
        return self.itm_head(hidden[:, 0])

    def decoder_logits(
        self, image_embeds: Tensor | None, input_ids: Tensor, attention_mask: Tensor, *, image: ImageContext | None = None
    ) -> Tensor:
        """Image-grounded decoder: (B, L, V) next-token logits; ``input_ids`` start with [DEC].
        The image as in :meth:`itm_logits`."""
        return self.text_decoder(input_ids, attention_mask, None if image is not None else image_embeds, image=image)

    # ---- momentum encoders and queues -------------------------------------------------------

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        """Make every momentum encoder an exact copy of its online encoder (start, or after import)."""
        for online, momentum in _MOMENTUM_PAIRS:
            for p, p_m in zip(
                getattr(self, online).parameters(), getattr(self, momentum).parameters(), strict=True
            ):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m <- m * p_m + (1 - m) * p for every momentum parameter."""
        online: list[Tensor] = []
        moving: list[Tensor] = []
        for name, name_m in _MOMENTUM_PAIRS:
            online.extend(getattr(self, name).parameters())
            moving.extend(getattr(self, name_m).parameters())
        torch._foreach_lerp_(moving, online, 1.0 - self.config.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(
        self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor | None = None
    ) -> None:
        """Write the (globally gathered) momentum features into the queues, oldest first out."""
        ids = None if image_ids is None else _all_gather(image_ids.reshape(-1).to(torch.long))
        self._enqueue(_all_gather(image_feat), _all_gather(text_feat), ids)

    def _enqueue(self, image_feat: Tensor, text_feat: Tensor, ids: Tensor | None) -> None:
        """:meth:`dequeue_and_enqueue` of features (and ids) already gathered over the ranks."""
        batch = image_feat.shape[0]
        q = self.config.queue_size
        if q == 0:
            return
        if q % batch:
            raise ValueError(f"queue_size {q} must be divisible by the global batch size {batch}")
        if ids is None:
            ids = torch.full((batch,), L.EMPTY_QUEUE_ID, dtype=torch.long, device=image_feat.device)
        ptr = int(self.queue_ptr.item())
        self.image_queue[:, ptr : ptr + batch] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, ptr : ptr + batch] = text_feat.T.to(self.text_queue.dtype)
        self.idx_queue[0, ptr : ptr + batch] = ids
        self.queue_ptr[0] = (ptr + batch) % q

    # ---- training -----------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        image_ids: Tensor | None = None,
        alpha: float | None = None,
        losses: Sequence[str] = ("itc", "itm", "lm"),
        prompt_length: int = 0,
    ) -> dict[str, Tensor]:
        """BLIP pre-training losses for a batch of (image, [CLS]-text) pairs.

        Each image and each text is encoded once; the image embeddings feed ITC, ITM and LM.
        ``alpha`` is the (ramped) distillation weight, default ``config.alpha``. With "itc" in
        training mode the momentum encoders and queues are updated.
        """
        unknown = set(losses) - {"itc", "itm", "lm"}
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of itc, itm, lm; got {list(losses)}")
        alpha = self.config.alpha if alpha is None else alpha
        out: dict[str, Tensor] = {}
        image_embeds = self.encode_image(pixel_values)
        # Data-parallel ranks (1 without torch.distributed, where every gather is the identity):
        # each rank's ITC and ITM see the global batch. The ids are gathered once for both.
        world, rows = _world_size(), len(input_ids)
        ids_all = _all_gather(image_ids.reshape(-1)) if image_ids is not None else None

        if "itc" in losses or "itm" in losses:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(self.encode_text(input_ids, attention_mask))

        if "itc" in losses:
            with torch.no_grad():
                if self.training:
                    self.momentum_update()
                image_feat_m = F.normalize(
                    self.vision_proj_m(self.vision_model_m(pixel_values)[:, 0]), dim=-1
                )
                text_feat_m = F.normalize(
                    self.text_proj_m(self.text_encoder_m(input_ids, attention_mask)[:, 0]), dim=-1
                )
            image_queue, text_queue = self.image_queue.clone().detach(), self.text_queue.clone().detach()
            idx_queue = self.idx_queue.clone().reshape(-1) if image_ids is not None else None
            image_m_all, text_m_all = _all_gather(image_feat_m), _all_gather(text_feat_m)
            if world > 1:
                # The other data-parallel ranks' pairs are candidates too (no gradient flows into
                # momentum features): each rank scores its pairs against the global batch + queue,
                # as one process with the whole batch would.
                image_queue = torch.cat([_others(image_m_all, rows).T, image_queue], dim=1)
                text_queue = torch.cat([_others(text_m_all, rows).T, text_queue], dim=1)
                if idx_queue is not None:
                    idx_queue = torch.cat([_others(ids_all, rows).to(idx_queue.dtype), idx_queue])
            out["loss_itc"] = L.itc_loss(
                image_feat,
                text_feat,
                image_feat_m,
                text_feat_m,
                image_queue,
                text_queue,
                self.temp,
                alpha,
                image_ids=image_ids,
                idx_queue=idx_queue,
            )
            if self.training:  # the features and ids gathered above, not gathered again
                self._enqueue(image_m_all, text_m_all, None if ids_all is None else ids_all.to(torch.long))

        if "itm" in losses:
            itm_ids, itm_mask = input_ids, attention_mask
            with torch.no_grad():
                # Hard negatives come from the global batch (every data-parallel rank's pairs).
                temp = self.temp if self.config.itm_negative_temp is None else self.config.itm_negative_temp
                sim_i2t = image_feat @ _all_gather(text_feat).T / temp
                sim_t2i = sim_i2t.T if world == 1 else text_feat @ _all_gather(image_feat).T / temp
                neg_image, neg_text = L.hard_negative_indices(
                    sim_i2t, sim_t2i, image_ids=image_ids,
                    candidate_ids=ids_all, offset=_rank() * rows,
                )  # fmt: skip
                if world > 1:  # every rank's texts padded to one length, to be gathered
                    itm_ids, itm_mask = _pad_to_longest_rank(input_ids, attention_mask, self.config.pad_token_id)
            # [positives; (negative image, text j); (image i, negative text)] in one pass. A negative
            # image from another rank carries its gradient back there (_AllGatherWithGrad).
            all_ids, all_mask = _all_gather(itm_ids), _all_gather(itm_mask)
            ids = torch.cat([itm_ids, itm_ids, all_ids[neg_text]])
            masks = torch.cat([itm_mask, itm_mask, all_mask[neg_text]])
            shared = world == 1 and self.share_image_context
            if shared:  # the batch's own images: their cross-attention keys/values once
                own = torch.arange(rows, device=neg_image.device)
                context = self.image_context(image_embeds, torch.cat([own, neg_image, own]))
                logits = self.itm_logits(None, ids, masks, image=context)
            else:
                all_images = image_embeds if world == 1 else _AllGatherWithGrad.apply(image_embeds)
                images = torch.cat([image_embeds, all_images[neg_image], image_embeds])
                logits = self.itm_logits(images, ids, masks)
            out["loss_itm"] = L.itm_loss(logits)

        if "lm" in losses:
            decoder_ids = input_ids.clone()
            decoder_ids[:, 0] = self.config.bos_token_id
            labels = L.lm_labels(decoder_ids, self.config.pad_token_id, prompt_length)
            if "itm" in losses and shared:  # ITM's keys/values of the same images, no second projection
                logits = self.decoder_logits(None, decoder_ids, attention_mask, image=context.one_row_per_image())
            else:
                logits = self.decoder_logits(image_embeds, decoder_ids, attention_mask)
            out["loss_lm"] = L.lm_loss(logits, labels, label_smoothing=self.config.label_smoothing)
        return out

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor,
        *,
        prompt_ids: Sequence[int] | Tensor | None = None,
        num_captions: int = 1,
        sample: bool = True,
        top_p: float = 0.9,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 5,
        repetition_penalty: float = 1.0,
        seeds: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Captions for a batch of images: (B * num_captions, T) token ids, image-major rows.

        ``prompt_ids`` are the prompt's token ids without special tokens (e.g.
        ``tokenizer("a picture of", add_special_tokens=False).input_ids``); the decoder input
        is [DEC] + prompt. ``max_length`` and ``min_length`` count that whole decoder sequence
        ([DEC] + prompt + new tokens), as BLIP and HF ``generate`` do. The returned ids are the
        new tokens only (prompt stripped), ending with [SEP] when the caption finished, then
        [PAD]. Modes: ``sample=True`` nucleus sampling (``top_p``), ``sample=False`` beam
        search with ``num_beams`` (greedy when 1); beam search returns the best
        ``num_captions <= num_beams`` beams per image. ``seeds`` (B,) int64 makes sampling a
        pure function of (seed, caption index, step) per row; without it torch's RNG (or
        ``generator``) is used.
        """
        cfg = self.config
        if num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {num_captions}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        prompt = torch.as_tensor(list(prompt_ids) if prompt_ids is not None else [], dtype=torch.long)
        prefix_len = 1 + prompt.numel()
        if max_length <= prefix_len:
            raise ValueError(
                f"max_length {max_length} leaves no room after [DEC] + {prompt.numel()} prompt tokens"
            )
        batch = pixel_values.shape[0]
        if seeds is not None:
            seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
            if seeds.numel() != batch:
                raise ValueError(f"seeds must have one entry per image ({batch}), got {seeds.numel()}")

        image_embeds = self.encode_image(pixel_values)
        if sample or num_beams == 1:
            rows = num_captions
        else:
            if num_captions > num_beams:
                raise ValueError(
                    f"beam search returns at most num_beams={num_beams} captions, asked {num_captions}"
                )
            rows = num_beams
        # Image-major rows; each image's cross-attention keys/values are computed once and read
        # by all its rows (beam search only reorders beams within an image, so this holds).
        image = self.image_context(image_embeds, group=rows)
        prefix = torch.cat([torch.tensor([cfg.bos_token_id]), prompt]).to(image_embeds.device)
        seqs = prefix.expand(batch * rows, -1).clone()

        if sample or num_beams == 1:
            out = self._sample_or_greedy(
                image,
                seqs,
                sample=sample,
                top_p=top_p,
                max_length=max_length,
                min_length=min_length,
                repetition_penalty=repetition_penalty,
                num_captions=rows,
                seeds=seeds,
                generator=generator,
            )
        else:
            out = self._beam_search(
                image,
                seqs,
                batch=batch,
                num_beams=num_beams,
                num_return=num_captions,
                max_length=max_length,
                min_length=min_length,
                repetition_penalty=repetition_penalty,
            )
        return out[:, prefix_len:]

    def _new_cache(self, capacity: int | None = None) -> list[KVCache]:
        return [KVCache(capacity=capacity) for _ in range(self.config.text_layers)]

    def _sample_or_greedy(
        self,
        image: ImageContext,
        seqs: Tensor,
        *,
        sample: bool,
        top_p: float,
        max_length: int,
        min_length: int,
        repetition_penalty: float,
        num_captions: int,
        seeds: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Nucleus sampling or greedy decoding; finished rows leave the batch.

        Rows are independent, so a row that emitted [SEP] is dropped from every later step
        (its cache rows, its image slot, its seed): the remaining steps cost only the rows
        still writing. Output ids land in one preallocated (rows, max_length) buffer, [PAD]
        after [SEP]; its width is that of the longest caption, as when all rows run to the end.
        """
        cfg = self.config
        device = seqs.device
        n_rows, prefix_len = seqs.shape
        out = torch.full((n_rows, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
        out[:, :prefix_len] = seqs
        cache = self._new_cache(capacity=max_length)
        alive = torch.arange(n_rows, device=device)  # original row of each row still decoding
        seeded = sample and seeds is not None
        if seeded:
            assert seeds is not None
            row_seeds = seeds.to(device).repeat_interleave(num_captions)
            caption_index = torch.arange(num_captions, device=device).repeat(n_rows // num_captions)
        step_ids, past, cur = seqs, 0, prefix_len
        width = prefix_len
        while cur < max_length:
            logits = self.text_decoder(step_ids, None, None, cache=cache, past_length=past, image=image)[
                :, -1
            ]
            logits = logits.float()
            past = cur
            if repetition_penalty != 1.0:
                logits = _apply_repetition_penalty(
                    logits, out.index_select(0, alive)[:, :cur], repetition_penalty
                )
            if cur < min_length:
                logits[:, cfg.sep_token_id] = -math.inf
            if not sample:
                token = logits.argmax(dim=-1)
            elif seeded:
                u = counter_uniform(row_seeds, caption_index, cur)
                token = _nucleus_sample(F.softmax(logits, dim=-1), top_p, u)
            else:
                sorted_probs, sorted_ids = _top_p_sorted(F.softmax(logits, dim=-1), top_p)
                pick = torch.multinomial(sorted_probs, 1, generator=generator)
                token = sorted_ids.gather(1, pick).squeeze(1)
            out[alive, cur] = token
            cur += 1
            width = cur
            if cur >= max_length:
                break
            going = token != cfg.sep_token_id
            still = int(going.sum())  # the step's one host sync (CPU: free)
            if still == 0:
                break
            if still < going.numel():  # drop the rows that just finished
                keep = going.nonzero().squeeze(1)
                alive = alive.index_select(0, keep)
                token = token.index_select(0, keep)
                for layer_cache in cache:
                    layer_cache.select(keep)
                image = image.select_rows(keep)
                if seeded:
                    row_seeds, caption_index = (
                        row_seeds.index_select(0, keep),
                        caption_index.index_select(0, keep),
                    )
            step_ids = token[:, None]
        return out[:, :width]

    def _beam_search(
        self,
        image: ImageContext,
        seqs: Tensor,
        *,
        batch: int,
        num_beams: int,
        num_return: int,
        max_length: int,
        min_length: int,
        repetition_penalty: float,
    ) -> Tensor:
        """Beam search with HF's defaults: length_penalty 1.0 over generated length, early_stopping False.

        Candidates are the top 2*num_beams (beam, token) continuations; those ending in [SEP]
        (or reaching max_length) become finished hypotheses scored sum_logprob / new_length;
        the rest keep the beam going. Stops when no running beam can beat the finished ones.
        """
        cfg = self.config
        device = seqs.device
        nb, prompt_len = num_beams, seqs.shape[1]
        vocab = cfg.vocab_size
        neg = -1.0e9
        cache = self._new_cache()
        running = seqs.view(batch, nb, -1)
        running_scores = torch.zeros(batch, nb, device=device)
        running_scores[:, 1:] = neg  # all beams start identical: keep only the first
        done_seqs = torch.full((batch, nb, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
        done_scores = torch.full((batch, nb), neg, device=device)
        done_filled = torch.zeros(batch, nb, dtype=torch.bool, device=device)
        improvable = torch.ones(batch, dtype=torch.bool, device=device)
        step_ids, past = seqs, 0
        cur_len = prompt_len
        while cur_len < max_length:
            flat = running.reshape(batch * nb, -1)
            logits = self.text_decoder(step_ids, None, None, cache=cache, past_length=past, image=image)[
                :, -1
            ].float()
            past = cur_len
            log_probs = F.log_softmax(logits, dim=-1)
            log_probs = _apply_repetition_penalty(log_probs, flat, repetition_penalty)
            if cur_len < min_length:
                log_probs[:, cfg.sep_token_id] = -math.inf
            scores = (log_probs.view(batch, nb, vocab) + running_scores[:, :, None]).view(batch, nb * vocab)
            top_scores, top_idx = scores.topk(2 * nb, dim=1)
            src_beam, token = top_idx // vocab, top_idx % vocab
            cand = torch.cat(
                [running.gather(1, src_beam[:, :, None].expand(-1, -1, cur_len)), token[:, :, None]], 2
            )
            ends = (token == cfg.sep_token_id) | (cur_len + 1 >= max_length)

            # Continue with the best num_beams candidates that did not end.
            keep_scores, keep = (top_scores + ends.float() * neg).topk(nb, dim=1)
            running = cand.gather(1, keep[:, :, None].expand(-1, -1, cur_len + 1))
            running_scores = keep_scores
            beam_origin = (
                src_beam.gather(1, keep) + torch.arange(batch, device=device)[:, None] * nb
            ).reshape(-1)

            # Ended candidates among the top num_beams become finished hypotheses.
            rank_ok = torch.arange(2 * nb, device=device)[None, :] < nb
            fin_scores = top_scores / float(cur_len + 1 - prompt_len)
            fin_scores = fin_scores + (~(ends & rank_ok)).float() * neg + (~improvable).float()[:, None] * neg
            padded = F.pad(cand, (0, max_length - cur_len - 1), value=cfg.pad_token_id)
            merged_scores = torch.cat([done_scores, fin_scores], dim=1)
            merged_seqs = torch.cat([done_seqs, padded], dim=1)
            merged_filled = torch.cat([done_filled, ends & rank_ok & improvable[:, None]], dim=1)
            done_scores, pick = merged_scores.topk(nb, dim=1)
            done_seqs = merged_seqs.gather(1, pick[:, :, None].expand(-1, -1, max_length))
            done_filled = merged_filled.gather(1, pick)

            for layer_cache in cache:
                layer_cache.select(beam_origin)
            cur_len += 1
            best_running = running_scores[:, 0] / float(cur_len - prompt_len)
            worst_done = torch.where(done_filled, done_scores.min(dim=1, keepdim=True).values, neg)
            improvable &= (best_running[:, None] > worst_done).any(dim=1)
            if not bool(improvable.any()) or bool(ends.all()):
                break
            step_ids = running[:, :, -1].reshape(-1, 1)

        out = done_seqs[:, :num_return].reshape(batch * num_return, max_length)
        positions = torch.arange(1, max_length + 1, device=device)
        length = int(((out != cfg.pad_token_id) * positions).max())
        return out[:, :length]

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, directory: str | Path, tokenizer: Any = None) -> Path:
        """Write model.safetensors (shared tensors stored once), med_config.json and the tokenizer."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(
            json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, allow_pickle: bool = False) -> tuple[MED, Any]:
        """Load a capfilt checkpoint directory -> (MED, tokenizer or None).

        Only safetensors by default: a directory holding only .bin/.pt/.pth weights is
        refused (unpickling can run code) unless ``allow_pickle``.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: no {CONFIG_NAME}; not a capfilt MED checkpoint")
        med = cls(read_med_config(config_path))
        weights = directory / WEIGHTS_NAME
        if weights.is_file():
            from safetensors.torch import load_model

            check_safetensors(weights)
            try:
                missing, unexpected = load_model(med, str(weights), strict=False)
            except Exception as err:  # safetensors' own error class, or torch's shape mismatch
                raise CheckpointError(f"{weights}: cannot load weights ({_first_line(err)})") from None
            if missing or unexpected:
                raise CheckpointError(
                    f"{weights}: keys do not match the config; missing {sorted(missing)[:10]}, "
                    f"unexpected {sorted(unexpected)[:10]}"
                )
        else:
            state = load_pickle_weights(directory, allow_pickle=allow_pickle)
            med.load_state_dict(state, strict=True)
        return med, load_tokenizer_if_present(directory)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n", 1)[0].split()) or type(err).__name__
    return text[:300]


def read_med_config(path: Path) -> MEDConfig:
    """``med_config.json`` as a MEDConfig; unreadable, invalid JSON or bad fields -> CheckpointError."""
    try:
        return MEDConfig.from_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a valid {CONFIG_NAME} ({_first_line(err)})") from None


MAX_SAFETENSORS_HEADER = 100_000_000
"""safetensors' own limit on the JSON header size."""


def check_safetensors(path: Path) -> None:
    """Cheap integrity check of a safetensors file: header readable, data exactly as long as it says.

    Reads the 8-byte header length and the JSON header only, so a truncated download or a
    garbage file is a one-line CheckpointError before any tensor is allocated.
    """

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or not a safetensors file ({reason})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise bad(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON: {_first_line(err)}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise bad(f"tensors need {8 + length + end} bytes, the file has {size}")


def inspect_checkpoint(directory: Path) -> int:
    """Check a capfilt or HF BLIP checkpoint without loading it; returns its text positions.

    Reads ``med_config.json`` (capfilt) or ``config.json`` (Hugging Face) and the header of
    ``model.safetensors`` when present. Raises CheckpointError (one line) on any problem.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    if (directory / CONFIG_NAME).is_file():
        positions = read_med_config(directory / CONFIG_NAME).max_position_embeddings
    elif (directory / "config.json").is_file():
        path = directory / "config.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({_first_line(err)})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        text = data.get("text_config") or {}
        positions = text.get("max_position_embeddings", 512) if isinstance(text, dict) else None
        if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
            raise CheckpointError(f"{path}: text_config.max_position_embeddings is not a positive integer")
    else:
        raise CheckpointError(f"{directory}: neither {CONFIG_NAME} (capfilt) nor config.json (Hugging Face)")
    if (directory / WEIGHTS_NAME).is_file():
        check_safetensors(directory / WEIGHTS_NAME)
    return positions


def load_pickle_weights(directory: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    """State dict from the single .bin/.pt/.pth file of ``directory``, only when allowed."""
    candidates = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not candidates:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} and no other weights file")
    if not allow_pickle:
        raise CheckpointError(
            f"{directory}: only pickle weights ({', '.join(p.name for p in candidates)}); unpickling can run "
            "arbitrary code, so it needs --allow-pickle (allow_pickle=True)"
        )
    if len(candidates) > 1:
        raise CheckpointError(
            f"{directory}: several pickle weight files ({[p.name for p in candidates]}); keep one"
        )
    state = torch.load(candidates[0], map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # BLIP's .pth files wrap the state dict
    if not isinstance(state, dict):
        raise CheckpointError(f"{candidates[0]}: not a state dict")
    return state


def load_tokenizer_if_present(directory: Path) -> Any:
    """The tokenizer saved next to the weights, or None. Never runs remote code."""
    if not (directory / "tokenizer.json").is_file():
        return None
    try:
        from model.tokenizer import load_tokenizer
    except ImportError:  # model/tokenizer.py not available: plain HF loading
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    return load_tokenizer(directory)


def _world_size() -> int:
    """Data-parallel ranks (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _world_size() > 1 else 0


def _all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` over data-parallel ranks, rank order (identity without torch.distributed).

    Every rank's ``x`` has the same shape (the trainer gives every rank full batches). No gradient.
    """
    import torch.distributed as dist

    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def _others(gathered: Tensor, rows: int) -> Tensor:
    """The other ranks' rows of an :func:`_all_gather` result (this rank's ``rows`` left out)."""
    start = _rank() * rows
    return torch.cat([gathered[:start], gathered[start + rows :]])


class _AllGatherWithGrad(torch.autograd.Function):
    """:func:`_all_gather` whose backward sends each rank the gradient of its own rows.

    Each rank's loss may use other ranks' rows (ITM's hard negatives); their gradients are summed
    over ranks and handed to the rank that owns the rows. DistributedDataParallel then averages
    the parameter gradients over ranks, which makes the step the global batch's mean loss.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # noqa: D102
        ctx.rows = len(x)
        return _all_gather(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = _rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _pad_to_longest_rank(input_ids: Tensor, attention_mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` padded (pad id, mask 0) to the longest rank's length."""
    import torch.distributed as dist

    length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length) - input_ids.shape[1]
    if pad == 0:
        return input_ids, attention_mask
    return F.pad(input_ids, (0, pad), value=pad_id), F.pad(attention_mask, (0, pad), value=0)


# --------------------------------------------------------------------------------------------
# Parameter accounting
# --------------------------------------------------------------------------------------------


def _count(params: Iterable[nn.Parameter], seen: set[int]) -> int:
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_counts(med: MED) -> dict[str, int]:
    """Parameters per part, each shared tensor counted once (in the first part listing it).

    ``total_trainable`` is the paper's Table 3 quantity (BLIP base, "all except SA": 252M).
    """
    seen: set[int] = set()
    enc_layers = med.text_encoder.encoder.layer
    dec_layers = med.text_decoder.bert.encoder.layer
    counts = {
        "vision": _count(med.vision_model.parameters(), seen),
        "text_shared": _count(
            [
                *med.text_encoder.embeddings.parameters(),
                *(
                    p
                    for layer in enc_layers
                    for m in (layer.crossattention, layer.intermediate, layer.output)
                    for p in m.parameters()
                ),
            ],
            seen,
        ),
        "text_encoder_self_attention": _count(
            (p for layer in enc_layers for p in layer.attention.parameters()), seen
        ),
        "decoder_self_attention": _count(
            (p for layer in dec_layers for p in layer.attention.parameters()), seen
        ),
        "lm_head": _count(med.text_decoder.cls.parameters(), seen),
        "projections_itm": _count(
            [
                *med.vision_proj.parameters(),
                *med.text_proj.parameters(),
                *med.itm_head.parameters(),
                med.temp,
            ],
            seen,
        ),
    }
    counts["momentum"] = _count(
        (p for _, name in _MOMENTUM_PAIRS for p in getattr(med, name).parameters()), seen
    )
    counts["total_trainable"] = _count((p for p in med.parameters() if p.requires_grad), set())
    return counts
