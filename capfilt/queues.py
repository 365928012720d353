"""Ray Data's downstream-capacity backpressure, applied from the first byte (``capfilt run``).

Imported only where Ray is (the driver's ``_execute``; Ray workers load ``BoundedQueuesPolicy``
by name when they unpickle the DataContext), so ``capfilt.pipeline`` stays importable without Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    DownstreamCapacityBackpressurePolicy,
)


class BoundedQueuesPolicy(DownstreamCapacityBackpressurePolicy):
    """Ray's policy without its object-store threshold: a queue is bounded from its first block."""

    OBJECT_STORE_BUDGET_UTIL_THRESHOLD = 0.0  # Ray 2.60: 0.5 of the operator's budget

    def _should_skip_backpressure(self, op: Any) -> bool:
        # The last operator's output (a part summary per block) goes to the driver, which takes
        # it at once; measured against the few bytes the driver holds it would stall the writes.
        return not op.output_dependencies or super()._should_skip_backpressure(op)


def bound_queues(context: Any) -> Callable[[], None]:
    """Bound every operator's queue of finished blocks by its consumer's pace, whatever the input
    size, in ``context`` (a DataContext, before the dataset is built); returns the function that
    restores the context's previous policies.

    Ray Data 2.60 backpressures an operator whose queued output exceeds ``downstream_capacity_
    backpressure_ratio`` (2) times the inputs its consumer has in flight, but only once the operator
    uses half of its object-store budget. Metadata rows never get there: the read tasks, far faster
    than the downloads, split the whole input into download batches ahead of them (1M LAION rows:
    ~3,900 blocks of ~31 KB). Ray returns an object under ``max_direct_call_object_size`` (100 KB)
    inline to its owner, the driver, so every queued block sat in the driver's heap: +47 MB of
    driver RSS per 200,000 rows (``benchmarks/README.md``, driver memory). ``BoundedQueuesPolicy``
    applies the ratio from the first byte (except to the last operator, whose consumer is the
    driver), through Ray Data's ``backpressure_policies.enabled`` config; a Ray without these
    names keeps its defaults.
    """
    key = ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY
    previous = context.get_config(key)
    current = context.get_config(key, ENABLED_BACKPRESSURE_POLICIES)
    context.set_config(
        key, [BoundedQueuesPolicy if p is DownstreamCapacityBackpressurePolicy else p for p in current]
    )

    def restore() -> None:
        if previous is None:
            context.remove_config(key)
        else:
            context.set_config(key, previous)

    return restore
