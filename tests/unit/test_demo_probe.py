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
    # per number of objects: the corpus's first 30 web images have one or two objects each
    assert set(out["captions_right_by_objects"]) <= {"1 object", "2 objects"}
    assert all(0.0 <= v <= 1.0 for v in out["captions_right_by_objects"].values())
    wrong_single = sum(out["single_object_errors"].values())
    assert wrong_single >= 1 and all(n >= 1 for n in out["single_object_errors"].values())
    assert set(out["filter_auc"]) >= {"junk", "mismatched", "wrong_attribute"}
    if "synthetic_wrong" in out["filter_auc"]:
        assert 0.0 <= out["filter_auc"]["synthetic_wrong_by_agreement"] <= 1.0
    everything, nothing = out["selection"]["0"], out["selection"]["1.01"]
    # threshold 0 keeps every web text and one caption per image; above 1 nothing passes
    assert everything["web_kept"] == 30 and everything["synthetic_kept"] == 30
    assert everything["web_kept_noisy"] == pytest.approx(out["raw_web_noisy"])
    assert nothing["web_kept"] == 0 and nothing["synthetic_kept"] == 0 and nothing["clean_removed"] == 1.0
    assert 0.0 <= out["selection"]["0.5"]["kept_set_noisy"] <= 1.0


def test_by_objects_counts_rates_per_object_count_and_single_object_errors(probe: Any) -> None:
    from capfilt.synth import check_caption

    one = [{"color": "red", "shape": "circle"}]
    two = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "star"}]
    captions = [
        [
            "a red square",
            "a blue circle",
            "a red circle",
            "a gray background",
            "a red circle and a green star",
        ],
        ["a red circle and a blue star", "a red circle"],
    ]
    objects = [json.dumps(one), json.dumps(two)]
    right = [[check_caption(c, o) for c in cs] for cs, o in zip(captions, objects, strict=True)]
    rates, errors = probe._by_objects(captions, objects, right)
    assert rates == {"1 object": 0.2, "2 objects": 0.5}
    assert errors == {
        "shape circle -> square": 1, "colour wrong": 1, "no object named": 1, "an extra object": 1,
    }  # fmt: skip


def test_caption_agreement_is_the_mean_cosine_to_the_images_other_captions(probe: Any, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from capfilt.inference import load_med, tokenize

    model = save_tiny_model(tmp_path / "model", seed=0)
    captions = [["a red circle", "a red circle", "best price 2019 free shipping"], ["a blue star"]]
    agree = probe.caption_agreement(str(model), captions)
    assert agree.shape == (4,) and np.isnan(agree[3])
    med, tokenizer = load_med(str(model), device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        tokens = tokenize(tokenizer, captions[0])
        f = med.text_features(med.encode_text(tokens["input_ids"], tokens["attention_mask"])).float()
    expected = [(f[0] @ f[1] + f[0] @ f[2]) / 2, (f[1] @ f[0] + f[1] @ f[2]) / 2, (f[2] @ f[0] + f[2] @ f[1]) / 2]
    assert agree[:3] == pytest.approx([float(e) for e in expected], abs=1e-5)
    assert agree[0] == pytest.approx(agree[1], abs=1e-5)  # identical captions, identical agreement
