"""Select: decide which texts of a sample are kept, from the scores the filter wrote.

A pure function over dict-of-arrays batches (no model, no Ray), so the same rule runs in the
pipeline and afterwards: the filter's scores (``web_itm``, ``synthetic_itm``) are stored in
``samples/*.parquet``, and :func:`select_table` re-applies the rule to those files with another
threshold or ``keep_synthetic`` without re-running any model::

    import pyarrow.parquet as pq
    from capfilt.stages.select import select_table
    table = select_table(pq.read_table("runs/x/samples"), threshold=0.7, keep_web=True, keep_synthetic=2)

The rule (BLIP's CapFilt: drop every text whose ITM match probability is below the threshold):

* a text's filter score is its ITM match probability, or with ``itc_weight`` w > 0
  (``filter.itc_weight``) ``(1 - w) * ITM + w * ITC cosine`` (``web_itc``/``synthetic_itc``,
  which the filter then writes): :func:`filter_score`. BLIP's reference code ranks retrieval by
  ITM plus ITC the same way; on a filter trained for minutes ITC catches texts that belong to
  another image better than ITM alone (README, "The filter's score").
* ``web_kept`` = the row is ok, ``keep_web``, the web text is not empty, and
  its score ``>= threshold``.
* ``synthetic_kept`` = among the row's synthetic captions with score ``>= threshold``, the
  ``keep_synthetic`` best (highest score; ties go to the earlier caption, so the result does
  not depend on anything but the scores and the caption order).
* ``threshold=None`` means no filter ran (captioner-only CapFilt): every non-empty web text
  (if ``keep_web``) and the first ``keep_synthetic`` captions are kept.

A NaN score never passes a threshold: a text that was not scored is not kept.

CLIP scores (``web_clip``, ``synthetic_clip``; :mod:`capfilt.stages.clip`) extend the rule:

* ``clip_threshold`` (``clip.threshold``): a text must also have CLIP cosine >= it.
* ``rank_by`` (``select.rank_by``): ``itm`` (default) or ``clip``, the score that orders the
  passing synthetic captions for ``keep_synthetic`` (ties and NaNs: caption order, NaN last).
* ``top_n`` (``select.top_n``): after the above, keep at most ``top_n`` texts of the row in
  total, web text included, best ``rank_by`` score first (ties: the web text, then caption
  order). BLIP-2's recipe is ``rank_by="clip", top_n=2`` with ``keep_synthetic >= K``.

Agreement among an image's sampled captions (``synthetic_agreement``, written by the filter)
extends it for synthetic captions only; the web text is not a sample and is never held to it:

* ``min_agreement`` (``select.min_agreement``): a synthetic caption must also agree with the
  image's other captions, mean ITC-text cosine >= it (a lone caption has no agreement: NaN,
  not kept). The captioner's errors are ones the filter, fine-tuned from the same model,
  shares; where the captioner was unsure, its samples disagree.
* ``rank_by="agreement"``: the passing synthetic captions are ordered by agreement (the
  consensus caption first) instead of ITM; not combinable with ``top_n``.

:class:`Selection` holds these arguments as one value; ``Selection.from_config`` reads them
from a pipeline config (:func:`selection_options` gives them as keyword arguments).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    """The web-text half of the ITM rule, for one row."""
    if not (ok and keep_web and has_text(text)):
        return False
    if threshold is None:
        return True
    return not math.isnan(score) and score >= threshold


def filter_score(itm: Any, itc: Any, itc_weight: float) -> Any:
    """The score the filter's threshold applies to: ``itm``, or ``(1 - w) * itm + w * itc``.

    Works on floats and numpy arrays alike; a NaN in either term (not scored) gives NaN. With
    ``itc_weight`` 0 the ITC term is not read (it may be None).
    """
    if not itc_weight:
        return itm
    if itc is None:
        raise ValueError(f"itc_weight {itc_weight:g} needs ITC scores (web_itc / synthetic_itc) from the filter")
    return (1.0 - itc_weight) * itm + itc_weight * itc


def score_words(itc_weight: float) -> str:
    """The filter's score in words, as the job summary and the report name it."""
    if not itc_weight:
        return "ITM score"
    return f"score {1 - itc_weight:g} x ITM + {itc_weight:g} x ITC cosine"


def _passes(score: float, threshold: float | None) -> bool:
    return threshold is None or (not math.isnan(score) and score >= threshold)


def _rank_key(score: float) -> float:
    """Sort key for "best first": higher score first, a NaN (not scored) after every number."""
    return math.inf if math.isnan(score) else -score


def keep_synthetic_texts(
    scores: Sequence[float],
    *,
    count: int,
    threshold: float | None,
    keep_synthetic: int,
    clip: Sequence[float] | None = None,
    clip_threshold: float | None = None,
    rank: Sequence[float] | None = None,
    agreement: Sequence[float] | None = None,
    min_agreement: float | None = None,
) -> list[bool]:
    """The synthetic half of the rule for one row: a kept flag per caption.

    ``count`` is the number of captions (``scores`` may be empty when no filter ran).
    ``rank`` (default: ``scores``) orders the passing captions; without a filter and without
    ``rank`` the first ``keep_synthetic`` passing captions are kept (caption order).
    """
    if threshold is not None and len(scores) != count:
        raise ValueError(f"{len(scores)} synthetic scores for {count} synthetic captions")
    if clip_threshold is not None and (clip is None or len(clip) != count):
        raise ValueError(f"{0 if clip is None else len(clip)} CLIP scores for {count} synthetic captions")
    if min_agreement is not None and (agreement is None or len(agreement) != count):
        raise ValueError(f"{0 if agreement is None else len(agreement)} agreements for {count} synthetic captions")
    passing = [
        i
        for i in range(count)
        if _passes(scores[i] if threshold is not None else math.nan, threshold)
        and _passes(clip[i] if clip is not None and clip_threshold is not None else math.nan, clip_threshold)
        and _passes(agreement[i] if agreement is not None and min_agreement is not None else math.nan, min_agreement)
    ]
    order = rank if rank is not None else (scores if threshold is not None else None)
    if order is not None:
        if len(order) != count:
            raise ValueError(f"{len(order)} ranking scores for {count} synthetic captions")
        # Stable sort by descending score: ties (and unscored captions) keep caption order.
        passing = sorted(passing, key=lambda i: _rank_key(order[i]))
    chosen = set(passing[:keep_synthetic])
    return [i in chosen for i in range(count)]


def keep_top_n(
    web_kept: bool, web_rank: float, synthetic_kept: list[bool], rank: Sequence[float], top_n: int
) -> tuple[bool, list[bool]]:
    """Cap a row's kept texts at ``top_n``, best ``rank`` first; ties: web text, then caption order."""
    candidates = ([(_rank_key(web_rank), -1)] if web_kept else []) + [
        (_rank_key(rank[j]), j) for j, kept in enumerate(synthetic_kept) if kept
    ]
    best = {j for _, j in sorted(candidates)[:top_n]}
    return -1 in best, [j in best for j in range(len(synthetic_kept))]


def _scores(column: Any, i: int, count: int) -> list[float]:
    """Row ``i``'s list of scores, or NaNs when the column is missing or does not match ``count``."""
    values = list(column[i]) if column is not None and column[i] is not None else []
    if len(values) != count:
        return [math.nan] * count
    return [math.nan if v is None else float(v) for v in values]


def _score(column: Any, i: int) -> float:
    if column is None or column[i] is None:
        return math.nan
    return float(column[i])


def select(
    batch: Mapping[str, np.ndarray],
    *,
    threshold: float | None,
    keep_web: bool = True,
    keep_synthetic: int = 1,
    clip_threshold: float | None = None,
    rank_by: str = "itm",
    top_n: int | None = None,
    min_agreement: float | None = None,
    itc_weight: float = 0.0,
) -> Batch:
    """Add ``web_kept`` (bool) and ``synthetic_kept`` (list of bool) to a batch.

    Reads ``status``, ``web_text``, ``synthetic_texts`` and the scores that ran: ``web_itm`` /
    ``synthetic_itm`` / ``synthetic_agreement`` (and ``web_itc`` / ``synthetic_itc`` with
    ``itc_weight``) (filter), ``web_clip`` / ``synthetic_clip`` (CLIP). Missing score columns
    are treated as "not scored" (NaN / empty). See the module docstring for the rule.
    """
    if rank_by not in ("itm", "clip", "agreement"):
        raise ValueError(f"rank_by must be 'itm', 'clip' or 'agreement', got {rank_by!r}")
    if rank_by == "agreement" and top_n is not None:
        raise ValueError("rank_by='agreement' ranks synthetic captions only; it cannot rank the web text for top_n")
    if not 0.0 <= itc_weight <= 1.0:
        raise ValueError(f"itc_weight must be in [0, 1], got {itc_weight}")
    out = dict(batch)
    n = len(batch["status"])
    synthetic = batch.get("synthetic_texts")
    web_itm, synthetic_itm = batch.get("web_itm"), batch.get("synthetic_itm")
    web_itc, synthetic_itc = batch.get("web_itc"), batch.get("synthetic_itc")
    if itc_weight and threshold is not None and (web_itc is None or synthetic_itc is None) and n:
        raise ValueError(
            f"itc_weight {itc_weight:g}: the samples have no ITC scores (web_itc / synthetic_itc); "
            "the filter writes them when filter.itc_weight > 0 or filter.itc_column is true"
        )
    web_clip, synthetic_clip = batch.get("web_clip"), batch.get("synthetic_clip")
    synthetic_agreement = batch.get("synthetic_agreement")
    web_kept = np.zeros(n, dtype=bool)
    synthetic_kept = np.empty(n, dtype=object)
    for i in range(n):
        ok = str(batch["status"][i]) == Status.ok
        texts = list(synthetic[i]) if synthetic is not None and synthetic[i] is not None else []
        if not ok:
            synthetic_kept[i] = [False] * len(texts)
            continue
        itm = _scores(synthetic_itm, i, len(texts))
        if itc_weight:
            itc = _scores(synthetic_itc, i, len(texts))
            itm = [filter_score(a, b, itc_weight) for a, b in zip(itm, itc, strict=True)]
        clip = _scores(synthetic_clip, i, len(texts))
        agreement = _scores(synthetic_agreement, i, len(texts))
        web_score, web_clip_score = _score(web_itm, i), _score(web_clip, i)
        if itc_weight:
            web_score = filter_score(web_score, _score(web_itc, i), itc_weight)
        web = keep_web_text(
            ok=ok, text=batch["web_text"][i], score=web_score, threshold=threshold, keep_web=keep_web
        ) and _passes(web_clip_score, clip_threshold)
        if rank_by == "clip":
            rank, web_rank = clip, web_clip_score
        elif rank_by == "agreement":
            rank, web_rank = agreement, math.nan
        elif threshold is not None:
            rank, web_rank = itm, web_score
        else:  # no filter ran: caption order
            rank, web_rank = [0.0] * len(texts), 0.0
        kept = keep_synthetic_texts(
            itm,
            count=len(texts),
            threshold=threshold,
            keep_synthetic=keep_synthetic,
            clip=clip,
            clip_threshold=clip_threshold,
            rank=rank,
            agreement=agreement,
            min_agreement=min_agreement,
        )
        if top_n is not None:
            web, kept = keep_top_n(web, web_rank, kept, rank, top_n)
        web_kept[i] = web
        synthetic_kept[i] = kept
    out["web_kept"] = web_kept
    out["synthetic_kept"] = synthetic_kept
    return out


@dataclass(frozen=True)
class Selection:
    """The selection rule as one value: what the pipeline's select step, the bootstrap's data
    variants and ``capfilt export``/``report`` use (module docstring for each field).

    ``Selection.from_config(cfg)`` reads it from a pipeline config; :meth:`options` gives the
    keyword arguments of :func:`select` and :func:`select_table`; :meth:`apply` re-applies it
    to a samples table.
    """

    threshold: float | None
    keep_web: bool = True
    keep_synthetic: int = 1
    clip_threshold: float | None = None
    rank_by: str = "itm"
    top_n: int | None = None
    min_agreement: float | None = None
    itc_weight: float = 0.0

    @classmethod
    def from_filter(cls, flt: Any) -> Selection:
        """The filter's part of the rule from a filter section (``threshold``, ``keep_web``,
        ``keep_synthetic``, ``itc_weight``)."""
        return cls(
            threshold=flt.threshold,
            keep_web=flt.keep_web,
            keep_synthetic=flt.keep_synthetic,
            itc_weight=flt.itc_weight,
        )

    @classmethod
    def from_config(cls, cfg: Any) -> Selection:
        """The rule of a pipeline config (the one place that maps config to rule).

        Without a filter (captioner-only CapFilt) every synthetic caption may be kept and no ITM
        threshold or agreement applies (the filter computes agreement); CLIP's threshold and the
        ranking options apply whenever they are set.
        """
        if cfg.filter is not None:
            rule = cls.from_filter(cfg.filter)
        else:
            caption = cfg.caption
            every = caption.num_captions * len(caption.model_ids) if caption is not None else 0
            rule = cls(threshold=None, keep_web=True, keep_synthetic=every)
        return dataclasses.replace(
            rule,
            clip_threshold=cfg.clip.threshold if cfg.clip is not None else None,
            rank_by=cfg.select.rank_by,
            top_n=cfg.select.top_n,
            min_agreement=cfg.select.min_agreement if cfg.filter is not None else None,
        )

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`select` / :func:`select_table`."""
        return dataclasses.asdict(self)

    def apply(self, table: pa.Table) -> pa.Table:
        """:func:`select_table` with this rule."""
        return select_table(table, **self.options())


def selection_options(cfg: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`select` for a pipeline config: ``Selection.from_config(cfg).options()``."""
    return Selection.from_config(cfg).options()


SCORE_COLUMNS = (
    "web_itm", "synthetic_itm", "web_itc", "synthetic_itc", "web_clip", "synthetic_clip", "synthetic_agreement"
)


def select_table(
    table: pa.Table,
    *,
    threshold: float | None,
    keep_web: bool = True,
    keep_synthetic: int = 1,
    clip_threshold: float | None = None,
    rank_by: str = "itm",
    top_n: int | None = None,
    min_agreement: float | None = None,
    itc_weight: float = 0.0,
) -> pa.Table:
    """Re-apply the selection rule to a samples table (e.g. ``pq.read_table(RUN/samples)``).

    Returns the table with ``web_kept`` and ``synthetic_kept`` replaced.
    """
    columns = ["status", "web_text", "synthetic_texts", *SCORE_COLUMNS]
    batch = {
        name: object_array(table.column(name).to_pylist()) for name in columns if name in table.column_names
    }
    for name in ("web_itm", "web_itc", "web_clip"):
        if name in batch:
            batch[name] = np.array([math.nan if v is None else v for v in batch[name]], dtype=float)
    result = select(
        batch,
        threshold=threshold,
        keep_web=keep_web,
        keep_synthetic=keep_synthetic,
        clip_threshold=clip_threshold,
        rank_by=rank_by,
        top_n=top_n,
        min_agreement=min_agreement,
        itc_weight=itc_weight,
    )
    web = pa.array(result["web_kept"], type=pa.bool_())
    synthetic = pa.array(list(result["synthetic_kept"]), type=pa.list_(pa.bool_()))
    for name, column in (("web_kept", web), ("synthetic_kept", synthetic)):
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table
