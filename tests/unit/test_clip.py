"""CLIP scoring stage (a tiny random CLIPModel built in-process) and the CLIP selection rules."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from support import WORDS, clip_tokenizer, save_tiny_clip

from capfilt.config import ClipConfig, loads
from capfilt.errors import UserError
from capfilt.stages.clip import ClipScorer
from capfilt.stages.select import (
    keep_synthetic_texts,
    object_array,
    select,
    select_table,
    selection_options,
)

NAN = math.nan


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((250, 250, 20), (0, 0, size[0] // 2, size[1] // 3))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def clip_batch() -> dict[str, np.ndarray]:
    return {
        "key": object_array(["a", "b", "c", "d"]),
        "status": object_array(["ok", "ok", "download_failed", "ok"]),
        "error": object_array(["", "", "HTTP 404", ""]),
        "web_text": object_array(["a red circle", "", "a cat", None]),
        "synthetic_texts": object_array(
            [["blue square", "red star on the left"], ["green"], [], ["big small"]]
        ),
        "image": object_array([jpeg((200, 10, 10)), jpeg((10, 200, 10)), b"", jpeg((10, 10, 200), (30, 60))]),
    }


def test_test_tokenizer_maps_real_words_to_real_ids() -> None:
    tokenizer = clip_tokenizer()
    ids = tokenizer("A red circle on the left").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert len(set(ids[1:-1])) == 6
    assert tokenizer("zebra").input_ids[1] == tokenizer.unk_token_id


def reference_cosine(clip_dir: Path, image: bytes, text: str) -> float:
    """The cosine computed directly with transformers' classes, one pair at a time."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt")
        out = model(
            input_ids=tokenizer([text], return_tensors="pt").input_ids, pixel_values=pixels["pixel_values"]
        )
    # logits_per_image = logit_scale * cosine
    return float((out.logits_per_image[0, 0] / model.logit_scale.exp()).detach())


def test_clip_scores_are_the_cosine_of_each_text_with_its_image(clip_dir: Path) -> None:
    scorer = ClipScorer(ClipConfig(model=str(clip_dir), batch_size=2))
    batch = clip_batch()
    out = scorer(batch)
    assert list(out["status"]) == ["ok", "ok", "download_failed", "ok"]
    web, syn = out["web_clip"], list(out["synthetic_clip"])
    assert web[0] == pytest.approx(reference_cosine(clip_dir, batch["image"][0], "a red circle"), abs=1e-5)
    assert syn[0][1] == pytest.approx(
        reference_cosine(clip_dir, batch["image"][0], "red star on the left"), abs=1e-5
    )
    assert syn[3][0] == pytest.approx(reference_cosine(clip_dir, batch["image"][3], "big small"), abs=1e-5)
    # Empty / null web text and failed rows are not scored.
    assert math.isnan(web[1]) and math.isnan(web[2]) and math.isnan(web[3])
    assert [len(s) for s in syn] == [2, 1, 0, 1]
    assert all(-1.0 <= v <= 1.0 for row in syn for v in row)
    # Distinct texts on one image get distinct scores (the model is not constant).
    assert syn[0][0] != syn[0][1]


def test_clip_scores_do_not_depend_on_batch_size(clip_dir: Path) -> None:
    one = ClipScorer(ClipConfig(model=str(clip_dir), batch_size=1))(clip_batch())
    many = ClipScorer(ClipConfig(model=str(clip_dir), batch_size=64))(clip_batch())
    np.testing.assert_allclose(one["web_clip"], many["web_clip"], atol=1e-5)
    for a, b in zip(one["synthetic_clip"], many["synthetic_clip"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_row_clip_cannot_score_becomes_clip_failed(clip_dir: Path) -> None:
    batch = clip_batch()
    batch["image"][1] = b"\xff\xd8 not really a jpeg"
    out = ClipScorer(ClipConfig(model=str(clip_dir), batch_size=4))(batch)
    assert list(out["status"]) == ["ok", "clip_failed", "download_failed", "ok"]
    assert out["error"][1] and math.isnan(out["web_clip"][1]) and list(out["synthetic_clip"][1]) == []
    assert not math.isnan(out["web_clip"][0]), "the other rows of the batch are still scored"


def test_a_checkpoint_without_safetensors_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        ClipScorer(ClipConfig(model=str(tmp_path)))


# --------------------------------------------------------------------------- selection with CLIP


def scored() -> dict[str, np.ndarray]:
    """Two ok rows with ITM and CLIP scores that order the texts differently."""
    return {
        "status": object_array(["ok", "ok", "too_small"]),
        "web_text": object_array(["web one", "web two", "web three"]),
        "synthetic_texts": object_array([["a", "b", "c"], ["p", "q"], []]),
        "web_itm": np.array([0.9, 0.6, NAN]),
        "synthetic_itm": object_array([[0.8, 0.7, 0.6], [0.55, 0.95], []]),
        "web_clip": np.array([0.20, 0.31, NAN]),
        "synthetic_clip": object_array([[0.10, 0.30, 0.25], [0.33, NAN], []]),
    }


def test_rank_by_clip_picks_the_captions_clip_prefers() -> None:
    by_itm = select(scored(), threshold=0.5, keep_synthetic=1)
    by_clip = select(scored(), threshold=0.5, keep_synthetic=1, rank_by="clip")
    assert list(by_itm["synthetic_kept"])[:2] == [[True, False, False], [False, True]]
    # An unscored (NaN) caption ranks after every scored one.
    assert list(by_clip["synthetic_kept"])[:2] == [[False, True, False], [True, False]]
    assert by_clip["web_kept"].tolist() == [True, True, False]


def test_blip2_recipe_keeps_the_top_two_of_web_and_captions_by_clip() -> None:
    out = select(scored(), threshold=None, keep_synthetic=3, rank_by="clip", top_n=2)
    # Row 0: b (0.30) > c (0.25) > web (0.20) > a (0.10); row 1: p (0.33) > web (0.31) > q (NaN).
    assert out["web_kept"].tolist() == [False, True, False]
    assert list(out["synthetic_kept"]) == [[False, True, True], [True, False], []]


def test_top_n_by_itm_counts_the_web_text_and_prefers_it_on_ties() -> None:
    batch = scored()
    batch["synthetic_itm"][0] = [0.9, 0.7, 0.6]  # ties the web text's 0.9
    out = select(batch, threshold=0.5, keep_synthetic=3, top_n=1)
    assert out["web_kept"].tolist() == [True, False, False]
    assert list(out["synthetic_kept"])[:2] == [[False, False, False], [False, True]]


def test_clip_threshold_applies_to_web_and_synthetic_texts() -> None:
    out = select(scored(), threshold=0.5, keep_synthetic=3, clip_threshold=0.25)
    assert out["web_kept"].tolist() == [False, True, False]
    assert list(out["synthetic_kept"])[:2] == [[False, True, True], [True, False]]
    # No ITM threshold at all: CLIP alone decides.
    clip_only = select(scored(), threshold=None, keep_synthetic=3, clip_threshold=0.3)
    assert clip_only["web_kept"].tolist() == [False, True, False]
    assert list(clip_only["synthetic_kept"])[:2] == [[False, True, False], [True, False]]


def test_clip_threshold_without_clip_scores_keeps_nothing_it_cannot_check() -> None:
    batch = scored()
    del batch["web_clip"], batch["synthetic_clip"]
    out = select(batch, threshold=0.5, keep_synthetic=3, clip_threshold=0.1)
    assert not out["web_kept"].any()
    assert all(not any(flags) for flags in out["synthetic_kept"])


def test_defaults_ignore_clip_scores() -> None:
    with_clip = select(scored(), threshold=0.5, keep_synthetic=2)
    batch = scored()
    del batch["web_clip"], batch["synthetic_clip"]
    without = select(batch, threshold=0.5, keep_synthetic=2)
    assert with_clip["web_kept"].tolist() == without["web_kept"].tolist()
    assert list(with_clip["synthetic_kept"]) == list(without["synthetic_kept"])


def test_keep_synthetic_texts_rejects_mismatched_clip_scores() -> None:
    with pytest.raises(ValueError, match="CLIP scores"):
        keep_synthetic_texts([0.9], count=1, threshold=0.5, keep_synthetic=1, clip=[], clip_threshold=0.2)


def test_select_table_reranks_stored_clip_scores() -> None:
    batch = scored()
    table = pa.table({k: list(v) if v.dtype == object else v for k, v in batch.items()})
    out = select_table(table, threshold=None, keep_synthetic=3, rank_by="clip", top_n=2)
    assert out.column("web_kept").to_pylist() == [False, True, False]
    assert out.column("synthetic_kept").to_pylist() == [[False, True, True], [True, False], []]


# --------------------------------------------------------------------------- config

BASE = "input: {path: urls.parquet}\ncaption: {model: cap, num_captions: 4}\n"


def test_selection_options_map_the_config() -> None:
    cfg = loads(BASE + "clip: {model: m, threshold: 0.2}\nselect: {rank_by: clip, top_n: 2}\n")
    assert selection_options(cfg) == {
        "threshold": None,
        "keep_web": True,
        "keep_synthetic": 4,
        "clip_threshold": 0.2,
        "rank_by": "clip",
        "top_n": 2,
        "min_agreement": None,
        "itc_weight": 0.0,
    }
    cfg = loads(BASE + "filter: {model: f, threshold: 0.6, keep_synthetic: 2}\n")
    assert selection_options(cfg) == {
        "threshold": 0.6,
        "keep_web": True,
        "keep_synthetic": 2,
        "clip_threshold": None,
        "rank_by": "itm",
        "top_n": None,
        "min_agreement": None,
        "itc_weight": 0.0,
    }
    cfg = loads(BASE + "filter: {model: f}\nselect: {min_agreement: 0.8, rank_by: agreement}\n")
    assert selection_options(cfg)["min_agreement"] == 0.8 and selection_options(cfg)["rank_by"] == "agreement"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("select: {rank_by: clip}\n", "needs a clip section"),
        ("select: {top_n: 0}\n", "select.top_n"),
        ("clip: {model: m, threshold: 1.5}\n", "clip.threshold"),
        ("clip: {model: m, bach_size: 3}\n", "did you mean 'batch_size'"),
        ("select: {rank_by: cider}\n", "select.rank_by"),
        ("select: {min_agreement: 0.8}\n", "need a filter section"),
        ("filter: {model: f}\nselect: {min_agreement: 1.5}\n", "select.min_agreement"),
        ("filter: {model: f}\nselect: {rank_by: agreement, top_n: 2}\n", "cannot be used with top_n"),
    ],
)
def test_bad_clip_and_select_config_is_one_line_user_error(extra: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        loads(BASE + extra)
    assert "\n" not in str(info.value)


def test_words_of_the_test_vocabulary_are_known() -> None:
    tokenizer = clip_tokenizer()
    assert all(tokenizer.convert_tokens_to_ids(w) != tokenizer.unk_token_id for w in WORDS)


def test_agreement_needs_two_captions_per_image() -> None:
    one = "input: {path: urls.parquet}\ncaption: {model: cap, num_captions: 1}\nfilter: {model: f}\n"
    with pytest.raises(UserError, match=">= 2 captions per image"):
        loads(one + "select: {min_agreement: 0.8}\n")
    two = "input: {path: urls.parquet}\ncaption: {models: [a, b], num_captions: 1}\nfilter: {model: f}\n"
    assert loads(two + "select: {min_agreement: 0.8}\n").select.min_agreement == 0.8  # an ensemble of two
