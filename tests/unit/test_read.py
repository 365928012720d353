"""Read stage: every format to key/url/web_text, stable keys, edge values, clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import InputConfig
from capfilt.errors import UserError
from capfilt.stages.read import (
    MAX_TEXT_CHARS,
    check_input,
    list_input_files,
    make_key,
    plan_input,
    read_table,
    read_unit,
    read_webdataset,
)

ROWS = {
    "URL": ["http://a/1.jpg", "  http://b/2.png ", None, ""],
    "TEXT": ["a dog", None, "ünïcödé 🐕 " * 3, "x" * (MAX_TEXT_CHARS + 500)],
    "score": [0.1, 0.2, 0.3, 0.4],
}


def cfg(path: Path | str, **fields: object) -> InputConfig:
    return InputConfig(path=str(path), **fields)


def check_rows(table: pa.Table, file_index: int = 0) -> None:
    assert table.column_names[:3] == ["key", "url", "web_text"]
    assert table["key"].to_pylist() == [make_key(file_index, i) for i in range(4)]
    assert table["url"].to_pylist() == ["http://a/1.jpg", "http://b/2.png", "", ""]
    texts = table["web_text"].to_pylist()
    assert texts[:3] == ["a dog", "", "ünïcödé 🐕 " * 3]
    assert texts[3] == "x" * MAX_TEXT_CHARS
    assert table["url"].null_count == 0 and table["web_text"].null_count == 0


def test_parquet_keeps_columns_and_keys_are_stable(tmp_path):
    pq.write_table(pa.table(ROWS), tmp_path / "a.parquet")
    first = read_table(str(tmp_path / "a.parquet"), cfg(tmp_path, keep_cols=["score"]))
    check_rows(first)
    assert first["score"].to_pylist() == ROWS["score"]
    assert make_key(0, 42) == "00000_000000042"
    assert read_table(str(tmp_path / "a.parquet"), cfg(tmp_path, keep_cols=["score"])).equals(first)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_text_formats(tmp_path, fmt):
    path = tmp_path / f"urls.{fmt}"
    rows = list(zip(ROWS["URL"], ROWS["TEXT"], strict=True))
    if fmt == "jsonl":
        path.write_text(
            "\n".join(json.dumps({"URL": u, "TEXT": t}) for u, t in rows) + "\n", encoding="utf-8"
        )
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = ["URL" + sep + "TEXT"] + [sep.join([u or "", t or ""]) for u, t in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_rows(read_table(str(path), cfg(path, format=fmt)))


def test_csv_quoted_newlines_and_invalid_utf8(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'URL,TEXT\nhttp://x,"two\nlines, one comma"\nhttp://y,bad \xff byte\n')
    table = read_table(str(path), cfg(path, format="csv"))
    assert table["web_text"].to_pylist() == ["two\nlines, one comma", "bad \ufffd byte"]


def test_tsv_quotes_are_text(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('URL\tTEXT\nhttp://x\tsay "hi\n', encoding="utf-8")
    assert read_table(str(path), cfg(path, format="tsv"))["web_text"].to_pylist() == ['say "hi']


def test_directory_glob_and_compressed_files(tmp_path):
    for name in ("b.parquet", "a.parquet"):
        pq.write_table(pa.table(ROWS), tmp_path / name)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("ignored")
    table = read_table(str(tmp_path), cfg(tmp_path))
    assert table.num_rows == 8
    assert table["key"].to_pylist()[4] == "00001_000000000"  # b.parquet sorts second
    assert list_input_files(str(tmp_path / "*.parquet"), "parquet") == [
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.parquet"),
    ]
    import gzip

    gz = tmp_path / "z.csv.gz"
    gz.write_bytes(gzip.compress(b"URL,TEXT\nhttp://z,zipped\n"))
    assert read_table(str(gz), cfg(gz, format="csv"))["web_text"].to_pylist() == ["zipped"]


def test_key_col(tmp_path):
    pq.write_table(pa.table({**ROWS, "id": [10, 11, 12, 13]}), tmp_path / "a.parquet")
    assert read_table(str(tmp_path), cfg(tmp_path, key_col="id"))["key"].to_pylist() == [
        "10",
        "11",
        "12",
        "13",
    ]
    for bad, expected in ([1, 1, 2, 3], "key '1' occurs 2 times"), (["a", "b/c", "d", "e"], "'b/c' in row 1"):
        pq.write_table(pa.table({**ROWS, "id": bad}), tmp_path / "a.parquet")
        with pytest.raises(UserError, match=expected):
            read_table(str(tmp_path), cfg(tmp_path, key_col="id"))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"url_col": "url"},
            "input.url_col: column 'url' not found in .*; available columns: URL, TEXT, score",
        ),
        ({"text_col": "caption"}, "input.text_col: column 'caption' not found"),
        ({"keep_cols": ["width_px"]}, "input.keep_cols: column 'width_px' not found"),
        ({"key_col": "id"}, "input.key_col: column 'id' not found"),
    ],
)
def test_missing_columns_list_the_available_ones(tmp_path, fields, expected):
    pq.write_table(pa.table(ROWS), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=expected):
        read_table(str(tmp_path / "a.parquet"), cfg(tmp_path, **fields))
    (tmp_path / "a.csv").write_text("URL,TEXT,score\nhttp://x,t,1\n")
    with pytest.raises(UserError, match=expected):
        read_table(str(tmp_path / "a.csv"), cfg(tmp_path, format="csv", **fields))


def test_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_table(str(tmp_path / "nope.parquet"), cfg(tmp_path))
    with pytest.raises(UserError, match=r"no \.parquet.* files in directory"):
        read_table(str(tmp_path), cfg(tmp_path))
    (tmp_path / "fake.parquet").write_text("URL,TEXT\n")
    with pytest.raises(UserError, match="cannot read .*fake.parquet as parquet"):
        read_table(str(tmp_path / "fake.parquet"), cfg(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"URL": "x", "TEXT": 1}\n{"URL": "y", "TEXT": "two"}\n{oops\n')
    with pytest.raises(UserError, match="cannot read .*bad.jsonl as jsonl"):
        read_table(str(tmp_path / "bad.jsonl"), cfg(tmp_path, format="jsonl"))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    meta = {"url": "http://a/1.jpg", "caption": "from json", "similarity": 0.3}
    write_shard(
        tmp_path / "00000.tar",
        [
            (
                "000000000",
                {"jpg": b"JPEGBYTES", "txt": "a cät 🐈".encode(), "json": json.dumps(meta).encode()},
            ),
            ("000000001", {"png": b"PNGBYTES", "json": json.dumps(meta).encode()}),
        ],
    )
    write_shard(tmp_path / "00001.tar", [("000010000", {"json": b'{"url": "http://c"}'})])
    table = read_webdataset(
        str(tmp_path / "{00000..00001}.tar"), cfg(tmp_path, format="webdataset", keep_cols=["similarity"])
    )
    assert table.to_pydict() == {
        "key": ["000000000", "000000001", "000010000"],
        "url": ["http://a/1.jpg", "http://a/1.jpg", "http://c"],
        "web_text": ["a cät 🐈", "from json", ""],
        "image": [b"JPEGBYTES", b"PNGBYTES", b""],  # no image: the download stage fetches the URL
        "similarity": [0.3, 0.3, None],
    }
    assert read_table(str(tmp_path), cfg(tmp_path, format="webdataset")).num_rows == 3

    write_shard(tmp_path / "00002.tar", [("000000000", {"jpg": b"again"})])
    with pytest.raises(UserError, match="key '000000000' occurs 2 times"):
        read_webdataset(str(tmp_path), cfg(tmp_path, format="webdataset"))
    (tmp_path / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(UserError, match="cannot read .*broken.tar as a webdataset tar"):
        read_webdataset(str(tmp_path / "broken.tar"), cfg(tmp_path, format="webdataset"))


def test_fsspec_urls_and_check_input():
    import fsspec

    with fsspec.open("memory://capfilt-test/in/a.parquet", "wb") as stream:
        pq.write_table(pa.table(ROWS), stream)
    url = "memory://capfilt-test/in"
    (file,) = check_input(cfg(url))
    assert file.startswith("memory://") and file.endswith("/capfilt-test/in/a.parquet")
    check_rows(read_table(url, cfg(url)))
    with pytest.raises(UserError, match="input.text_col: column 'caption' not found"):
        check_input(cfg(url, text_col="caption"))


# --------------------------------------------------------------------------- reading by units (tasks)


def _by_units(config: InputConfig, rows_per_shard: int = 3, done: frozenset[int] = frozenset()) -> pa.Table:
    """What the pipeline's read tasks produce, unit by unit, concatenated."""
    plan = plan_input(config, rows_per_shard=rows_per_shard, done=done)
    tables = [read_unit(unit, config, rows_per_shard=rows_per_shard) for unit in plan.units]
    return pa.concat_tables(tables, promote_options="permissive")


def _write_format(path: Path, fmt: str, rows: dict) -> None:
    pairs = list(zip(rows["URL"], rows["TEXT"], strict=True))
    if fmt == "parquet":
        pq.write_table(pa.table(rows), path, row_group_size=2)
    elif fmt == "jsonl":
        path.write_text(
            "\n".join(json.dumps({"URL": u, "TEXT": t}) for u, t in pairs) + "\n", encoding="utf-8"
        )
    elif fmt == "webdataset":
        write_shard(path, [(f"k{path.stem}{i}", {"json": json.dumps({"url": u, "caption": t}).encode()})
                           for i, (u, t) in enumerate(pairs)])  # fmt: skip
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = ["URL" + sep + "TEXT"] + [sep.join([u or "", t or ""]) for u, t in pairs]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "webdataset"])
def test_read_units_give_the_same_rows_as_the_whole_input(tmp_path, fmt, monkeypatch):
    import capfilt.stages.read as read

    monkeypatch.setattr(read, "UNIT_ROWS", 2)  # several units per Parquet file (row groups of 2)
    suffix = {"webdataset": "tar"}.get(fmt, fmt)
    for name in ("b", "a"):
        _write_format(tmp_path / f"{name}.{suffix}", fmt, {"URL": ROWS["URL"], "TEXT": ROWS["TEXT"]})
    config = cfg(tmp_path, format=fmt)
    plan = plan_input(config, rows_per_shard=3)
    assert plan.rows == [4, 4] and plan.total_rows == 8
    assert len(plan.units) == (4 if fmt == "parquet" else 2)
    whole = read_table(str(tmp_path), config)
    units = _by_units(config)
    assert units.drop_columns(["_row", "_shard"]).equals(whole)
    assert units["_row"].to_pylist() == list(range(8))
    assert units["_shard"].to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2]
    if fmt != "webdataset":
        assert units["key"].to_pylist()[4:6] == [make_key(1, 0), make_key(1, 1)]  # today's key scheme
    # Resume: rows of committed shards are not read again (units wholly inside them are skipped).
    resumed = _by_units(config, done=frozenset({0, 2}))
    assert resumed["_row"].to_pylist() == [3, 4, 5]
    assert resumed["key"].to_pylist() == whole["key"].to_pylist()[3:6]


def test_read_unit_refuses_a_file_that_changed_after_counting(tmp_path):
    path = tmp_path / "a.csv"
    _write_format(path, "csv", {"URL": ROWS["URL"], "TEXT": ROWS["TEXT"]})
    config = cfg(path, format="csv")
    (unit,) = plan_input(config, rows_per_shard=10).units
    path.write_text("URL,TEXT\nhttp://x,only one row now\n")
    with pytest.raises(UserError, match=r"a.csv changed while the run was starting \(1 rows where 4"):
        read_unit(unit, config, rows_per_shard=10)


def test_path_lists_globs_and_directories(tmp_path):
    for sub, name in (("d", "x.parquet"), ("d", "y.parquet"), ("g", "b.parquet"), ("g", "a.parquet")):
        (tmp_path / sub).mkdir(exist_ok=True)
        pq.write_table(pa.table(ROWS), tmp_path / sub / name)
    single = str(tmp_path / "d" / "y.parquet")
    entries = [str(tmp_path / "g" / "*.parquet"), str(tmp_path / "d"), single]
    files = list_input_files(entries, "parquet")
    assert files == [str(tmp_path / p) for p in ("g/a.parquet", "g/b.parquet", "d/x.parquet", "d/y.parquet")]
    config = InputConfig(path=entries)
    assert config.path == entries
    table = _by_units(config, rows_per_shard=100)
    assert table.num_rows == 16 and table["key"].to_pylist()[12] == make_key(3, 0)
    with pytest.raises(UserError, match="list of inputs is empty"):
        list_input_files([], "parquet")
    with pytest.raises(Exception, match="list of inputs is empty"):
        InputConfig(path=[])


@pytest.mark.parametrize(
    ("url", "package"), [("s3://bucket/laion/part-00000.parquet", "s3fs"), ("gs://bucket/x", "gcsfs")]
)
def test_a_missing_filesystem_package_is_one_line_naming_it(url, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(
        UserError, match=rf"^input.path: \w+:// needs {package} \(pip install {package}\)"
    ) as err:
        list_input_files(url, "parquet")
    assert "\n" not in str(err.value)
    from capfilt.rundir import RunDir

    with pytest.raises(UserError, match=rf"^output.dir: \w+:// needs {package}"):
        RunDir(url)


def test_hf_urls_use_huggingface_hubs_filesystem():
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import HfFileSystem

    fs, _ = fsspec.core.url_to_fs("hf://datasets/org/name/data/part-0.parquet")
    assert isinstance(fs, HfFileSystem)
