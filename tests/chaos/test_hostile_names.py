"""Issue 12.6: names read from inputs and run directories cannot escape or corrupt anything.

A tampered run directory (keys, member names or tar paths edited to ``../../../x``) is
refused by export before it writes outside ``--out``; keys with control characters are
refused when the input is read; a webdataset input with ``a/x.jpg`` and ``b/x.jpg`` is an
error naming both instead of one merged sample. All through the real CLI, one line, exit 2.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chaos.helpers import cli, one_line_error, pipeline_yaml, tmp_files, url_list
from support import make_run

# --------------------------------------------------------------------------- tampered run directories


def _tamper(run: Path, *, key: str | None = None, member: str | None = None, tar: str | None = None) -> None:
    """Edit the first kept pair of shard 0 the way an attacker with write access to the run would.

    The image bytes are added to the tar under the tampered member name too, so the only thing
    standing between the export and a write outside --out is capfilt's own check.
    """
    path = run / "dataset" / "shard-00000.parquet"
    rows = pq.read_table(path).to_pylist()
    first = rows[0]
    tar_path = run / first["image_tar"]
    with tarfile.open(tar_path) as archive:
        image = archive.extractfile(first["image_member"]).read()  # type: ignore[union-attr]
    if member is not None:
        with tarfile.open(tar_path, "a") as archive:
            info = tarfile.TarInfo(member)
            info.size = len(image)
            archive.addfile(info, io.BytesIO(image))
    first.update(
        {
            "key": key if key is not None else first["key"],
            "image_member": member if member is not None else first["image_member"],
            "image_tar": tar if tar is not None else first["image_tar"],
        }
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)


@pytest.mark.parametrize("fmt", ["jsonl", "webdataset", "parquet"])
def test_export_refuses_a_traversal_key(tmp_path: Path, fmt: str) -> None:
    run, out = tmp_path / "a" / "run", tmp_path / "a" / "b" / "out"
    make_run(run)
    _tamper(run, key="../../../x", member="../../../x.jpg")
    one_line_error(cli("export", run, "--out", out, "--format", fmt), "key '../../../x' contains")
    assert [p for p in tmp_path.rglob("x*") if p.suffix in (".jpg", ".txt", ".json")] == []
    assert tmp_files(out) == [] and not (out / "README.md").exists()


def test_export_refuses_a_traversal_member(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    make_run(run)
    _tamper(run, member="../../../x.jpg")
    one_line_error(cli("export", run, "--out", out, "--format", "jsonl"), "image member '../../../x.jpg'")
    assert list(tmp_path.rglob("x.jpg")) == []


def test_export_refuses_a_tar_outside_the_run(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    make_run(run)
    _tamper(run, tar="../elsewhere/stolen.tar")
    (tmp_path / "elsewhere").mkdir()
    (run / "images" / "shard-00000.tar").rename(tmp_path / "elsewhere" / "stolen.tar")
    one_line_error(cli("export", run, "--out", out), "image_tar: '../elsewhere/stolen.tar' points outside")


def test_export_refuses_a_control_character_key(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    make_run(run)
    _tamper(run, key="k\x1b[2J", member="k\x1b[2J.jpg")
    line = one_line_error(cli("export", run, "--out", out), "contains the control character U+001B")
    assert "\x1b" not in line  # shown escaped, so it cannot drive the terminal


def test_export_refuses_an_alias_bomb_in_config_yaml(tmp_path: Path) -> None:
    """A run's config.yaml is read with the same strict loader as a user's config."""
    run, out = tmp_path / "run", tmp_path / "out"
    make_run(run)
    levels = [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    (run / "config.yaml").write_text("\n".join(["a: &a [x,x,x,x,x,x,x,x,x]", *levels, "filter: *i", ""]))
    one_line_error(cli("export", run, "--out", out), "config.yaml", "aliases expand to more than")


def test_inside_resolves_symlinks(tmp_path: Path) -> None:
    """The last line of defence: a directory symlinked out of the root does not count as inside."""
    from capfilt.errors import UserError
    from capfilt.guards import inside

    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "images").symlink_to(tmp_path / "outside")
    assert inside(tmp_path / "root", "a/b.jpg", what="--out") == (tmp_path / "root" / "a" / "b.jpg").resolve()
    for bad in ("images/x.jpg", "../x.jpg", "/etc/passwd", ""):
        with pytest.raises(UserError):
            inside(tmp_path / "root", bad, what="--out")


# --------------------------------------------------------------------------- keys at read time

CONTROL_KEYS = {"NUL": "a\x00b", "ESC": "a\x1bb", "newline": "a\nb", "DEL": "a\x7fb", "RLO": "a\u202eb"}


@pytest.mark.parametrize("name", list(CONTROL_KEYS))
@pytest.mark.integration
def test_control_character_key_col(tmp_path: Path, name: str, ray_session: str) -> None:
    """Keys are checked by the read tasks (the driver reads no rows): one line through Ray."""
    bad = CONTROL_KEYS[name]
    data = url_list(tmp_path / "urls.parquet", id=["k0", bad, "k2"])
    config = pipeline_yaml(tmp_path, f"{{path: {data}, key_col: id}}")
    line = one_line_error(
        cli("run", config), "input.key_col: key", "in row 1 of", "contains", ray_logs=True
    )
    assert bad not in line


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def _meta(url: str, text: str) -> bytes:
    return json.dumps({"url": url, "caption": text}).encode()


@pytest.mark.integration
def test_control_character_webdataset_member(tmp_path: Path, ray_session: str) -> None:
    shard = _tar(
        tmp_path / "00000.tar",
        {
            "ok.json": _meta("http://127.0.0.1:9/0.jpg", "a"),
            "b\x1bad.json": _meta("http://127.0.0.1:9/1.jpg", "b"),
        },
    )
    config = pipeline_yaml(tmp_path, f"{{path: {shard}, format: webdataset}}")
    one_line_error(
        cli("run", config), "key 'b\\x1bad' in sample 1", "control character U+001B", ray_logs=True
    )


@pytest.mark.integration
def test_duplicate_webdataset_names_across_directories(tmp_path: Path, ray_session: str) -> None:
    """`a/x.*` and `b/x.*` are two samples named x: an error naming both, not one merged sample."""
    shard = _tar(
        tmp_path / "00000.tar",
        {
            "a/x.json": _meta("http://127.0.0.1:9/a.jpg", "first"),
            "a/x.txt": b"first",
            "b/x.json": _meta("http://127.0.0.1:9/b.jpg", "second"),
            "b/x.txt": b"second",
        },
    )
    config = pipeline_yaml(tmp_path, f"{{path: {shard}, format: webdataset}}")
    one_line_error(cli("run", config), "'a/x.json'", "'b/x.json'", "same name 'x'", ray_logs=True)


def test_validate_key_accepts_what_img2dataset_writes() -> None:
    from capfilt.guards import validate_key

    for key in ("000000042", "00000_000000042", "laion-2b_en_123", "clé_ünïcode"):
        validate_key(key, where="test")
