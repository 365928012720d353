"""Import from and export to Hugging Face BLIP checkpoints.

HF ships BLIP as two separate models, each with its own ViT:

- ``BlipForConditionalGeneration`` (the captioner): ``vision_model`` + ``text_decoder``
  (``bert`` with causal self-attention, cross-attention, FFN; ``cls`` LM head);
- ``BlipForImageTextRetrieval`` (the filter): ``vision_model`` + ``text_encoder`` (self- and
  cross-attention, FFN) + ``vision_proj`` / ``text_proj`` + ``itm_head``.

MED's module names are HF's, so a checkpoint key maps to the MED key of the same name. MED
has one ViT and one set of shared text weights, so :func:`import_hf` decides as follows.

Both captioner and filter given:
  - vision_model: from the filter (the captioner's ViT is not used);
  - text embeddings, cross-attention, FFN (shared by encoder and decoder): from the filter;
  - encoder self-attention, vision_proj, text_proj, itm_head: from the filter;
  - decoder self-attention and LM head transform/bias: from the captioner.
  The result is a starting point for pre-training or joint fine-tuning, not a lossless copy of
  the captioner (its decoder was trained against its own ViT and text layers): to caption
  with a released captioner, import the captioner alone.
Only the captioner:
  - vision, shared text layers, decoder self-attention, LM head: from the captioner;
  - encoder self-attention: COPIED from the decoder self-attention (BLIP initialises both
    from the same BERT weights, so this is the closest available start);
  - vision_proj, text_proj, itm_head: random (N(0, 0.02)); ITC/ITM need training.
Only the filter:
  - vision, shared text layers, encoder self-attention, projections, ITM head: from the filter;
  - decoder self-attention: COPIED from the encoder self-attention (same reason);
  - LM head transform (dense, LayerNorm) random, LM bias zero; the output matrix is the
    word-embedding matrix, tied as in HF, so it is imported with the embeddings.
Always:
  - momentum encoders are copies of the online ones; queues are random unit vectors, the
    id queue empty, the temperature ``config.temp`` (HF has no pre-training state);
  - ``text_decoder.cls.predictions.decoder.{weight,bias}`` in a checkpoint are the tied
    aliases of the word embeddings and ``cls.predictions.bias``; HF ignores them on load and
    so do we;
  - any other checkpoint key that MED has no place for, and any MED weight left
    uninitialised outside the rules above, raises :class:`CheckpointError` listing them.

``label_smoothing`` comes from ``text_config`` (0.0 on the hub checkpoints; BLIP trained with
0.1). Exports write a ``capfilt.json`` next to ``config.json`` with the full ``MEDConfig``, so
re-importing an export restores every field (including ``itm_use_enc_token``, which HF's
retrieval model ignores: it never puts [ENC] at position 0).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.med import (
    CONFIG_NAME,
    MED,
    CheckpointError,
    MEDConfig,
    inspect_checkpoint,
    load_tokenizer_if_present,
)

log = logging.getLogger(__name__)

CAPTIONER_ARCH = "BlipForConditionalGeneration"
FILTER_ARCH = "BlipForImageTextRetrieval"
CAPFILT_SIDE_FILE = "capfilt.json"
BLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Checkpoint keys that are tied aliases in HF (ignored on load, as HF does).
_TIED_ALIASES = ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias")
_ENC_SA = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.attention\.(.+)$")
_DEC_SA = re.compile(r"^text_decoder\.bert\.encoder\.layer\.(\d+)\.attention\.(.+)$")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _get(cfg: Any, name: str) -> Any:
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def config_from_hf(blip_config: Any) -> MEDConfig:
    """MEDConfig with the shapes and token ids of a ``transformers.BlipConfig``.

    ``cls_token_id`` and ``enc_token_id`` are not in HF configs: bert-base-uncased's [CLS]
    (101) and bos + 1 ([ENC] after [DEC]) are assumed; :func:`import_hf` corrects them from
    the tokenizer when the checkpoint has one.
    """
    text, vision = blip_config.text_config, blip_config.vision_config
    for part, cfg in (("text_config", text), ("vision_config", vision)):
        if _get(cfg, "hidden_act") != "gelu":
            raise CheckpointError(
                f"{part}.hidden_act {_get(cfg, 'hidden_act')!r} is not supported (only gelu)"
            )
    if not getattr(blip_config, "tie_word_embeddings", True):
        raise CheckpointError(
            "tie_word_embeddings=False is not supported: MED ties the LM head to the embeddings"
        )
    image_size, patch_size = _get(vision, "image_size"), _get(vision, "patch_size")
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise CheckpointError(
            f"vision_config image_size/patch_size must be ints, got {image_size}/{patch_size}"
        )
    bos = _get(text, "bos_token_id")
    return MEDConfig(
        image_size=image_size,
        patch_size=patch_size,
        vision_width=_get(vision, "hidden_size"),
        vision_layers=_get(vision, "num_hidden_layers"),
        vision_heads=_get(vision, "num_attention_heads"),
        vision_intermediate=_get(vision, "intermediate_size"),
        vision_eps=_get(vision, "layer_norm_eps"),
        vocab_size=_get(text, "vocab_size"),
        text_width=_get(text, "hidden_size"),
        text_layers=_get(text, "num_hidden_layers"),
        text_heads=_get(text, "num_attention_heads"),
        text_intermediate=_get(text, "intermediate_size"),
        max_position_embeddings=_get(text, "max_position_embeddings"),
        text_eps=_get(text, "layer_norm_eps"),
        pad_token_id=_get(text, "pad_token_id"),
        cls_token_id=101 if _get(text, "vocab_size") > 101 else 0,
        sep_token_id=_get(text, "sep_token_id"),
        bos_token_id=bos,
        enc_token_id=min(bos + 1, _get(text, "vocab_size") - 1),
        embed_dim=blip_config.image_text_hidden_size,
        label_smoothing=float(_get(text, "label_smoothing")),
        itm_use_enc_token=False,
    )


def hf_config(med_config: MEDConfig) -> Any:
    """``transformers.BlipConfig`` for a MED's shapes and token ids (vocab and ids from the MED)."""
    from transformers import BlipConfig

    c = med_config
    text_config = {
        "vocab_size": c.vocab_size,
        "hidden_size": c.text_width,
        "encoder_hidden_size": c.vision_width,
        "intermediate_size": c.text_intermediate,
        "num_hidden_layers": c.text_layers,
        "num_attention_heads": c.text_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "layer_norm_eps": c.text_eps,
        "hidden_act": "gelu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.sep_token_id,
        "sep_token_id": c.sep_token_id,
        "pad_token_id": c.pad_token_id,
        "label_smoothing": c.label_smoothing,
        "is_decoder": True,
        "tie_word_embeddings": True,
    }
    vision_config = {
        "hidden_size": c.vision_width,
        "intermediate_size": c.vision_intermediate,
        "num_hidden_layers": c.vision_layers,
        "num_attention_heads": c.vision_heads,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "layer_norm_eps": c.vision_eps,
        "hidden_act": "gelu",
    }
    return BlipConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_text_hidden_size=c.embed_dim,
        label_smoothing=c.label_smoothing,
        tie_word_embeddings=True,
    )


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    """Where each MED weight came from: the key accounting of :func:`import_hf`."""

    loaded: dict[str, str] = field(default_factory=dict)  # MED key -> "side:checkpoint key"
    superseded: list[str] = field(default_factory=list)  # checkpoint keys overridden by the other side
    tied_ignored: list[str] = field(default_factory=list)  # tied aliases HF ignores too
    copied: dict[str, str] = field(default_factory=dict)  # MED key -> MED key it was copied from
    random: list[str] = field(default_factory=list)  # MED keys left at their documented random init


def read_hf_dir(directory: str | Path, *, allow_pickle: bool = False) -> tuple[Any, dict[str, Tensor]]:
    """(BlipConfig, state dict) of an HF BLIP checkpoint directory (any layout of :func:`load_state_dict`)."""
    from transformers import BlipConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; not a Hugging Face checkpoint directory")
    config = BlipConfig.from_pretrained(str(directory))
    return config, load_state_dict(directory, allow_pickle=allow_pickle)


# --------------------------------------------------------------------------------------------
# Weights in any Hugging Face layout
# --------------------------------------------------------------------------------------------

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


def load_state_dict(directory: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict of a Hugging Face-format checkpoint directory, whatever its layout.

    Looked for in this order (the first present wins, as ``from_pretrained`` does):
    ``model.safetensors``; ``model.safetensors.index.json`` and its shards;
    ``pytorch_model.bin``; ``pytorch_model.bin.index.json`` and its shards. ``.bin`` files are
    read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
    arbitrary objects, so they are as safe to open as safetensors. ``allow_pickle`` (only
    ``capfilt model import --allow-pickle`` sets it) switches to full unpickling, which can run
    code, and also accepts a single ``.pt``/``.pth`` file of any name (BLIP's own releases).
    """
    directory = Path(directory)
    if (directory / SAFE_WEIGHTS).is_file():
        return _load_safetensors(directory / SAFE_WEIGHTS)
    if (directory / SAFE_INDEX).is_file():
        return _load_sharded(directory, SAFE_INDEX, _load_safetensors)
    full_pickle = allow_pickle
    if (directory / BIN_WEIGHTS).is_file():
        return _load_bin(directory / BIN_WEIGHTS, full_pickle=full_pickle)
    if (directory / BIN_INDEX).is_file():
        return _load_sharded(directory, BIN_INDEX, lambda path: _load_bin(path, full_pickle=full_pickle))
    others = sorted(p for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
    if others and not allow_pickle:
        raise CheckpointError(
            f"{directory}: only pickle weights ({', '.join(p.name for p in others)}); unpickling them can run "
            "arbitrary code, so they need `capfilt model import --allow-pickle`"
        )
    if allow_pickle:
        if len(others) == 1:
            return _load_bin(others[0], full_pickle=True)
        if others:
            raise CheckpointError(
                f"{directory}: several pickle weight files ({[p.name for p in others]}); keep one"
            )
    raise CheckpointError(
        f"{directory}: no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX})"
    )


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _load_bin(path: Path, *, full_pickle: bool) -> dict[str, Tensor]:
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=not full_pickle)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds more than tensors, so weights_only loading refuses it "
            f"({' '.join(str(err).split())[:200]}); if you trust the file, convert it with "
            "`capfilt model import --allow-pickle`"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"{path}: cannot read as a torch checkpoint: {' '.join(str(err).split())[:200]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # BLIP's .pth files wrap the state dict
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (name -> tensor)")
    return state


def _load_sharded(directory: Path, index_name: str, load: Any) -> dict[str, Tensor]:
    """Every shard named by an ``*.index.json`` weight map, merged; each key from its own shard."""
    index_path = directory / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index_path}: not a weight index ({type(err).__name__}: {err})") from None
    state: dict[str, Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in {directory}")
        if not (directory / shard).is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        state.update(load(directory / shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path}: keys listed but not in their shards: {', '.join(missing[:10])}")
    return state


def _architecture(config: Any) -> str | None:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else None


def import_hf(
    captioner: str | Path | None = None,
    filter: str | Path | None = None,  # noqa: A002 - the CapFilt role name
    *,
    allow_pickle: bool = False,
    itm_use_enc_token: bool | None = None,
) -> tuple[MED, Any]:
    """Build a MED from HF BLIP checkpoint dirs -> (MED, tokenizer or None). See module docstring.

    ``itm_use_enc_token`` None means: the value saved by a capfilt export (capfilt.json),
    else False (HF's retrieval model keeps [CLS] at position 0).
    """
    med, tokenizer, _ = import_hf_with_report(
        captioner, filter, allow_pickle=allow_pickle, itm_use_enc_token=itm_use_enc_token
    )
    return med, tokenizer


def import_hf_with_report(
    captioner: str | Path | None = None,
    filter: str | Path | None = None,  # noqa: A002
    *,
    allow_pickle: bool = False,
    itm_use_enc_token: bool | None = None,
) -> tuple[MED, Any, ImportReport]:
    """:func:`import_hf` plus the :class:`ImportReport` of where every weight came from."""
    if captioner is None and filter is None:
        raise ValueError("import_hf needs a captioner and/or a filter checkpoint directory")
    sides: list[tuple[str, Path, Any, dict[str, Tensor]]] = []
    # Captioner first: the filter, read second, wins every weight both provide.
    for side, path, arch in (("captioner", captioner, CAPTIONER_ARCH), ("filter", filter, FILTER_ARCH)):
        if path is None:
            continue
        cfg, state = read_hf_dir(path, allow_pickle=allow_pickle)
        found = _architecture(cfg)
        if found is not None and found != arch:
            raise CheckpointError(f"{path}: {side} must be a {arch} checkpoint, found {found}")
        sides.append((side, Path(path), cfg, state))

    # Shapes from the filter's config when present (it provides the vision model), else the captioner's.
    main_side, main_path, main_cfg, _ = sides[-1]
    config = config_from_hf(main_cfg)
    for side, path, cfg, _ in sides[:-1]:
        other = config_from_hf(cfg)
        diffs = [
            k
            for k in (
                "vocab_size",
                "text_width",
                "text_layers",
                "text_heads",
                "text_intermediate",
                "vision_width",
                "bos_token_id",
                "sep_token_id",
                "pad_token_id",
            )
            if getattr(other, k) != getattr(config, k)
        ]
        if diffs:
            raise CheckpointError(
                f"{path} ({side}) and {main_path} ({main_side}) differ in {', '.join(diffs)}"
            )

    side_file = main_path / CAPFILT_SIDE_FILE
    if side_file.is_file():  # a capfilt export: restore the exact MEDConfig
        saved = MEDConfig.from_dict(json.loads(side_file.read_text(encoding="utf-8"))["med_config"])
        config = saved.replace(
            **{
                k: getattr(config, k)
                for k in (
                    "image_size",
                    "patch_size",
                    "vision_width",
                    "vision_layers",
                    "vocab_size",
                    "text_width",
                    "text_layers",
                )
            }
        )
    tokenizer = load_tokenizer_if_present(main_path)
    if tokenizer is None:
        for _, path, _, _ in sides:
            tokenizer = load_tokenizer_if_present(path)
            if tokenizer is not None:
                break
    if tokenizer is not None:
        config = _config_with_tokenizer(config, tokenizer, main_path)
    if itm_use_enc_token is not None:
        config = config.replace(itm_use_enc_token=itm_use_enc_token)
    elif not side_file.is_file():
        config = config.replace(itm_use_enc_token=False)

    med = MED(config)
    report = _load_weights(med, [(side, state) for side, _, _, state in sides])
    med.copy_params_to_momentum()
    log.info(
        "imported HF BLIP (%s): %d weights loaded, %d copied, %d random, %d superseded",
        ", ".join(side for side, *_ in sides),
        len(report.loaded),
        len(report.copied),
        len(report.random),
        len(report.superseded),
    )
    return med, tokenizer, report


def _config_with_tokenizer(config: MEDConfig, tokenizer: Any, where: Path) -> MEDConfig:
    """Take [CLS]/[ENC] from the tokenizer; refuse a tokenizer that disagrees with the weights."""
    from model.tokenizer import special_ids

    ids = special_ids(tokenizer)
    for name in ("bos_token_id", "sep_token_id", "pad_token_id"):
        if ids[name] != getattr(config, name):
            raise CheckpointError(
                f"{where}: tokenizer {name} {ids[name]} differs from the model config's {getattr(config, name)}"
            )
    if ids["vocab_size"] > config.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer has {ids['vocab_size']} tokens, the model only {config.vocab_size}"
        )
    return config.replace(cls_token_id=ids["cls_token_id"], enc_token_id=ids["enc_token_id"])


def _load_weights(med: MED, sides: list[tuple[str, dict[str, Tensor]]]) -> ImportReport:
    """Copy checkpoint tensors into MED by key, apply the documented fallbacks, account for all."""
    report = ImportReport()
    target = {k: v for k, v in med.state_dict(keep_vars=True).items() if not _is_pretrain_state(k)}
    slot = {name: id(t) for name, t in target.items()}  # shared modules: several names, one tensor
    filled: dict[int, str] = {}  # slot -> MED key that filled it
    values: dict[str, Tensor] = {}
    unused: list[str] = []
    for side, state in sides:
        for key, value in state.items():
            if key in _TIED_ALIASES:
                report.tied_ignored.append(f"{side}:{key}")
                continue
            if key not in target:
                unused.append(f"{side}:{key}")
                continue
            if tuple(value.shape) != tuple(target[key].shape):
                raise CheckpointError(
                    f"{side}:{key} has shape {tuple(value.shape)}, the MED expects {tuple(target[key].shape)}"
                )
            previous = filled.get(slot[key])
            if previous is not None:
                report.superseded.append(report.loaded.pop(previous))
                del values[previous]
            filled[slot[key]] = key
            values[key] = value
            report.loaded[key] = f"{side}:{key}"
    if unused:
        raise CheckpointError(
            f"checkpoint keys with no place in the MED: {', '.join(sorted(unused)[:20])}"
            + (f" (+{len(unused) - 20} more)" if len(unused) > 20 else "")
        )

    # Fallbacks: one side's self-attention stands in for the other's (both start from BERT in BLIP).
    for key in target:
        if slot[key] in filled:
            continue
        source = None
        if m := _ENC_SA.match(key):
            source = f"text_decoder.bert.encoder.layer.{m[1]}.attention.{m[2]}"
        elif m := _DEC_SA.match(key):
            source = f"text_encoder.encoder.layer.{m[1]}.attention.{m[2]}"
        if source is not None and source in values:
            values[key] = values[source]
            filled[slot[key]] = key
            report.copied[key] = source
    allowed_random = ("vision_proj.", "text_proj.", "itm_head.", "text_decoder.cls.predictions.")
    missing = []
    for key in target:
        if slot[key] in filled:
            continue
        if key.startswith(allowed_random):
            report.random.append(key)
        else:
            missing.append(key)
        filled[slot[key]] = key
    if missing:
        raise CheckpointError(
            f"MED weights not provided by the checkpoint(s): {', '.join(sorted(missing)[:20])}"
            + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        )
    with torch.no_grad():
        for key, value in values.items():
            target[key].copy_(value.to(target[key].dtype))
    return report


def _is_pretrain_state(key: str) -> bool:
    """Momentum encoders, queues and temperature: not in HF checkpoints, set by MED itself."""
    return key.split(".")[0] in {
        "vision_model_m",
        "text_encoder_m",
        "vision_proj_m",
        "text_proj_m",
        "image_queue",
        "text_queue",
        "idx_queue",
        "queue_ptr",
        "temp",
    }


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _export(med: MED, tokenizer: Any, out_dir: str | Path, hf_class: Any) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model = hf_class(hf_config(med.config))
    ours = med.state_dict()
    theirs = hf_model.state_dict()
    missing = [k for k in theirs if k not in ours]
    if missing:
        raise CheckpointError(f"MED has no weights for HF keys {missing[:10]}")
    hf_model.load_state_dict({k: ours[k] for k in theirs}, strict=True)
    hf_model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    _image_processor(med.config.image_size).save_pretrained(str(out))
    side = {"med_config": med.config.to_dict(), "architecture": hf_class.__name__}
    (out / CAPFILT_SIDE_FILE).write_text(json.dumps(side, indent=2) + "\n", encoding="utf-8")
    return out


def _image_processor(image_size: int) -> Any:
    try:  # transformers 5: the PIL backend works without torchvision
        from transformers import BlipImageProcessorPil as Processor
    except ImportError:
        from transformers import BlipImageProcessor as Processor
    return Processor(
        size={"height": image_size, "width": image_size},
        image_mean=list(BLIP_IMAGE_MEAN),
        image_std=list(BLIP_IMAGE_STD),
        do_convert_rgb=True,
    )


def export_captioner(med: MED, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a ``BlipForConditionalGeneration`` directory (vision + decoder side of the MED)."""
    from transformers import BlipForConditionalGeneration

    return _export(med, tokenizer, out_dir, BlipForConditionalGeneration)


def export_filter(med: MED, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a ``BlipForImageTextRetrieval`` directory (vision + encoder + projections + ITM head).

    HF's retrieval model keeps [CLS] at position 0 for ITM; a MED trained with
    ``itm_use_enc_token`` expects [ENC] there, so HF users must put it in themselves.
    """
    from transformers import BlipForImageTextRetrieval

    if med.config.itm_use_enc_token:
        log.warning("exported filter was trained with [ENC] at position 0; HF's ITM keeps [CLS] there")
    return _export(med, tokenizer, out_dir, BlipForImageTextRetrieval)


# --------------------------------------------------------------------------------------------
# Any checkpoint
# --------------------------------------------------------------------------------------------


HUB_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w][\w./-]*))?$")
"""A Hugging Face hub model: ``org/name``, optionally pinned as ``org/name@revision`` (a branch,
tag, commit or ``refs/pr/N``)."""

HUB_SMALL_FILES = (".json", ".txt", ".model")
"""Top-level files fetched whatever they are: configs, tokenizer files (and capfilt's own)."""


def split_revision(spec: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``"org/name"`` -> ``("org/name", None)``."""
    match = HUB_SPEC.match(spec)
    if match is None:
        raise CheckpointError(f"{spec}: not a Hugging Face hub id (org/name or org/name@revision)")
    return match["repo"], match["revision"]


def hub_files_to_fetch(files: list[str]) -> list[str]:
    """Which files of a hub repo a checkpoint needs: configs, tokenizer and ONE weight format.

    Safetensors are preferred (single file, else the sharded index and its shards); otherwise
    ``pytorch_model.bin`` (or its index and shards), which :func:`load_state_dict` reads with
    ``weights_only``. Sub-folders (onnx/, ...) and other frameworks' weights (tf_model.h5,
    flax) are never fetched.
    """
    top = [f for f in files if "/" not in f]
    wanted = [f for f in top if f.endswith(HUB_SMALL_FILES)]
    if SAFE_WEIGHTS in top:
        weights = [SAFE_WEIGHTS]
    elif SAFE_INDEX in top:
        weights = [f for f in top if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f)]
    elif BIN_WEIGHTS in top:
        weights = [BIN_WEIGHTS]
    elif BIN_INDEX in top:
        weights = [f for f in top if re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", f)]
    else:
        raise CheckpointError(
            f"no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}) among the repo's files: "
            f"{', '.join(sorted(top)[:20])}"
        )
    return sorted(set(wanted + weights))


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download what :func:`hub_files_to_fetch` picks from ``repo_id`` at ``revision``; local dir.

    Uses the Hugging Face cache (``HF_HOME``); when the hub cannot be listed (offline,
    ``HF_HUB_OFFLINE=1``) a snapshot already in the cache is used.
    """
    from huggingface_hub import HfApi, snapshot_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo or revision
        try:
            return Path(snapshot_download(repo_id=repo_id, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - nothing cached either: report the listing error
            raise CheckpointError(
                f"{where}: could not list the Hugging Face hub repo ({' '.join(str(exc).split())[:300]})"
            ) from None
    try:
        names = hub_files_to_fetch(files)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=names))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{where}: could not download from the Hugging Face hub ({' '.join(str(exc).split())[:300]})"
        ) from None


def load_any(
    path: str | Path, *, allow_pickle: bool = False, itm_use_enc_token: bool | None = None
) -> tuple[MED, Any]:
    """A capfilt checkpoint dir (med_config.json) or an HF BLIP dir (config.json) -> (MED, tokenizer).

    HF dirs are imported by their ``architectures``: captioner or retrieval (filter), with
    weights in any layout :func:`load_state_dict` reads. A Hugging Face hub id (``org/name``
    or ``org/name@revision``) that is not a local path is downloaded (:func:`download_from_hub`).

    ``itm_use_enc_token``: None keeps what a capfilt checkpoint or export recorded; for a
    Hugging Face BLIP directory without ``capfilt.json`` it means True, BLIP's own ITM ([ENC]
    at position 0, as salesforce/BLIP fine-tunes and evaluates its retrieval models, from
    which the Salesforce hub checkpoints were converted). Pass False for HF's convention.
    """
    directory = Path(path)
    if not directory.exists() and HUB_SPEC.match(str(path)):
        directory = download_from_hub(*split_revision(str(path)))
    if not directory.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if (directory / CONFIG_NAME).is_file():
        med, tokenizer = MED.load(directory, allow_pickle=allow_pickle)
        if itm_use_enc_token is not None:
            med.config = med.config.replace(itm_use_enc_token=itm_use_enc_token)
        return med, tokenizer
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: neither {CONFIG_NAME} (capfilt) nor config.json (Hugging Face)")
    inspect_checkpoint(directory)  # config.json is JSON, safetensors header intact: one-line errors
    arch = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("architectures") or [None]
    if itm_use_enc_token is None and not (directory / CAPFILT_SIDE_FILE).is_file():
        itm_use_enc_token = True
    if arch[0] == CAPTIONER_ARCH:
        return import_hf(captioner=directory, allow_pickle=allow_pickle, itm_use_enc_token=itm_use_enc_token)
    if arch[0] == FILTER_ARCH:
        return import_hf(filter=directory, allow_pickle=allow_pickle, itm_use_enc_token=itm_use_enc_token)
    raise CheckpointError(
        f"{directory}: architecture {arch[0]!r} is neither {CAPTIONER_ARCH} nor {FILTER_ARCH}"
    )
