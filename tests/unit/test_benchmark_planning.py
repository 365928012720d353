"""The 30-minute benchmark's step planning (pure functions of benchmarks/synthetic_capfilt.py)."""

from __future__ import annotations

from typing import Any

import pytest
from support import load_benchmark


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("synthetic_capfilt")


RATES = {"pretrain": 64.0, "captioner": 128.0, "filter": 64.0}
BATCH = {"pretrain": 64, "captioner": 64, "filter": 64}
NONE = {"pretrain": None, "captioner": None, "filter": None}


def test_plan_spends_the_time_in_the_shares(bench: Any) -> None:
    steps = bench.plan_steps(1000 + 3 * bench.RUN_OVERHEAD_S, RATES, BATCH, NONE)
    seconds = {k: steps[k] * BATCH[k] / RATES[k] for k in steps}
    for kind, share in bench.TIME_SHARES.items():
        assert seconds[kind] == pytest.approx(1000 * share, abs=1.0)


def test_replan_after_a_slowdown_shrinks_only_the_kinds_still_to_run(bench: Any) -> None:
    planned = bench.plan_steps(1000 + 3 * bench.RUN_OVERHEAD_S, RATES, BATCH, NONE)
    left = 400 + 2 * bench.RUN_OVERHEAD_S  # what the plan left for captioner + filter
    same, slowdown = bench.replan(
        planned, "pretrain", RATES["pretrain"], seconds_left=left, rates=RATES, batch=BATCH, given=NONE
    )
    assert slowdown == 1.0
    assert same["pretrain"] == planned["pretrain"]
    assert abs(same["captioner"] - planned["captioner"]) <= 1 and abs(same["filter"] - planned["filter"]) <= 1
    # The machine got twice as busy during pre-training: the later runs get half the steps.
    slower, slowdown = bench.replan(
        planned, "pretrain", RATES["pretrain"] / 2, seconds_left=left, rates=RATES, batch=BATCH, given=NONE
    )
    assert slowdown == 2.0 and slower["pretrain"] == planned["pretrain"]
    assert slower["captioner"] == pytest.approx(planned["captioner"] / 2, abs=1)
    assert slower["filter"] == pytest.approx(planned["filter"] / 2, abs=1)
    # Steps given on the command line are never changed; the last kind has nothing to replan.
    given, _ = bench.replan(
        planned, "pretrain", 8.0, seconds_left=left, rates=RATES, batch=BATCH, given={**NONE, "captioner": 77}
    )
    assert given["captioner"] == 77
    assert (
        bench.replan(planned, "filter", 1.0, seconds_left=0, rates=RATES, batch=BATCH, given=NONE)[0]
        == planned
    )
