"""capfilt.queues.bound_queues: Ray Data's downstream-capacity policy swapped in, and put back."""

from __future__ import annotations

import pickle

import pytest

ray_data = pytest.importorskip("ray.data")


def test_bound_queues_replaces_the_downstream_policy_and_restores_the_context() -> None:
    from ray.data._internal.execution.backpressure_policy import (
        ENABLED_BACKPRESSURE_POLICIES,
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
        DownstreamCapacityBackpressurePolicy,
    )

    from capfilt import queues

    context = ray_data.DataContext()
    key = ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY
    assert context.get_config(key) is None
    restore = queues.bound_queues(context)
    policies = context.get_config(key)
    assert queues.BoundedQueuesPolicy in policies
    assert DownstreamCapacityBackpressurePolicy not in policies
    assert issubclass(queues.BoundedQueuesPolicy, DownstreamCapacityBackpressurePolicy)
    # every other default policy stays, in its place
    assert [p for p in policies if p is not queues.BoundedQueuesPolicy] == [
        p for p in ENABLED_BACKPRESSURE_POLICIES if p is not DownstreamCapacityBackpressurePolicy
    ]
    # Ray workers unpickle the context, which names the class by module and name
    assert pickle.loads(pickle.dumps(queues.BoundedQueuesPolicy)) is queues.BoundedQueuesPolicy
    restore()
    assert context.get_config(key) is None

    context.set_config(key, [DownstreamCapacityBackpressurePolicy])
    restore = queues.bound_queues(context)
    assert context.get_config(key) == [queues.BoundedQueuesPolicy]
    restore()
    assert context.get_config(key) == [DownstreamCapacityBackpressurePolicy]
