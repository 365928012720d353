"""benchmarks/ablation.py: mean +- sd over seeds, and CapFilt vs raw judged on paired differences."""

from __future__ import annotations

from typing import Any

import pytest
from support import load_benchmark


@pytest.fixture(scope="module")
def ablation() -> Any:
    return load_benchmark("ablation")


def _run(raw: float, capfilt: float, cider_raw: float, cider_capfilt: float) -> dict[str, dict[str, Any]]:
    rows = {
        v: {"variant": v, "pairs": 100, "txt_r1": 5.0, "img_r1": 4.0, "cider": 0.1}
        for v in ("raw", "filter", "captioner", "capfilt")
    }
    rows["raw"].update(txt_r1=raw, cider=cider_raw)
    rows["capfilt"].update(txt_r1=capfilt, cider=cider_capfilt)
    return rows


def test_summary_is_mean_and_sample_sd_and_direction_uses_paired_differences(ablation: Any) -> None:
    runs = [_run(10, 14, 0.10, 0.20), _run(12, 15, 0.12, 0.18), _run(11, 17, 0.11, 0.13)]
    summary = ablation.summarize(runs)
    assert summary["seeds"] == 3
    raw = summary["variants"]["raw"]["txt_r1"]
    assert (
        raw["mean"] == pytest.approx(11.0)
        and raw["sd"] == pytest.approx(1.0)
        and raw["values"] == [10, 12, 11]
    )
    assert summary["variants"]["capfilt"]["cider"]["mean"] == pytest.approx(17.0)  # CIDEr is shown x100
    tr = summary["capfilt_vs_raw"]["txt_r1"]  # diffs 4, 3, 6: mean 4.33 > sd 1.53
    assert tr["mean_diff"] == pytest.approx(13 / 3) and tr["met"] is True
    cider = summary["capfilt_vs_raw"]["cider"]  # diffs 10, 6, 2 (x100): mean 6 > sd 4
    assert (
        cider["mean_diff"] == pytest.approx(6.0) and cider["sd_diff"] == pytest.approx(4.0) and cider["met"]
    )
    text = ablation.format_table(summary)
    assert "11.0 +- 1.0" in text and "(3 seeds" in text and "NOT" not in text

    noisy = ablation.summarize([_run(10, 14, 0.1, 0.1), _run(12, 9, 0.1, 0.1), _run(11, 13, 0.1, 0.1)])
    assert noisy["capfilt_vs_raw"]["txt_r1"]["met"] is False  # diffs 4, -3, 2: mean 1 < sd 3.6
    assert "NOT more than one sd" in ablation.format_table(noisy)


def test_one_seed_is_never_evidence(ablation: Any) -> None:
    summary = ablation.summarize([_run(10, 20, 0.1, 0.3)])
    assert summary["capfilt_vs_raw"]["txt_r1"] == {"mean_diff": 10.0, "sd_diff": None, "met": None}
    text = ablation.format_table(summary)
    assert "+-" not in text.split("\n(")[0] and "one seed: no sd, NOT evidence" in text


def test_seeds_change_the_corpus_and_every_training_seed(ablation: Any) -> None:
    from capfilt.bootstrap import load_config

    a, b = (load_config(None, ablation.seed_overrides(s)) for s in (0, 1))
    for get in (
        lambda c: c.corpus.seed,
        lambda c: c.pretrain.train.seed,
        lambda c: c.captioner.train.seed,
        lambda c: c.filter.train.seed,
        lambda c: c.pipeline.caption.seed,
    ):
        assert get(a) != get(b)


def test_step_seconds_reads_each_steps_wall_time_from_the_run_state(ablation: Any, tmp_path: Any) -> None:
    from capfilt.bootstrap.steps import State

    state = State(tmp_path / "state.json")
    state.mark("round-0/pretrain", 12.5)
    state.mark("corpus", None)  # found committed by a rerun: not timed
    assert ablation.step_seconds(tmp_path) == {"round-0/pretrain": 12.5, "corpus": None}
