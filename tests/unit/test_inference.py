"""capfilt/inference.py: BLIP's test transform, device/hub resolution, OOM halving, device loss."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from support import tiny_med

from capfilt import inference
from capfilt.config import CaptionConfig, FilterConfig
from capfilt.errors import UserError
from capfilt.stages.caption import Captioner, caption_seed, pixel_column, preprocess
from capfilt.stages.filter import Filter
from capfilt.stages.select import object_array

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def blip_test_transform(image: Image.Image, size: int) -> np.ndarray:
    """BLIP's transform_test, plainly: Resize((size, size), BICUBIC) on the PIL image, ToTensor,
    Normalize(mean, std). (3, size, size) float32."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A photo-like test picture: smooth gradients, shapes and noise, so resampling matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [127 + 120 * np.sin(x / (7 + seed)), 127 + 120 * np.cos(y / 11), (x + y) * 255 / (width + height)], -1
    )
    base = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 4, width // 2, height * 3 // 4), fill=(250, 30, 20))
    draw.rectangle((width * 3 // 5, height // 6, width * 9 // 10, height // 2), fill=(10, 40, 230))
    return image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


PICTURES = [picture(640, 360, 0), picture(251, 97, 1), picture(300, 800, 2), picture(384, 384, 3, mode="L")]


def ours(batch: dict[str, np.ndarray], size: int, resize_mode: str | None) -> np.ndarray:
    pixels = preprocess(batch, sizes=[size], resize_mode=resize_mode)[pixel_column(size)]
    return inference.pixel_values(pixels, device=torch.device("cpu"), dtype=torch.float32).numpy()


def rows(images: list[bytes], **columns: list[int]) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "status": object_array(["ok"] * n),
        "error": object_array([""] * n),
        "image": object_array(images),
        **{k: np.asarray(v, dtype=np.int32) for k, v in columns.items()},
    }


def test_original_images_are_prepared_exactly_as_blips_test_transform() -> None:
    """Max |difference| over all pixels, in normalised units: below 1e-5 (float rounding only)."""
    size = 384
    reference = np.stack([blip_test_transform(p, size) for p in PICTURES])
    got = ours(rows([encode(p) for p in PICTURES]), size, resize_mode="no")
    assert got.shape == reference.shape == (4, 3, size, size)
    assert np.abs(got - reference).max() < 1e-5


@pytest.mark.parametrize("resize_mode", ["border", "keep_ratio"])
def test_stored_images_give_nearly_blips_input_of_the_original(resize_mode: str) -> None:
    """Images stored the way the download stage stores them (img2dataset's Resizer at 384, PNG
    so that only resampling differs) give the model nearly BLIP's input of the ORIGINAL image:
    the letterbox of ``border`` is cut off before the squash. The difference is the second
    resampling: measured mean |diff| 0.7-1.4/255 (keep_ratio) and 1.5-3.1/255 (border, whose
    picture is stored smaller), 99.9th percentile <= 11/255 (keep_ratio); the stated bounds are
    mean < 2/255 (keep_ratio) and < 4/255 (border), 99.9th percentile < 16/255 (keep_ratio).
    Without the cut a letterboxed image is off by whole white bars (> 10x the difference)."""
    from img2dataset.resizer import Resizer

    size = 384
    resizer = Resizer(
        image_size=size,
        resize_mode=resize_mode,
        resize_only_if_bigger=False,
        encode_format="png",
        encode_quality=1,
    )
    stored, widths, heights = [], [], []
    for p in PICTURES:
        encoded, width, height, *_rest, error = resizer(io.BytesIO(encode(p.convert("RGB"), "PPM")))
        assert error is None
        stored.append(encoded)
        widths.append(width)
        heights.append(height)
    batch = rows(
        stored,
        width=widths,
        height=heights,
        original_width=[p.width for p in PICTURES],
        original_height=[p.height for p in PICTURES],
    )
    reference = np.stack([blip_test_transform(p, size) for p in PICTURES])
    got = ours(batch, size, resize_mode=resize_mode)
    diff = np.abs(got - reference) * STD[None, :, None, None]  # back to [0, 1] channel units
    if resize_mode == "keep_ratio":
        assert diff.mean() < 2 / 255, diff.mean() * 255
        assert np.quantile(diff, 0.999) < 16 / 255, np.quantile(diff, 0.999) * 255
    else:
        assert diff.mean() < 4 / 255, diff.mean() * 255
        uncut = np.abs(ours(batch, size, resize_mode=None) - reference) * STD[None, :, None, None]
        assert uncut.mean() > 10 * diff.mean()


def test_content_box_of_border_storage() -> None:
    assert inference.content_box((384, 384), (640, 360), "border") == (0, 84, 384, 300)
    assert inference.content_box((384, 384), (100, 400), "border") == (144, 0, 240, 384)
    assert inference.content_box((384, 384), (500, 500), "border") is None
    assert inference.content_box((384, 216), (640, 360), "keep_ratio") is None
    assert inference.content_box((384, 384), (0, 0), "border") is None  # original size unknown


def test_hub_ids_and_devices() -> None:
    assert inference.is_hub_id("Salesforce/blip-itm-large-coco")
    assert not inference.is_hub_id("runs/a/b") and not inference.is_hub_id("model")
    with pytest.raises(UserError, match="no such directory"):
        inference.resolve_model("./not/here/at/all")
    assert inference.resolve_device("cpu").type == "cpu"
    assert inference.resolve_device(None, num_gpus=0).type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            inference.resolve_device("cuda")
        with pytest.warns(UserWarning, match="no CUDA device"):
            assert inference.resolve_device(None, num_gpus=1).type == "cpu"
    with pytest.raises(UserError, match="not a torch device"):
        inference.resolve_device("tpu9")


# --------------------------------------------------------------------------- failures


def test_errors_are_classified() -> None:
    lost = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert inference.is_device_lost(lost)
    assert inference.is_device_lost(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert inference.is_out_of_memory(oom) and not inference.is_device_lost(oom)
    assert not inference.is_device_lost(ValueError("CUDA error in a value"))  # only runtime errors
    assert not inference.is_device_lost(RuntimeError("shape mismatch"))


def test_out_of_memory_halves_the_micro_batch() -> None:
    calls: list[tuple[int, int]] = []

    def run(a: int, b: int) -> list[int]:
        calls.append((a, b))
        if b - a > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(a, b))

    assert inference.run_chunks(run, 10, 16) == list(range(10))
    sizes = [b - a for a, b in calls]
    assert sizes[:3] == [10, 5, 2] and 1 not in sizes, "halved, then kept at the size that fits"


def test_an_item_that_fails_alone_gets_its_error_and_a_lost_device_raises() -> None:
    def run(a: int, b: int) -> list[int]:
        if a <= 4 < b:
            raise ValueError("bad item")
        return list(range(a, b))

    out = inference.run_chunks(run, 8, 8)
    assert out[:4] == [0, 1, 2, 3] and isinstance(out[4], ValueError) and out[5:] == [5, 6, 7]

    def lost(a: int, b: int) -> list[int]:
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(inference.DeviceLost, match="device-side assert"):
        inference.run_chunks(lost, 8, 8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    med, tokenizer = tiny_med(seed=0)
    return str(med.save(tmp_path_factory.mktemp("model") / "m", tokenizer))


def small_batch(n: int) -> dict[str, np.ndarray]:
    return {
        "key": object_array([f"{i:04d}" for i in range(n)]),
        "status": object_array(["ok"] * n),
        "error": object_array([""] * n),
        "image": object_array([encode(picture(40 + 3 * i, 30, i)) for i in range(n)]),
        "web_text": object_array(["a red circle"] * n),
    }


def test_captioner_oom_halves_and_gives_the_same_captions(model_dir: str) -> None:
    batch = small_batch(8)
    cfg = CaptionConfig(model=model_dir, num_captions=2, max_length=10, min_length=3, batch_size=8)
    expected = Captioner(cfg)(batch)["synthetic_texts"]
    captioner = Captioner(cfg)
    med = captioner.models[0][0]
    real_generate, sizes = med.generate, []

    def generate(pixel_values, **kwargs):
        sizes.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(pixel_values, **kwargs)

    med.generate = generate
    out = captioner(batch)
    assert [list(c) for c in out["synthetic_texts"]] == [list(c) for c in expected]
    assert list(out["status"]) == ["ok"] * 8
    assert sizes[:3] == [8, 4, 2] and 1 not in sizes


@pytest.mark.parametrize("stage", ["caption", "filter"])
def test_a_lost_device_never_marks_rows_failed(model_dir: str, stage: str, monkeypatch) -> None:
    """Outside Ray the error propagates (no batch is returned, so nothing is committed); inside
    a Ray actor the process ends with DEVICE_LOST_EXIT_CODE so Ray restarts it and retries."""
    batch = small_batch(4)
    if stage == "caption":
        runner = Captioner(CaptionConfig(model=model_dir, num_captions=1, max_length=8, min_length=2))
        med, method = runner.models[0][0], "generate"
    else:
        batch["synthetic_texts"] = object_array([["a blue square"]] * 4)
        runner = Filter(FilterConfig(model=model_dir))
        med, method = runner.models[0][0], "itm_logits"
    poisoned = caption_seed(0, "0002")

    def fail(*args, **kwargs):
        if stage == "caption" and poisoned not in kwargs["seeds"].tolist():
            return real(*args, **kwargs)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    real = getattr(med, method)
    setattr(med, method, fail)
    with pytest.raises(inference.DeviceLost, match="illegal memory access"):
        runner(batch)

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(inference, "_in_ray_actor", lambda: True)
    monkeypatch.setattr(inference.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        runner(batch)
    assert exits == [inference.DEVICE_LOST_EXIT_CODE]
