"""Caption and filter stages called directly (no Ray) with tiny random MEDs saved to disk."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import save_tiny_model

from capfilt.config import CaptionConfig, FilterConfig
from capfilt.stages.caption import (
    BLIP_MEAN,
    Captioner,
    caption_seed,
    pixel_column,
    pixel_values,
    preprocess,
)
from capfilt.stages.filter import Filter
from capfilt.stages.select import object_array


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("models")
    return str(save_tiny_model(root / "a", seed=0)), str(save_tiny_model(root / "b", seed=1))


def jpeg(color: tuple[int, int, int], size: int = 40) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (size, size), color)
    image.paste((255 - color[0], color[1], 255 - color[2]), (0, 0, size // 2, size // 3))
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def make_batch(n: int, *, bad: frozenset[int] = frozenset()) -> dict[str, np.ndarray]:
    """n rows; rows in ``bad`` failed to download. Web texts include None and empty."""
    texts = ["a red circle", None, "", "big blue square on the left"]
    return {
        "key": object_array([f"{i:06d}" for i in range(n)]),
        "status": object_array(["download_failed" if i in bad else "ok" for i in range(n)]),
        "error": object_array(["HTTP 404" if i in bad else "" for i in range(n)]),
        "image": object_array(
            [b"" if i in bad else jpeg((13 * i % 256, 90, 200 - 7 * i % 200)) for i in range(n)]
        ),
        "web_text": object_array([texts[i % len(texts)] for i in range(n)]),
    }


def subset(batch: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


def caption_cfg(model: str | list[str], **changes) -> CaptionConfig:
    fields = {"num_captions": 3, "max_length": 12, "min_length": 3, "batch_size": 16, **changes}
    if isinstance(model, list):
        return CaptionConfig(models=model, **fields)
    return CaptionConfig(model=model, **fields)


# --------------------------------------------------------------------------- preprocess


def test_preprocess_resizes_ok_rows_and_marks_undecodable_ones() -> None:
    batch = make_batch(3, bad=frozenset({1}))
    batch["image"][2] = b"\xff\xd8 not really a jpeg"
    out = preprocess(batch, sizes=[32, 16, 32])
    assert out[pixel_column(32)].shape == (3, 32, 32, 3) and out[pixel_column(32)].dtype == np.uint8
    assert out[pixel_column(16)].shape == (3, 16, 16, 3)
    assert out[pixel_column(32)][0].any() and not out[pixel_column(32)][1].any()
    assert list(out["status"]) == ["ok", "download_failed", "decode_failed"]
    assert out["error"][2] and out["error"][1] == "HTTP 404"
    assert batch["status"][2] == "ok", "the input batch must not be modified"


def test_pixel_values_normalise_with_blip_statistics() -> None:
    pixels = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    values = pixel_values(pixels, device=torch.device("cpu"), dtype=torch.float32)
    assert values.shape == (1, 3, 4, 4)
    assert values[0, 0, 0, 0].item() == pytest.approx(-BLIP_MEAN[0] / 0.26862954, rel=1e-5)


# --------------------------------------------------------------------------- captioner


def test_captions_do_not_depend_on_batch_size_or_batching(models: tuple[str, str]) -> None:
    batch = make_batch(16, bad=frozenset({5}))
    whole = Captioner(caption_cfg(models[0], batch_size=16))(batch)["synthetic_texts"]
    one_by_one = Captioner(caption_cfg(models[0], batch_size=1))
    pieces = [one_by_one(subset(batch, slice(i, i + 1)))["synthetic_texts"][0] for i in range(16)]
    # Precomputed pixels (the pipeline's preprocess step) give the same captions as decoding here.
    pre = Captioner(caption_cfg(models[0], batch_size=4))(preprocess(batch, sizes=[32]))["synthetic_texts"]
    assert [list(c) for c in whole] == pieces == [list(c) for c in pre]
    assert whole[5] == [] and all(1 <= len(c) <= 3 for i, c in enumerate(whole) if i != 5)


def test_captions_depend_on_seed_and_key(models: tuple[str, str]) -> None:
    batch = make_batch(6)
    first = Captioner(caption_cfg(models[0]))(batch)["synthetic_texts"]
    reseeded = Captioner(caption_cfg(models[0], seed=1))(batch)["synthetic_texts"]
    rekeyed = dict(batch, key=object_array([f"other-{k}" for k in batch["key"]]))
    other_keys = Captioner(caption_cfg(models[0]))(rekeyed)["synthetic_texts"]
    assert list(map(list, first)) != list(map(list, reseeded))
    assert list(map(list, first)) != list(map(list, other_keys))
    assert caption_seed(0, "a") == caption_seed(0, "a") != caption_seed(0, "b")


def test_ensemble_captions_are_the_union_of_each_model(models: tuple[str, str]) -> None:
    batch = make_batch(4)
    a = Captioner(caption_cfg(models[0]))(batch)["synthetic_texts"]
    b = Captioner(caption_cfg(models[1]))(batch)["synthetic_texts"]
    both = Captioner(caption_cfg(list(models)))(batch)["synthetic_texts"]
    for i in range(4):
        assert list(both[i]) == list(dict.fromkeys(list(a[i]) + list(b[i])))
        assert len(both[i]) > len(a[i])


def test_beam_search_writes_distinct_captions(models: tuple[str, str]) -> None:
    out = Captioner(caption_cfg(models[0], sample=False, num_beams=3, num_captions=2))(make_batch(2))
    assert all(1 <= len(c) <= 2 and len(set(c)) == len(c) for c in out["synthetic_texts"])


def test_a_failing_row_becomes_caption_failed_not_a_crash(models: tuple[str, str]) -> None:
    captioner = Captioner(caption_cfg(models[0]))
    med = captioner.models[0][0]
    real_generate = med.generate
    poisoned = caption_seed(0, "000002")

    def generate(pixel_values, *, seeds, **kwargs):
        if poisoned in seeds.tolist():
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_generate(pixel_values, seeds=seeds, **kwargs)

    med.generate = generate
    out = captioner(make_batch(4, bad=frozenset({3})))
    assert list(out["status"]) == ["ok", "ok", "caption_failed", "download_failed"]
    assert "out of memory" in out["error"][2] and out["error"][3] == "HTTP 404"
    assert out["synthetic_texts"][2] == [] and len(out["synthetic_texts"][0]) >= 1


# --------------------------------------------------------------------------- filter


def captioned(models: tuple[str, str], n: int, bad: frozenset[int] = frozenset()) -> dict[str, np.ndarray]:
    return Captioner(caption_cfg(models[0]))(make_batch(n, bad=bad))


def test_filter_encodes_each_image_once_for_all_its_texts(models: tuple[str, str]) -> None:
    batch = captioned(models, 6, bad=frozenset({4}))
    stage = Filter(FilterConfig(model=models[0], batch_size=8))  # 8 < 15+ texts: pairs are chunked
    med = stage.models[0][0]
    encoded: list[int] = []
    real_encode = med.encode_image

    def encode_image(pixel_values):
        encoded.append(pixel_values.shape[0])
        return real_encode(pixel_values)

    med.encode_image = encode_image
    out = stage(batch)
    assert encoded == [5], "one vision pass over the 5 ok images, shared by all their texts"
    assert sum(len(s) for s in out["synthetic_itm"]) == sum(len(s) for s in batch["synthetic_texts"])


def test_filter_scores_match_a_direct_itm_computation(models: tuple[str, str]) -> None:
    batch = captioned(models, 4, bad=frozenset({3}))
    stage = Filter(FilterConfig(model=models[0], batch_size=3, itc_column=True))
    out = stage(batch)
    med, tokenizer = stage.models[0]
    pixels = pixel_values(
        preprocess(batch, sizes=[32])[pixel_column(32)][:1], device=torch.device("cpu"), dtype=torch.float32
    )
    tokens = tokenizer(["a red circle"], return_tensors="pt")
    with torch.inference_mode():
        logits = med.itm_logits(med.encode_image(pixels), tokens["input_ids"], tokens["attention_mask"])
    assert out["web_itm"][0] == pytest.approx(torch.softmax(logits, -1)[0, 1].item(), abs=1e-5)
    # Row 1 has web text None, row 2 "": no web score; row 3 failed to download: nothing.
    assert math.isnan(out["web_itm"][1]) and math.isnan(out["web_itm"][2]) and math.isnan(out["web_itm"][3])
    assert out["synthetic_itm"][3] == [] and out["synthetic_itc"][3] == []
    for i in range(3):
        assert len(out["synthetic_itm"][i]) == len(batch["synthetic_texts"][i])
        assert all(0.0 <= p <= 1.0 for p in out["synthetic_itm"][i])
        assert all(-1.0001 <= c <= 1.0001 for c in out["synthetic_itc"][i])
    assert -1.0001 <= out["web_itc"][0] <= 1.0001


def test_filter_writes_each_captions_agreement_with_the_images_other_captions(models: tuple[str, str]) -> None:
    batch = captioned(models, 4, bad=frozenset({3}))
    # Row 0: two identical captions and one unlike them; row 2: one caption (no agreement).
    batch["synthetic_texts"] = object_array(
        [["a red circle", "a red circle", "shop now cheap"], ["a blue square", "a green star"], ["a circle"], []]
    )
    stage = Filter(FilterConfig(model=models[0], batch_size=2))
    out = stage(batch)
    med, tokenizer = stage.models[0]
    tokens = tokenizer(["a red circle", "shop now cheap", "a blue square", "a green star"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        f = med.text_features(med.encode_text(tokens["input_ids"], tokens["attention_mask"]))
    cos = (f @ f.T).tolist()
    row0 = out["synthetic_agreement"][0]
    assert row0[0] == pytest.approx((1.0 + cos[0][1]) / 2, abs=1e-4)  # itself once, the odd one once
    assert row0[1] == pytest.approx(row0[0], abs=1e-6)
    assert row0[2] == pytest.approx(cos[0][1], abs=1e-4)
    assert out["synthetic_agreement"][1] == pytest.approx([cos[2][3], cos[2][3]], abs=1e-4)
    assert len(out["synthetic_agreement"][2]) == 1 and math.isnan(out["synthetic_agreement"][2][0])
    assert out["synthetic_agreement"][3] == []  # failed download: no scores
    # The web text is not a sample of the captioner: it is scored by ITM, not counted in agreement.
    assert len(out["synthetic_itm"][0]) == 3 and not math.isnan(out["web_itm"][0])


def test_ensemble_filter_averages_the_models(models: tuple[str, str]) -> None:
    batch = captioned(models, 3)
    a = Filter(FilterConfig(model=models[0]))(batch)
    b = Filter(FilterConfig(model=models[1]))(batch)
    both = Filter(FilterConfig(models=list(models)))(batch)
    assert both["web_itm"][0] == pytest.approx((a["web_itm"][0] + b["web_itm"][0]) / 2, abs=1e-6)
    for i in range(3):
        expected = (np.array(a["synthetic_itm"][i]) + np.array(b["synthetic_itm"][i])) / 2
        assert np.allclose(both["synthetic_itm"][i], expected, atol=1e-6)
    assert a["web_itm"][0] != b["web_itm"][0]


def test_a_failing_row_becomes_filter_failed(models: tuple[str, str]) -> None:
    batch = captioned(models, 3)
    stage = Filter(FilterConfig(model=models[0]))
    med = stage.models[0][0]
    real_itm = med.itm_logits

    def itm_logits(image_embeds, input_ids, attention_mask, *, image=None):
        keys = image.kv[0][0] if image is not None else med.image_context(image_embeds).kv[0][0]
        if keys.shape[0] > 0 and (keys - bad_keys).abs().amax(dim=(1, 2, 3)).min() < 1e-6:
            raise ValueError("bad row (simulated)")
        return real_itm(image_embeds, input_ids, attention_mask, image=image)

    with torch.inference_mode():
        first = med.encode_image(
            pixel_values(
                preprocess(batch, sizes=[32])[pixel_column(32)][1:2],
                device=torch.device("cpu"),
                dtype=torch.float32,
            )
        )
        bad_keys = med.image_context(first).kv[0][0]
    med.itm_logits = itm_logits
    out = stage(batch)
    assert list(out["status"]) == ["ok", "filter_failed", "ok"]
    assert "simulated" in out["error"][1] and out["synthetic_itm"][1] == [] and math.isnan(out["web_itm"][1])
    assert not math.isnan(out["web_itm"][0]) and len(out["synthetic_itm"][2]) == len(
        batch["synthetic_texts"][2]
    )


# --------------------------------------------------------------------------- fused stage


def test_fused_stage_equals_caption_then_filter(models: tuple[str, str]) -> None:
    from capfilt.stages.fused import CaptionFilter

    batch = preprocess(make_batch(6, bad=frozenset({2})), sizes=[32])
    ccfg, fcfg = caption_cfg(models[0]), FilterConfig(model=models[1], batch_size=4, itc_column=True)
    two_pools = Filter(fcfg)(Captioner(ccfg)(batch))
    fused = CaptionFilter(ccfg, fcfg)(batch)
    assert pixel_column(32) not in fused, "the fused stage drops the pixels it consumed"
    assert set(two_pools) - set(fused) == {pixel_column(32)}
    for name in ("status", "error", "synthetic_texts"):
        assert [list(x) if isinstance(x, list) else x for x in fused[name]] == [
            list(x) if isinstance(x, list) else x for x in two_pools[name]
        ], name
    np.testing.assert_allclose(fused["web_itm"], two_pools["web_itm"], rtol=0, atol=1e-6)
    for a, b in zip(fused["synthetic_itm"], two_pools["synthetic_itm"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_make_plan_fuses_caption_and_filter_when_asked(models: tuple[str, str], tmp_path: Path) -> None:
    from capfilt.config import PipelineConfig
    from capfilt.errors import UserError
    from capfilt.pipeline import make_plan

    (tmp_path / "urls.parquet").write_bytes(b"")
    base = {
        "input": {"path": str(tmp_path / "urls.parquet")},
        "caption": {"model": models[0], "num_gpus": 1, "concurrency": 3, "batch_size": 32},
        "filter": {"model": models[1], "num_gpus": 0.5, "concurrency": 1},
    }
    separate = make_plan(PipelineConfig.model_validate(base))
    assert [s.name for s in separate.stages if s.kind == "actors"] == ["caption", "filter"]
    fused_cfg = PipelineConfig.model_validate({**base, "filter": {**base["filter"], "fused": True}})
    fused = [s for s in make_plan(fused_cfg).stages if s.kind == "actors"]
    assert [s.name for s in fused] == ["fused"]
    assert (fused[0].num_gpus, fused[0].concurrency, fused[0].batch_size) == (1.0, 3, 32)
    assert fused[0].models == [models[0], models[1]]
    with pytest.raises(UserError, match="filter.fused: needs a caption section"):
        make_plan(
            PipelineConfig.model_validate({"input": base["input"], "filter": fused_cfg.filter.model_dump()})
        )


def test_agreement_encodes_no_text_when_every_image_has_one_caption(models: tuple[str, str]) -> None:
    from capfilt.inference import load_med, text_agreement

    med, tokenizer = load_med(models[0], device=torch.device("cpu"), dtype=torch.float32)
    calls: list[int] = []
    real = med.encode_text
    med.encode_text = lambda ids, mask: calls.append(ids.shape[0]) or real(ids, mask)
    lone = text_agreement(med, tokenizer, ["a red circle", "a blue star"], [0, 1], batch_size=8)
    assert calls == [] and all(math.isnan(v) for v in lone.tolist())
    mixed = text_agreement(med, tokenizer, ["a red circle", "a red circle", "a blue star"], [0, 0, 1], batch_size=8)
    assert calls == [2]  # only the two captions of image 0 were encoded
    assert mixed[0].item() == pytest.approx(1.0, abs=1e-5) and math.isnan(mixed[2].item())
