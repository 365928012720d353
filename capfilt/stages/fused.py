"""Fused caption + filter: one actor holds the captioner(s) and the filter(s).

Chosen with ``filter.fused: true`` (``capfilt.pipeline.make_plan``). Each batch is captioned
and scored in the same process, on the same GPU:

* the preprocessed uint8 pixels cross Ray's object store once (into this actor), instead of
  once into the caption pool and again, with the captions, into the filter pool; they are
  dropped from this stage's output;
* there is no caption:filter replica ratio to tune: every replica does both in proportion,
  so neither pool idles waiting for the other (captioning dominates: K captions of ~20
  tokens per image against K + 1 ITM passes of ~20 tokens).

The output equals running :class:`~capfilt.stages.caption.Captioner` then
:class:`~capfilt.stages.filter.Filter` (same per-row seeds, same code). Separate pools remain
the default and fit ensembles or models of very unequal size, where one replica holding
everything would not fit or would waste a large GPU on a small model.

Resources: the caption section's ``num_gpus``, ``concurrency`` and ``batch_size`` size the
pool and its batches; ``filter.batch_size`` stays the filter's micro-batch inside the actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from capfilt.inference import DeviceLost, abandon_actor
from capfilt.stages.caption import Captioner

Batch = dict[str, np.ndarray]


class CaptionFilter:
    """Captions then ITM scores in one actor; drops the ``pixels_*`` columns it consumed."""

    def __init__(self, caption: Any, filter: Any, *, device: str | None = None) -> None:  # noqa: A002
        from capfilt.stages.filter import Filter

        self.captioner = Captioner(caption, device=device)
        # The filter runs where the captioner runs (the actor's GPU, or the CPU).
        self.filter = Filter(filter, device=device if device is not None else str(self.captioner.device))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Batch:
        try:
            out = self.filter.score(self.captioner.caption(batch))
        except DeviceLost as err:
            abandon_actor(err)
            raise
        return {k: v for k, v in out.items() if not k.startswith("pixels_")}
