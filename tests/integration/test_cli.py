"""`capfilt bootstrap` through the CLI (typer's CliRunner): the embedded demo at the smallest size
that still runs every step. The other commands' CLI smoke tests are in tests/unit/test_cli.py;
`capfilt run` goes through the CLI in test_pipeline.py. The pipeline step joins the test run's one
Ray session (``ray_session``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import tiny_overrides
from typer.testing import CliRunner

from capfilt.cli import app

pytestmark = pytest.mark.integration

SMALLEST = [
    "corpus.images=8", "corpus.human_images=4", "corpus.test_images=2", "corpus.size=32",
    "model.vocab_size=200", f"model.overrides={tiny_overrides()}",
    "pretrain.train.steps=1", "pretrain.train.batch_size=4",
    "captioner.train.steps=1", "captioner.train.batch_size=4",
    "filter.train.steps=1", "filter.train.batch_size=4",
    "pipeline.download.image_size=32", "pipeline.caption.num_captions=1", "pipeline.select.min_agreement=null",
    "pipeline.caption.max_length=8", "pipeline.caption.min_length=4",
    "eval.k_test=2", "eval.max_length=6", "eval.min_length=2", "eval.num_beams=1",
]  # fmt: skip


def test_bootstrap_runs_every_step_through_the_cli(ray_session: str, tmp_path: Path) -> None:
    out = tmp_path / "boot"
    args = ["bootstrap", "--out", str(out), *[a for o in SMALLEST for a in ("--set", o)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert result.stdout.strip().splitlines()[-1] == str(out)

    steps = json.loads((out / "state.json").read_text())["steps"]
    assert list(steps) == ["corpus", "round-0/pretrain", "round-0/eval", "round-1/captioner", "round-1/filter",
                           "round-1/pipeline", "round-1/pretrain", "round-1/eval"]  # fmt: skip
    assert all(step["done"] for step in steps.values())
    manifest = json.loads((out / "round-1" / "pipeline" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 8
    sources = pq.read_table(out / "round-1" / "pretrain" / "data" / "pairs.parquet", columns=["source"])
    assert sources.column("source").to_pylist().count("human") == 4  # D_1 = human pairs + what CapFilt kept
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (out / "report.html").is_file()
