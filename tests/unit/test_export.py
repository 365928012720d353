"""capfilt export: a hand-built run directory exported to webdataset, parquet and jsonl.

The fixture writes a run directory the way the README's "Run directory" section specifies (pyarrow for
the parquet files, webdataset's TarWriter for the image shards), independently of the
pipeline, so these tests check the export against the contract rather than against
whatever the pipeline happens to write. The builders live in ``tests/support.py``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from support import THRESHOLD, make_bootstrap, make_run

from capfilt.errors import UserError
from capfilt.export import EXPORT_SCHEMA, export
from capfilt.rundir.read import collect_stats, resolve_run
from capfilt.stages.select import Selection


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path / "run"
    return run_dir, make_run(run_dir)


def _total(kept: dict[str, int]) -> int:
    return sum(kept.values())


# --------------------------------------------------------------------------- the fixture itself


def test_fixture_is_realistic(run: tuple[Path, dict[str, Any]]) -> None:
    """Guard: the fixture must exercise failures, kept and removed texts of both sources."""
    run_dir, info = run
    assert set(info["status"]) >= {"ok", "download_failed", "invalid_url", "decode_failed"}
    assert info["kept"]["web"] > 0 and info["kept"]["synthetic"] > 0
    ok = [s for s in info["samples"] if s["status"] == "ok"]
    assert any(not s["web_kept"] and not math.isnan(s["web_itm"]) for s in ok)  # a removed web text
    assert any(s["web_kept"] and any(s["synthetic_kept"]) for s in ok)  # an image with several kept texts
    assert any(not s["web_kept"] and not any(s["synthetic_kept"]) for s in ok)  # nothing kept
    stats = collect_stats(resolve_run(run_dir))
    assert stats.rows == info["rows"] and stats.kept == dict(sorted(info["kept"].items()))
    assert stats.status == info["status"]


# --------------------------------------------------------------------------- webdataset


def test_webdataset_export_reads_back_like_open_clip(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, info = run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out = tmp_path / "wds"
    summary = export(run_dir, out, format="webdataset")
    assert summary["pairs"] == _total(manifest["kept"]) == len(info["pairs"])
    assert summary["by_source"] == dict(sorted(info["kept"].items()))
    assert summary["images"] == len({p["key"] for p in info["pairs"]})
    urls = sorted(str(p) for p in out.glob("*.tar"))
    assert [Path(u).name for u in urls] == summary["files"] == ["00000.tar"]

    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    samples = list(ds)
    assert len(samples) == len(info["pairs"])
    expected = {(p["key"], p["text"]): p for p in info["pairs"]}
    by_url = {s["key"]: s["url"] for s in info["samples"]}
    seen = set()
    for sample_key, image, text, meta in samples:
        assert isinstance(image, Image.Image) and image.size == (64, 48)
        assert isinstance(text, str)
        pair = expected[(meta["key"], text)]
        assert meta["source"] == pair["source"] and meta["itm"] == pytest.approx(pair["itm"])
        assert meta["url"] == by_url[meta["key"]]
        assert sample_key.startswith(meta["key"] + "_") and "." not in sample_key
        seen.add((meta["key"], text))
    assert seen == set(expected)

    # An image with several kept texts becomes several samples with the same image bytes.
    multi = Counter(p["key"] for p in info["pairs"]).most_common(1)[0]
    assert multi[1] >= 2
    with tarfile.open(urls[0]) as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    same = [blob for name, blob in blobs.items() if name.startswith(multi[0] + "_")]
    assert len(same) == multi[1] and len(set(same)) == 1


def test_rows_per_shard_splits_and_keeps_every_pair(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, info = run
    n = len(info["pairs"])
    summary = export(run_dir, tmp_path / "wds", format="webdataset", rows_per_shard=4)
    assert summary["shards"] == math.ceil(n / 4) == len(summary["files"])
    sizes = []
    for name in summary["files"]:
        with tarfile.open(tmp_path / "wds" / name) as tar:
            sizes.append(sum(m.name.endswith(".txt") for m in tar.getmembers()))
    assert sizes[:-1] == [4] * (len(sizes) - 1) and sum(sizes) == n
    assert not list((tmp_path / "wds").glob(".*"))  # no temporary files left behind


# --------------------------------------------------------------------------- parquet


def test_parquet_export_reads_with_pyarrow_and_hf_datasets(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import datasets

    run_dir, info = run
    out = tmp_path / "pq"
    summary = export(run_dir, out, format="parquet", rows_per_shard=5)
    files = sorted(str(p) for p in out.glob("*.parquet"))
    assert len(files) == summary["shards"] == math.ceil(len(info["pairs"]) / 5)

    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.equals(EXPORT_SCHEMA)
    assert table.num_rows == len(info["pairs"])
    assert Counter(table.column("source").to_pylist()) == Counter(info["kept"])
    by_url = {s["key"]: s["url"] for s in info["samples"]}
    for row in table.to_pylist():
        assert row["url"] == by_url[row["key"]]
        assert Image.open(io.BytesIO(row["image"])).size == (64, 48)

    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(info["pairs"])
    assert set(ds.column_names) == {"key", "image", "text", "source", "itm", "url"}
    decoded = ds.cast_column("image", datasets.Image())
    first = decoded[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (64, 48)
    assert first["text"] == table.column("text")[0].as_py()


# --------------------------------------------------------------------------- jsonl


def test_jsonl_export_copies_each_image_once(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, info = run
    out = tmp_path / "jsonl"
    summary = export(run_dir, out, format="jsonl")
    rows = [json.loads(line) for f in sorted(out.glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert len(rows) == summary["pairs"] == len(info["pairs"])
    assert {(r["key"], r["text"], r["source"]) for r in rows} == {
        (p["key"], p["text"], p["source"]) for p in info["pairs"]
    }
    for r in rows:
        assert not Path(r["image"]).is_absolute() and r["image"].startswith("images/")
        with Image.open(out / r["image"]) as image:
            assert image.size == (64, 48)
    copied = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert len(copied) == len({p["key"] for p in info["pairs"]}) == summary["images"]


# --------------------------------------------------------------------------- dataset card


def test_dataset_card_states_counts_scores_models_and_config(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, info = run
    out = tmp_path / "card"
    export(run_dir, out, format="parquet")
    card = (out / "README.md").read_text()
    n = len(info["pairs"])
    assert f"{n:,} image-text pairs" in card
    for source, count in info["kept"].items():
        assert f"| {source} | {count:,} |" in card
    for status, count in info["status"].items():
        assert f"| {status} | {count:,} |" in card
    assert "cannot be decoded" not in card  # meanings come from Status, not invented here
    assert "| download_failed | " in card and "HTTP error status" in card
    assert f"at least **{THRESHOLD}**" in card
    assert "`runs/captioner-tiny`" in card and "`runs/filter-tiny`" in card
    assert "keep_synthetic: 2" in card  # the config, verbatim
    assert "torch 2.13.0" in card and "2025-01-01T00:00:00+00:00" in card
    assert 'load_dataset("parquet"' in card

    # Histogram rows add up to the scored texts of each kind.
    hist = [line for line in card.splitlines() if line.startswith("| [")]
    assert len(hist) == 10
    web_total = sum(int(line.split("|")[2]) for line in hist)
    syn_kept = sum(int(line.split("|")[5]) for line in hist)
    scored_web = [s for s in info["samples"] if not math.isnan(s["web_itm"])]
    assert web_total == len(scored_web)
    assert syn_kept == info["kept"]["synthetic"]
    assert "Note: the run's manifest.json" not in card


def test_card_flags_a_manifest_that_disagrees(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, _ = run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["kept"]["web"] += 5
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    export(run_dir, tmp_path / "out", format="jsonl")
    assert "Note: the run's manifest.json" in (tmp_path / "out" / "README.md").read_text()


# --------------------------------------------------------------------------- variants and edges


def test_dataset_with_image_bytes_needs_no_tars(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """If the dataset parquet carries the image bytes, the export uses them (tars may be gone)."""
    run_dir, info = run
    for path in sorted((run_dir / "dataset").glob("*.parquet")):
        table = pq.read_table(path)
        with tarfile.open(run_dir / "images" / path.name.replace(".parquet", ".tar")) as tar:
            blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        images = [blobs[m] for m in table.column("image_member").to_pylist()]
        pq.write_table(table.append_column("image", pa.array(images, pa.binary())), path)
    for tar in (run_dir / "images").glob("*.tar"):
        tar.unlink()
    summary = export(run_dir, tmp_path / "out", format="parquet")
    assert summary["pairs"] == len(info["pairs"])


def test_missing_image_is_a_user_error_and_leaves_no_partial_files(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, _ = run
    (run_dir / "images" / "shard-00001.tar").unlink()
    out = tmp_path / "out"
    with pytest.raises(UserError, match="shard-00001.tar"):
        export(run_dir, out, format="webdataset", rows_per_shard=1000)
    assert sorted(p.name for p in out.iterdir()) == []  # no README, no half-written shard


def test_export_refuses_to_mix_with_an_earlier_export(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, info = run
    out = tmp_path / "out"
    first = export(run_dir, out, format="webdataset", rows_per_shard=2)
    (out / "keep-me.txt").write_text("user file")
    with pytest.raises(UserError, match="--overwrite"):
        export(run_dir, out, format="parquet")
    second = export(run_dir, out, format="parquet", overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert first["shards"] > 1
    assert names == sorted([*second["files"], "README.md", "keep-me.txt"])  # old tars gone, user file kept
    assert second["pairs"] == len(info["pairs"])


def test_run_without_kept_pairs_exports_an_empty_dataset_with_a_card(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    info = make_run(run_dir, shard_sizes=(1,))  # row 0: empty web text, captions scored below 0.5
    assert info["pairs"] == []
    summary = export(run_dir, tmp_path / "out", format="webdataset")
    assert summary["pairs"] == 0 and summary["files"] == []
    assert "0 image-text pairs" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "csv"}, "--format"),
        ({"rows_per_shard": 0}, "--rows-per-shard"),
        ({"round": 1}, "--round: .* is a single run"),
    ],
)
def test_bad_arguments_are_user_errors(
    run: tuple[Path, dict[str, Any]], tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    run_dir, _ = run
    with pytest.raises(UserError, match=message):
        export(run_dir, tmp_path / "out", **kwargs)


def test_run_view_reads_the_selection_rule_of_the_run(run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = run
    rule = resolve_run(run_dir).selection()
    assert rule == Selection(threshold=THRESHOLD, keep_web=True, keep_synthetic=2)
    (run_dir / "config.yaml").write_text(
        "filter: {threshold: 0.3}\n", encoding="utf-8"
    )  # not a pipeline config
    assert resolve_run(run_dir).selection() is None


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such run directory"):
        export(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        export(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="run directory itself"):
        make_run(tmp_path / "r", shard_sizes=(2,))
        export(tmp_path / "r", tmp_path / "r")


# --------------------------------------------------------------------------- bootstrap directories


def test_bootstrap_dir_exports_the_latest_finished_round_or_the_one_asked_for(tmp_path: Path) -> None:
    root = tmp_path / "boot"
    infos = make_bootstrap(root, rounds=2)
    assert infos[0]["kept"] != infos[1]["kept"]  # the rounds differ, so the choice is visible
    latest = export(root, tmp_path / "latest", format="parquet")
    assert latest["round"] == 2 and latest["pairs"] == len(infos[1]["pairs"])
    first = export(root, tmp_path / "first", format="parquet", round=1)
    assert first["round"] == 1 and first["pairs"] == len(infos[0]["pairs"])
    assert "(bootstrap round 1)" in (tmp_path / "first" / "README.md").read_text()
    with pytest.raises(UserError, match="no round 7"):
        export(root, tmp_path / "x", round=7)
    with pytest.raises(UserError, match="round 3 .* no pipeline output"):
        export(root, tmp_path / "x", round=3)


def test_export_reads_what_the_pipeline_writer_writes(tmp_path: Path) -> None:
    """Guard against contract drift: a run committed by capfilt.stages.write exports in full."""
    from capfilt.stages import write as writer

    run_dir = tmp_path / "run"
    source = make_run(tmp_path / "fixture", shard_sizes=(5, 4))
    images = {}
    for tar_path in (tmp_path / "fixture" / "images").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            images |= {
                m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")
            }
    rows = [
        {k: v for k, v in s.items() if k != "similarity"} | {"image": images.get(s["key"])}
        for s in source["samples"]
    ]
    for shard, part in enumerate((rows[:5], rows[5:])):
        writer.write_shard(run_dir, shard, pa.Table.from_pylist(part))
    expected = writer.summarize(run_dir)["kept"]
    summary = export(run_dir, tmp_path / "out", format="webdataset")
    assert summary["by_source"] == {k: v for k, v in expected.items() if v}
    ds = wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), shardshuffle=False)
    assert sum(1 for _ in ds.decode("pil").to_tuple("jpg", "txt")) == sum(expected.values())
