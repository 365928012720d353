"""Select: decide which texts of a sample are kept, from the scores the filter wrote.

A pure function over dict-of-arrays batches (no model, no Ray), so the same rule runs in the
pipeline and afterwards: the filter's scores (``web_itm``, ``synthetic_itm``) are stored in
``samples/*.parquet``, and :func:`select_table` re-applies the rule to those files with another
threshold or ``keep_synthetic`` without re-running any model::

    import pyarrow.parquet as pq
    from capfilt.stages.select import select_table
    table = select_table(pq.read_table("runs/x/samples"), threshold=0.7, keep_web=True, keep_synthetic=2)

The rule (BLIP's CapFilt: drop every text whose ITM match probability is below the threshold):

* ``web_kept`` = the row is ok, ``keep_web``, the web text is not empty, and
  ``web_itm >= threshold``.
* ``synthetic_kept`` = among the row's synthetic captions with ``p >= threshold``, the
  ``keep_synthetic`` best (highest ITM; ties go to the earlier caption, so the result does
  not depend on anything but the scores and the caption order).
* ``threshold=None`` means no filter ran (captioner-only CapFilt): every non-empty web text
  (if ``keep_web``) and the first ``keep_synthetic`` captions are kept.

A NaN score never passes a threshold: a text that was not scored is not kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from capfilt.stages.status import Status

Batch = dict[str, np.ndarray]


def object_array(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are.

    ``np.array(list_of_equal_length_lists)`` would build a 2-D array; batches need one cell per
    row, each cell a Python list (captions, scores, flags).
    """
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def has_text(value: Any) -> bool:
    """Whether a web text cell holds a usable caption (not None/NaN/empty/whitespace)."""
    return isinstance(value, str) and bool(value.strip())


def keep_web_text(*, ok: bool, text: Any, score: float, threshold: float | None, keep_web: bool) -> bool:
    """The web-text half of the rule, for one row."""
    if not (ok and keep_web and has_text(text)):
        return False
    if threshold is None:
        return True
    return not math.isnan(score) and score >= threshold


def keep_synthetic_texts(
    scores: Sequence[float], *, count: int, threshold: float | None, keep_synthetic: int
) -> list[bool]:
    """The synthetic half of the rule for one row: a kept flag per caption.

    ``count`` is the number of captions (``scores`` may be empty when no filter ran).
    """
    if threshold is None:
        return [i < keep_synthetic for i in range(count)]
    if len(scores) != count:
        raise ValueError(f"{len(scores)} synthetic scores for {count} synthetic captions")
    passing = [i for i, p in enumerate(scores) if not math.isnan(p) and p >= threshold]
    # Stable sort by descending score: ties keep caption order.
    best = sorted(passing, key=lambda i: -scores[i])[:keep_synthetic]
    chosen = set(best)
    return [i in chosen for i in range(count)]


def select(
    batch: Mapping[str, np.ndarray],
    *,
    threshold: float | None,
    keep_web: bool = True,
    keep_synthetic: int = 1,
) -> Batch:
    """Add ``web_kept`` (bool) and ``synthetic_kept`` (list of bool) to a batch.

    Reads ``status``, ``web_text``, ``synthetic_texts`` and, when a filter ran, ``web_itm`` and
    ``synthetic_itm``. Missing score columns are treated as "not scored" (NaN / empty).
    """
    out = dict(batch)
    n = len(batch["status"])
    synthetic = batch.get("synthetic_texts")
    web_itm = batch.get("web_itm")
    synthetic_itm = batch.get("synthetic_itm")
    web_kept = np.zeros(n, dtype=bool)
    synthetic_kept = np.empty(n, dtype=object)
    for i in range(n):
        ok = str(batch["status"][i]) == Status.ok
        texts = list(synthetic[i]) if synthetic is not None and synthetic[i] is not None else []
        score = float(web_itm[i]) if web_itm is not None else math.nan
        web_kept[i] = keep_web_text(
            ok=ok, text=batch["web_text"][i], score=score, threshold=threshold, keep_web=keep_web
        )
        scores = [float(p) for p in synthetic_itm[i]] if synthetic_itm is not None and ok else []
        if ok and threshold is not None and len(scores) != len(texts):
            scores = [math.nan] * len(texts)  # not scored (e.g. filter skipped this row)
        synthetic_kept[i] = (
            keep_synthetic_texts(scores, count=len(texts), threshold=threshold, keep_synthetic=keep_synthetic)
            if ok
            else [False] * len(texts)
        )
    out["web_kept"] = web_kept
    out["synthetic_kept"] = synthetic_kept
    return out


def select_table(
    table: pa.Table, *, threshold: float | None, keep_web: bool = True, keep_synthetic: int = 1
) -> pa.Table:
    """Re-apply the selection rule to a samples table (e.g. ``pq.read_table(RUN/samples)``).

    Returns the table with ``web_kept`` and ``synthetic_kept`` replaced.
    """
    columns = ["status", "web_text", "synthetic_texts", "web_itm", "synthetic_itm"]
    batch = {
        name: object_array(table.column(name).to_pylist()) for name in columns if name in table.column_names
    }
    if "web_itm" in batch:
        batch["web_itm"] = np.array([math.nan if v is None else v for v in batch["web_itm"]], dtype=float)
    result = select(batch, threshold=threshold, keep_web=keep_web, keep_synthetic=keep_synthetic)
    web = pa.array(result["web_kept"], type=pa.bool_())
    synthetic = pa.array(list(result["synthetic_kept"]), type=pa.list_(pa.bool_()))
    for name, column in (("web_kept", web), ("synthetic_kept", synthetic)):
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table
