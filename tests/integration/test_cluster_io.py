"""Worker-side reads and writes: list inputs read by tasks, output to an fsspec URL, and a driver
that never receives image bytes (download-only runs through the CLI, one Ray session)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import capfilt.pipeline as pipeline
from capfilt.cli import app
from capfilt.serve import LoopbackServer
from capfilt.stages import write
from capfilt.stages.read import make_key

pytestmark = pytest.mark.integration

ROWS_PER_SHARD = 3


@pytest.fixture(scope="module")
def served(image_dir: Path) -> Iterator[str]:
    with LoopbackServer(directory=image_dir) as server:
        yield server.url


def _input_files(root: Path, base: str) -> list[Path]:
    """Two CSV files (5 + 3 rows) mixing good images and failures."""
    first = [f"{base}/good{i}.jpg,image {i}" for i in range(4)] + [f"{base}/status/404,missing"]
    second = [f"{base}/good5.jpg,five", f"{base}/notimage.jpg,not an image", "ftp://x/y.jpg,bad scheme"]
    paths = []
    for name, lines in (("part-a.csv", first), ("more/part-b.csv", second)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("URL,TEXT\n" + "\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _config(root: Path, inputs: list[str], out: str) -> Path:
    config = {
        "input": {"path": inputs, "format": "csv"},
        "download": {
            "image_size": 32, "threads": 2, "timeout_s": 5, "retries": 0, "min_image_size": 16,
            "allowed_hosts": ["127.0.0.1"],
        },
        "output": {"dir": out, "rows_per_shard": ROWS_PER_SHARD},
    }
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_list_input_file_url_output_and_no_image_bytes_at_the_driver(
    ray_session: str, served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _input_files(tmp_path / "in", served)
    out = tmp_path / "out" / "run"
    config = _config(tmp_path, [str(a), str(tmp_path / "in" / "more" / "*.csv")], f"file://{out}")

    seen: list[list[str]] = []
    real = pipeline._driver_batches

    def recording(ds):  # what the driver's loop receives, batch by batch
        for batch in real(ds):
            seen.append(batch.column_names)
            yield batch

    monkeypatch.setattr(pipeline, "_driver_batches", recording)
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"

    assert seen and all(names == ["shard", "rows", "part"] for names in seen), seen
    rows = pq.read_table(out / write.SAMPLES_DIR).to_pylist()
    keys = [make_key(0, i) for i in range(5)] + [make_key(1, i) for i in range(3)]
    assert [r["key"] for r in rows] == keys, "list order, then row order; today's key scheme"
    assert [r["status"] for r in rows] == ["ok"] * 4 + [
        "download_failed",
        "ok",
        "decode_failed",
        "invalid_url",
    ]
    assert sorted(p.name for p in (out / write.SAMPLES_DIR).iterdir()) == [
        "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet",
    ]  # fmt: skip
    with tarfile.open(out / write.IMAGES_DIR / "shard-00001.tar") as tar:
        names = tar.getnames()
    assert names == [f"{key}.{ext}" for key in (make_key(0, 3), make_key(1, 0)) for ext in ("jpg", "json")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["input_rows"] == manifest["rows"] == 8
    assert manifest["status"] == {"decode_failed": 1, "download_failed": 1, "invalid_url": 1, "ok": 5}
    assert manifest["kept"] == {"web": 5, "synthetic": 0}
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or write.PARTS_DIR in p.parts]
    assert leftovers == [], "no temporary files after a completed run"

    # Resume after losing a shard: only that shard is redone, through the same URL.
    lost = {kind: (out / kind / "shard-00001.parquet") for kind in (write.SAMPLES_DIR, write.DATASET_DIR)}
    before = {kind: path.read_bytes() for kind, path in lost.items()}
    for path in lost.values():
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / write.SAMPLES_DIR).iterdir()}
    seen.clear()
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert seen and all(names == ["shard", "rows", "part"] for names in seen)
    again = json.loads((out / "manifest.json").read_text())
    assert again["timing"]["rows_processed"] == ROWS_PER_SHARD and again["timing"]["shards_written"] == 1
    assert {k: again[k] for k in ("rows", "status", "kept", "complete")} == {
        k: manifest[k] for k in ("rows", "status", "kept", "complete")
    }
    assert {kind: path.read_bytes() for kind, path in lost.items()} == before, "the redone shard is identical"


def test_resume_redoes_damaged_shards_and_refuses_a_changed_input(
    ray_session: str, served: str, tmp_path: Path
) -> None:
    a, b = _input_files(tmp_path / "in", served)
    out = tmp_path / "run"
    config = _config(tmp_path, [str(a), str(b)], str(out))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    files = sorted(
        p for kind in (write.IMAGES_DIR, write.DATASET_DIR, write.SAMPLES_DIR) for p in (out / kind).iterdir()
    )
    before = {p: p.read_bytes() for p in files}
    assert len(files) == 9 and (out / "fingerprint.json").is_file()

    tar = out / write.IMAGES_DIR / "shard-00000.tar"
    tar.write_bytes(before[tar][:-512])  # truncated tar
    (out / write.DATASET_DIR / "shard-00001.parquet").unlink()  # lost dataset file
    (out / write.SAMPLES_DIR / "shard-00002.parquet").write_bytes(b"PAR1 garbage")  # corrupt marker
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "shard 0: images/shard-00000.tar does not match its recorded sha256; redoing it" in result.output
    assert "shard 1: dataset/shard-00001.parquet is missing; redoing it" in result.output
    assert "shard 2: samples file unreadable" in result.output
    assert {p: p.read_bytes() for p in files} == before, "every damaged shard was redone, identically"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["timing"]["shards_written"] == 3

    a.write_text(a.read_text().replace("image 1", "another text"), encoding="utf-8")  # same path, new text
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert "input.path: the input changed since shard 0 of" in result.output
    assert {p: p.read_bytes() for p in files} == before, "a refused resume changes nothing"
