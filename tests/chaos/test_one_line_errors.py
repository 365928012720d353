"""Issue 12.5: every failure of a hostile disk, input, checkpoint or config is one line, exit 2.

Each case was a traceback (exit 1), a hang or a silently accepted value before, and goes
through the real CLI here. Disks: a read-only output directory and a full disk are produced
for real in a private mount namespace (read-only bind mount, 16 KB tmpfs) where the machine
allows it, and simulated otherwise by raising the kernel's OSError from the function that
writes (``pathlib.Path.mkdir``; ``tarfile``'s file object; ``pyarrow.parquet.write_table``),
so the path through the writer and the CLI is the one a real disk error takes. Tests run as
root, where ``chmod`` does not deny writes, so permissions are not used.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chaos.helpers import cli, in_namespace, one_line_error, pipeline_yaml, tmp_files, url_list
from support import make_run, tiny_med

# --------------------------------------------------------------------------- disks


def test_read_only_output_dir_real_mount(tmp_path: Path, mount_namespace: None) -> None:
    """`capfilt run` into a read-only bind mount: EROFS from the kernel -> one line."""
    url_list(tmp_path / "urls.parquet")
    locked = tmp_path / "locked"
    locked.mkdir()
    config = tmp_path / "pipe.yaml"
    config.write_text(f"input: {{path: {tmp_path / 'urls.parquet'}}}\noutput: {{dir: {locked / 'run'}}}\n")
    done = in_namespace(
        f"mount --bind '{locked}' '{locked}' && mount -o remount,bind,ro '{locked}' && $CAPFILT run '{config}'"
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "read-only file system" in lines[0] and str(locked / "run") in lines[0]


def test_read_only_output_dir_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None
) -> None:
    """The same with EROFS raised by Path.mkdir for paths under the "read-only" directory."""
    config = pipeline_yaml(tmp_path, f"{{path: {url_list(tmp_path / 'urls.parquet')}}}")
    real_mkdir = pathlib.Path.mkdir

    def read_only_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if str(self).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    one_line_error(cli("run", config), "read-only file system", str(tmp_path / "run"))


def test_output_dir_under_a_file(tmp_path: Path, no_ray: None) -> None:
    """output.dir below a regular file: the kernel's ENOTDIR, no simulation."""
    (tmp_path / "afile").write_text("not a directory")
    url_list(tmp_path / "urls.parquet")
    config = tmp_path / "pipe.yaml"
    config.write_text(
        f"input: {{path: {tmp_path / 'urls.parquet'}}}\noutput: {{dir: {tmp_path / 'afile' / 'run'}}}\n"
    )
    one_line_error(cli("run", config), "not a directory", "afile")


def test_disk_full_real_tmpfs(tmp_path: Path, mount_namespace: None) -> None:
    """`capfilt export` onto a 16 KB tmpfs: ENOSPC from the kernel, one line, no .tmp left."""
    make_run(tmp_path / "run")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "export"
    done = in_namespace(
        f"mount -t tmpfs -o size=16k tmpfs '{disk}' || exit 99; "
        f"$CAPFILT export '{tmp_path / 'run'}' --out '{out}'; rc=$?; "
        f"echo LEFT:; find '{out}' -name '*.tmp'; exit $rc"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "no space left on device" in lines[0]
    assert done.stdout.split("LEFT:", 1)[1].strip() == "", "temporary files left behind"


class _FullDisk(io.RawIOBase):
    """A writable file that takes ``room`` bytes and then fails like a full disk does."""

    def __init__(self, path: str, room: int) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._path, self._room = path, room

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._file.tell()

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            self._file.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def test_disk_full_during_export_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC after 4 KB of an export tar (tarfile's own open is the injection point)."""
    make_run(tmp_path / "run")
    real_open = tarfile.bltn_open

    def full_open(name: str, mode: str = "r", *args: object, **kwargs: object):
        if "w" in mode and str(name).endswith(".tmp"):
            return _FullDisk(str(name), room=4096)
        return real_open(name, mode, *args, **kwargs)

    monkeypatch.setattr(tarfile, "bltn_open", full_open)
    out = tmp_path / "out"
    one_line_error(cli("export", tmp_path / "run", "--out", out), "no space left on device", str(out))
    assert tmp_files(out) == []
    assert not (out / "README.md").exists()


def test_disk_full_while_committing_a_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's shard writer: ENOSPC half way through a parquet file -> UserError, no .tmp."""
    from capfilt.errors import UserError
    from capfilt.stages import write as writer

    rows = pa.table(
        {
            "key": ["00000_000000000", "00000_000000001"],
            "url": ["http://127.0.0.1:9/0.jpg", "http://127.0.0.1:9/1.jpg"],
            "web_text": ["a", "b"],
            "status": ["download_failed", "download_failed"],
            "error": ["x", "y"],
        }
    )
    real_write = pq.write_table

    def full_write(table: pa.Table, where: object, *args: object, **kwargs: object) -> None:
        if isinstance(where, io.BytesIO):  # serialised in memory first (the dataset file): no disk
            return real_write(table, where, *args, **kwargs)
        sink = pa.BufferOutputStream()
        real_write(table, sink, *args, **kwargs)
        data = sink.getvalue().to_pybytes()[:100]  # what fitted on the disk
        if hasattr(where, "write"):
            where.write(data)
        else:
            Path(str(where)).write_bytes(data)
        raise OSError("[errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", full_write)
    with pytest.raises(UserError, match="no space left on device") as info:
        writer.write_shard(tmp_path / "run", 0, rows)
    assert "shard-00000" in str(info.value) and "\n" not in str(info.value)
    assert tmp_files(tmp_path / "run") == []
    assert writer.committed_shards(tmp_path / "run") == set()


# --------------------------------------------------------------------------- input decoding


def _invalid_utf8_parquet(path: Path) -> Path:
    """A parquet file whose string column holds bytes that are not UTF-8 (as a broken writer leaves)."""
    raw = pa.array([b"fine", b"bad \xff\xfe text"], pa.binary())
    texts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # no validation on purpose
    pq.write_table(
        pa.table({"URL": ["http://127.0.0.1:9/0.jpg", "http://127.0.0.1:9/1.jpg"], "TEXT": texts}), path
    )
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.integration
def test_invalid_utf8_input(tmp_path: Path, fmt: str, ray_session: str) -> None:
    if fmt == "jsonl":
        data = tmp_path / "urls.jsonl"
        data.write_bytes(
            b'{"URL": "http://127.0.0.1:9/0.jpg", "TEXT": "fine"}\n'
            b'{"URL": "http://127.0.0.1:9/1.jpg", "TEXT": "bad \xff\xfe text"}\n'
        )
    else:
        data = _invalid_utf8_parquet(tmp_path / "urls.parquet")
    config = pipeline_yaml(tmp_path, f"{{path: {data}, format: {fmt}}}")
    one_line_error(cli("run", config), "not valid UTF-8", "'TEXT'", "row 1", data.name, ray_logs=True)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    med, tokenizer = tiny_med(seed=0)  # 48 text positions
    return med.save(tmp_path_factory.mktemp("model") / "med", tokenizer=tokenizer)


def _corrupt_copy(checkpoint: Path, target: Path, damage: str) -> Path:
    import shutil

    shutil.copytree(checkpoint, target)
    weights, config = target / "model.safetensors", target / "med_config.json"
    if damage == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage weights":
        weights.write_bytes(os.urandom(4096))
    elif damage == "config not JSON":
        config.write_text('{"vision_width": 32,', encoding="utf-8")
    elif damage == "config wrong field":
        data = json.loads(config.read_text(encoding="utf-8"))
        config.write_text(json.dumps({**data, "vision_heads": "two"}), encoding="utf-8")
    return target


DAMAGES = {
    "truncated weights": "model.safetensors: truncated or not a safetensors file",
    "garbage weights": "model.safetensors: truncated or not a safetensors file",
    "config not JSON": "med_config.json: not a valid med_config.json",
    "config wrong field": "med_config.json: not a valid med_config.json",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_corrupt_checkpoint_in_run(tmp_path: Path, checkpoint: Path, damage: str, no_ray: None) -> None:
    """`capfilt run` checks its checkpoints on the driver before Ray starts actors."""
    model = _corrupt_copy(checkpoint, tmp_path / "bad-model", damage)
    config = pipeline_yaml(
        tmp_path, f"{{path: {url_list(tmp_path / 'urls.parquet')}}}", f"caption: {{model: {model}}}\n"
    )
    one_line_error(cli("run", config), DAMAGES[damage])


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_corrupt_checkpoint_in_model_info(tmp_path: Path, checkpoint: Path, damage: str) -> None:
    """Commands that load a MED directly (model info/export, eval, train) go through MED.load."""
    model = _corrupt_copy(checkpoint, tmp_path / "bad-model", damage)
    one_line_error(cli("model", "info", model), DAMAGES[damage])


def test_corrupt_checkpoint_inside_a_caption_actor(tmp_path: Path, checkpoint: Path) -> None:
    """What a Ray caption actor's __init__ raises is a one-line UserError naming the model (the
    loader's CheckpointError, reworded by capfilt.inference.load_med), which the pipeline unwraps."""
    from capfilt.config import CaptionConfig
    from capfilt.errors import UserError
    from capfilt.pipeline import _user_error_in
    from capfilt.stages.caption import Captioner

    model = _corrupt_copy(checkpoint, tmp_path / "bad-model", "truncated weights")
    with pytest.raises(UserError, match="truncated or not a safetensors file") as info:
        Captioner(CaptionConfig(model=str(model)))
    wrapped = RuntimeError("actor died")
    wrapped.__cause__ = info.value
    assert _user_error_in(wrapped) is info.value


def test_max_length_beyond_model_positions(tmp_path: Path, checkpoint: Path, no_ray: None) -> None:
    config = pipeline_yaml(
        tmp_path,
        f"{{path: {url_list(tmp_path / 'urls.parquet')}}}",
        f"caption: {{model: {checkpoint}, max_length: 100}}\n",
    )
    one_line_error(cli("run", config), "caption.max_length: 100 exceeds the 48 text positions")


# --------------------------------------------------------------------------- YAML

BILLION_LAUGHS = "\n".join(
    ["a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    + [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    + ["input: {path: urls.parquet, keep_cols: *i}"]
)
"""Nine levels of nine aliases: 9**9 (387 million) strings once expanded, in under 400 bytes."""


def _validate(tmp_path: Path, text: str, *overrides: str):
    path = tmp_path / "pipe.yaml"
    path.write_text(text, encoding="utf-8")
    return cli("validate", path, *[a for o in overrides for a in ("--set", o)])


def test_billion_laughs_fails_before_expanding(tmp_path: Path) -> None:
    """~300 bytes that expand to 9^9 strings: refused on the node graph, nothing is built."""
    assert len(BILLION_LAUGHS) < 400
    one_line_error(_validate(tmp_path, BILLION_LAUGHS), "aliases expand to more than 100,000 values")


@pytest.mark.parametrize(
    "text",
    ["a: &a [*a]\ninput: {path: x}\n", "input: &a {path: x, keep_cols: [*a]}\n"],
    ids=["list", "mapping"],
)
def test_self_referencing_alias(tmp_path: Path, text: str) -> None:
    one_line_error(_validate(tmp_path, text), "refers to a value that contains it")


def test_unhashable_key(tmp_path: Path) -> None:
    one_line_error(_validate(tmp_path, "input: {path: x}\n? [a, b]\n: 1\n"), "a key must be a plain value")


def test_merge_keys_are_supported(tmp_path: Path) -> None:
    """`<<: *anchor` merges a mapping; explicit keys win over merged ones."""
    text = (
        "input: {path: x}\n"
        "caption: &stage {model: my/captioner, batch_size: 8, dtype: float32}\n"
        "filter:\n  <<: *stage\n  model: my/filter\n  threshold: 0.4\n"
    )
    result = _validate(tmp_path, text)
    assert result.exit_code == 0, result.output
    import yaml

    resolved = yaml.safe_load(result.stdout)
    assert resolved["filter"]["model"] == "my/filter"
    assert resolved["filter"]["batch_size"] == 8 and resolved["filter"]["dtype"] == "float32"


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("section", "override", "fragment"),
    [
        (
            "output",
            "output.rows_per_shard=100000000000000000000",
            "output.rows_per_shard: input should be less",
        ),
        ("output", "output.rows_per_shard=1e20", "output.rows_per_shard: input should be a valid integer"),
        ("input", "input.keep_cols=[_shard]", "input.keep_cols: _shard would collide"),
        ("input", "input.keep_cols=[_row, pixels_384]", "_row, pixels_384 would collide"),
        ("download", "download.timeout_s=.inf", "download.timeout_s: input should be a finite number"),
        ("download", "download.timeout_s=.nan", "download.timeout_s: input should be a finite number"),
        (
            "download",
            "download.image_size=100000",
            "download.image_size: input should be less than or equal to 4096",
        ),
        (
            "download",
            "download.image_size=true",
            "download.image_size: expected a number, got the boolean true",
        ),
        ("download", "download.retries=200", "download.retries: input should be less than or equal to 10"),
        ("filter", "filter.threshold=true", "filter.threshold: expected a number, got the boolean true"),
    ],
)
def test_out_of_bounds_values(tmp_path: Path, section: str, override: str, fragment: str) -> None:
    one_line_error(_validate(tmp_path, "input: {path: x}\nfilter: {model: my/filter}\n", override), fragment)


def test_every_numeric_field_refuses_booleans() -> None:
    """One rule for all sections: no int/float field of any schema reads `true` as 1."""
    from pydantic import ValidationError

    from capfilt import bootstrap, config, train
    from capfilt.config import _is_number_type, _Section

    schemas = {
        cls
        for module in (config, train, bootstrap)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, _Section) and cls is not _Section
    }
    checked = 0
    for cls in schemas:
        for name, field in cls.model_fields.items():
            if not _is_number_type(field.annotation):
                continue
            with pytest.raises(ValidationError, match="got the boolean true"):
                cls.__pydantic_validator__.validate_assignment(cls.model_construct(), name, True)
            checked += 1
    assert checked >= 40  # image_size, timeout_s, retries, ..., train steps, bootstrap rounds


def test_sections_share_one_base() -> None:
    from capfilt import bootstrap, config, train

    assert train._Section is config._Section and bootstrap._Section is config._Section
