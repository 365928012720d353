"""Every real-dataset preset in pipelines/ passes `capfilt run --dry-run` on a few-row file with
that dataset's real column names and types (input.path pointed at the local file).

The dry run must not touch the network: hub models are only named, and `input.where` is checked
against the local file's schema. A socket guard makes any connection attempt fail the test.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import load
from capfilt.stages.read import read_table
from capfilt.stages.where import apply_where, read_config

REPO = Path(__file__).resolve().parents[2]

# (column, Arrow type, three values) per dataset, as their releases document them.
SCHEMAS: dict[str, list[tuple[str, pa.DataType, list]]] = {
    "laion2B-en": [
        ("URL", pa.string(), ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"]),
        ("TEXT", pa.string(), ["a cat", "a dog", None]),
        ("WIDTH", pa.int32(), [512, 200, 640]),
        ("HEIGHT", pa.int32(), [384, 200, 480]),
        ("similarity", pa.float64(), [0.31, 0.29, 0.35]),
        ("hash", pa.int64(), [1, 2, 3]),
        ("punsafe", pa.float32(), [0.01, 0.9, None]),
        ("pwatermark", pa.float32(), [0.1, 0.2, 0.95]),
    ],
    "relaion2B-en": [
        ("url", pa.string(), ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"]),
        ("caption", pa.string(), ["a cat", "a dog", "a bird"]),
    ],
    "laion400m": [
        ("SAMPLE_ID", pa.int64(), [10, 11, 12]),
        ("URL", pa.string(), ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"]),
        ("TEXT", pa.string(), ["a cat", "a dog", "a bird"]),
        ("HEIGHT", pa.int32(), [384, 200, 480]),
        ("WIDTH", pa.int32(), [512, 200, 640]),
        ("LICENSE", pa.string(), ["?", "?", "cc-by"]),
        ("NSFW", pa.string(), ["UNLIKELY", "UNSURE", "NSFW"]),
        ("similarity", pa.float64(), [0.31, 0.29, 0.35]),
    ],
    "coyo700m": [
        ("id", pa.int64(), [1, 2, 3]),
        ("url", pa.string(), ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"]),
        ("text", pa.string(), ["a cat", "a dog", "a bird"]),
        ("width", pa.int64(), [512, 200, 640]),
        ("height", pa.int64(), [384, 200, 480]),
        ("image_phash", pa.string(), ["a", "b", "c"]),
        ("text_length", pa.int64(), [5, 5, 6]),
        ("word_count", pa.int64(), [2, 2, 2]),
        ("num_tokens_bert", pa.int64(), [2, 2, 2]),
        ("num_tokens_gpt", pa.int64(), [2, 2, 2]),
        ("num_faces", pa.int64(), [0, 0, 1]),
        ("clip_similarity_vitb32", pa.float64(), [0.3, 0.31, 0.32]),
        ("clip_similarity_vitl14", pa.float64(), [0.3, 0.31, 0.32]),
        ("nsfw_score_opennsfw2", pa.float64(), [0.01, 0.7, 0.02]),
        ("nsfw_score_gantman", pa.float64(), [0.01, 0.7, 0.02]),
        ("watermark_score", pa.float64(), [0.1, 0.2, 0.9]),
        ("aesthetic_score_laion_v2", pa.float64(), [5.1, 4.2, 6.0]),
    ],
    "datacomp": [
        ("uid", pa.string(), ["00a1", "00a2", "00a3"]),
        ("url", pa.string(), ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"]),
        ("text", pa.string(), ["a cat", "a dog", "a bird"]),
        ("original_width", pa.int64(), [512, 150, 640]),
        ("original_height", pa.int64(), [384, 150, 480]),
        ("clip_b32_similarity_score", pa.float32(), [0.3, 0.31, 0.32]),
        ("clip_l14_similarity_score", pa.float32(), [0.3, 0.31, 0.32]),
        ("face_bboxes", pa.list_(pa.list_(pa.float64())), [[], [[0.1, 0.1, 0.2, 0.2]], []]),
        ("sha256", pa.string(), ["x", "y", "z"]),
    ],
}

# preset file -> (schema, file format, file name)
PRESETS = {
    "laion.yaml": ("laion2B-en", "parquet", "part-00000.snappy.parquet"),
    "relaion2b_en.yaml": ("relaion2B-en", "parquet", "part-00000.snappy.parquet"),
    "laion400m.yaml": ("laion400m", "parquet", "part-00000.snappy.parquet"),
    "cc12m.yaml": (None, "tsv", "cc12m.tsv"),
    "coyo700m.yaml": ("coyo700m", "parquet", "part-00000.parquet"),
    "datacomp.yaml": ("datacomp", "parquet", "0000.parquet"),
}


def write_input(tmp_path: Path, schema: str | None, name: str) -> Path:
    path = tmp_path / name
    if schema is None:  # CC12M: url<TAB>caption, with the header the preset asks users to add
        path.write_text(
            'url\tcaption\nhttp://a/1.jpg\ta cat\nhttp://a/2.jpg\ta dog "quoted"\n', encoding="utf-8"
        )
        return path
    columns = SCHEMAS[schema]
    table = pa.table({c: pa.array(v, t) for c, t, v in columns})
    pq.write_table(table, path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a dry run opened a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def dry_run(preset: str, *overrides: str):
    args = ["run", str(REPO / "pipelines" / preset), "--dry-run"]
    for override in overrides:
        args += ["--set", override]
    return CliRunner().invoke(app, args)


def test_every_real_preset_is_tested():
    presets = {p.name for p in (REPO / "pipelines").glob("*.yaml")}
    demo_and_training = {p for p in presets if p.startswith(("demo", "bootstrap", "train_"))}
    assert presets - demo_and_training == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_dry_run_on_its_real_schema(preset, tmp_path, no_network):
    schema, fmt, name = PRESETS[preset]
    data = write_input(tmp_path, schema, name)
    config = yaml.safe_load((REPO / "pipelines" / preset).read_text(encoding="utf-8"))
    assert config["input"]["format"] == fmt
    result = dry_run(preset, f"input.path={data}", f"output.dir={tmp_path / 'out'}")
    assert result.exit_code == 0, result.output
    for stage in ("download", "preprocess", "caption", "filter", "select", "write"):
        assert re.search(rf"^\s+{stage}\s", result.output, re.M), stage
    if config["input"].get("where"):
        assert re.search(r"^\s+where\s+tasks", result.output, re.M)
    assert "Salesforce/blip-itm-large-coco: Hugging Face hub, downloaded at run time" in result.output
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    # The dry run checks `where` only; the read stage must also find every configured column.
    cfg = load(REPO / "pipelines" / preset, [f"input.path={data}"])
    table = read_table(str(data), read_config(cfg.input))
    if cfg.input.where:
        table = apply_where(table, cfg=cfg.input)
        assert 0 < table["status"].to_pylist().count("") < table.num_rows, "the where should keep some rows"
    assert set(cfg.input.keep_cols) <= set(table.column_names)
    assert table["url"].to_pylist()[:2] == ["http://a/1.jpg", "http://a/2.jpg"]
    header = (REPO / "pipelines" / preset).read_text(encoding="utf-8").split("\ninput:")[0]
    for topic in ("What", "Rows", "Cost", "GPU-hours"):
        assert topic in header, f"{preset} header says nothing about {topic}"


@pytest.mark.parametrize("preset", ["laion.yaml", "coyo700m.yaml", "datacomp.yaml"])
def test_a_where_naming_a_missing_column_fails_the_dry_run_in_one_line(preset, tmp_path, no_network):
    schema, _, name = PRESETS[preset]
    data = write_input(tmp_path, schema, name)
    result = dry_run(preset, f"input.path={data}", "input.where=aesthetic > 5")
    assert result.exit_code == 2
    assert result.output.startswith("error: input.where: unknown column 'aesthetic'")
    assert result.output.count("\n") == 1


def test_the_laion400m_preset_refuses_a_laion2b_file(tmp_path, no_network):
    """The schema check is real: LAION-2B-en parts have no NSFW column."""
    data = write_input(tmp_path, "laion2B-en", "part.parquet")
    result = dry_run("laion400m.yaml", f"input.path={data}")
    assert result.exit_code == 2 and "unknown column 'NSFW'" in result.output
