"""The step engine: a run is a list of :class:`Step`, committed one by one, resumable.

Every step writes into a hidden staging path next to its artifact (``round-1/.filter.partial``)
and is committed by an atomic rename to ``round-1/filter`` followed by an atomic rewrite of
``RUN/state.json`` (:class:`State`). A rerun skips committed steps and restarts at the first
unfinished one, whose staging output is either discarded (cheap steps) or handed to the step's
own resume (``resumable``). Consecutive steps that share a ``group`` do not depend on each other
and run at the same time, one thread each (the bootstrap's training steps of a group each run in a
process of their own, see :func:`capfilt.bootstrap.backend.train_isolated`); each is committed as
soon as it is done. :data:`FAIL_AFTER_ENV` and :data:`FAIL_DURING_ENV` inject a crash at a named
step, for the tests that check a rerun recovers.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capfilt.errors import UserError
from capfilt.rundir import atomic_write_text

STATE_FILE = "state.json"
FAIL_AFTER_ENV = "CAPFILT_FAIL_AFTER_STEP"
"""Fault injection: crash right after the named step is committed (``round-1/filter``, or ``*``)."""
FAIL_DURING_ENV = "CAPFILT_FAIL_DURING_STEP"
"""Fault injection: crash after the named step did its work but before it is committed."""


class InjectedFault(RuntimeError):
    """Raised by the fault-injection variables, to test that a rerun recovers."""


def remove_path(path: Path) -> None:
    """Delete a file, a link or a directory tree (nothing when absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True, kw_only=True)
class Step:
    """One unit of work: ``run(staging, resuming)`` writes the artifact at ``staging``.

    ``target`` is where the artifact lives once committed (a directory or a file). With
    ``resumable`` a leftover staging path from an interrupted run is handed back to ``run``
    (``resuming=True``), which continues it; otherwise it is deleted and the step starts over.
    Steps next to each other with the same ``group`` run at the same time (:func:`run_steps`).
    """

    name: str
    target: Path
    run: Callable[[Path, bool], None]
    resumable: bool = False
    group: str | None = None

    @property
    def staging(self) -> Path:
        return self.target.with_name(f".{self.target.name}.partial")


class State:
    """``RUN/state.json``: which steps are committed and how long each took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: not valid JSON ({err.msg}); delete it to start over") from None
            self.steps = dict(data.get("steps", {}))

    def done(self, name: str) -> bool:
        return bool(self.steps.get(name, {}).get("done"))

    def mark(self, name: str, seconds: float | None, *, order: Sequence[str] = ()) -> None:
        """Record ``name`` as committed; ``order`` (the run's step names) keeps the file in step order."""
        self.steps[name] = {
            "done": True,
            "seconds": None if seconds is None else round(seconds, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        rank = {n: i for i, n in enumerate(order)}
        self.steps = dict(sorted(self.steps.items(), key=lambda item: rank.get(item[0], len(rank))))
        atomic_write_text(self.path, json.dumps({"version": 1, "steps": self.steps}, indent=2) + "\n")


def _fault(variable: str, name: str) -> None:
    wanted = os.environ.get(variable)
    if wanted and wanted in (name, "*"):
        raise InjectedFault(f"{variable}={wanted}: injected failure at step {name}")


def run_steps(
    steps: Sequence[Step],
    state: State,
    *,
    echo: Callable[[str], None] = print,
    max_parallel: int = 1,
) -> dict[str, float]:
    """Run the steps in order, skipping committed ones; returns seconds of the steps run now.

    A step counts as committed when state.json says so AND its artifact exists. An artifact that
    exists without a state entry was renamed into place just before a crash: renaming is the
    last thing a step does, so it is complete and only its state entry is written now.

    Consecutive steps with the same ``group`` run at the same time, at most ``max_parallel`` at
    once (one thread each); each is committed when it finishes. When one of them fails the others
    still finish and are committed, then the first failure (in step order) is raised.
    """
    ran: dict[str, float] = {}
    total = len(steps)
    order = [step.name for step in steps]
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            echo(text)

    def execute(index: int, step: Step) -> None:
        staging = step.staging
        resuming = staging.exists() and step.resumable
        if staging.exists() and not resuming:
            remove_path(staging)
        say(f"\n=== [{index}/{total}] {step.name}{' (resuming)' if resuming else ''} ===")
        started = time.perf_counter()
        staging.parent.mkdir(parents=True, exist_ok=True)
        step.run(staging, resuming)
        if not staging.exists():
            raise RuntimeError(f"step {step.name} wrote nothing at {staging}")
        _fault(FAIL_DURING_ENV, step.name)
        os.replace(staging, step.target)
        seconds = time.perf_counter() - started
        with lock:
            state.mark(step.name, seconds, order=order)
            ran[step.name] = seconds
            echo(f"=== {step.name}: {seconds:.1f}s ===")
        _fault(FAIL_AFTER_ENV, step.name)

    position = 0
    while position < total:
        block_end = position + 1
        group = steps[position].group
        while group is not None and block_end < total and steps[block_end].group == group:
            block_end += 1
        pending: list[tuple[int, Step]] = []
        for index in range(position + 1, block_end + 1):
            step = steps[index - 1]
            if step.target.exists():
                if not state.done(step.name):
                    state.mark(step.name, None, order=order)
                echo(f"[{index}/{total}] {step.name}: done, skipped")
            else:
                pending.append((index, step))
        position = block_end
        if len(pending) <= 1 or max_parallel <= 1:
            for index, step in pending:
                execute(index, step)
            continue
        with ThreadPoolExecutor(
            max_workers=min(max_parallel, len(pending)), thread_name_prefix="step"
        ) as pool:
            futures = [pool.submit(execute, index, step) for index, step in pending]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
    return ran


def step_table(steps: Sequence[Step], state: State) -> str:
    """Seconds per step as recorded in state.json (``-`` for steps committed by an older run).

    Steps of one group ran at the same time (marked ``*``): the total counts the longest of them.
    """
    lines = [f"{'step':<28} {'seconds':>8}"]
    total = 0.0
    block_group: str | None = None
    block_max = 0.0
    for step in steps:
        seconds = state.steps.get(step.name, {}).get("seconds")
        if step.group is not None and step.group == block_group:
            block_max = max(block_max, seconds or 0.0)
        else:
            total += block_max
            block_group, block_max = step.group, seconds or 0.0
        mark = " *" if step.group is not None else ""
        lines.append(f"{step.name:<28} {'-' if seconds is None else f'{seconds:.1f}':>8}{mark}")
    total += block_max
    lines.append(f"{'total':<28} {total:>8.1f}")
    if any(step.group is not None for step in steps):
        lines.append(
            "(* trained at the same time as the other * steps next to it; the total counts the longest)"
        )
    return "\n".join(lines)
