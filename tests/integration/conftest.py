"""Integration fixtures: tiny models and a loopback corpus (the builders live in tests/support.py).

Every pipeline run in these tests joins the test run's one Ray session (``ray_session`` in
tests/conftest.py; ``capfilt.pipeline`` reuses an initialised Ray, subprocess runs join it by
address), so Ray starts once per test run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["no_proxy"] = "127.0.0.1,localhost"

from support import image_bytes, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(captioner, filter) checkpoint directories."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(root / "captioner", seed=0), save_tiny_model(
        root / "filter", seed=1, calibrate_itm=True
    )


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
