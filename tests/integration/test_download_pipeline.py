"""`capfilt run` with hostile URL lists (issue 12 acceptance) and finite Ray retries.

* default settings + loopback URLs: no request reaches the server, every row blocked_address;
* drip servers mixed with normal images: each drip row download_failed with a deadline error,
  the server sees the client hang up, the normal rows are ok;
* a batch whose worker dies every time fails after ray.max_retries retries (Ray Data's default
  would retry it forever), and the run's error is one line naming the shards it was lost from.
  Ray Data 2.60 takes the retry options only as (deprecated) ``ray_remote_args``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import PipelineConfig, RayConfig
from capfilt.serve import LoopbackServer
from capfilt.stages import write

pytestmark = pytest.mark.integration


@pytest.fixture()
def server(image_dir: Path) -> Iterator[LoopbackServer]:
    with LoopbackServer(directory=image_dir) as srv:
        yield srv


def run_urls(tmp_path: Path, urls: list[str], download: dict) -> list[dict]:
    pq.write_table(
        pa.table({"URL": urls, "TEXT": [f"text {i}" for i in range(len(urls))]}), tmp_path / "in.parquet"
    )
    config = {
        "input": {"path": str(tmp_path / "in.parquet")},
        "download": {"image_size": 32, "threads": 4, **download},
        "output": {"dir": str(tmp_path / "run"), "rows_per_shard": 4},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return pq.read_table(tmp_path / "run" / write.SAMPLES_DIR).sort_by("key").to_pylist()


def test_default_settings_block_a_loopback_url_list(
    ray_session: str, server: LoopbackServer, tmp_path: Path
) -> None:
    port = server.port
    urls = [
        f"http://127.0.0.1:{port}/good0.jpg",
        f"http://127.0.0.2:{port}/good1.jpg",
        f"http://2130706433:{port}/good2.jpg",
        f"http://0x7f000001:{port}/good3.jpg",
        f"http://[::1]:{port}/good4.jpg",
        f"http://localhost:{port}/good5.jpg",
        f"http://127.0.0.1:{port}/redirect/1/good6.jpg",
    ]
    rows = run_urls(tmp_path, urls, {})
    assert [r["status"] for r in rows] == ["blocked_address"] * len(urls)
    assert server.requests == []


def test_drip_servers_do_not_hold_a_run(ray_session: str, server: LoopbackServer, tmp_path: Path) -> None:
    drips = [f"{server.url}/drip/{phase}/good0.jpg" for phase in ("status", "headers", "chunks", "body")]
    good = [f"{server.url}/good{i}.jpg" for i in range(4)]
    urls = [u for pair in zip(drips, good, strict=True) for u in pair]
    rows = run_urls(tmp_path, urls, {"timeout_s": 2, "retries": 0, "allowed_hosts": ["127.0.0.1"]})
    by_url = {r["url"]: r for r in rows}
    assert [by_url[u]["status"] for u in good] == ["ok"] * 4
    assert [by_url[u]["status"] for u in drips] == ["download_failed"] * 4
    assert all(by_url[u]["error"].startswith("deadline:") for u in drips)
    stop = time.monotonic() + 30  # the server notices a hang-up on its next write (1 s apart)
    while len(server.drips) < 4 and time.monotonic() < stop:
        time.sleep(0.1)
    assert sorted(outcome for _, outcome, _ in server.drips) == ["client closed early"] * 4


def _die_on_first_batch(batch: dict, *, marker: str) -> dict:
    """Records each attempt, then kills its worker process for the batch holding row 0."""
    if 0 in batch["id"]:
        with open(marker, "a", encoding="utf-8") as f:
            f.write("attempt\n")
        os._exit(1)
    return batch


def test_a_poison_batch_fails_after_finite_retries(ray_session: str, tmp_path: Path) -> None:
    import ray

    from capfilt import pipeline

    marker = tmp_path / "attempts.txt"
    options = RayConfig(max_retries=1).task_options()
    ds = ray.data.range(8, override_num_blocks=2).map_batches(
        _die_on_first_batch, fn_kwargs={"marker": str(marker)}, batch_size=4, **options
    )
    with pytest.raises(Exception) as caught:  # noqa: PT011 - whatever Ray wraps the crash in
        ds.materialize()
    assert marker.read_text().count("attempt") == 2  # the first try and one retry, then it gave up
    cfg = PipelineConfig.model_validate(
        {"input": {"path": str(tmp_path)}, "output": {"rows_per_shard": 4}, "ray": {"max_retries": 1}}
    )
    message = pipeline._lost_work(caught.value, [0, 1], cfg)  # shards 0 and 1 still waiting for rows
    assert message is not None and "\n" not in message
    assert "ray.max_retries=1" in message and "0 (input rows 0-3)" in message


def test_stage_options_are_finite() -> None:
    ray_cfg = RayConfig()
    assert ray_cfg.max_retries == 3
    assert ray_cfg.task_options() == {"max_retries": 3}
    assert ray_cfg.actor_options() == {"max_restarts": 3, "max_task_retries": 3}
