"""`capfilt run` as a Ray Job on a real two-node Ray cluster, and the faults a cluster has.

The cluster (``ray_cluster.LocalCluster``) is a head node and a second node joined with
``ray start --address``, one CPU each, on this machine; both are stopped by this module through
their own process groups (never ``ray stop``). Jobs are submitted through the Ray Jobs API of the
head's dashboard, exactly as a user submits them from a laptop; the run's config joins the
cluster with ``ray.address: auto``. Images come from a loopback server started here.

Only the public interface is used: the ``capfilt run CONFIG --set ...`` command line and the run
directory (``samples/``, ``dataset/``, ``images/``, ``manifest.json``), so these tests hold for any
implementation of the pipeline (driver-side or worker-side shard writes).

* ``test_job_on_two_nodes_accounts_for_every_row``: every input row once, with its status; both
  nodes ran pipeline work.
* ``test_killed_driver_then_resubmitted_job_resumes_to_identical_output``: the job's driver is
  killed with SIGKILL after its first shard is committed; the same job submitted again finishes
  the run, and samples, dataset and image tars equal the uninterrupted run's.
* ``test_losing_a_node_mid_run_still_finishes_every_row_once``: the second node is killed (its
  process group and every process it started) while it runs download tasks; the job finishes with
  every row exactly once. Download-only: after the loss one CPU is left, too little for caption and
  filter actors (0.5 CPU each on a CPU-only run) plus the tasks that feed them.
"""

from __future__ import annotations

import json
import math
import shlex
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ray_cluster import LocalCluster, Proc

from capfilt.serve import LoopbackServer

pytestmark = pytest.mark.integration

ROWS_PER_SHARD = 4
JOB_TIMEOUT_S = 420.0
"""Upper bound for one job on a busy 2-core machine (a quiet machine needs well under a minute)."""
KILL_WINDOW_TIMEOUT_S = 300.0

# Rows of the model run: (URL path or full URL, web text, expected status). Rows 0-11 are quick
# (good images, then failures); the last shard downloads slowly (/slow/2/...), so that a driver
# killed right after its first committed shard always leaves a shard to resume.
BAD = [
    ("/status/404", "gone", "download_failed"),
    ("/notimage.jpg", "not an image", "decode_failed"),
    ("ftp://127.0.0.1/x.jpg", "ftp", "invalid_url"),
    ("", "no url", "invalid_url"),
]
MODEL_ROWS: list[tuple[str, str, str]] = (
    [(f"/good{i}.jpg?r={i}", f"a picture of red circle {i}", "ok") for i in range(8)]
    + BAD
    + [(f"/slow/2/good{i}.jpg?r=s{i}", f"big blue square {i}", "ok") for i in range(4)]
)
# Download-only rows for the node loss: every image takes 1 s to serve, so the run lasts long
# enough for the second node to be busy when it is killed.
SLOW_ROWS: list[tuple[str, str, str]] = [
    (f"/slow/1/good{i % 24}.jpg?r=n{i}", f"text {i}", "ok") for i in range(48)
] + BAD


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster.create()
    try:
        cluster.start_node(num_cpus=1)
        cluster.start_node(num_cpus=1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def served(image_dir: Path) -> Iterator[str]:
    with LoopbackServer(directory=image_dir) as server:
        yield server.url


def write_input(path: Path, rows: list[tuple[str, str, str]], base: str) -> Path:
    urls = [u if not u.startswith("/") else base + u for u, _, _ in rows]
    pq.write_table(pa.table({"URL": urls, "TEXT": [t for _, t, _ in rows]}), path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def model_config(workdir: Path, served: str, tiny_models: tuple[Path, Path]) -> Path:
    """Caption + filter on the cluster. Batch size 1 makes every score independent of how rows
    were batched, so a resumed run's files can be compared with an uninterrupted run's exactly."""
    captioner, filter_ = tiny_models
    config = {
        "input": {"path": str(write_input(workdir / "urls.parquet", MODEL_ROWS, served))},
        "download": {"image_size": 32, "threads": 2, "timeout_s": 10, "retries": 0, "min_image_size": 16,
                     "allowed_hosts": ["127.0.0.1"]},
        "caption": {"model": str(captioner), "num_captions": 2, "max_length": 10, "min_length": 3, "batch_size": 1},
        "filter": {"model": str(filter_), "threshold": 0.5, "keep_synthetic": 1, "batch_size": 1},
        "output": {"dir": str(workdir / "unused"), "rows_per_shard": ROWS_PER_SHARD},
        "ray": {"address": "auto"},
    }  # fmt: skip
    path = workdir / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def download_config(workdir: Path, served: str) -> Path:
    config = {
        "input": {"path": str(write_input(workdir / "slow.parquet", SLOW_ROWS, served))},
        "download": {"image_size": 32, "threads": 1, "timeout_s": 20, "retries": 0, "allowed_hosts": ["127.0.0.1"]},
        "output": {"dir": str(workdir / "unused"), "rows_per_shard": ROWS_PER_SHARD},
        "ray": {"address": "auto"},
    }
    path = workdir / "download.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- jobs


def entrypoint(config: Path, out: Path) -> str:
    return shlex.join(["capfilt", "run", str(config), "--set", f"output.dir={out}"])


def submit(cluster: LocalCluster, config: Path, out: Path) -> str:
    return cluster.job_client().submit_job(entrypoint=entrypoint(config, out))


def job_report(cluster: LocalCluster, job_id: str) -> str:
    client = cluster.job_client()
    try:
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
    except Exception as err:  # noqa: BLE001 - a diagnostic for a failing assertion
        return f"(no job info: {err!r})\n{cluster.logs()}"
    return f"job {job_id}: {info.status} {info.message}\n--- job logs ---\n{logs[-6000:]}"


def wait_job(cluster: LocalCluster, job_id: str, *, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll until the job ends; returns its final status name. On timeout the job is stopped."""
    client = cluster.job_client()
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value)
        if time.monotonic() > deadline:
            report = job_report(cluster, job_id)
            client.stop_job(job_id)
            pytest.fail(f"job still {status} after {timeout_s:.0f} s\n{report}")
        time.sleep(1.0)


def run_job(cluster: LocalCluster, config: Path, out: Path) -> None:
    job_id = submit(cluster, config, out)
    status = wait_job(cluster, job_id)
    assert status == "SUCCEEDED", job_report(cluster, job_id)


# --------------------------------------------------------------------------- the run directory


def committed(out: Path) -> set[str]:
    """Committed shards: the samples file is written last (README, "Run directory")."""
    directory = out / "samples"
    return {p.name for p in directory.glob("shard-*.parquet")} if directory.is_dir() else set()


def samples(out: Path) -> list[dict[str, Any]]:
    files = sorted((out / "samples").glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def assert_every_row_once(out: Path, rows: list[tuple[str, str, str]], base: str) -> list[dict[str, Any]]:
    got = samples(out)
    urls = [u if not u.startswith("/") else base + u for u, _, _ in rows]
    counts = Counter(r["url"] for r in got)
    assert len(got) == len(rows), f"{len(got)} sample rows for {len(rows)} input rows"
    assert {u for u, n in counts.items() if n > 1} == set(), "rows written twice"
    assert set(counts) == set(urls), "rows missing"
    assert len({r["key"] for r in got}) == len(rows)
    status = {r["url"]: r["status"] for r in got}
    assert {u: status[u] for u in urls} == {u: s for u, (_, _, s) in zip(urls, rows, strict=True)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_rows"] == manifest["rows"] == len(rows) and manifest["complete"]
    assert manifest["status"] == dict(Counter(s for _, _, s in rows))
    return got


def shard_files(out: Path, sub: str, suffix: str) -> list[Path]:
    return sorted((out / sub).glob(f"shard-*{suffix}"))


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]


def nan_safe(value: Any) -> Any:
    """``value`` with every float NaN replaced by a marker, so that equal files compare equal."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [nan_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: nan_safe(v) for k, v in value.items()}
    return value


def assert_identical_runs(run: Path, reference: Path) -> None:
    """Same samples and dataset rows (every column) and the same tar members, shard by shard."""
    for sub in ("samples", "dataset"):
        names = [p.name for p in shard_files(reference, sub, ".parquet")]
        assert [p.name for p in shard_files(run, sub, ".parquet")] == names, sub
        for name in names:
            want = pq.read_table(reference / sub / name)
            got = pq.read_table(run / sub / name)
            assert got.schema.names == want.schema.names, f"{sub}/{name}"
            assert nan_safe(got.to_pylist()) == nan_safe(want.to_pylist()), f"{sub}/{name} differs"
    tars = [p.name for p in shard_files(reference, "images", ".tar")]
    assert tars and [p.name for p in shard_files(run, "images", ".tar")] == tars
    for name in tars:
        assert tar_members(run / "images" / name) == tar_members(reference / "images" / name), name
    strip = ("started_at", "finished_at", "timing")
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (run, reference)]
    assert [{k: v for k, v in m.items() if k not in strip} for m in manifests][0] == {
        k: v for k, v in manifests[1].items() if k not in strip
    }


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference(cluster: LocalCluster, model_config: Path, workdir: Path) -> tuple[Path, set[str]]:
    """The uninterrupted model run; also records which busy Ray workers the second node showed."""
    out = workdir / "reference"
    job_id = submit(cluster, model_config, out)
    seen: set[str] = set()
    client = cluster.job_client()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not client.get_job_status(job_id).is_terminal():
        seen.update(cluster.nodes[1].busy_workers())
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    status = wait_job(cluster, job_id)
    assert status == "SUCCEEDED", job_report(cluster, job_id)
    return out, seen


def test_job_on_two_nodes_accounts_for_every_row(
    reference: tuple[Path, set[str]], served: str, cluster: LocalCluster
) -> None:
    out, second_node_work = reference
    rows = assert_every_row_once(out, MODEL_ROWS, served)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(1 <= len(r["synthetic_texts"]) <= 2 and r["error"] == "" for r in ok)
    assert all(r["error"] and r["synthetic_texts"] == [] for r in rows if r["status"] != "ok")
    assert len(committed(out)) == len(MODEL_ROWS) // ROWS_PER_SHARD
    assert second_node_work, "the second node never ran a pipeline task or actor"
    assert yaml.safe_load((out / "config.yaml").read_text())["ray"]["address"] == "auto"


def driver_processes(cluster: LocalCluster, out: Path) -> list[Proc]:
    """The job's `capfilt run` process(es) on the head: descendants whose command line names ``out``.

    The Jobs API runs the entrypoint through a shell in its own session; the shell may exec
    capfilt or stay as its parent, so both are matched (killing the shell alone would not stop the
    driver, killing capfilt is the point).
    """
    needle = f"output.dir={out}"
    return [p for p in cluster.head.descendants() if needle in p.title() and "capfilt" in p.title()]


def test_killed_driver_then_resubmitted_job_resumes_to_identical_output(
    reference: tuple[Path, set[str]], cluster: LocalCluster, model_config: Path, served: str, workdir: Path
) -> None:
    out = workdir / "killed-driver"
    total = len(MODEL_ROWS) // ROWS_PER_SHARD
    job_id = submit(cluster, model_config, out)
    client = cluster.job_client()
    deadline = time.monotonic() + KILL_WINDOW_TIMEOUT_S
    while not committed(out):
        assert not client.get_job_status(job_id).is_terminal(), (
            f"job ended before its first shard\n{job_report(cluster, job_id)}"
        )
        assert time.monotonic() < deadline, f"no shard committed in time\n{job_report(cluster, job_id)}"
        time.sleep(0.05)
    drivers = driver_processes(cluster, out)
    for proc in drivers:  # kill -9
        proc.kill()
    at_kill = committed(out)
    assert drivers, f"driver process not found\n{job_report(cluster, job_id)}"
    assert wait_job(cluster, job_id, timeout_s=120) == "FAILED", job_report(cluster, job_id)
    at_kill = committed(out)  # a shard may have been committed while the signal was on its way
    assert 1 <= len(at_kill) < total, f"the kill should interrupt the run ({len(at_kill)}/{total})"
    first = {name: (out / "samples" / name).stat().st_mtime_ns for name in at_kill}

    run_job(cluster, model_config, out)  # the same job again: resumes

    assert len(committed(out)) == total
    assert {name: (out / "samples" / name).stat().st_mtime_ns for name in at_kill} == first, (
        "committed shards must not be rewritten"
    )
    assert_every_row_once(out, MODEL_ROWS, served)
    assert_identical_runs(out, reference[0])
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name]


def test_losing_a_node_mid_run_still_finishes_every_row_once(
    reference: tuple[Path, set[str]], cluster: LocalCluster, download_config: Path, served: str, workdir: Path
) -> None:
    worker = cluster.nodes[1]
    client = cluster.job_client()
    total = -(-len(SLOW_ROWS) // ROWS_PER_SHARD)
    busy: list[str] = []
    # Ray places a job's tasks on the driver's node first; on a quiet machine one download task at a
    # time may run there for the whole job, and the second node never gets one. Placement is not
    # the test's to choose, so the job is submitted again (fresh output) until the second node is
    # caught running one of its tasks, at most three times.
    for attempt in range(1, 4):
        out = workdir / f"lost-node-{attempt}"
        job_id = submit(cluster, download_config, out)
        deadline = time.monotonic() + KILL_WINDOW_TIMEOUT_S
        while not busy and not client.get_job_status(job_id).is_terminal():
            assert time.monotonic() < deadline, f"the job did not end in time\n{job_report(cluster, job_id)}"
            busy = worker.busy_workers()
            time.sleep(0.05)
        if busy:
            break
        assert wait_job(cluster, job_id) == "SUCCEEDED", job_report(cluster, job_id)
    assert busy, "three jobs ran without a task on the second node"
    try:
        worker.kill()  # SIGKILL to its process group and every process it started
        at_kill = committed(out)
        assert not worker.alive()
        assert len(at_kill) < total, "the node loss should happen mid-run"

        status = wait_job(cluster, job_id)
        assert status == "SUCCEEDED", f"killed while running {busy}\n{job_report(cluster, job_id)}"
        assert len(committed(out)) == total
        assert_every_row_once(out, SLOW_ROWS, served)
        assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name]
    finally:  # the module's other tests, in whatever order they run, find two nodes again
        cluster.nodes.remove(worker)
        cluster.start_node(num_cpus=1)
        cluster.wait_for_nodes(2, timeout_s=180)
