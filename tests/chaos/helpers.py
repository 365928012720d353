"""Helpers for the chaos tests: run the real CLI in-process and check the one-line error.

Every case ends in ``error: ...`` on one stderr line and exit code 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def cli(*args: object):
    """Invoke ``capfilt ARGS`` in-process (typer's CliRunner); returns click's Result."""
    from capfilt.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str, ray_logs: bool = False) -> str:
    """Assert exit code 2 and exactly one stderr line ``error: ...`` holding every fragment.

    ``ray_logs``: the error came from a Ray task (the read tasks check keys and UTF-8), and Ray
    Data logs its failed task before capfilt's one line, which must be the last.
    """
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = result.stderr.strip().splitlines()
    if ray_logs:  # Ray's own log lines may come first; capfilt's part is one last line
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], f"expected one last error line: {result.stderr!r}"
        lines = errors
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def tmp_files(root: Path) -> list[Path]:
    """Temporary files a writer left under ``root``."""
    return sorted(p for p in Path(root).rglob("*") if p.name.endswith(".tmp"))


def url_list(path: Path, rows: int = 3, **extra: list) -> Path:
    """A small LAION-style parquet URL list (nothing is downloaded by the chaos tests)."""
    columns = {
        "URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(rows)],
        "TEXT": [f"text {i}" for i in range(rows)],
        **extra,
    }
    pq.write_table(pa.table(columns), path)
    return path


def pipeline_yaml(tmp_path: Path, input_yaml: str, extra: str = "", name: str = "pipe.yaml") -> Path:
    """A pipeline config writing to tmp_path/run (download-only unless ``extra`` adds stages)."""
    path = tmp_path / name
    path.write_text(f"input: {input_yaml}\noutput: {{dir: {tmp_path / 'run'}}}\n{extra}", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- real mounts


def can_mount(tmp_path: Path) -> bool:
    if sys.platform != "linux" or not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    try:
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs '{probe}'"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def in_namespace(script: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` with sh in a private mount namespace; ``$CAPFILT`` runs the CLI."""
    env = {**os.environ, "CAPFILT": f"{sys.executable} -m capfilt.cli", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=timeout, env=env
    )
