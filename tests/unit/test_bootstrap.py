"""The bootstrap's step state machine, with the heavy steps replaced by cheap deterministic fakes.

The fakes write artifacts whose bytes depend only on their inputs (the training config's data
and init, the pipeline's models and URL list), so "a resumed run ends with the same artifacts as
an uninterrupted one" is checked by comparing file digests. The real corpus generator runs (it
is fast at this size) and the fake pipeline commits shards with the real shard writer, so the
data assembly (D_r, the ablation variants) runs on real pipeline output formats.

The fakes are passed in as a :class:`capfilt.bootstrap.Backend` (``FAKES``), the way any caller
swaps the heavy work; nothing is patched. Run as a script (``python tests/unit/test_bootstrap.py
OUT``), this file runs a bootstrap with the fakes: the kill -9 test does that in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from capfilt import bootstrap
from capfilt.bootstrap import (
    FAIL_AFTER_ENV,
    FAIL_DURING_ENV,
    Backend,
    InjectedFault,
    State,
    Step,
    run_steps,
)
from capfilt.errors import UserError
from capfilt.train import TrainingConfig

SMALL = [
    "corpus.images=24", "corpus.human_images=6", "corpus.test_images=4", "corpus.size=32",
    "pipeline.output.rows_per_shard=10",
    "pipeline.select.min_agreement=null",  # the fake pipeline writes one caption per image: no agreement
]  # fmt: skip
STEP_DELAY_ENV = "CAPFILT_TEST_STEP_DELAY"


# --------------------------------------------------------------------------- fakes


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _delay() -> None:
    time.sleep(float(os.environ.get(STEP_DELAY_ENV, "0")))


def fake_training(kind: str, cfg: TrainingConfig, resume: bool) -> Path:
    """Writes checkpoints/ then model/ (and hf/), content = digest of data files + init."""
    out = Path(cfg.output.dir)
    checkpoints = out / "checkpoints"
    if checkpoints.exists() and not resume:
        raise UserError(f"output.dir: {out} already holds checkpoints")
    data = [hashlib.sha256(Path(s.path).read_bytes()).hexdigest() for s in cfg.data.sources]
    init = cfg.model.init
    init_digest = init if init == "scratch" else (Path(init) / "weights.txt").read_text()
    (checkpoints / "step_00000001").mkdir(parents=True, exist_ok=True)
    _delay()
    weights = _digest(kind, data, init_digest, cfg.train.steps, cfg.train.seed)
    for sub in ["model"] + (["hf"] if kind != "pretrain" else []):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "weights.txt").write_text(weights)
    return out


def fake_pipeline(cfg: Any) -> Path:
    """Commits shards with the real writer; scores are digests of (filter models, key).

    The url column keeps the path only: the server's port differs between the test's run
    directories (within one directory it is pinned, see test_served_port_is_remembered).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.config import dump
    from capfilt.stages import write as writer
    from capfilt.stages.select import filter_score

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump(cfg))  # as the real run does: the ablation reads its rule
    urls = pq.read_table(cfg.input.path).to_pylist()
    corpus = Path(cfg.input.path).parent / "corpus"
    images = {
        r["key"]: r["image"]
        for r in pq.read_table(corpus / "web.parquet", columns=["key", "image"]).to_pylist()
    }
    filters = [(Path(m) / "weights.txt").read_text() for m in cfg.filter.model_ids]
    captioners = [(Path(m) / "weights.txt").read_text() for m in cfg.caption.model_ids]
    size = cfg.output.rows_per_shard
    done = writer.committed_shards(out)
    for shard in range(0, (len(urls) + size - 1) // size):
        if shard in done:
            continue
        rows = []
        for row in urls[shard * size : (shard + 1) * size]:
            web_itm = int(_digest(filters, row["key"], "web")[:8], 16) / 0xFFFFFFFF
            syn_itm = int(_digest(filters, row["key"], "syn")[:8], 16) / 0xFFFFFFFF
            web_itc = int(_digest(filters, row["key"], "web-itc")[:8], 16) / 0xFFFFFFFF
            syn_itc = int(_digest(filters, row["key"], "syn-itc")[:8], 16) / 0xFFFFFFFF
            web_score = filter_score(web_itm, web_itc, cfg.filter.itc_weight)
            syn_score = filter_score(syn_itm, syn_itc, cfg.filter.itc_weight)
            rows.append({
                "key": row["key"], "url": urlsplit(row["URL"]).path, "web_text": row["TEXT"], "status": "ok", "error": "",
                "image": images[row["key"]],
                "synthetic_texts": [f"caption {_digest(captioners, row['key'])[:6]}"],
                "web_itm": web_itm, "synthetic_itm": [syn_itm], "web_itc": web_itc, "synthetic_itc": [syn_itc],
                "web_kept": web_score >= cfg.filter.threshold, "synthetic_kept": [syn_score >= cfg.filter.threshold],
                "noise_type": row["noise_type"], "noisy": row["noisy"],
            })  # fmt: skip
        writer.write_shard(out, shard, pa.Table.from_pylist(rows), keep_cols=["noise_type", "noisy"])
        _delay()
    (out / "manifest.json").write_text(json.dumps({"rows": len(urls)}))
    return out


def fake_evaluate(model_path: Path, data_path: Path, **kwargs: Any) -> dict[str, Any]:
    weights = (Path(model_path) / "weights.txt").read_text()
    value = int(weights[:4], 16) / 0xFFFF * 100
    return {
        "retrieval": {"txt_r1": value, "img_r1": 100 - value},
        "captioning": {"cider": value / 100, "bleu_4": 0.1},
        "settings": kwargs,
    }


def fake_isolated(
    kind: str, cfg: TrainingConfig, resume: bool, threads: int, processes: int, threads_file: Path | None = None
) -> Path:
    """The fake training for steps trained in child processes (``processes`` ranks of ``threads`` threads)."""
    assert threads >= 1 and processes >= 1
    return fake_training(kind, cfg, resume)


def fake_evaluate_isolated(model_path: Path, data_path: Path, threads: int, **kwargs: Any) -> dict[str, Any]:
    return fake_evaluate(model_path, data_path, **kwargs)


FAKES = Backend(
    train=fake_training, train_isolated=fake_isolated, run_pipeline=fake_pipeline, evaluate=fake_evaluate,
    evaluate_isolated=fake_evaluate_isolated, build_report=lambda run: None,
)  # fmt: skip
"""The real corpus generator and loopback server; fake training, pipeline and evaluation; no report."""


def artifact_digests(run_dir: Path) -> dict[str, str]:
    """Digest of every committed artifact file (state.json, which holds timings, excluded).

    Config files name absolute paths under the run directory; those are replaced by ``RUN`` so
    that runs in different directories compare equal.
    """
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and rel.name != "state.json" and not any(p.startswith(".") for p in rel.parts):
            data = path.read_bytes().replace(str(run_dir).encode(), b"RUN")
            out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture
def no_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fault injection left over from the environment (the tests set it where they mean to)."""
    monkeypatch.delenv(FAIL_AFTER_ENV, raising=False)
    monkeypatch.delenv(FAIL_DURING_ENV, raising=False)


def _run(out: Path, *extra: str, **kwargs: Any) -> Path:
    """A bootstrap on the small corpus with the fake backend."""
    return bootstrap.run_bootstrap(None, [*SMALL, *extra], out=out, progress=False, backend=FAKES, **kwargs)


# --------------------------------------------------------------------------- run_steps


def _counting_step(
    name: str, target: Path, calls: list[tuple[str, bool]], *, resumable: bool = False, content: str = "x"
) -> Step:
    def run(staging: Path, resuming: bool) -> None:
        calls.append((name, resuming))
        staging.mkdir(exist_ok=True)
        (staging / "log.txt").open("a").write(content)

    return Step(name=name, target=target, run=run, resumable=resumable)


def test_run_steps_skips_committed_and_runs_the_rest(tmp_path: Path) -> None:
    calls: list[tuple[str, bool]] = []
    steps = [_counting_step(n, tmp_path / n, calls) for n in ("a", "b", "c")]
    state = State(tmp_path / "state.json")
    assert set(run_steps(steps, state, echo=lambda s: None)) == {"a", "b", "c"}
    assert [c[0] for c in calls] == ["a", "b", "c"]

    calls.clear()
    (tmp_path / "b").rename(tmp_path / "gone")  # b's artifact lost: b is recomputed, a and c are not
    ran = run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None)
    assert list(ran) == ["b"] and calls == [("b", False)]
    saved = json.loads((tmp_path / "state.json").read_text())["steps"]
    assert all(saved[n]["done"] for n in "abc")


def test_interrupted_step_is_resumed_or_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool]] = []
    steps = [
        _counting_step("train", tmp_path / "train", calls, resumable=True),
        _counting_step("eval", tmp_path / "eval", calls, resumable=False),
    ]
    monkeypatch.setenv(FAIL_DURING_ENV, "train")
    with pytest.raises(InjectedFault):
        run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None)
    assert not (tmp_path / "train").exists() and (tmp_path / ".train.partial").exists()
    monkeypatch.setenv(FAIL_DURING_ENV, "eval")
    with pytest.raises(InjectedFault):
        run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None)
    # the resumable step got its partial output back and appended to it; the other starts over
    assert calls == [("train", False), ("train", True), ("eval", False)]
    assert (tmp_path / "train" / "log.txt").read_text() == "xx"
    monkeypatch.delenv(FAIL_DURING_ENV)
    run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None)
    assert calls[-1] == ("eval", False)
    assert (tmp_path / "eval" / "log.txt").read_text() == "x"


def test_artifact_renamed_before_state_write_counts_as_done(tmp_path: Path) -> None:
    calls: list[tuple[str, bool]] = []
    (tmp_path / "a").mkdir()  # a crash between the rename and state.json
    ran = run_steps(
        [_counting_step("a", tmp_path / "a", calls)], State(tmp_path / "state.json"), echo=lambda s: None
    )
    assert ran == {} and calls == []
    assert State(tmp_path / "state.json").done("a")


def test_step_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    step = Step(name="empty", target=tmp_path / "out", run=lambda staging, resuming: None)
    with pytest.raises(RuntimeError, match="wrote nothing"):
        run_steps([step], State(tmp_path / "state.json"), echo=lambda s: None)
    assert not State(tmp_path / "state.json").done("empty")


def _group_step(name: str, target: Path, body: Any, group: str = "g") -> Step:
    def run(staging: Path, resuming: bool) -> None:
        body(name)
        staging.mkdir()

    return Step(name=name, target=target, run=run, resumable=True, group=group)


def test_steps_of_a_group_run_at_the_same_time_and_commit_in_step_order(tmp_path: Path) -> None:
    """Each waits for the other at a barrier: run one after the other, the first would time out."""
    import threading

    barrier = threading.Barrier(2, timeout=20)
    calls: list[tuple[str, bool]] = []
    steps = [
        _counting_step("before", tmp_path / "before", calls),
        _group_step("a", tmp_path / "a", lambda name: barrier.wait()),
        _group_step("b", tmp_path / "b", lambda name: (time.sleep(0.2), barrier.wait())),
        _counting_step("after", tmp_path / "after", calls),
    ]
    ran = run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None, max_parallel=2)
    assert set(ran) == {"before", "a", "b", "after"} and [c[0] for c in calls] == ["before", "after"]
    saved = json.loads((tmp_path / "state.json").read_text())["steps"]
    assert list(saved) == ["before", "a", "b", "after"]  # b may finish first; the file keeps step order

    # max_parallel=1 (concurrency off, or one core): the same steps one after the other, in order
    order: list[str] = []
    for name in ("a", "b"):
        (tmp_path / name).rename(tmp_path / f"{name}-old")
    steps[1:3] = [_group_step(n, tmp_path / n, order.append) for n in ("a", "b")]
    assert set(run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None)) == {"a", "b"}
    assert order == ["a", "b"]


def test_a_failing_step_of_a_group_lets_the_others_finish_and_commit(tmp_path: Path) -> None:
    def body(name: str) -> None:
        if name == "a":
            raise ValueError("a broke")
        time.sleep(0.3)  # still running when a fails

    steps = [_group_step(n, tmp_path / n, body) for n in ("a", "b", "c")]
    with pytest.raises(ValueError, match="a broke"):
        run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None, max_parallel=3)
    state = State(tmp_path / "state.json")
    assert not state.done("a") and state.done("b") and state.done("c")
    assert (tmp_path / "b").is_dir() and (tmp_path / "c").is_dir() and not (tmp_path / "a").exists()

    steps[0] = _group_step("a", tmp_path / "a", lambda name: None)  # fixed: the rerun runs a only
    assert list(run_steps(steps, State(tmp_path / "state.json"), echo=lambda s: None, max_parallel=3)) == [
        "a"
    ]


@pytest.mark.parametrize(
    ("cores", "concurrent", "parallel", "group", "batch", "where"),
    [
        (2, "true", "1", 2, 32, (1, 1)),  # the demo's captioner + filter on this machine: one core each
        (2, "true", "1", 3, 32, (1, 1)),  # the ablation's three pre-trainings: all at once, one thread each
        (2, "true", "1", 1, 32, (1, 2)),  # MED_r alone: a child process with both cores
        (8, "true", "1", 3, 32, (1, 2)),
        (1, "true", "1", 2, 32, None),  # one core: one after the other, in this process
        (4, "false", "1", 2, 32, None),  # concurrent_training off: in this process
        (4, "false", "1", 1, 32, None),
        (2, "true", "auto", 1, 32, (2, 1)),  # data-parallel: 2 processes of 16 samples, a core each
        (2, "false", "auto", 1, 32, (2, 1)),  # data-parallel does not need concurrent_training
        (2, "true", "auto", 1, 24, (1, 2)),  # 2 x 12 would be under 16 per process
        (8, "true", "auto", 1, 32, (2, 4)),  # at most 32 // 16 processes, the cores shared among them
        (8, "true", "auto", 1, 64, (4, 2)),
        (8, "true", "auto", 2, 64, (4, 1)),
        (2, "true", "auto", 2, 32, (1, 1)),
        (1, "true", "2", 1, 32, (2, 1)),  # asked for: 2 processes even on one core
    ],
)
def test_placement_shares_the_cores_among_a_group_and_splits_a_training_across_processes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    concurrent: str,
    parallel: str,
    group: int,
    batch: int,
    where: tuple[int, int] | None,
) -> None:
    from capfilt.bootstrap.planner import Bootstrap, Placement

    monkeypatch.setattr("capfilt.bootstrap.planner.available_cores", lambda: cores)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = bootstrap.load_config(None, [*SMALL, f"concurrent_training={concurrent}", f"data_parallel={parallel}"])
    expected = Placement(processes=where[0], threads=where[1]) if where else None
    assert Bootstrap(cfg=cfg, run_dir=tmp_path, backend=FAKES).placement(group, batch) == expected


def test_ablation_pretrainings_train_with_med1_as_one_group_of_one_thread_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_faults: None
) -> None:
    """--ablation: MED_1 and the three rows need only round 1's pipeline, so they form one group that
    trains at once (one thread each on 2 cores); MED_0 and a later round's MED_r still train alone."""
    from dataclasses import replace

    from capfilt.bootstrap.planner import Bootstrap

    monkeypatch.setattr("capfilt.bootstrap.planner.available_cores", lambda: 2)
    cfg = bootstrap.load_config(None, [*SMALL, "concurrent_training=true"])
    steps = Bootstrap(cfg=cfg, run_dir=tmp_path / "plan", backend=FAKES).steps(rounds=2, ablation=True)
    names = [step.name for step in steps]
    together = ["round-1/pretrain", "ablation/raw/pretrain", "ablation/filter/pretrain", "ablation/captioner/pretrain"]
    first = names.index("round-1/pretrain")
    assert names[first : first + 4] == together and names[first - 1] == "round-1/pipeline"
    assert {steps[first + i].group for i in range(4)} == {"round-1/pre-train"}
    evaluations = ["round-1/eval", "ablation/raw/eval", "ablation/filter/eval", "ablation/captioner/eval"]
    assert names[first + 4 : first + 8] == evaluations and names[first + 8] == "round-2/captioner"
    assert {steps[first + 4 + i].group for i in range(4)} == {"round-1/evaluate"}
    for alone in ("round-0/pretrain", "round-0/eval", "round-2/pretrain", "round-2/eval"):
        assert steps[names.index(alone)].group is None
    plain = Bootstrap(cfg=cfg, run_dir=tmp_path / "plan", backend=FAKES).steps(rounds=1, ablation=False)
    assert [step.group for step in plain if "pretrain" in step.name or "eval" in step.name] == [None] * 4

    placed: dict[str, int] = {}

    def isolated(
        kind: str, config: TrainingConfig, resume: bool, threads: int, processes: int, threads_file: Path | None = None
    ) -> Path:
        placed[Path(config.output.dir).parent.name + "/" + Path(config.output.dir).name] = threads
        return fake_training(kind, config, resume)

    evaluated: dict[str, int | None] = {}

    def evaluate(model_path: Path, data_path: Path, **kwargs: Any) -> dict[str, Any]:
        evaluated[Path(model_path).parent.parent.name] = None  # in this process
        return fake_evaluate(model_path, data_path, **kwargs)

    def evaluate_isolated(model_path: Path, data_path: Path, threads: int, **kwargs: Any) -> dict[str, Any]:
        evaluated[Path(model_path).parent.parent.name] = threads
        return fake_evaluate(model_path, data_path, **kwargs)

    backend = replace(FAKES, train_isolated=isolated, evaluate=evaluate, evaluate_isolated=evaluate_isolated)
    bootstrap.run_bootstrap(
        None, [*SMALL, "concurrent_training=true"], out=tmp_path / "run", progress=False, backend=backend,
        ablation=True,
    )  # fmt: skip
    # MED_0's evaluation alone, in this process; MED_1's and the rows' at once, a process and a core each
    assert evaluated == {"round-0": None, "round-1": 1, "raw": 1, "filter": 1, "captioner": 1}
    pretrain = {name: threads for name, threads in placed.items() if name.endswith("pretrain.partial")}
    assert pretrain == {
        "round-0/.pretrain.partial": 2,  # alone: both cores
        "round-1/.pretrain.partial": 1,  # with the three rows: one thread each
        "raw/.pretrain.partial": 1,
        "filter/.pretrain.partial": 1,
        "captioner/.pretrain.partial": 1,
    }


def test_data_parallel_refuses_a_batch_it_cannot_split_and_a_count_under_one(tmp_path: Path) -> None:
    from capfilt.bootstrap.planner import data_parallel_processes

    with pytest.raises(UserError, match="do not split train.batch_size 32 evenly"):
        data_parallel_processes(3, 2, 32)
    with pytest.raises(UserError, match="data_parallel"):
        bootstrap.load_config(None, [*SMALL, "data_parallel=0"])


def test_data_parallel_steps_record_each_process_share_and_resume_as_their_checkpoint_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_parallel=2: MED_r trains in 2 processes of 16 (the record says so in a header); a step
    resumed from a checkpoint written by 2 processes continues with 2 even after data_parallel=1."""
    from dataclasses import replace

    from capfilt.bootstrap.planner import Bootstrap

    calls: list[tuple[str, int, int, int]] = []

    def isolated(
        kind: str, cfg: TrainingConfig, resume: bool, threads: int, processes: int, threads_file: Path | None = None
    ) -> Path:
        assert threads_file is None  # data-parallel ranks keep their threads
        calls.append((kind, threads, processes, cfg.train.batch_size))
        return fake_training(kind, cfg, resume)

    monkeypatch.setattr("capfilt.bootstrap.planner.available_cores", lambda: 2)
    backend = replace(FAKES, train_isolated=isolated)
    cfg = bootstrap.load_config(None, [*SMALL, "data_parallel=2"])
    boot = Bootstrap(cfg=cfg, run_dir=tmp_path / "run", backend=backend, progress=False)
    human = bootstrap.load_config(None, SMALL)
    data = tmp_path / "pairs.parquet"
    data.write_bytes(b"pairs")  # the fake training digests the bytes only
    staging = tmp_path / "run" / "round-0" / ".pretrain.partial"
    boot._pretrain(data, init="scratch", staging=staging, resuming=False)
    assert calls[-1] == ("pretrain", 1, 2, 16)
    record = (staging / "bootstrap-train.yaml").read_text()
    assert record.startswith("# data-parallel: 2 processes; train.batch_size is each one's share of the batch of 32")

    (staging / "checkpoints" / "step_00000001" / "trainer.json").write_text(json.dumps({"world_size": 2}))
    one = Bootstrap(cfg=human, run_dir=tmp_path / "run", backend=backend, progress=False)
    one._pretrain(data, init="scratch", staging=staging, resuming=True)
    assert calls[-1] == ("pretrain", 1, 2, 16)  # as written, not the one process asked for now
    (staging / "checkpoints" / "step_00000001" / "trainer.json").write_text(json.dumps({"world_size": 3}))
    with pytest.raises(UserError, match="written by 3 processes"):
        one._pretrain(data, init="scratch", staging=staging, resuming=True)


def test_step_table_counts_a_group_once_by_its_longest_step(tmp_path: Path) -> None:
    from capfilt.bootstrap.steps import step_table

    state = State(tmp_path / "state.json")
    for name, seconds in (("pre", 10.0), ("cap", 30.0), ("filt", 20.0), ("post", 5.0)):
        state.mark(name, seconds)
    steps = [
        Step(name="pre", target=tmp_path / "pre", run=lambda s, r: None),
        Step(name="cap", target=tmp_path / "cap", run=lambda s, r: None, group="g"),
        Step(name="filt", target=tmp_path / "filt", run=lambda s, r: None, group="g"),
        Step(name="post", target=tmp_path / "post", run=lambda s, r: None),
    ]
    table = step_table(steps, state).splitlines()
    assert table[2].endswith("30.0 *") and table[3].endswith("20.0 *") and table[4].endswith("5.0")
    assert table[5].split() == ["total", "45.0"]  # 10 + max(30, 20) + 5, not 65
    sequential = [Step(name=s.name, target=s.target, run=s.run) for s in steps]
    assert step_table(sequential, state).splitlines()[-1].split() == ["total", "65.0"]


def test_corrupt_state_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json"):
        State(tmp_path / "state.json")


# --------------------------------------------------------------------------- config


def test_embedded_default_loads_and_overrides_are_checked() -> None:
    cfg = bootstrap.load_config(None, ["rounds=2", "pretrain.train.steps=7"])
    assert cfg.rounds == 2 and cfg.pretrain.train.steps == 7 and cfg.corpus.synthetic
    repo = Path(__file__).resolve().parents[2]
    assert (repo / "pipelines" / "bootstrap_demo.yaml").read_text() == bootstrap.default_config_text()
    # The main job is one CapFilt round on the demo world; the ablation is opt-in (--ablation,
    # benchmarks/ablation.py), so the default config never trains the ablation's extra MEDs.
    demo = bootstrap.load_config(None, [])
    assert demo.corpus.world == "demo" and demo.ablation is False and demo.rounds == 1
    assert (
        bootstrap.Bootstrap(cfg=demo, run_dir=repo).steps(rounds=1, ablation=False)[-1].name == "round-1/eval"
    )
    for override, message in [
        ("pipeline.caption.model=x", "pipeline.caption.model: set by bootstrap"),
        ("captioner.train.stepz=1", "captioner.train.stepz: unknown key (did you mean 'steps'?)"),
        ("rounds=0", "rounds: input should be greater than or equal to 1"),
        ("corpus.urls=u.parquet", "corpus: with existing files give human, urls and test"),
        ("filter.train.batch_size=0", "filter.train.batch_size"),
    ]:
        with pytest.raises(UserError) as err:
            bootstrap.load_config(None, [override])
        assert message in str(err.value) and "\n" not in str(err.value)


def test_url_list_corpus_needs_web_pairs_for_round0(tmp_path: Path) -> None:
    files = [f"corpus.{n}={tmp_path / n}.parquet" for n in ("human", "urls", "test")]
    with pytest.raises(UserError, match="corpus.web_pairs"):
        bootstrap.load_config(None, files)
    cfg = bootstrap.load_config(None, [*files, "pretrain.round0_web=false"])
    assert not cfg.corpus.synthetic


def test_served_port_is_remembered(tmp_path: Path) -> None:
    port_file = tmp_path / ".serve_port"
    with bootstrap.serve_corpus(tmp_path, port_file) as first:
        assert port_file.read_text().strip() == first.rsplit(":", 1)[1]
        with bootstrap.serve_corpus(tmp_path, port_file) as second:  # port taken: a fresh one
            assert second != first
    with bootstrap.serve_corpus(tmp_path, tmp_path / ".other") as third:
        pass
    port_file.write_text(third.rsplit(":", 1)[1])
    with bootstrap.serve_corpus(tmp_path, port_file) as again:  # free again: reused
        assert again == third


def test_round_pipeline_config_uses_the_rounds_models(tmp_path: Path) -> None:
    cfg = bootstrap.load_config(None, ["ensemble.filters=2", "pipeline.filter.threshold=0.3"])
    boot = bootstrap.Bootstrap(cfg=cfg, run_dir=tmp_path)
    pcfg = boot.pipeline_config(2, tmp_path / "urls.parquet", tmp_path / "stage")
    assert pcfg.caption.model == str(tmp_path / "round-2" / "captioner" / "hf")
    assert pcfg.filter.models == [
        str(tmp_path / "round-2" / "filter" / "hf"),
        str(tmp_path / "round-2" / "filter-2" / "hf"),
    ]
    assert pcfg.filter.threshold == 0.3 and pcfg.input.key_col == "key"
    assert pcfg.output.dir == str(tmp_path / "stage")


# --------------------------------------------------------------------------- whole runs with fakes


def test_full_run_artifacts_metrics_and_noop_rerun(tmp_path: Path, no_faults: None) -> None:
    run = _run(tmp_path / "run", "rounds=2")
    for r in (1, 2):
        for sub in (
            "captioner/hf",
            "filter/hf",
            "pipeline/samples",
            "pretrain/model",
            "pretrain/data/pairs.parquet",
        ):
            assert (run / f"round-{r}" / sub).exists(), sub
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "filter_auc" in rows[1] and "filter_auc" not in rows[0]
    # round 0 = human (6 images) + raw web (24); round r = human + what round r's pipeline kept
    assert rows[0]["human_pairs"] == 6 and rows[0]["web_pairs"] == 24
    import pyarrow.parquet as pq

    samples = pq.read_table(run / "round-1" / "pipeline" / "samples").to_pylist()
    assert rows[1]["web_pairs"] == sum(s["web_kept"] for s in samples)
    assert rows[1]["synthetic_pairs"] == sum(s["synthetic_kept"][0] for s in samples)

    before = artifact_digests(run)
    state_before = (run / "state.json").read_text()
    _run(tmp_path / "run", "rounds=2")
    assert artifact_digests(run) == before and (run / "state.json").read_text() == state_before


def test_more_rounds_extends_a_run_and_a_changed_config_is_refused(tmp_path: Path, no_faults: None) -> None:
    run = _run(tmp_path / "run")
    first = artifact_digests(run)
    _run(tmp_path / "run", rounds=2)
    extended = artifact_digests(run)
    assert {
        k: v for k, v in extended.items() if k in first and k != "metrics.jsonl" and k != "config.yaml"
    } == {k: v for k, v in first.items() if k not in ("metrics.jsonl", "config.yaml")}
    assert any(k.startswith("round-2/pretrain/") for k in extended)
    with pytest.raises(UserError, match=r"different config \(pretrain changed\)"):
        _run(tmp_path / "run", "pretrain.train.steps=99")


def test_from_scratch_false_continues_the_previous_model(tmp_path: Path, no_faults: None) -> None:
    run = _run(tmp_path / "run", "from_scratch=false")
    train_cfg = (run / "round-1" / "pretrain" / "bootstrap-train.yaml").read_text()
    assert str(run / "round-0" / "pretrain" / "model") in train_cfg
    scratch = _run(tmp_path / "scratch")
    assert "init: scratch" in (scratch / "round-1" / "pretrain" / "bootstrap-train.yaml").read_text()


def test_training_steps_get_the_demo_settings_as_the_config_object_they_record(
    tmp_path: Path, no_faults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each training step hands the trainer a TrainingConfig object (no YAML parsed back in the
    process); the bootstrap-train.yaml it writes is that object, and the demo's settings are
    the embedded config's (steps, batch, lr, seeds) as before the config became an object."""
    from dataclasses import replace

    from capfilt.config import load_model

    received: list[tuple[str, TrainingConfig]] = []
    isolated: list[tuple[str, int, int]] = []

    def recording(kind: str, cfg: TrainingConfig, resume: bool) -> Path:
        assert isinstance(cfg, TrainingConfig)
        received.append((kind, cfg))
        return fake_training(kind, cfg, resume)

    def recording_isolated(
        kind: str, cfg: TrainingConfig, resume: bool, threads: int, processes: int, threads_file: Path | None = None
    ) -> Path:
        # a lone process follows its share of the cores (CoreShares), which it holds while it trains
        assert threads_file is not None and threads_file.is_file()
        isolated.append((kind, threads, processes))
        return recording(kind, cfg, resume)

    # Two cores, concurrency on: the captioner and the filter train at the same time, one core each;
    # MED_0 and MED_1, alone, in a child process with both cores.
    monkeypatch.setattr("capfilt.bootstrap.planner.available_cores", lambda: 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    run = bootstrap.run_bootstrap(
        None, [*SMALL, "concurrent_training=true"], out=tmp_path / "run", progress=False,
        backend=replace(FAKES, train=recording, train_isolated=recording_isolated),
    )  # fmt: skip
    assert sorted(isolated) == [("captioner", 1, 1), ("filter", 1, 1), ("pretrain", 2, 1), ("pretrain", 2, 1)]
    received[1:3] = sorted(received[1:3], key=lambda item: item[0])  # the two ran concurrently
    assert [kind for kind, _ in received] == ["pretrain", "captioner", "filter", "pretrain"]
    for kind, cfg in received:
        staging = Path(cfg.output.dir)
        target = staging.with_name(staging.name.removeprefix(".").removesuffix(".partial"))
        record = (target / "bootstrap-train.yaml").read_text()
        assert load_model(TrainingConfig, target / "bootstrap-train.yaml") == cfg
        assert cfg.train.batch_size == 32 and not record.startswith("# data-parallel")
        assert cfg.optim.lr == 1e-3 and cfg.optim.clip_grad_norm == 5.0
        assert cfg.data.max_length == 32
        # MED_0 and MED_1 load batches in one DataLoader worker (pretrain.num_workers); the two
        # fine-tunes, one core each at the same time, load in their own process.
        assert cfg.data.num_workers == (1 if kind == "pretrain" else 0)
        assert not cfg.data.augment.random_resized_crop and cfg.data.augment.randaugment_ops == 0
        # MED_1 draws one of a human image's captions per visit (an image is one item, as a web image
        # is); MED_0 (round0_captions) and the fine-tunes take every reference as an item of its own.
        assert [(s.path, s.format, s.captions) for s in cfg.data.sources] == [
            (str(staging / "data" / "pairs.parquet") if kind == "pretrain" else str(run / "corpus" / "human.parquet"),
             "parquet", "sample" if kind == "pretrain" and cfg is not received[0][1] else "expand")
        ]  # fmt: skip
    steps = [
        (cfg.train.steps, cfg.train.seed, cfg.train.save_every, cfg.optim.warmup_steps) for _, cfg in received
    ]
    assert steps == [(800, 0, 200, 30), (900, 1001, 300, 20), (800, 1002, 400, 20), (800, 0, 200, 30)]
    round0, captioner = received[0][1].model, received[1][1].model
    assert (round0.init, round0.preset, round0.vocab_size, round0.overrides["queue_size"]) == (
        "scratch",
        "tiny",
        400,
        256,
    )
    assert round0.overrides["itm_negative_temp"] == 0.05  # ITM's negatives drawn at a fixed temperature
    assert captioner.init == str(run / "round-0" / "pretrain" / "model")
    assert received[0][1].optim.min_lr == 1e-5 and received[1][1].optim.min_lr == 0.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Digests of an uninterrupted run (ablation on, so every kind of step is covered)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(FAIL_AFTER_ENV, raising=False)
        mp.delenv(FAIL_DURING_ENV, raising=False)
        run = _run(tmp_path_factory.mktemp("ref") / "run", ablation=True)
    return artifact_digests(run)


STEPS = [
    "corpus",
    "round-0/pretrain",
    "round-0/eval",
    "round-1/captioner",
    "round-1/filter",
    "round-1/pipeline",
    "ablation/filter/pretrain",  # MED_1 and the ablation's rows train as one group
    "round-1/pretrain",
    "ablation/captioner/eval",  # ... and are evaluated as one
    "round-1/eval",
]


@pytest.mark.parametrize("variable", [FAIL_AFTER_ENV, FAIL_DURING_ENV])
def test_crash_at_every_step_boundary_then_rerun_gives_the_same_artifacts(
    tmp_path: Path, no_faults: None, monkeypatch: pytest.MonkeyPatch, reference: dict[str, str], variable: str
) -> None:
    run = tmp_path / "run"
    for step in STEPS:  # crash at each step in turn, on one run directory
        if State(run / "state.json").done(step):
            # Trained at the same time as the step of its group that crashed, and committed then
            # (the fine-tunes, and MED_1 with the ablation's pre-trainings, run concurrently on a
            # machine with 2+ cores).
            assert step in ("round-1/filter", "round-1/pretrain", "round-1/eval")
            continue
        monkeypatch.setenv(variable, step)
        with pytest.raises(InjectedFault, match=step):
            _run(run, ablation=True)
        assert State(run / "state.json").done(step) == (variable == FAIL_AFTER_ENV)
    monkeypatch.delenv(variable)
    _run(run, ablation=True)
    assert artifact_digests(run) == reference
    table = json.loads((run / "ablation.json").read_text())["variants"]
    assert [row["variant"] for row in table] == ["raw", "filter", "captioner", "capfilt"]
    assert {"txt_r1", "img_r1", "cider", "pairs"} <= set(table[0])


def test_ablation_raw_row_is_med0_when_round0_trains_on_raw_web(tmp_path: Path, no_faults: None) -> None:
    """MED_0 (scratch, human + raw web, the same pretrain settings) is the raw row: not trained twice."""
    import pyarrow.parquet as pq

    run = _run(tmp_path / "run", "pretrain.round0_captions=null", ablation=True)
    assert not (run / "ablation" / "raw").exists()
    assert sorted(p.name for p in (run / "ablation").iterdir()) == ["captioner", "filter"]
    round0 = (
        pq.read_table(run / "round-0" / "pretrain" / "data" / "pairs.parquet").column("source").to_pylist()
    )
    assert (round0.count("human"), round0.count("web"), round0.count("synthetic")) == (6, 24, 0)
    # Rows are shuffled once when written: the loader reads row groups, so source-by-source
    # order would give single-source batches.
    assert round0 != sorted(round0, key=lambda source: source != "human")
    raw = json.loads((run / "ablation.json").read_text())["variants"][0]
    assert raw["variant"] == "raw" and raw["pairs"] == 30
    # Not equal when round 0 is not that model: the raw variant gets its own pre-training again. The
    # demo's round0_captions (expand, against sample for every later pre-training) is such a case.
    for extra in ("pretrain.round0_web=false", "from_scratch=false", "pretrain.round0_captions=expand"):
        other = _run(tmp_path / extra.split(".")[-1], "pretrain.round0_captions=null", extra, ablation=True)
        assert (other / "ablation" / "raw" / "eval.json").is_file()
        if extra.endswith("expand"):
            recorded = (other / "ablation" / "raw" / "pretrain" / "bootstrap-train.yaml").read_text()
            assert "captions: sample" in recorded
            assert "captions: expand" in (other / "round-0" / "pretrain" / "bootstrap-train.yaml").read_text()


def test_ablation_variants_differ_only_in_selection(tmp_path: Path, no_faults: None) -> None:
    import pyarrow.parquet as pq

    run = _run(tmp_path / "run", "pretrain.round0_web=false", ablation=True)
    counts = {}
    for variant in ("raw", "filter", "captioner"):
        table = pq.read_table(run / "ablation" / variant / "pretrain" / "data" / "pairs.parquet")
        counts[variant] = {
            s: table.column("source").to_pylist().count(s) for s in ("human", "web", "synthetic")
        }
    capfilt = (
        pq.read_table(run / "round-1" / "pretrain" / "data" / "pairs.parquet").column("source").to_pylist()
    )
    samples = pq.read_table(run / "round-1" / "pipeline" / "samples").to_pylist()
    kept_web = sum(s["web_kept"] for s in samples)
    assert counts["raw"] == {"human": 6, "web": 24, "synthetic": 0}
    assert counts["filter"] == {"human": 6, "web": kept_web, "synthetic": 0}
    assert counts["captioner"] == {"human": 6, "web": 24, "synthetic": 24}
    assert capfilt.count("web") == kept_web and 0 < kept_web < 24
    out = json.loads((run / "ablation.json").read_text())["variants"]
    assert [r["pairs"] for r in out] == [30, 6 + kept_web, 54, len(capfilt)]


def test_kill_9_mid_step_then_rerun_gives_the_same_artifacts(
    tmp_path: Path, no_faults: None, reference: dict[str, str]
) -> None:
    run = tmp_path / "run"
    env = {**os.environ, STEP_DELAY_ENV: "0.4"}
    proc = subprocess.Popen(
        [sys.executable, __file__, str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        # kill while round 1's pipeline is half written (a shard committed, the step not)
        while not list((run / "round-1" / ".pipeline.partial" / "samples").glob("shard-*.parquet")):
            assert proc.poll() is None, "the bootstrap subprocess ended before it could be killed"
            assert time.monotonic() < deadline, "the bootstrap subprocess never reached the pipeline"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "round-1" / "pipeline").exists()
    _run(run, ablation=True)
    assert artifact_digests(run) == reference


if __name__ == "__main__":  # the kill -9 test's subprocess
    _run(Path(sys.argv[1]), ablation=True)


# --------------------------------------------------------------------------- the CapFilt summary


def test_capfilt_summary_scores_filter_captions_and_noise_against_the_truth(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    red_circle = json.dumps([{"color": "red", "shape": "circle"}])
    labels = [  # key, noise type, objects
        ("a", "clean", red_circle), ("b", "clean", red_circle), ("c", "junk", red_circle),
        ("d", "mismatched", red_circle), ("e", "wrong_attribute", red_circle), ("f", "clean", red_circle),
    ]  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist([{"key": k, "noise_type": t, "objects": o} for k, t, o in labels]),
        tmp_path / "web.parquet",
    )
    samples = [  # key, status, web_itm, web_kept, synthetic texts, synthetic kept
        ("a", "ok", 0.9, True, ["a red circle", "a blue circle"], [True, False]),
        ("b", "ok", 0.8, True, ["a red circle"], [False]),
        ("c", "ok", 0.1, False, ["a red square"], [True]),
        ("d", "ok", 0.6, True, ["a red circle"], [True]),
        ("e", "ok", 0.2, False, ["a red circle on a plain background"], [True]),
        ("f", "ok", 0.3, False, [], []),
        ("g", "http_404", None, False, [], []),  # not downloaded: not counted
    ]
    rows = [
        {"key": k, "status": s, "web_itm": w, "web_kept": wk, "synthetic_texts": st, "synthetic_kept": sk}
        for k, s, w, wk, st, sk in samples
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "samples.parquet")

    summary = bootstrap.capfilt_summary(
        [tmp_path / "samples.parquet"], tmp_path / "web.parquet", threshold=0.5
    )
    by_type = summary["filter"]["by_type"]
    assert by_type["clean"] == {"count": 3, "removed": pytest.approx(1 / 3)}
    # junk: removed, one clean text (f) removed too -> precision 1/2; its score 0.1 is below every clean one
    assert (
        by_type["junk"]["recall"] == 1.0
        and by_type["junk"]["precision"] == 0.5
        and by_type["junk"]["auc"] == 1.0
    )
    # mismatched 0.6 is above f's 0.3 and below a's and b's: AUC 2/3, kept -> recall 0, precision 0
    assert by_type["mismatched"]["recall"] == 0.0 and by_type["mismatched"]["auc"] == pytest.approx(2 / 3)
    assert by_type["mismatched"]["precision"] == 0.0
    assert summary["captions"] == {
        "captions": 6,
        "attribute_check": pytest.approx(4 / 6),
        "images": 5,
        "images_with_a_right_caption": pytest.approx(4 / 5),
    }
    # raw: 3 of 6 noisy; kept web a, b, d (d noisy); kept synthetic a (right), c (wrong), d, e (right)
    assert summary["noise"] == {
        "raw_web": 0.5,
        "kept_web_texts": pytest.approx(1 / 3),
        "kept_synthetic_wrong": 0.25,
        "kept_set": pytest.approx(2 / 7),
    }
    assert summary["pairs"] == {"raw_web": 6, "kept_web": 3, "synthetic_added": 4, "kept_set": 7}
    text = bootstrap.summary_text(summary)
    assert "ROC-AUC 1.000, removed 100% (recall), precision 50%" in text
    assert "50% of the raw web texts are wrong; after CapFilt 29% of the kept web pairs are" in text
    assert "6 raw web pairs -> 3 web texts kept + 4 synthetic captions added = 7" in text
    # no stored caption scores: nothing to say about them
    assert summary["caption_scores"] == {"score_auc": None, "agreement_auc": None, "min_agreement": None}
    assert "Telling right captions" not in text

    # With the filter's caption scores stored: how well each tells right captions from wrong ones.
    rows[0] |= {"synthetic_itm": [0.4, 0.6], "synthetic_agreement": [0.99, 0.90]}  # right, wrong
    rows[2] |= {"synthetic_itm": [0.7], "synthetic_agreement": [0.95]}  # wrong
    rows[3] |= {"synthetic_itm": [0.2], "synthetic_agreement": [float("nan")]}  # right, lone: no agreement
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "scored.parquet")
    scored = bootstrap.capfilt_summary(
        [tmp_path / "scored.parquet"], tmp_path / "web.parquet", threshold=0.5, min_agreement=0.98
    )
    # right: a0 (0.4), d (0.2); wrong: a1 (0.6), c (0.7): ITM ranks every wrong above every right
    assert scored["caption_scores"] == {"score_auc": 0.0, "agreement_auc": 1.0, "min_agreement": 0.98}
    assert (
        "Telling right captions from wrong ones (ROC-AUC): the filter's score 0.000, agreement with the "
        "image's other sampled captions 1.000; a caption is kept only when its agreement is >= 0.98."
    ) in bootstrap.summary_text(scored)
    assert "The filter (ITM score < 0.5 removes a web text)" in bootstrap.summary_text(scored)

    # With filter.itc_weight the figures are of the score the threshold applied to: ITC says the
    # mismatched text (d) belongs elsewhere and lifts f, so every clean text now outranks it.
    itc = {"a": 0.9, "b": 0.8, "c": 0.0, "d": 0.0, "e": 0.2, "f": 0.9}
    for row in rows:
        row["web_itc"] = itc.get(row["key"])
        row["synthetic_itc"] = [0.0] * len(row.get("synthetic_itm") or [])
    rows[3]["synthetic_itc"] = [1.0]  # the right caption of d: (0.2 + 1.0) / 2 = 0.6, above every wrong one
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "itc.parquet")
    mixed = bootstrap.capfilt_summary(
        [tmp_path / "itc.parquet"], tmp_path / "web.parquet", threshold=0.5, itc_weight=0.5
    )
    assert mixed["filter"]["by_type"]["mismatched"]["auc"] == 1.0
    assert mixed["caption_scores"]["score_auc"] == 0.5  # right 0.2, 0.6; wrong 0.3, 0.35
    assert "The filter (score 0.5 x ITM + 0.5 x ITC cosine < 0.5 removes a web text)" in bootstrap.summary_text(mixed)
    # eval.json's "filter" (from the labels a served corpus stores in samples/) reads the same score.
    from capfilt.bootstrap.summary import filter_summary

    kinds = dict((k, t) for k, t, _ in labels)
    for row in rows:
        row["noise_type"] = kinds.get(row["key"], "clean")
        row["noisy"] = row["noise_type"] != "clean"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labelled.parquet")
    assert filter_summary([tmp_path / "labelled.parquet"], threshold=0.5)["auc_by_type"]["mismatched"] == pytest.approx(2 / 3)
    flt = filter_summary([tmp_path / "labelled.parquet"], threshold=0.5, itc_weight=0.5)
    assert flt["auc_by_type"]["mismatched"] == 1.0 and flt["n"] == 6  # the row not downloaded is not scored


def test_ablation_variant_rules_keep_the_filter_out_of_captioner_only() -> None:
    from capfilt.bootstrap.planner import variant_rules
    from capfilt.stages.select import Selection

    capfilt = Selection(threshold=0.3, keep_web=True, keep_synthetic=1, rank_by="agreement", min_agreement=0.995)
    rules = variant_rules(capfilt)
    assert rules["capfilt"] == capfilt
    # captioner only: no ITM threshold, no agreement (the filter computes it), caption order
    assert (rules["captioner"].threshold, rules["captioner"].min_agreement, rules["captioner"].rank_by) == (None, None, "itm")
    assert rules["captioner"].keep_synthetic == 1
    assert rules["filter"].threshold == 0.3 and rules["filter"].keep_synthetic == 0
    assert rules["raw"].threshold is None and rules["raw"].keep_synthetic == 0 and rules["raw"].keep_web


def test_agreement_with_one_caption_per_image_is_refused_when_the_config_loads() -> None:
    from capfilt.bootstrap import load_config
    from capfilt.errors import UserError

    with pytest.raises(UserError, match=r">= 2 captions per image, got 1 .*min_agreement=null"):
        load_config(None, ["pipeline.caption.num_captions=1"])  # the demo keeps min_agreement 0.995
    assert load_config(None, ["pipeline.caption.num_captions=1", "pipeline.select.min_agreement=null"])
    # two captioners of one caption each are two captions per image
    assert load_config(None, ["pipeline.caption.num_captions=1", "ensemble.captioners=2"]).ensemble.captioners == 2


def test_filter_score_bench_rescores_a_round_with_its_own_filter(tmp_path: Path) -> None:
    """benchmarks/filter_score.py: the round's filter model re-scores the web texts (ITM and ITC),
    each rule is applied and judged as the job does; thresholds move the kept counts as they must."""
    import shutil

    import pyarrow.parquet as pq
    from support import load_benchmark, save_tiny_model

    from capfilt.bootstrap.summary import samples_files
    from capfilt.stages.select import has_text

    run = _run(tmp_path / "run")
    model = run / "round-1" / "filter" / "model"
    shutil.rmtree(model)  # the fake training's model is not a MED: put a real (tiny) one there
    save_tiny_model(model, seed=0, calibrate_itm=True)
    texts = [
        t for f in samples_files(run / "round-1" / "pipeline") for t in pq.read_table(f).column("web_text").to_pylist()
    ]
    results = load_benchmark("filter_score").main([str(run), "--rules", "0:0,0:1.01,0.5:0.5,1:-1"])
    keep_all, keep_none, mixed, itc_all = (results[rule][0] for rule in [(0, 0), (0, 1.01), (0.5, 0.5), (1, -1)])
    assert keep_all["kept_web"] == sum(has_text(t) for t in texts) == itc_all["kept_web"] > 0
    assert keep_none["kept_web"] == 0 and keep_none["kept_set"] is None  # nothing kept: no noise rate
    assert 0.0 <= keep_all["kept_set"] <= 1.0 and 0.0 <= itc_all["kept_set"] <= 1.0
    for figures in (keep_all, mixed, itc_all):
        assert all(0.0 <= figures[name] <= 1.0 for name in ("junk", "mismatched", "wrong_attribute"))
    # the ranking is the score's, not the threshold's: the same ITM ranks the same under any threshold
    assert [keep_all[n] for n in ("junk", "mismatched")] == [keep_none[n] for n in ("junk", "mismatched")]


def test_itm_negatives_bench_counts_drawn_negatives_that_describe_their_anchor(tmp_path: Path) -> None:
    """benchmarks/itm_negatives.py: a drawn negative is false when the corpus's attribute check passes
    it against the anchor (both directions); the run's models draw at each temperature asked for."""
    import shutil

    from support import load_benchmark, save_tiny_model

    bench = load_benchmark("itm_negatives")
    red, blue = '[{"color": "red", "shape": "square"}]', '[{"color": "blue", "shape": "circle"}]'
    texts = ["a red square", "a drawing of a red square", "a blue circle"]
    # image 0 drew text 1 and image 1 drew text 0 (both describe a red square: false); image 2 drew
    # text 0 (true negative); the texts drew images 2, 2, 0 (a red square is not a blue circle: true)
    assert bench.false_negative_share(texts, [red, red, blue], [2, 2, 0], [1, 0, 0]) == (2, 6)
    assert bench.false_negative_share(texts, [red, red, blue], [1, 0, 0], [2, 2, 0]) == (2, 6)
    assert bench.false_negative_share(texts, [red, blue, blue], [1, 2, 0], [2, 0, 0]) == (0, 6)

    run = _run(tmp_path / "run")
    for step in bench.MODELS:  # the fake training's models are not MEDs: put real (tiny) ones there
        shutil.rmtree(run / step / "model", ignore_errors=True)
        save_tiny_model(run / step / "model", seed=0)
    results = bench.main([str(run), "--batches", "2", "--batch-size", "6", "--draws", "2", "--temps", "learned,0.05"])
    assert set(results) == {(str(run), step) for step in bench.MODELS}
    for shares in results.values():
        assert shares["learned_temp"] > 0 and set(shares) == {"learned_temp", "learned", "0.05"}
        assert all(0.0 <= shares[t] <= 1.0 for t in ("learned", "0.05"))
    with pytest.raises(SystemExit):
        bench.main([str(run), "--temps", "0"])


def test_train_speed_bench_reruns_a_runs_trainings_before_and_now(tmp_path: Path) -> None:
    """benchmarks/train_speed.py: a step config's paths (recorded under the bootstrap's output.dir, in
    a step's .partial directory) are found under the run; its trainings run with the speed-ups off
    and on, with the same first losses for a fine-tune, and every switch is on again afterwards."""
    import shutil

    from support import load_benchmark, save_tiny_model

    from model.med import MED, TextModel
    from model.train import Trainer

    bench = load_benchmark("train_speed")
    run = tmp_path / "moved"
    assert bench.localise("runs/b/round-0/.pretrain.partial/data/pairs.parquet", "runs/b", run) == str(
        run / "round-0" / "pretrain" / "data" / "pairs.parquet"
    )
    assert bench.localise("runs/b/corpus/human.parquet", "runs/b/", run) == str(run / "corpus" / "human.parquet")
    assert bench.localise("/elsewhere/model", "runs/b", run) == "/elsewhere/model"

    run = _run(tmp_path / "run")
    shutil.rmtree(run / "round-0" / "pretrain" / "model")  # the fake MED_0 is not a MED
    save_tiny_model(run / "round-0" / "pretrain" / "model", seed=0)
    rows = bench.main([str(run), "--steps", "8", "--repeats", "1", "--threads", "1", "--only", "round-1/filter"])
    assert [row["step"] for row in rows] == ["round-1/filter"]
    (row,) = rows
    assert 0.0 < row["real_share"] < 1.0  # captions of unequal length: some padding to skip
    assert row["before_s"] > 0 and row["now_s"] > 0
    assert set(row["losses_before"]) == {"loss", "loss_itc", "loss_itm"}
    for name, value in row["losses_before"].items():
        assert row["losses_now"][name] == pytest.approx(value, rel=1e-4)
    assert TextModel.skip_padding and MED.share_image_context and Trainer.fused_optimizer
    with pytest.raises(SystemExit):
        bench.main([str(run), "--steps", "3"])
