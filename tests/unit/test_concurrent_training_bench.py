"""benchmarks/concurrent_training.py --compare loader | data-parallel: one training, two ways."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import load_benchmark


def test_loader_comparison_trains_with_and_without_a_worker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("concurrent_training")
    out = bench.main(
        ["--compare", "loader", "--kind", "captioner", "--steps", "2", "--repeats", "1", "--work", str(tmp_path)]
    )
    assert set(out) == {"in_process_s", "one_worker_s"} and all(v > 0 for v in out.values())
    printed = capsys.readouterr().out
    assert "num_workers 0, run 1" in printed and "num_workers 1, run 1" in printed
    # each setting trained to the end and saved its model, with the worker count it was given
    for workers in (0, 1):
        run = tmp_path / f"run{workers}-0"
        assert (run / "model").is_dir()
        assert f"num_workers: {workers}" in (run / "config.yaml").read_text(encoding="utf-8")


def test_alone_comparison_trains_here_in_a_child_and_in_two_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("concurrent_training")
    out = bench.main(
        ["--compare", "alone", "--kind", "pretrain", "--steps", "2", "--repeats", "1", "--work", str(tmp_path)]
    )
    assert len(out) == 3 and all(v > 0 for v in out.values())
    assert "in this process" in out and "2 data-parallel processes" in out
    assert "2 data-parallel processes: " in capsys.readouterr().out
    # each trained to the end and saved its model: the split run as two ranks of half the batch
    for i, (batch, ranks) in enumerate(((32, 1), (32, 1), (16, 2))):
        run = tmp_path / f"run{i}-0"
        assert (run / "model").is_dir()
        assert f"batch_size: {batch}" in (run / "config.yaml").read_text(encoding="utf-8")
        (checkpoint,) = (run / "checkpoints").iterdir()
        assert f'"world_size": {ranks}' in (checkpoint / "trainer.json").read_text(encoding="utf-8")
