"""A minimal real bootstrap: synthetic corpus on loopback, real training, Ray pipeline, evaluation.

Everything is real but tiny (a 1-layer MED, a few optimizer steps, a 24-image web corpus), so the
test checks the wiring and the artifacts, not model quality. The pipeline joins the test run's
one Ray session (``ray_session`` in conftest.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt import bootstrap

pytestmark = pytest.mark.integration  # joins the test run's Ray session

TINY = [
    "corpus.images=24", "corpus.human_images=8", "corpus.test_images=6", "corpus.size=32",
    "model.vocab_size=400",
    "model.overrides={image_size: 32, vision_width: 32, vision_layers: 1, vision_heads: 2, vision_intermediate: 64,"
    " text_width: 32, text_layers: 1, text_heads: 2, text_intermediate: 64, embed_dim: 16, queue_size: 64}",
    "pretrain.train.steps=2", "pretrain.train.batch_size=8", "pretrain.train.save_every=1",
    "captioner.train.steps=2", "captioner.train.batch_size=8",
    "filter.train.steps=2", "filter.train.batch_size=8",
    "pipeline.download.image_size=32", "pipeline.output.rows_per_shard=10",
    "pipeline.caption.num_captions=1", "pipeline.select.min_agreement=null", "pipeline.caption.max_length=8", "pipeline.caption.min_length=6",
    "pipeline.filter.threshold=0.45",
    "eval.k_test=4", "eval.max_length=8", "eval.min_length=2", "eval.num_beams=1",
]  # fmt: skip


def _digests(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in ("report.html",)
    }


def test_minimal_bootstrap_end_to_end_and_rerun_is_a_noop(ray_session: str, tmp_path: Path) -> None:
    run = bootstrap.run_bootstrap(None, TINY, out=tmp_path / "run", progress=False)
    assert run == tmp_path / "run"

    # every step committed, in order, with its time
    state = json.loads((run / "state.json").read_text())["steps"]
    assert list(state) == ["corpus", "round-0/pretrain", "round-0/eval", "round-1/captioner", "round-1/filter",
                           "round-1/pipeline", "round-1/pretrain", "round-1/eval"]
    assert all(s["done"] and s["seconds"] >= 0 for s in state.values())
    assert not list(run.rglob(".*.partial"))

    # models: capfilt checkpoints for MED_r, HF BLIP dirs for captioner and filter
    for r in (0, 1):
        assert (run / f"round-{r}" / "pretrain" / "model" / "model.safetensors").is_file()
    for kind in ("captioner", "filter"):
        assert (run / "round-1" / kind / "hf" / "config.json").is_file()
        assert (run / "round-1" / kind / "model" / "model.safetensors").is_file()

    # the pipeline saw every web URL and used this round's models
    manifest = json.loads((run / "round-1" / "pipeline" / "manifest.json").read_text())
    assert manifest["rows"] == 24 and manifest["complete"]
    assert manifest["status"].get("ok") == 24
    assert manifest["models"]["caption"] == [str(run / "round-1" / "captioner" / "hf")]
    samples = pq.read_table(run / "round-1" / "pipeline" / "samples").to_pylist()
    # One caption per image (num_captions=1); a 2-step model may still write a caption that decodes
    # to nothing, which the caption stage drops rather than keeping an empty text.
    assert all(len(s["synthetic_texts"]) <= 1 for s in samples)
    assert all(t.strip() for s in samples for t in s["synthetic_texts"])
    assert sum(len(s["synthetic_texts"]) for s in samples) > len(samples) // 2

    # D_1 = human pairs + exactly what the pipeline kept
    pairs = pq.read_table(run / "round-1" / "pretrain" / "data" / "pairs.parquet").to_pylist()
    kept_web = sum(s["web_kept"] for s in samples)
    kept_synthetic = sum(sum(s["synthetic_kept"]) for s in samples)
    by_source = {src: sum(p["source"] == src for p in pairs) for src in ("human", "web", "synthetic")}
    assert by_source == {"human": 8, "web": kept_web, "synthetic": kept_synthetic}

    # one metrics row per evaluated round, with the Table-1 numbers and the filter's AUC in round 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert 0 <= row["txt_r1"] <= 100 and 0 <= row["img_r1"] <= 100 and row["cider"] >= 0
    assert 0 <= rows[1]["filter_auc"] <= 1
    evaluation = json.loads((run / "round-1" / "eval.json").read_text())
    assert evaluation["eval"]["n_images"] == 6 and evaluation["data"]["pairs"] == len(pairs)
    assert (run / "report.html").is_file()
    # what CapFilt did, judged against the synthetic corpus's labels: printed, stored, on the report
    summary = evaluation["capfilt"]
    assert summary["pairs"]["raw_web"] == 24 and summary["pairs"]["kept_web"] == kept_web
    assert summary["pairs"]["synthetic_added"] == kept_synthetic
    assert summary["noise"]["raw_web"] == sum(s["noise_type"] != "clean" for s in samples) / 24
    assert set(summary["filter"]["by_type"]) <= {"clean", "junk", "mismatched", "wrong_attribute"}
    assert summary["captions"]["captions"] == sum(len(s["synthetic_texts"]) for s in samples)
    assert "Did CapFilt work?" in (run / "report.html").read_text()

    # a rerun does nothing: no step runs, no artifact changes
    before = _digests(run)
    bootstrap.run_bootstrap(None, TINY, out=run, progress=False)
    assert _digests(run) == before
