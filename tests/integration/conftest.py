"""Integration fixtures: ONE Ray session for the whole test run, tiny models, a loopback corpus.

Every pipeline run in these tests joins the session started here (``capfilt.pipeline`` reuses
an initialised Ray; subprocess runs join it by address), so Ray starts once per test run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["no_proxy"] = "127.0.0.1,localhost"

from support import WORDS, tiny_med  # noqa: E402


def save_tiny_model(directory: Path, *, seed: int, calibrate_itm: bool = False) -> Path:
    """A randomly initialised, very small MED (32 px input, width 32) with a trained tokenizer.

    A random ITM head gives every pair nearly the same probability (~0.47). With
    ``calibrate_itm`` the head is rescaled so that, on images and texts like the tests', the
    match probabilities spread around 0.5: a 0.5 threshold then keeps some texts and drops others.
    """
    med, tokenizer = tiny_med(seed=seed)
    if calibrate_itm:
        _calibrate_itm(med, tokenizer)
    med.save(directory, tokenizer)
    return directory


def _calibrate_itm(med: torch.nn.Module, tokenizer: object) -> None:
    """Scale the ITM head so (match - no match) logits have spread ~2 and median ~0."""
    from capfilt.stages.caption import decode_image, pixel_values

    pixels = np.stack([decode_image(image_bytes("RGB", "JPEG", color=c), 32) for c in range(12)])
    texts = [" ".join(WORDS[(3 * i) % len(WORDS) : (3 * i) % len(WORDS) + 3]) for i in range(12)]
    tokens = tokenizer(texts, padding="longest", return_tensors="pt")  # type: ignore[operator]
    with torch.no_grad():
        embeds = med.encode_image(pixel_values(pixels, device=torch.device("cpu"), dtype=torch.float32))
        head = med.itm_head
        hidden_logits = med.itm_logits(embeds, tokens["input_ids"], tokens["attention_mask"]) - head.bias
        u = hidden_logits[:, 1] - hidden_logits[:, 0]
        scale = 2.0 / float(u.std().clamp_min(1e-8))
        head.weight.mul_(scale)
        head.bias.zero_()
        head.bias[1] = -scale * float(u.median())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(captioner, filter) checkpoint directories."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(root / "captioner", seed=0), save_tiny_model(
        root / "filter", seed=1, calibrate_itm=True
    )


def image_bytes(
    mode: str, fmt: str, *, size: tuple[int, int] = (48, 40), color: int = 0, **save: object
) -> bytes:
    """An image of ``mode`` (RGB, CMYK, P, I;16, RGBA, ...) encoded as ``fmt``."""
    rgb = Image.new("RGB", size, (40 + color * 7 % 200, 120, 200 - color * 5 % 150))
    rgb.paste((250, 250, 20), (0, 0, size[0] // 2, size[1] // 3))
    if mode == "I;16":
        image = rgb.convert("L").convert("I;16")
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = rgb.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files for the loopback server: good images and every kind of bad body."""
    root = tmp_path_factory.mktemp("www")
    for i in range(24):
        (root / f"good{i}.jpg").write_bytes(image_bytes("RGB", "JPEG", color=i))
    good = image_bytes("RGB", "JPEG", size=(64, 64))
    files = {
        "cmyk.jpg": image_bytes("CMYK", "JPEG"),
        "palette.png": image_bytes("P", "PNG"),
        "gray16.png": image_bytes("I;16", "PNG"),
        "rgba.png": image_bytes("RGBA", "PNG"),
        "animated.gif": animated_gif(),
        "zero.jpg": b"",
        "corrupt.jpg": good[:20] + bytes(range(256)) * 4,
        "notimage.jpg": b"<html><body>hello</body></html>",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "truncsrc.jpg").write_bytes(good)
    return root
