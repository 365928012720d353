"""benchmarks/demo_probe.py: judges a captioner and a filter on a synthetic corpus's web images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import load_benchmark, save_tiny_model


@pytest.fixture(scope="module")
def probe() -> Any:
    return load_benchmark("demo_probe")


def test_probe_reports_captions_filter_auc_and_selection_per_threshold(
    probe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from capfilt.synth import make_corpus

    corpus = tmp_path / "corpus"
    make_corpus(
        corpus, images=40, seed=0, size=32, human_images=5, test_images=100, progress=False, world="demo"
    )
    model = save_tiny_model(tmp_path / "model", seed=0, calibrate_itm=True)
    out = probe.main(
        ["--corpus", str(corpus), "--captioner", str(model), "--filter", str(model), "--k", "2", "--n", "30",
         "--thresholds", "0.0,0.5,1.01", "--threads", "1"]
    )  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
    assert out["images"] == 30 and out["k"] == 2
    assert 0.0 <= out["captions_right"] <= out["images_with_a_right_caption"] <= 1.0
    assert len(out["examples"]) == 3 and all(len(c) == 2 for c in out["examples"])
    assert set(out["filter_auc"]) >= {"junk", "mismatched", "wrong_attribute"}
    everything, nothing = out["selection"]["0"], out["selection"]["1.01"]
    # threshold 0 keeps every web text and one caption per image; above 1 nothing passes
    assert everything["web_kept"] == 30 and everything["synthetic_kept"] == 30
    assert everything["web_kept_noisy"] == pytest.approx(out["raw_web_noisy"])
    assert nothing["web_kept"] == 0 and nothing["synthetic_kept"] == 0 and nothing["clean_removed"] == 1.0
    assert 0.0 <= out["selection"]["0.5"]["kept_set_noisy"] <= 1.0
