"""benchmarks/driver_memory.py's measuring functions (the benchmark itself needs minutes and Ray).

Running the script's smallest mode takes over a minute here (Ray start-up, model loading), so it
is not run by the tests; these check what its figures are computed with.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from support import load_benchmark


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("driver_memory")


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_image_payload_counts_image_columns_and_pixels_not_metadata(bench: Any) -> None:
    image = jpeg()
    table = pa.table({"key": ["a", "b"], "image": pa.array([image, image], pa.binary()), "n": [1, 2]})
    assert bench.image_payload_bytes(table) == 2 * len(image)
    assert bench.image_payload_bytes(table.drop_columns(["image"])) == 0
    failed = pa.table({"image": pa.array([b"", b""], pa.binary())})  # rows whose download failed
    assert bench.image_payload_bytes(failed) == 0
    pixels = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    assert bench.image_payload_bytes({"pixels": pixels, "ids": np.arange(4)}) == pixels.nbytes
    objects = np.array([image, b"plain text, not an image"], dtype=object)
    assert bench.image_payload_bytes([objects]) == len(image)
    assert bench.image_payload_bytes({"summary": {"rows": 10, "status": {"ok": 10}}}) == 0


def test_window_rates_split_commits_into_windows(bench: Any) -> None:
    # 8 shards of 100 rows, committed 1 s apart after a 4 s start-up, listed out of order.
    times = [14.0, 7.0, 5.0, 6.0, 8.0, 9.0, 10.0, 11.0]
    assert bench.window_rates(times, [100] * 8, 3.0, 4) == pytest.approx([200 / 3, 100.0, 100.0, 200 / 4])
    assert bench.window_rates([5.0], [7], 4.0, 4) == [7.0]
    assert bench.window_rates([], [], 0.0, 4) == []


def test_proc_status_reads_this_process(bench: Any) -> None:
    status = bench.proc_status(os.getpid())
    assert 0 < status["VmRSS"] <= status["VmHWM"]
    assert bench.proc_status(2**22 + 12345) == {}
