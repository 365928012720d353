"""The select rule, part files, the shard commit (atomic, idempotent, resume) and one row per input."""

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

from capfilt.errors import UserError
from capfilt.pipeline import finish_batch, shard_sizes
from capfilt.rundir import RunDir, shard_number
from capfilt.rundir.read import kept_texts, scan_images_tar
from capfilt.stages import write
from capfilt.stages.select import Selection, object_array, select, select_table

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


def test_itc_weight_mixes_itc_into_the_score_that_passes_and_ranks() -> None:
    batch = scored_batch()
    batch["web_itc"] = np.array([0.1, NAN, NAN, 0.9, NAN])
    batch["synthetic_itc"] = object_array([[0.9, 0.1, 0.3], [0.2, NAN], [], [], [0.6]])
    out = select(batch, threshold=0.5, keep_web=True, keep_synthetic=1, itc_weight=0.5)
    # web: (0.5 + 0.1) / 2 = 0.3 < 0.5, removed although its ITM alone passes.
    assert out["web_kept"].tolist() == [False, False, False, False, False]
    # Row 0: scores 0.55, 0.45, 0.55 -> "x" (ITM 0.2 alone would fail) ties "z" and comes first.
    # Row 1: 0.45 and NaN (ITC not scored) -> nothing; row 4: (0.49999 + 0.6) / 2 passes.
    assert list(out["synthetic_kept"]) == [[True, False, False], [False, False], [], [], [True]]
    # The same rule from stored scores, and weight 0 is BLIP's ITM rule whatever ITC says.
    table = pa.table({k: list(v) if v.dtype == object else v for k, v in batch.items()})
    again = select_table(table, threshold=0.5, keep_web=True, keep_synthetic=1, itc_weight=0.5)
    assert again.column("synthetic_kept").to_pylist() == list(out["synthetic_kept"])
    itm_only = select(batch, threshold=0.5, keep_web=True, keep_synthetic=1, itc_weight=0.0)
    assert itm_only["web_kept"].tolist() == [True, False, False, False, False]


def test_itc_weight_without_itc_scores_is_an_error_not_an_empty_dataset() -> None:
    with pytest.raises(ValueError, match="no ITC scores"):
        select(scored_batch(), threshold=0.5, itc_weight=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        select(scored_batch(), threshold=0.5, itc_weight=1.5)
    # Without a filter (captioner only) there is no score to mix: no error.
    out = select(scored_batch(), threshold=None, keep_synthetic=1, itc_weight=0.5)
    assert out["web_kept"].tolist() == [True, False, False, False, False]


def test_min_agreement_holds_synthetic_captions_to_their_agreement_not_the_web_text() -> None:
    batch = scored_batch()
    batch["synthetic_agreement"] = object_array([[0.9, 0.4, 0.95], [0.6, 0.61], [], [], [NAN]])
    out = select(batch, threshold=0.5, keep_web=True, keep_synthetic=1, min_agreement=0.6)
    assert out["web_kept"].tolist() == [True, False, False, False, False]  # the web text: ITM only
    # Row 0: "y" (ITM 0.8) disagrees (0.4), "z" (0.8, agrees 0.95) is kept; "x" agrees but ITM 0.2.
    # Row 1: "p" agrees at 0.6 (>= is enough) but "q" has the better ITM. Row 4: NaN never passes.
    assert list(out["synthetic_kept"]) == [[False, False, True], [False, True], [], [], [False]]
    strict = select(batch, threshold=0.5, keep_web=True, keep_synthetic=2, min_agreement=0.605)
    assert list(strict["synthetic_kept"])[:2] == [[False, False, True], [False, True]]


def test_rank_by_agreement_keeps_the_consensus_caption() -> None:
    batch = scored_batch()
    batch["synthetic_agreement"] = object_array([[0.9, 0.4, 0.95], [0.7, 0.6], [], [], [0.5]])
    out = select(batch, threshold=0.5, keep_web=True, keep_synthetic=1, rank_by="agreement")
    # Row 0: of the captions passing ITM ("y", "z"), "z" agrees most; row 1: "p" (0.7 > 0.6).
    assert list(out["synthetic_kept"]) == [[False, False, True], [True, False], [], [], [False]]
    with pytest.raises(ValueError, match="top_n"):
        select(batch, threshold=0.5, rank_by="agreement", top_n=2)
    # Without the column every caption is unscored: agreement then keeps nothing.
    del batch["synthetic_agreement"]
    none = select(batch, threshold=0.5, keep_synthetic=1, min_agreement=0.0)
    assert all(not any(flags) for flags in none["synthetic_kept"])


def test_select_table_reapplies_min_agreement_to_stored_scores() -> None:
    batch = scored_batch()
    batch["synthetic_agreement"] = object_array([[0.9, 0.4, 0.95], [0.6, 0.61], [], [], [NAN]])
    table = pa.table({k: list(v) if v.dtype == object else v for k, v in batch.items()})
    rule = Selection(threshold=0.5, keep_synthetic=1, min_agreement=0.6)
    assert rule.apply(table).column("synthetic_kept").to_pylist() == [[False, False, True], [False, True], [], [], [False]]
    assert select_table(table, threshold=0.5, keep_synthetic=1).column("synthetic_kept").to_pylist()[0] == [
        False, True, False,
    ]  # fmt: skip


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


def test_selection_value_applies_the_same_rule_as_select_table() -> None:
    batch = scored_batch()
    table = pa.table({k: list(v) if v.dtype == object else v for k, v in batch.items()})
    rule = Selection(threshold=0.5, keep_web=False, keep_synthetic=2)
    assert rule.options() == {
        "threshold": 0.5,
        "keep_web": False,
        "keep_synthetic": 2,
        "clip_threshold": None,
        "rank_by": "itm",
        "top_n": None,
        "min_agreement": None,
        "itc_weight": 0.0,
    }
    applied = rule.apply(table)
    direct = select_table(table, threshold=0.5, keep_web=False, keep_synthetic=2)
    for name in ("web_kept", "synthetic_kept"):
        assert applied.column(name).equals(direct.column(name))
    assert applied.column("synthetic_kept").to_pylist()[:2] == [[False, True, True], [True, True]]


def test_kept_texts_expands_the_flags_web_first_then_caption_order() -> None:
    table = pa.table(
        {
            "key": ["a", "b", "c"],
            "web_text": ["a dog", "a cat", "x"],
            "web_itm": [0.9, None, 0.1],
            "web_kept": [True, False, False],
            "synthetic_texts": [["s0", "s1", "s2"], ["t0"], []],
            "synthetic_itm": [[0.1, 0.8, 0.7], [], []],
            "synthetic_kept": [[False, True, True], [True], []],
        }
    )
    got = list(kept_texts(table))
    assert got[:3] == [
        ("a", "a dog", "web", 0.9),
        ("a", "s1", "synthetic", 0.8),
        ("a", "s2", "synthetic", 0.7),
    ]
    key, text, source, itm = got[3]
    assert (key, text, source) == ("b", "t0", "synthetic") and math.isnan(itm)  # not scored: NaN
    assert len(got) == 4


def test_shard_number_reads_every_shard_name() -> None:
    assert shard_number("shard-00007.parquet") == 7
    assert shard_number("shard-00007.tar") is None
    assert shard_number("shard-00007.tar", suffix=".tar") == 7
    assert shard_number("shard-00007", suffix="") == 7
    assert shard_number("shard-00007") is None
    assert shard_number("shard-123456.x.tmp", suffix=None) == 123456
    assert shard_number("shard-0007.parquet") is None  # fewer than five digits
    assert shard_number(".shard-00007.parquet.tmp", suffix=None) is None


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


def test_write_parts_splits_a_block_by_shard_with_deterministic_names(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    block = shard_rows([6, 1, 3, 0])
    summary = write.write_parts(block, run=run)
    assert summary.schema == write.PART_SUMMARY_SCHEMA and "image" not in summary.column_names
    assert summary.column("shard").to_pylist() == [0, 1] and summary.column("rows").to_pylist() == [3, 1]
    first, second = summary.column("part").to_pylist()
    assert first.startswith(str(tmp_path / write.PARTS_DIR / "shard-00000" / "part-000000000000-3-"))
    assert pq.read_table(first).column(write.ROW_COLUMN).to_pylist() == [0, 1, 3]
    assert pq.read_table(second).column("image").to_pylist() == block.column("image").to_pylist()[:1]
    again = write.write_parts(block.take([3, 2, 1, 0]), run=run)  # a retried task, rows reordered
    assert again.column("part").to_pylist() == [first, second], "same rows, same part names"
    assert sorted(p.name for p in (tmp_path / write.PARTS_DIR).rglob("*")) == sorted(
        ["shard-00000", "shard-00001", Path(first).name, Path(second).name]
    )


def test_commit_shard_from_parts_equals_writing_the_shard_at_once(tmp_path: Path) -> None:
    a, b = RunDir(tmp_path / "a"), tmp_path / "b"
    parts = [
        *write.write_parts(shard_rows([5, 7]), run=a).column("part").to_pylist(),
        *write.write_parts(shard_rows([4, 5, 6]), run=a).column("part").to_pylist(),  # row 5 twice
    ]
    summary = write.commit_shard(a, 1, parts, expected=4, keep_cols=["lang"])
    write.write_shard(b, 1, shard_rows([4, 5, 6, 7]), keep_cols=["lang"])
    for kind in (write.IMAGES_DIR, write.DATASET_DIR, write.SAMPLES_DIR):
        name = f"shard-00001.{'tar' if kind == write.IMAGES_DIR else 'parquet'}"
        assert (tmp_path / "a" / kind / name).read_bytes() == (b / kind / name).read_bytes(), kind
    assert summary == {
        "shard": 1, "images": 3, "pairs": 5, "rows": 4, "status": {"ok": 3, "download_failed": 1},
        "kept": {"web": 2, "synthetic": 3},
    }  # fmt: skip
    assert not [p for p in (tmp_path / "a").rglob("*") if p.is_file() and write.PARTS_DIR in p.parts]
    # A retry after the commit (parts already deleted) reports the same counts, rewrites nothing.
    mtime = write.samples_path(tmp_path / "a", 1).stat().st_mtime_ns
    retry = write.commit_shard(a, 1, parts, expected=4, keep_cols=["lang"])
    assert {k: retry[k] for k in ("rows", "status", "kept")} == {
        k: summary[k] for k in ("rows", "status", "kept")
    }
    assert write.samples_path(tmp_path / "a", 1).stat().st_mtime_ns == mtime


def test_commit_shard_refuses_missing_rows_and_duplicate_keys(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    parts = write.write_parts(shard_rows([0, 1, 2]), run=run).column("part").to_pylist()
    with pytest.raises(RuntimeError, match="3 rows in its parts, expected 4"):
        write.commit_shard(run, 0, parts, expected=4)
    assert write.committed_shards(tmp_path) == set()
    rows = shard_rows([4, 5]).set_column(0, "key", pa.array(["same", "same"]))
    parts = write.write_parts(rows, run=run).column("part").to_pylist()
    with pytest.raises(UserError, match="key 'same' occurs 2 times in shard 1"):
        write.commit_shard(run, 1, parts, expected=2)


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


def test_scan_images_tar_reads_images_only_some_or_headers_only(tmp_path: Path) -> None:
    rows = pa.table(
        {
            "key": ["a", "b", "c"],
            "url": ["u"] * 3,
            "web_text": ["t"] * 3,
            "status": ["ok", "ok", "download_failed"],
            "error": ["", "", "HTTP 404"],
            "image": [b"AAAA", b"BB", b""],
        }
    )
    write.write_shard(tmp_path, 0, rows)
    tar = write.images_path(tmp_path, 0)
    assert list(scan_images_tar(tar)) == [("a.jpg", 4, b"AAAA"), ("b.jpg", 2, b"BB")]  # no json sidecars
    with open(tar, "rb") as stream:
        assert list(scan_images_tar(stream, members={"b.jpg"})) == [("b.jpg", 2, b"BB")]
    assert list(scan_images_tar(tar, read=False)) == [("a.jpg", 4, None), ("b.jpg", 2, None)]


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
    stale_part = write.write_parts(shard_rows([8]), run=RunDir(tmp_path)).column("part").to_pylist()[0]
    real_write_table = pq.write_table

    def dies_on_samples(table: pa.Table, where, *args, **kwargs) -> None:
        if Path(getattr(where, "name", "")).parent.name == write.SAMPLES_DIR:
            where.write(b"half a parq")  # what a kill mid-write leaves behind
            where.flush()
            raise KeyboardInterrupt("killed")
        real_write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", dies_on_samples)
    monkeypatch.setattr("capfilt.rundir.atomic_write", _atomic_write_without_cleanup)
    with pytest.raises(KeyboardInterrupt):
        write.write_shard(tmp_path, 1, shard_rows([4, 5, 6, 7]))
    monkeypatch.undo()
    assert write.committed_shards(tmp_path) == {0}
    assert write.images_path(tmp_path, 1).exists() and write.dataset_path(tmp_path, 1).exists()
    removed = {p.name for p in write.clean_partial(tmp_path)}
    assert removed == {
        "shard-00001.tar",
        "shard-00001.parquet",
        ".shard-00001.parquet.tmp",
        Path(stale_part).name,
    }
    assert write.committed_shards(tmp_path) == {0} and write.images_path(tmp_path, 0).exists()
    assert not (tmp_path / write.PARTS_DIR).exists()
    assert write.summarize(tmp_path) == {
        "rows": 4, "shards": 1, "status": {"download_failed": 1, "ok": 3}, "kept": {"web": 1, "synthetic": 3},
    }  # fmt: skip


def _atomic_write_without_cleanup(path, write_fn):
    """atomic_write as a SIGKILL sees it: the temporary file stays when the process dies."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    with open(tmp, "wb") as stream:
        result = write_fn(stream)
    import os

    os.replace(tmp, final)
    return result


def test_atomic_write_removes_its_temporary_file_on_failure(tmp_path: Path) -> None:
    from capfilt.rundir import atomic_write

    def fails(stream) -> None:
        stream.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x" / "a.bin", fails)
    assert list((tmp_path / "x").iterdir()) == []
    atomic_write(tmp_path / "x" / "a.bin", lambda stream: stream.write(b"whole"))
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["a.bin"]


def test_shard_sizes_cover_every_row_and_skip_committed_shards() -> None:
    assert shard_sizes(10, 4, set()) == {0: 4, 1: 4, 2: 2}
    assert shard_sizes(10, 4, {0, 2}) == {1: 4}
    assert shard_sizes(10, 4, {0, 1, 2}) == {}
    assert shard_sizes(0, 4, set()) == {}


# --------------------------------------------------------------------------- verified resume


def test_verify_shard_finds_each_kind_of_damage(tmp_path: Path) -> None:
    from capfilt import rundir

    run = RunDir(tmp_path)

    def fresh() -> None:
        write.write_shard(tmp_path, 0, shard_rows([0, 1, 2, 3]))

    fresh()
    assert rundir.verify_shard(run, 0, 4) is None
    recorded = rundir.shard_meta(run, 0)[1]
    assert recorded["rows"] == 4 and len(recorded["images_sha256"]) == 64
    assert "3 rows" not in (rundir.verify_shard(run, 0, 3) or "") and "4 rows" in rundir.verify_shard(
        run, 0, 3
    )
    tar = write.images_path(tmp_path, 0)
    tar.write_bytes(tar.read_bytes()[:-1024])  # truncated
    assert "images/shard-00000.tar does not match its recorded sha256" in rundir.verify_shard(run, 0, 4)
    fresh()
    write.dataset_path(tmp_path, 0).unlink()
    assert rundir.verify_shard(run, 0, 4) == "dataset/shard-00000.parquet is missing"
    fresh()
    write.samples_path(tmp_path, 0).write_bytes(b"not parquet")
    assert rundir.verify_shard(run, 0, 4).startswith("samples file unreadable")
    rundir.remove_shard(run, 0)
    assert write.committed_shards(tmp_path) == set() and not write.images_path(tmp_path, 0).exists()


def test_input_fingerprint_adds_up_over_read_units(tmp_path: Path) -> None:
    from capfilt import rundir
    from capfilt.config import InputConfig
    from capfilt.stages.read import fingerprint_unit, plan_input, read_unit

    pq.write_table(pa.table({"URL": [f"http://x/{i}" for i in range(7)], "TEXT": list("abcdefg")}),
                   tmp_path / "a.parquet", row_group_size=2)  # fmt: skip
    config = InputConfig(path=str(tmp_path / "a.parquet"))
    import capfilt.stages.read as read

    old, read.UNIT_ROWS = read.UNIT_ROWS, 2
    try:
        plan = plan_input(config, rows_per_shard=3)
        done_plan = plan.with_done({0, 1}, 3, keep_done=True)
        sums: dict[int, list[int]] = {}
        for unit in done_plan.units:
            for shard, (n, term) in fingerprint_unit(unit, config, rows_per_shard=3).items():
                entry = sums.setdefault(shard, [0, 0])
                entry[0] += n
                entry[1] = (entry[1] + term) % 2**64
        rows = pa.concat_tables([read_unit(u, config, rows_per_shard=3) for u in plan.units])
        todo = plan.with_done({0, 1}, 3).units
    finally:
        read.UNIT_ROWS = old
    assert len(done_plan.units) == 4 and [(u.start, u.skip_shards) for u in todo] == [(6, ())]
    for shard in (0, 1):
        mine = rows.filter(pa.compute.equal(rows.column(write.SHARD_COLUMN), shard))
        assert sums[shard] == [3, int(rundir.input_fingerprint(mine), 16)]
    changed = rows.set_column(2, "web_text", pa.array(["z"] * rows.num_rows))
    assert rundir.input_fingerprint(changed) != rundir.input_fingerprint(rows)


def test_resuming_with_other_model_weights_is_refused(tmp_path: Path) -> None:
    from capfilt.config import PipelineConfig
    from capfilt.pipeline import _check_models

    model = tmp_path / "captioner"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights v1")
    cfg = PipelineConfig(
        input={"path": "x.parquet"}, caption={"model": str(model)}, output={"dir": str(tmp_path)}
    )
    run = RunDir(tmp_path / "run")
    _check_models(run, cfg, resuming=False)
    _check_models(run, cfg, resuming=True)  # same weights: fine
    (model / "model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(UserError, match=r"^caption.model: the weights of .*captioner changed since shards"):
        _check_models(run, cfg, resuming=True)
