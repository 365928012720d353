"""Issue 12.7, the kill cases: SIGKILL a download worker mid-batch, and the driver at 5 seeded points.

One small input (12 loopback images, 2 rows per shard, every image answered after a short
delay so that download batches are in flight for a while) is run once uninterrupted by a
``capfilt run`` subprocess: the reference. Then:

* a Ray worker executing the download map task is killed with SIGKILL mid-batch; Ray retries
  the task and the run completes;
* the driver (``capfilt run`` subprocess) is killed with SIGKILL at 5 points drawn from a seeded
  RNG (after k committed shards, or after t seconds within the reference run's duration), and
  each killed run is rerun to completion in-process.

Every finished run must hold exactly the reference's files: each ``samples/`` and ``dataset/``
shard's rows (all columns), each tar's member names and bytes, and the manifest's counts. The
caption and filter batch size is 1, so no score depends on how rows were batched.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support import assert_identical_runs, spawn_run, tiny_med
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.serve import LoopbackServer
from capfilt.stages import write

pytestmark = pytest.mark.integration

ROWS = 12
ROWS_PER_SHARD = 2
SHARDS = ROWS // ROWS_PER_SHARD
DELAY_S = 0.5
"""Every image is answered after this delay (``/slow/``): a download batch of 2 rows on 2
threads stays in flight for at least this long."""
KILL_SEED = 12
KILL_POINTS = 5
HANG_S = 240.0
"""Generous bound on any one run, only so that a hang fails instead of blocking the test run."""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("kills")
    models = []
    for name, seed in (("captioner", 0), ("filter", 1)):
        med, tokenizer = tiny_med(seed=seed)
        models.append(med.save(root / name, tokenizer))
    (root / "www").mkdir()
    with LoopbackServer(directory=root / "www") as server:
        urls = [f"{server.url}/slow/{DELAY_S}/gen/{40 + i}x{36 + (3 * i) % 7}.jpg" for i in range(ROWS)]
        texts = [f"a picture of {w} number {i}" for i, w in enumerate(["red", "blue", "green", "star"] * 3)]
        pq.write_table(pa.table({"URL": urls, "TEXT": texts}), root / "urls.parquet")
        # An untrained ITM head scores every pair near 0.47: threshold 0.4 keeps texts, so the
        # dataset/ shards and tars are not empty.
        config = {
            "input": {"path": str(root / "urls.parquet")},
            "download": {"image_size": 32, "threads": 2, "timeout_s": 20, "retries": 0,
                         "allowed_hosts": ["127.0.0.1"]},
            "caption": {"model": str(models[0]), "num_captions": 2, "max_length": 8, "min_length": 3,
                        "batch_size": 1},
            "filter": {"model": str(models[1]), "threshold": 0.4, "keep_synthetic": 1, "batch_size": 1},
            "output": {"dir": str(root / "unused"), "rows_per_shard": ROWS_PER_SHARD},
        }  # fmt: skip
        path = root / "capfilt.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        yield path


def finish(proc, what: str) -> None:
    """Wait for a driver subprocess that must succeed."""
    try:
        rc = proc.wait(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert rc == 0, f"{what} failed (exit {rc}): {stderr[-3000:]}"


def rerun(config: Path, out: Path) -> None:
    """Resume ``out`` in-process (the CLI joins the test run's Ray session)."""
    result = CliRunner().invoke(app, ["run", str(config), "--set", f"output.dir={out}"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"


@pytest.fixture(scope="module")
def reference(
    ray_session: str, config_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, float]:
    """The uninterrupted run, by a driver subprocess as the killed ones; (run dir, seconds it took)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    started = time.monotonic()
    finish(spawn_run(config_file, out, ray_session), "the reference run")
    seconds = time.monotonic() - started
    assert write.committed_shards(out) == set(range(SHARDS))
    assert not (out / "_parts").exists()
    return out, seconds


# --------------------------------------------------------------------------- download worker


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (from /proc): this test run's Ray session and its workers only."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def download_workers() -> list[int]:
    """Ray workers of this test run's session now executing the download map task.

    The session was started by this process (``ray_session``), so its raylet and every worker
    process descend from it; Ray titles a worker ``ray::<task>`` while it runs a task.
    """
    return [
        p
        for p in descendants(os.getpid())
        if cmdline(p).startswith("ray::") and "_download_batch" in cmdline(p)
    ]


def test_kill_9_of_a_download_worker_mid_batch_is_retried_to_the_same_output(
    reference: tuple[Path, float], config_file: Path, ray_session: str, tmp_path: Path
) -> None:
    out = tmp_path / "worker-killed"
    proc = spawn_run(config_file, out, ray_session)
    killed: list[tuple[int, str]] = []
    deadline = time.monotonic() + HANG_S
    try:
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            for pid in download_workers():
                title = cmdline(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append((pid, title))
                break
            time.sleep(0.01)
    finally:
        finish(proc, "the run whose download worker was killed")
    assert killed, "no download task was seen running: nothing was killed"
    pid, title = killed[0]
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "_download_batch" in title
    assert write.committed_shards(out) == set(range(SHARDS))
    assert_identical_runs(out, reference[0])


# --------------------------------------------------------------------------- driver


def kill_points(seconds: float) -> list[tuple[str, float]]:
    """KILL_POINTS seeded points: ("shards", k) kills once k shards are committed (0: as soon as
    parts are being written), ("seconds", t) kills t seconds after the driver starts."""
    rng = random.Random(KILL_SEED)
    by_shards = [rng.random() < 0.5 for _ in range(KILL_POINTS)]
    counts = iter(rng.sample(range(SHARDS), sum(by_shards)))  # distinct shard counts
    return [
        ("shards", next(counts)) if shards else ("seconds", rng.uniform(0.1, 1.0) * seconds)
        for shards in by_shards
    ]


def kill_driver_at(proc, out: Path, point: tuple[str, float]) -> bool:
    """SIGKILL the driver at ``point``; False if it finished before the point was reached."""
    kind, value = point
    started = time.monotonic()
    try:
        while proc.poll() is None:
            assert time.monotonic() - started < HANG_S, f"kill point {point} never reached"
            if kind == "seconds":
                reached = time.monotonic() - started >= value
            else:
                reached = len(write.committed_shards(out)) >= value and (
                    value > 0 or (out / "_parts").exists()
                )
            if reached:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert rc in (0, -signal.SIGKILL), f"the driver failed before its kill point: {stderr[-3000:]}"
    return rc == -signal.SIGKILL


def test_kill_9_of_the_driver_at_5_seeded_points_then_rerun_gives_the_same_output(
    reference: tuple[Path, float], config_file: Path, ray_session: str, tmp_path: Path
) -> None:
    ref_dir, seconds = reference
    points = kill_points(seconds)
    interrupted = []
    for i, point in enumerate(points):
        out = tmp_path / f"killed-{i}"
        if kill_driver_at(spawn_run(config_file, out, ray_session), out, point):
            committed = write.committed_shards(out)
            interrupted.append(len(committed) < SHARDS)
        rerun(config_file, out)
        assert write.committed_shards(out) == set(range(SHARDS)), point
        assert_identical_runs(out, ref_dir)
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], point
    assert any(interrupted), f"no kill point {points} interrupted a run: {interrupted}"
