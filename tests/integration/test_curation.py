"""`capfilt run` with the curation options: CLIP scoring + BLIP-2 ranking, and run-wide dedup.

Both runs go through the real CLI against the loopback server and join the test run's Ray session.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support import save_tiny_clip, scene
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.serve import LoopbackServer
from capfilt.stages import write
from capfilt.stages.select import select_table

pytestmark = pytest.mark.integration

THRESHOLD = 0.5


def run_cli(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return Path(config["output"]["dir"])


def input_file(path: Path, urls: list[str], texts: list[str | None]) -> str:
    pq.write_table(pa.table({"URL": pa.array(urls, pa.string()), "TEXT": pa.array(texts, pa.string())}), path)
    return str(path)


def samples(run_dir: Path) -> list[dict]:
    return write.read_samples(run_dir).to_pylist()


# --------------------------------------------------------------------------- CLIP + BLIP-2 ranking


@pytest.fixture(scope="module")
def clip_run(
    ray_session: str,
    image_dir: Path,
    tiny_models: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    root = tmp_path_factory.mktemp("clip-run")
    clip = save_tiny_clip(root / "clip", seed=3)
    captioner, filter_ = tiny_models
    texts = ["a red circle", None, "blue square on the left", "small yellow star", "big green triangle"]
    with LoopbackServer(directory=image_dir) as server:
        urls = [f"{server.url}/good{i}.jpg" for i in range(5)] + [f"{server.url}/status/404"]
        config = {
            "input": {"path": input_file(root / "urls.parquet", urls, [*texts, "missing"])},
            "download": {
                "image_size": 32,
                "threads": 2,
                "timeout_s": 5,
                "retries": 0,
                "allowed_hosts": ["127.0.0.1"],
            },
            "caption": {"model": str(captioner), "num_captions": 3, "max_length": 10, "min_length": 3},
            "filter": {"model": str(filter_), "threshold": THRESHOLD, "keep_synthetic": 3},
            "clip": {"model": str(clip), "batch_size": 4},
            "select": {"rank_by": "clip", "top_n": 2},
            "output": {"dir": str(root / "run"), "rows_per_shard": 4},
        }
        return run_cli(config, root / "capfilt.yaml")


def test_clip_scores_are_stored_for_every_text_of_every_ok_row(clip_run: Path) -> None:
    rows = samples(clip_run)
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["download_failed"]
    for row in rows[:5]:
        assert len(row["synthetic_clip"]) == len(row["synthetic_texts"]) == len(row["synthetic_itm"]) >= 1
        assert all(-1.0 <= v <= 1.0 for v in row["synthetic_clip"])
        if row["web_text"]:
            assert -1.0 <= row["web_clip"] <= 1.0
        else:
            assert math.isnan(row["web_clip"])
    assert rows[5]["synthetic_clip"] == [] and math.isnan(rows[5]["web_clip"])
    manifest = json.loads((clip_run / "manifest.json").read_text())
    assert manifest["models"]["clip"] == [str(clip_run.parent / "clip")]
    assert sum(manifest["status"].values()) == 6
    download = manifest["download"]
    assert (
        download["rows"] == 6 and download["downloaded"] == 5 and download["success_rate"] == round(5 / 6, 4)
    )
    assert download["domains"]["top"][0]["domain"] == "127.0.0.1"
    assert download["domains"]["top"][0]["status"] == {"download_failed": 1, "ok": 5}
    assert download["bytes"]["images"] == 5 and download["bytes"]["total"] > 0
    assert manifest["timing"]["images_per_s"] > 0 and manifest["dedup"] is None


def test_kept_texts_are_the_two_best_by_clip_among_those_passing_itm(clip_run: Path) -> None:
    rows = samples(clip_run)
    assert any(sum(r["synthetic_kept"]) + r["web_kept"] > 0 for r in rows), "the run should keep something"
    for row in rows:
        candidates = []  # (clip, tie order, name) of every text that passes the ITM threshold
        if row["status"] == "ok" and row["web_text"] and row["web_itm"] >= THRESHOLD:
            candidates.append((-row["web_clip"], -1, "web"))
        for j, (itm, clip) in enumerate(zip(row["synthetic_itm"], row["synthetic_clip"], strict=True)):
            if itm >= THRESHOLD:
                candidates.append((-clip, j, j))
        expected = {name for _, _, name in sorted(candidates)[:2]}
        kept = ({"web"} if row["web_kept"] else set()) | {j for j, k in enumerate(row["synthetic_kept"]) if k}
        assert kept == expected, row["key"]
    # The stored scores re-apply to the same flags (what a user re-ranking afterwards gets).
    table = write.read_samples(clip_run)
    again = select_table(table, threshold=THRESHOLD, keep_synthetic=3, rank_by="clip", top_n=2)
    assert again.column("synthetic_kept").to_pylist() == table.column("synthetic_kept").to_pylist()
    pairs = write.read_dataset(clip_run)
    assert pairs.num_rows == sum(r["web_kept"] + sum(r["synthetic_kept"]) for r in rows)


# --------------------------------------------------------------------------- dedup


def _jpeg(image, **options) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dedup_www(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("dedup-www")
    for s in range(5):
        (root / f"scene{s}.jpg").write_bytes(_jpeg(scene(s), quality=95))
    (root / "copy0.jpg").write_bytes((root / "scene0.jpg").read_bytes())  # same bytes, other URL
    (root / "reenc1.jpg").write_bytes(_jpeg(scene(1), quality=40))  # re-encoded
    small = io.BytesIO()
    scene(2).resize((160, 120)).save(small, "PNG")  # resized, other format
    (root / "small2.png").write_bytes(small.getvalue())
    with LoopbackServer(directory=root) as server:
        yield server.url


# (path, expected duplicate_of as a row index or None); 3 rows per shard, so every copy is in
# another shard than the row it duplicates.
DEDUP_ROWS: list[tuple[str, int | None]] = [
    ("/scene0.jpg", None),
    ("/scene1.jpg", None),
    ("/scene2.jpg", None),
    ("/copy0.jpg", 0),  # sha256
    ("/scene3.jpg", None),
    ("/reenc1.jpg", 1),  # phash
    ("/small2.png", 2),  # phash
    ("/scene3.jpg", 4),  # url
    ("/scene4.jpg", None),
    ("/status/404", None),
    ("/status/404", None),  # a failed row is never a duplicate nor an original
]


def dedup_config(url: str, root: Path, **dedup: object) -> dict:
    urls = [url + path for path, _ in DEDUP_ROWS]
    return {
        "input": {"path": input_file(root / "urls.parquet", urls, [f"text {i}" for i in range(len(urls))])},
        "download": {
            "image_size": 64,
            "threads": 2,
            "timeout_s": 5,
            "retries": 0,
            "allowed_hosts": ["127.0.0.1"],
        },
        "dedup": {"enabled": True, **dedup},
        "output": {"dir": str(root / "run"), "rows_per_shard": 3},
    }


@pytest.fixture(scope="module")
def dedup_run(ray_session: str, dedup_www: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dedup-run")
    return run_cli(dedup_config(dedup_www, root), root / "capfilt.yaml")


def test_exact_and_near_duplicates_across_shards_are_marked_with_the_smallest_key(dedup_run: Path) -> None:
    rows = samples(dedup_run)
    assert len(rows) == len(DEDUP_ROWS), "duplicates stay in samples/"
    keys = [r["key"] for r in rows]
    expected = [None if original is None else keys[original] for _, original in DEDUP_ROWS]
    assert [r["duplicate_of"] for r in rows] == expected
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(len(r["phash"]) == 16 for r in ok)
    assert all(r["phash"] == "" for r in rows if r["status"] != "ok")
    state = json.loads((dedup_run / "dedup.json").read_text())
    assert state["duplicates"] == 4 and state["groups"] == 4
    assert state["shards"] == [0, 1, 2, 3]


def test_duplicates_are_left_out_of_the_dataset(dedup_run: Path) -> None:
    rows = samples(dedup_run)
    kept_keys = sorted(write.read_dataset(dedup_run).column("key").to_pylist())
    assert kept_keys == sorted(r["key"] for r in rows if r["status"] == "ok" and r["duplicate_of"] is None)
    manifest = json.loads((dedup_run / "manifest.json").read_text())
    assert manifest["kept"]["web"] == len(kept_keys) == 5
    assert manifest["dedup"]["duplicates"] == 4


def test_dedup_resumes_after_a_crash_mid_pass_to_identical_files(dedup_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(dedup_run, copy)
    files = sorted(p for sub in ("samples", "dataset") for p in (copy / sub).glob("*.parquet"))
    reference = {p.relative_to(copy): p.read_bytes() for p in files}
    # As if the pass died before marking shard 2 and before writing dedup.json.
    (copy / "dedup.json").unlink()
    shard2 = pq.read_table(write.samples_path(copy, 2)).drop_columns(["duplicate_of"])
    pq.write_table(shard2, write.samples_path(copy, 2))
    pq.write_table(write.dataset_table(shard2, shard=2), write.dataset_path(copy, 2))
    config = yaml.safe_load((dedup_run / "config.yaml").read_text())
    config["output"]["dir"] = str(copy)
    run_cli(config, tmp_path / "capfilt.yaml")
    assert {p.relative_to(copy): p.read_bytes() for p in files} == reference
    assert (copy / "dedup.json").read_text() == (dedup_run / "dedup.json").read_text()
    # And a rerun of the finished run touches nothing.
    before = {p: p.stat().st_mtime_ns for p in files}
    run_cli(config, tmp_path / "capfilt.yaml")
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_exact_only_dedup_leaves_near_duplicates(ray_session: str, dedup_www: str, tmp_path: Path) -> None:
    run = run_cli(dedup_config(dedup_www, tmp_path, near_distance=None), tmp_path / "capfilt.yaml")
    rows = samples(run)
    keys = [r["key"] for r in rows]
    assert [r["duplicate_of"] for r in rows] == [
        None,
        None,
        None,
        keys[0],
        None,
        None,
        None,
        keys[4],
        None,
        None,
        None,
    ]
    assert "phash" not in rows[0]


def test_marked_shards_keep_a_record_that_verified_resume_accepts(dedup_run: Path) -> None:
    """Dedup rewrites dataset/ and samples/ after the commit: the commit's checksums follow, so a
    resume does not take the marked shards for damaged ones and redo them."""
    from capfilt.rundir import RunDir, shard_meta, verify_shard

    run = RunDir(dedup_run)
    marked = [
        s
        for s in sorted(run.committed_shards())
        if "duplicate_of" in pq.read_schema(write.samples_path(dedup_run, s)).names
    ]
    assert marked, "the fixture run marks duplicates"
    for shard in sorted(run.committed_shards()):
        rows, record = shard_meta(run, shard)
        assert "dataset_sha256" in record
        assert verify_shard(run, shard, rows) is None, shard
