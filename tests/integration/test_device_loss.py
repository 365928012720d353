"""A lost GPU ends the actor, and Ray Data restarts it and retries the batch (issue #11 item 5).

The unit tests (tests/unit/test_inference.py) show that the stages raise ``DeviceLost`` instead
of marking rows failed and that ``abandon_actor`` exits the process inside an actor. This test
shows the other half on a real Ray Data actor pool: the batch whose actor died is retried by a
restarted actor, so every row comes back exactly once and none carries a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


class LosesItsGpuOnce:
    """Stands in for a caption/filter actor whose CUDA context dies on its first batch."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from capfilt.inference import DeviceLost, abandon_actor, run_chunks

        def work(a: int, b: int) -> list[int]:
            if not self.marker.exists():
                self.marker.write_text("died once")
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            return [int(x) * 10 for x in batch["id"][a:b]]

        try:
            out = run_chunks(work, len(batch["id"]), 2)
        except DeviceLost as err:
            abandon_actor(err)
            raise
        return {"id": batch["id"], "out": np.asarray(out)}


def test_a_lost_device_restarts_the_actor_and_retries_the_batch(ray_session: str, tmp_path: Path) -> None:
    import ray

    marker = tmp_path / "died"
    ds = ray.data.range(12).map_batches(
        LosesItsGpuOnce,
        fn_constructor_kwargs={"marker": str(marker)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=4,
        num_cpus=0.25,
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert marker.exists(), "the actor did lose its device once"
    assert [r["id"] for r in rows] == list(range(12))
    assert [r["out"] for r in rows] == [10 * i for i in range(12)]
