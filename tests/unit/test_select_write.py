"""The select rule, the shard buffer and the shard writer (atomic commit, resume, one row per input)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipeline import assign_shards, finish_batch
from capfilt.stages import write
from capfilt.stages.select import object_array, select, select_table

NAN = math.nan


def scored_batch() -> dict[str, np.ndarray]:
    return {
        "status": object_array(["ok", "ok", "ok", "download_failed", "ok"]),
        "web_text": object_array(["a dog", "", None, "a cat", "  "]),
        "synthetic_texts": object_array([["x", "y", "z"], ["p", "q"], [], [], ["s"]]),
        "web_itm": np.array([0.5, NAN, NAN, 0.9, NAN]),
        "synthetic_itm": object_array([[0.2, 0.8, 0.8], [0.7, 0.9], [], [], [0.49999]]),
    }


# --------------------------------------------------------------------------- select


def test_select_keeps_texts_at_or_above_threshold_best_first() -> None:
    out = select(scored_batch(), threshold=0.5, keep_web=True, keep_synthetic=1)
    assert out["web_kept"].tolist() == [True, False, False, False, False]  # 0.5 >= 0.5; empty/NaN never
    # Ties (0.8, 0.8) go to the earlier caption; rows that are not ok keep nothing.
    assert list(out["synthetic_kept"]) == [[False, True, False], [False, True], [], [], [False]]


def test_select_keep_synthetic_and_keep_web_limits() -> None:
    batch = scored_batch()
    two = select(batch, threshold=0.5, keep_web=False, keep_synthetic=2)
    assert not two["web_kept"].any()
    assert list(two["synthetic_kept"])[:2] == [[False, True, True], [True, True]]
    none = select(batch, threshold=0.0, keep_web=True, keep_synthetic=0)
    assert all(not any(flags) for flags in none["synthetic_kept"])


def test_select_without_filter_keeps_web_and_first_captions() -> None:
    batch = scored_batch()
    del batch["web_itm"], batch["synthetic_itm"]
    out = select(batch, threshold=None, keep_web=True, keep_synthetic=2)
    assert out["web_kept"].tolist() == [True, False, False, False, False]
    assert list(out["synthetic_kept"]) == [[True, True, False], [True, True], [], [], [True]]


def test_select_table_rethresholds_stored_scores() -> None:
    batch = scored_batch()
    table = pa.table({k: list(v) if v.dtype == object else v for k, v in batch.items()})
    strict = select_table(table, threshold=0.85, keep_web=True, keep_synthetic=3)
    assert strict.column("web_kept").to_pylist() == [False] * 5
    assert strict.column("synthetic_kept").to_pylist() == [[False] * 3, [False, True], [], [], [False]]
    assert strict.column("web_itm").to_pylist()[0] == 0.5, "scores are kept, only flags change"


def test_finish_batch_types_columns_and_drops_pixels_even_when_stages_were_skipped() -> None:
    # Caption and filter skipped: no synthetic or score columns; every row failed but one.
    batch = {
        "key": object_array(["a", "b"]),
        "status": object_array(["ok", "download_failed"]),
        "error": object_array(["", "HTTP 404"]),
        "web_text": object_array(["a dog", None]),
        "image": object_array([b"\xff\xd8jpeg", b""]),
        "pixels_32": np.zeros((2, 32, 32, 3), dtype=np.uint8),
    }
    table = finish_batch(batch, threshold=None, keep_web=True, keep_synthetic=0, drop=["pixels_32"])
    assert "pixels_32" not in table.column_names
    assert table.column("web_kept").to_pylist() == [True, False]
    assert table.schema.field("synthetic_kept").type == pa.list_(pa.bool_())
    assert table.schema.field("image").type == pa.binary()
    # Captioned and filtered, but every list empty: still list<string>, not list<null>.
    batch["synthetic_texts"] = object_array([[], []])
    batch["synthetic_itm"] = object_array([[], []])
    batch["web_itm"] = np.array([0.2, NAN])
    table = finish_batch(batch, threshold=0.5, keep_web=True, keep_synthetic=1, drop=["pixels_32"])
    assert table.schema.field("synthetic_texts").type == pa.list_(pa.string())
    assert table.column("web_kept").to_pylist() == [False, False]


# --------------------------------------------------------------------------- shards


def shard_rows(rows: list[int], *, rows_per_shard: int = 4, ok: bool = True) -> pa.Table:
    """Pipeline-shaped rows for input rows ``rows``; every third row failed to download."""

    def good(r: int) -> bool:
        return ok and r % 3 != 2

    images = []
    for r in rows:
        buffer = io.BytesIO()
        if good(r):
            from PIL import Image

            Image.new("RGB", (8, 8), (r * 10 % 256, 0, 0)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    return pa.table(
        {
            "key": [f"{r:09d}" for r in rows],
            "url": [f"http://x/{r}.jpg" for r in rows],
            "web_text": [f"text {r}" for r in rows],
            "status": ["ok" if good(r) else "download_failed" for r in rows],
            "error": ["" if good(r) else "HTTP 500" for r in rows],
            "image": pa.array(images, type=pa.binary()),
            "synthetic_texts": [[f"syn {r} a", f"syn {r} b"] if good(r) else [] for r in rows],
            "web_itm": [0.9 if r % 2 == 0 and good(r) else (0.1 if good(r) else NAN) for r in rows],
            "synthetic_itm": [[0.6, 0.7] if good(r) else [] for r in rows],
            "web_kept": [r % 2 == 0 and good(r) for r in rows],
            "synthetic_kept": [[False, True] if good(r) else [] for r in rows],
            "width": [8 if good(r) else 0 for r in rows],
            "lang": [f"l{r}" for r in rows],
            write.ROW_COLUMN: pa.array(rows, type=pa.int64()),
            write.SHARD_COLUMN: pa.array([r // rows_per_shard for r in rows], type=pa.int64()),
        }
    )


def test_shard_buffer_commits_a_shard_once_all_its_rows_arrived_in_any_order() -> None:
    buffer = write.ShardBuffer(expected={0: 4, 1: 3})
    assert buffer.add(shard_rows([6, 1, 3])) == []
    assert buffer.pending == {1: 1, 0: 2}
    done = buffer.add(shard_rows([0, 5, 2]))
    assert [shard for shard, _ in done] == [0]
    assert done[0][1].column(write.ROW_COLUMN).to_pylist() == [0, 1, 2, 3]
    done = buffer.add(shard_rows([4]))
    assert [(s, t.column("key").to_pylist()) for s, t in done] == [
        (1, ["000000004", "000000005", "000000006"])
    ]
    assert buffer.expected == {}


def test_shard_buffer_refuses_more_rows_than_expected() -> None:
    buffer = write.ShardBuffer(expected={0: 2})
    with pytest.raises(RuntimeError, match="expected 2"):
        buffer.add(shard_rows([0, 1, 1]))
    with pytest.raises(RuntimeError, match="does not write"):
        write.ShardBuffer(expected={0: 2}).add(shard_rows([9]))


def test_write_shard_writes_one_sample_per_row_images_and_kept_pairs(tmp_path: Path) -> None:
    rows = shard_rows([7, 4, 6, 5])  # shard 1, out of order
    summary = write.write_shard(tmp_path, 1, rows, keep_cols=["lang"])
    samples = pq.read_table(write.samples_path(tmp_path, 1))
    assert samples.column_names[:10] == write.SAMPLE_SCHEMA.names
    assert samples.column("key").to_pylist() == ["000000004", "000000005", "000000006", "000000007"]
    assert samples.column("lang").to_pylist() == ["l4", "l5", "l6", "l7"]
    assert samples.schema.field("synthetic_itm").type == pa.list_(pa.float64())
    assert write.ROW_COLUMN not in samples.column_names and "image" not in samples.column_names
    # Images: ok rows 4, 6, 7 (5 failed), each as KEY.jpg + KEY.json, bytes unchanged.
    with tarfile.open(write.images_path(tmp_path, 1)) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000004.json").read())
        image = tar.extractfile("000000004.jpg").read()
    assert names == [f"00000000{r}.{ext}" for r in (4, 6, 7) for ext in ("jpg", "json")]
    assert image == rows.column("image")[1].as_py()
    assert meta["url"] == "http://x/4.jpg" and meta["caption"] == "text 4" and meta["width"] == 8
    # Kept pairs: the web text of even ok rows and the second synthetic caption of each ok row.
    dataset = pq.read_table(write.dataset_path(tmp_path, 1)).to_pylist()
    assert [(d["key"][-1], d["source"], d["text"]) for d in dataset] == [
        ("4", "web", "text 4"), ("4", "synthetic", "syn 4 b"), ("6", "web", "text 6"),
        ("6", "synthetic", "syn 6 b"), ("7", "synthetic", "syn 7 b"),
    ]  # fmt: skip
    assert dataset[1]["itm"] == 0.7 and dataset[0]["image_tar"] == "images/shard-00001.tar"
    assert dataset[0]["image_member"] == "000000004.jpg" and dataset[0]["shard"] == 1
    assert summary == write.ShardSummary(shard=1, rows=4, images=3, pairs=5)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    with_images = write.read_dataset(tmp_path, with_images=True)
    assert with_images.column("image")[0].as_py() == image


def test_write_shard_handles_a_shard_where_every_row_failed(tmp_path: Path) -> None:
    rows = shard_rows([0, 1], ok=False).drop_columns(["synthetic_texts", "synthetic_itm", "synthetic_kept"])
    rows = rows.append_column("synthetic_texts", pa.array([[], []], type=pa.list_(pa.null())))
    write.write_shard(tmp_path, 0, rows)
    samples = pq.read_table(write.samples_path(tmp_path, 0))
    assert samples.column("synthetic_texts").type == pa.list_(pa.string())
    assert samples.column("synthetic_kept").to_pylist() == [[], []]
    assert pq.read_table(write.dataset_path(tmp_path, 0)).num_rows == 0
    with tarfile.open(write.images_path(tmp_path, 0)) as tar:
        assert tar.getnames() == []


def test_a_crash_before_the_samples_file_leaves_the_shard_uncommitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write.write_shard(tmp_path, 0, shard_rows([0, 1, 2, 3]))
    real_write_table = pq.write_table

    def dies_on_samples(table: pa.Table, where: Path, *args, **kwargs) -> None:
        if Path(where).parent.name == write.SAMPLES_DIR:
            Path(where).write_bytes(b"half a parq")  # what a kill mid-write leaves behind
            raise KeyboardInterrupt("killed")
        real_write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", dies_on_samples)
    with pytest.raises(KeyboardInterrupt):
        write.write_shard(tmp_path, 1, shard_rows([4, 5, 6, 7]))
    monkeypatch.setattr(pq, "write_table", real_write_table)
    assert write.committed_shards(tmp_path) == {0}
    assert write.images_path(tmp_path, 1).exists() and write.dataset_path(tmp_path, 1).exists()
    removed = {p.name for p in write.clean_partial(tmp_path)}
    assert removed == {"shard-00001.tar", "shard-00001.parquet", ".shard-00001.parquet.tmp"}
    assert write.committed_shards(tmp_path) == {0} and write.images_path(tmp_path, 0).exists()
    assert write.summarize(tmp_path) == {
        "rows": 4, "shards": 1, "status": {"download_failed": 1, "ok": 3}, "kept": {"web": 1, "synthetic": 3},
    }  # fmt: skip


def test_assign_shards_is_stable_and_skips_committed_shards() -> None:
    table = pa.table({"key": [str(i) for i in range(10)]})
    todo, expected = assign_shards(table, 4, set())
    assert expected == {0: 4, 1: 4, 2: 2}
    assert todo.column(write.SHARD_COLUMN).to_pylist() == [0] * 4 + [1] * 4 + [2] * 2
    resumed, expected = assign_shards(table, 4, {0, 2})
    assert expected == {1: 4}
    assert resumed.column("key").to_pylist() == ["4", "5", "6", "7"]
    assert resumed.column(write.ROW_COLUMN).to_pylist() == [4, 5, 6, 7]
    _, nothing = assign_shards(table, 4, {0, 1, 2})
    assert nothing == {}
