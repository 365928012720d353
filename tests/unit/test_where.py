"""input.where: the parser, its errors, the where step, and the download stage skipping its rows."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.config import DownloadConfig, InputConfig, loads
from capfilt.errors import UserError
from capfilt.stages.download import Downloader
from capfilt.stages.status import Status
from capfilt.stages.where import (
    FILTERED_ERROR,
    WhereError,
    apply_limit,
    apply_where,
    check_where_against_schema,
    columns_of,
    compile_where,
    parse_where,
    read_config,
)

LAION = {
    "URL": pa.string(), "TEXT": pa.string(), "WIDTH": pa.int32(), "HEIGHT": pa.int32(), "similarity": pa.float64(),
    "hash": pa.int64(), "punsafe": pa.float32(), "pwatermark": pa.float32(), "NSFW": pa.string(), "ok": pa.bool_(),
}  # fmt: skip


def mask(text: str, table: pa.Table) -> list[bool]:
    """Which rows the where step keeps (status left empty)."""
    cfg = InputConfig(
        path="x", where=text, keep_cols=[c for c in table.column_names if c not in ("key", "url", "web_text")]
    )
    out = apply_where(table, cfg=cfg)
    return [s == "" for s in out["status"].to_pylist()]


TABLE = pa.table(
    {
        "key": ["a", "b", "c", "d", "e"],
        "url": ["u"] * 5,
        "web_text": ["t"] * 5,
        "punsafe": pa.array([0.1, 0.7, None, 0.2, float("nan")], pa.float32()),
        "WIDTH": pa.array([300, 300, 300, 100, 300], pa.int32()),
        "NSFW": ["UNLIKELY", "NSFW", "UNSURE", None, "UNLIKELY"],
        "flag": [True, False, None, True, True],
    }
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("punsafe < 0.5 and WIDTH >= 256", [True, False, False, False, False]),  # null and NaN fail
        ("punsafe < 0.5 or WIDTH < 200", [True, False, False, True, False]),
        ("punsafe is null or punsafe < 0.5", [True, False, True, True, False]),
        ("not (punsafe >= 0.5)", [True, False, False, True, True]),  # NaN >= 0.5 is false, so not(...) true
        ("NSFW in ('UNLIKELY', 'UNSURE')", [True, False, True, False, True]),
        ("NSFW not in ('NSFW')", [True, False, True, False, True]),  # null: unknown -> dropped
        ("NSFW = 'UNLIKELY' AND WIDTH > 299", [True, False, False, False, True]),
        ("NSFW is not null and (WIDTH <> 300 or punsafe <= 0.15)", [True, False, False, False, False]),
        ("flag", [True, False, False, True, True]),
        ("WIDTH >= -1e3 and 1 = 1", [True] * 5),
        ("TEXT = 't'", [True] * 5),  # the text column, seen as the pipeline's web_text
    ],
)
def test_expressions_select_rows_like_sql(text, expected):
    assert mask(text, TABLE) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("punsafe < 0.5 && WIDTH > 1", "unknown operator '&&' at position 14 (use and)"),
        ("punsafe ~ 0.5", "unknown operator '~'"),
        ("punsafe ≥ 0.5", "unknown operator '≥'"),
        ("punsafe <", "expected a column or a value at position 9, found the end"),
        ("(punsafe < 1", "expected ')'"),
        ("punsafe 0.5", "expected an operator"),
        ("punsafe = null", "write 'x is null'"),
        ("TEXT like 'a%'", "expected an operator"),
        ("NSFW = 'UNLIKELY", "unterminated quote '"),
        ("", "empty expression"),
        ("NSFW in ('a', 1)", "mixes number and string"),
    ],
)
def test_syntax_errors_name_the_problem(text, message):
    with pytest.raises(WhereError) as err:
        compile_where(text, LAION)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("punsaf < 0.5", "unknown column 'punsaf'"),
        ("width >= 256", "unknown column 'width' (did you mean 'WIDTH'?)"),
        ("NSFW > 3", "cannot compare column 'NSFW' (string) with 3 (number)"),
        ("WIDTH = '300'", "cannot compare column 'WIDTH' (number) with '300' (string)"),
        ("WIDTH", "column 'WIDTH' (number) is not a condition"),
        ("NSFW in (1, 2)", "column 'NSFW' (string) is compared with number values"),
    ],
)
def test_schema_errors_name_the_column(text, message):
    with pytest.raises(WhereError) as err:
        compile_where(text, LAION)
    assert message in str(err.value)


def test_columns_of_and_quoted_names():
    tree = parse_where("`odd name` > 1 and (a < 2 or not b is null) and a in (1, 2)")
    assert columns_of(tree) == ["odd name", "a", "b"]
    assert "it's" in str(compile_where("x = 'it''s'"))


def test_config_checks_syntax_at_load_with_the_field_named():
    with pytest.raises(UserError) as err:
        loads("input: {path: x.parquet, where: 'punsafe < 0.5 &&'}\n", source="p.yaml")
    assert str(err.value).startswith("p.yaml: input.where") and "unknown operator '&&'" in str(err.value)
    cfg = loads("input: {path: x.parquet, where: 'punsafe < 0.5', limit: 10}\n")
    assert cfg.input.where == "punsafe < 0.5" and cfg.input.limit == 10
    with pytest.raises(UserError, match="input.limit"):
        loads("input: {path: x.parquet, limit: 0}\n")


def test_where_step_sets_status_and_drops_where_only_columns():
    cfg = InputConfig(path="x", where="punsafe < 0.5 and width >= 256", keep_cols=["punsafe"])
    read = read_config(cfg)
    assert read.keep_cols == ["punsafe", "width"]  # width: where-only, even though capfilt writes a width
    batch = TABLE.select(["key", "url", "web_text", "punsafe"]).append_column("width", TABLE["WIDTH"])
    out = apply_where(batch, cfg=cfg)
    assert "width" not in out.column_names and "punsafe" in out.column_names
    assert out["status"].to_pylist() == ["", *[Status.filtered_metadata.value] * 4]
    assert out["error"].to_pylist() == ["", *[FILTERED_ERROR] * 4]
    assert read_config(InputConfig(path="x")) == InputConfig(path="x")


def test_url_and_text_columns_are_the_pipeline_columns():
    cfg = InputConfig(path="x", url_col="URL", text_col="TEXT", where="TEXT != '' and URL is not null")
    assert read_config(cfg).keep_cols == []  # read anyway, as url / web_text
    batch = pa.table({"key": ["a", "b"], "url": ["http://x", ""], "web_text": ["", "a cat"]})
    assert apply_where(batch, cfg=cfg)["status"].to_pylist() == [Status.filtered_metadata.value, ""]


def test_limit_keeps_the_first_rows():
    assert apply_limit(TABLE, 2)["key"].to_pylist() == ["a", "b"]
    assert apply_limit(TABLE, None) is TABLE and apply_limit(TABLE, 50).num_rows == 5


def test_schema_check_reads_a_local_files_footer_only(tmp_path):
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({name: pa.array([], kind) for name, kind in LAION.items()}), path)
    ok = InputConfig(path=str(path), where="punsafe < 0.5 and WIDTH >= 256 and TEXT != ''")
    check_where_against_schema(ok)
    bad = InputConfig(path=str(path), where="punsafe < 0.5 and width >= 256")
    with pytest.raises(UserError, match=r"^input.where: unknown column 'width' \(did you mean 'WIDTH'\?\)"):
        check_where_against_schema(bad)
    remote = InputConfig(path="hf://datasets/org/name/part.parquet", where="nope > 1")
    check_where_against_schema(remote)  # a dry run does not open remote inputs
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("url\tcaption\nhttp://a/1.jpg\ta cat\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown column 'WIDTH'"):
        check_where_against_schema(InputConfig(path=str(tsv), format="tsv", where="WIDTH > 1"))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_downloader_passes_rows_with_a_status_through_without_requesting_them(http_server):
    urls = [http_server.add(f"/img{i}.jpg", _jpeg()) for i in range(4)]
    batch = {
        "url": np.array(urls, dtype=object),
        "status": np.array(
            ["", Status.filtered_metadata.value, "", Status.filtered_metadata.value], dtype=object
        ),
        "error": np.array(["", FILTERED_ERROR, "", FILTERED_ERROR], dtype=object),
    }
    out = Downloader(cfg=DownloadConfig(image_size=32, threads=2, allowed_hosts=["127.0.0.1"]))(batch)
    assert list(out["status"]) == ["ok", "filtered_metadata", "ok", "filtered_metadata"]
    assert list(out["error"]) == ["", FILTERED_ERROR, "", FILTERED_ERROR]
    assert [len(b) > 0 for b in out["image"]] == [True, False, True, False]
    assert [http_server.hits(f"/img{i}.jpg") for i in range(4)] == [1, 0, 1, 0]
