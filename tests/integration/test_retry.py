"""`capfilt run CONFIG --retry STATUS[,STATUS...]` (issue 14 item 2) against a loopback server.

The first run meets ``/flaky/1/...`` URLs (503 on the first request, the image afterwards), a
404, a 500 and an HTML page; ``--retry transient`` makes the flaky rows ok, asks the 500 again
and leaves the 404 and the HTML row alone; every row not retried keeps its samples row, dataset
pairs and tar members, and a shard without retried rows keeps its files byte for byte.
"""

from __future__ import annotations

import hashlib
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.serve import LoopbackServer
from capfilt.stages import write

pytestmark = pytest.mark.integration

ROWS_PER_SHARD = 4


@pytest.fixture()
def server(image_dir: Path) -> Iterator[LoopbackServer]:
    with LoopbackServer(directory=image_dir) as srv:
        yield srv


def _config(tmp_path: Path, paths: list[str], port: int, out: str = "run") -> Path:
    urls = [f"http://127.0.0.1:{port}/{p}" for p in paths]
    pq.write_table(
        pa.table({"URL": urls, "TEXT": [f"text {i}" for i in range(len(urls))]}), tmp_path / "in.parquet"
    )
    config = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "download": {"image_size": 32, "threads": 4, "retries": 0, "allowed_hosts": ["127.0.0.1"]},
        "output": {"dir": str(tmp_path / out), "rows_per_shard": ROWS_PER_SHARD},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, f"{result.output}\n{result.exception!r}"


def _comparable(rows: list[dict]) -> list[dict]:
    """Rows with NaN scores (no model ran) spelled out, so equal rows compare equal."""
    return [{k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]


def _samples(run: Path, shard: int) -> list[dict]:
    return _comparable(pq.read_table(write.samples_path(run, shard)).to_pylist())


def _dataset(run: Path, shard: int) -> list[dict]:
    return _comparable(pq.read_table(write.dataset_path(run, shard)).to_pylist())


def _members(run: Path, shard: int) -> dict[str, bytes]:
    with tarfile.open(write.images_path(run, shard)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _digests(run: Path, shard: int) -> list[str]:
    return [
        hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (
            write.images_path(run, shard),
            write.dataset_path(run, shard),
            write.samples_path(run, shard),
        )
    ]


PATHS = [
    # shard 0: one flaky (transient 503 first), one 404 (permanent)
    "good0.jpg",
    "flaky/1/good1.jpg",
    "good2.jpg",
    "status/404",
    # shard 1: all fine, never touched by the retry
    "good3.jpg",
    "good4.jpg",
    "good5.jpg",
    "good6.jpg",
    # shard 2: flaky, an HTML page (decode_failed), an image, a 500 every time
    "flaky/1/good7.jpg",
    "html",
    "good8.jpg",
    "status/500",
]


def test_retry_transient_rows_in_place(ray_session: str, server: LoopbackServer, tmp_path: Path) -> None:
    config = _config(tmp_path, PATHS, server.port)
    run = tmp_path / "run"
    code, output = _invoke("run", str(config))
    assert code == 0, output
    before = {s: _samples(run, s) for s in range(3)}
    status = [r["status"] for s in range(3) for r in before[s]]
    assert status == [
        "ok", "download_failed", "ok", "download_failed",
        "ok", "ok", "ok", "ok",
        "download_failed", "decode_failed", "ok", "download_failed",
    ]  # fmt: skip
    datasets = {s: _dataset(run, s) for s in range(3)}
    members = {s: _members(run, s) for s in range(3)}
    shard1 = _digests(run, 1)
    mtime1 = write.samples_path(run, 1).stat().st_mtime_ns

    code, output = _invoke("run", str(config), "--retry", "transient")
    assert code == 0, output
    after = {s: _samples(run, s) for s in range(3)}
    retried = {(0, 1), (2, 0), (2, 3)}  # (shard, position): the 503s and the 500
    for shard in range(3):
        assert len(after[shard]) == ROWS_PER_SHARD
        for pos in range(ROWS_PER_SHARD):
            if (shard, pos) not in retried:
                assert after[shard][pos] == before[shard][pos], (shard, pos)
    assert after[0][1]["status"] == "ok" and after[2][0]["status"] == "ok"
    assert after[2][3]["status"] == "download_failed" and after[2][3]["error"].startswith("HTTP 500")
    assert after[0][3]["status"] == "download_failed" and after[2][1]["status"] == "decode_failed"
    # The server saw the retried URLs twice, the rows not retried once.
    seen = [path for _, path in server.requests]
    assert seen.count("/status/500") == 2 and seen.count("/flaky/1/good1.jpg") == 2
    assert seen.count("/status/404") == 1 and seen.count("/html") == 1 and seen.count("/good3.jpg") == 1

    # Untouched rows: dataset pairs and tar members unchanged; new rows added in row order.
    for shard in (0, 2):
        new_keys = {after[shard][p]["key"] for s, p in retried if s == shard}
        old_pairs = [r for r in datasets[shard] if r["key"] not in new_keys]
        assert [r for r in _dataset(run, shard) if r["key"] not in new_keys] == old_pairs
        now = _members(run, shard)
        for name, payload in members[shard].items():
            assert now[name] == payload, name
        for key in new_keys:
            ok = next(r for r in after[shard] if r["key"] == key)["status"] == "ok"
            assert (f"{key}.jpg" in now) == ok
    keys0 = [r["key"] for r in _dataset(run, 0)]
    assert keys0 == sorted(keys0, key=[r["key"] for r in after[0]].index)
    # A shard with no retried rows is not rewritten at all.
    assert _digests(run, 1) == shard1 and write.samples_path(run, 1).stat().st_mtime_ns == mtime1
    assert not (run / "_retry").exists() and not (run / "_parts").exists()
    manifest = yaml.safe_load((run / "manifest.json").read_text())
    assert manifest["status"] == {"decode_failed": 1, "download_failed": 2, "ok": 9}
    assert manifest["complete"] is True

    # Verified resume still trusts the rewritten shards: a plain rerun processes nothing.
    digests = {s: _digests(run, s) for s in range(3)}
    code, output = _invoke("run", str(config))
    assert code == 0, output
    assert "0 rows to process" in output and "redoing" not in output
    assert {s: _digests(run, s) for s in range(3)} == digests

    # An explicit status list: only decode_failed rows are retried now.
    code, output = _invoke("run", str(config), "--retry", "decode_failed")
    assert code == 0, output
    seen = [path for _, path in server.requests]
    assert seen.count("/html") == 2 and seen.count("/status/500") == 2
    final = {s: _samples(run, s) for s in range(3)}
    assert final[0] == after[0] and final[1] == after[1]
    assert [r for i, r in enumerate(final[2]) if i != 1] == [r for i, r in enumerate(after[2]) if i != 1]


def test_retry_refuses_an_unfinished_run(ray_session: str, server: LoopbackServer, tmp_path: Path) -> None:
    config = _config(tmp_path, PATHS[:8], server.port)
    code, output = _invoke("run", str(config), "--retry", "transient")
    assert code == 2
    assert "error: --retry:" in output and "not finished" in output and "Traceback" not in output
    assert not server.requests  # nothing was downloaded


def test_retry_rejects_a_bad_status_list(tmp_path: Path) -> None:
    config = _config(tmp_path, PATHS[:4], 9)
    for value, words in (("nope", "unknown status 'nope'"), ("ok", "ok rows are not retried"), (",", "give")):
        code, output = _invoke("run", str(config), "--retry", value)
        assert code == 2 and words in output, output


def test_retry_with_models_equals_a_clean_run(
    ray_session: str, server: LoopbackServer, tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    """Retried rows go through caption and filter like any row: after ``--retry transient`` the
    run directory holds what a run with a healthy server writes (rows, pairs, images)."""
    captioner, filter_ = tiny_models
    paths = ["good0.jpg", "flaky/1/good1.jpg", "good2.jpg", "good3.jpg", "good4.jpg", "flaky/1/good5.jpg"]
    config = _config(tmp_path, paths, server.port)
    data = yaml.safe_load(config.read_text())
    data["input"]["keep_cols"] = ["lang"]
    table = pq.read_table(tmp_path / "in.parquet")
    pq.write_table(
        table.append_column("lang", pa.array([f"l{i}" for i in range(table.num_rows)])),
        tmp_path / "in.parquet",
    )
    data["caption"] = {
        "model": str(captioner),
        "num_captions": 2,
        "max_length": 8,
        "min_length": 3,
        "batch_size": 8,
    }
    data["filter"] = {
        "model": str(filter_),
        "threshold": 0.5,
        "keep_synthetic": 1,
        "batch_size": 8,
        "itc_column": True,
    }
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    run, clean = tmp_path / "run", tmp_path / "clean"
    code, output = _invoke("run", str(config))
    assert code == 0, output
    assert [r["status"] for r in _samples(run, 0) + _samples(run, 1)].count("download_failed") == 2
    code, output = _invoke("run", str(config), "--retry", "transient")
    assert code == 0, output
    code, output = _invoke("run", str(config), "--set", f"output.dir={clean}")  # the server is healthy now
    assert code == 0, output
    for shard in (0, 1):
        _assert_close(_samples(run, shard), _samples(clean, shard))
        assert _samples(run, shard)[1]["synthetic_texts"]  # the retried row was captioned
        _assert_close(_dataset(run, shard), _dataset(clean, shard))
        assert _members(run, shard).keys() == _members(clean, shard).keys()
        for name, payload in _members(run, shard).items():
            if name.endswith(".jpg"):
                assert payload == _members(clean, shard)[name], name


def _assert_close(got: list[dict], want: list[dict]) -> None:
    """Equal rows, scores equal to float rounding (a model batch of other rows may pad differently)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            x, y = a[name], b[name]
            if isinstance(x, float) or (isinstance(x, list) and x and isinstance(x[0], float)):
                # NaN = not scored (e.g. the agreement of an image's only caption): equal when both are
                assert np.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True), (a["key"], name, x, y)
            else:
                assert x == y, (a["key"], name, x, y)
