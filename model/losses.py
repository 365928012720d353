"""BLIP pre-training losses as pure tensor functions.

The MED module (``model/med.py``) owns the encoders, momentum copies and queues; this file
owns the arithmetic that turns their outputs into the three BLIP objectives:

- ITC: image-text contrastive loss against a momentum queue, with momentum distillation
  (``blip_pretrain.py``) and, optionally, image ids so that captions of the same image are
  all positives (``blip_retrieval.py``).
- ITM: binary matched / not-matched classification on hard negatives mined from the ITC
  similarities.
- LM: next-token prediction with label smoothing, prompt and padding masked out.

Nothing here holds state or touches a module, so every function can be unit-tested with
small hand-written tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Label value that the LM loss skips (the cross-entropy convention of torch and BLIP)."""

EMPTY_QUEUE_ID = -1
"""Value of an ``idx_queue`` slot that has not been filled yet; never a positive."""

_HARD_NEGATIVE_EPS = 1e-4
"""Added to the softmax before sampling hard negatives (as BLIP), so every negative can be drawn."""


def _check_matrix(name: str, tensor: Tensor, rows: int | None, cols: int | None) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(tensor.shape)}")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(tensor.shape)}")


def _itc_targets(
    batch_size: int,
    queue_size: int,
    image_ids: Tensor | None,
    idx_queue: Tensor | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Ground-truth ITC targets over the ``batch_size + queue_size`` candidates, shape (B, B+Q).

    Without ids this is the one-hot diagonal on the in-batch block (BLIP pre-training: every
    pair is its own class). With ids, every in-batch or queued candidate carrying the same
    image id is a positive, and each row is normalised to sum to 1 (BLIP retrieval). Both
    directions (i2t and t2i) share these targets because images and texts are queued together
    with one id queue.
    """
    if image_ids is None:
        targets = torch.zeros(batch_size, batch_size + queue_size, device=device, dtype=dtype)
        targets[:, :batch_size].fill_diagonal_(1.0)
        return targets

    ids = image_ids.reshape(-1).to(device)
    if ids.numel() != batch_size:
        raise ValueError(f"image_ids must have {batch_size} entries (one per pair), got {ids.numel()}")
    if bool((ids < 0).any()):
        raise ValueError(f"image_ids must be >= 0 ({EMPTY_QUEUE_ID} marks an empty queue slot)")
    if idx_queue is None:
        if queue_size:
            raise ValueError("idx_queue is required when image_ids are given and the queue is not empty")
        queued = ids.new_empty(0)
    else:
        queued = idx_queue.reshape(-1).to(device=device, dtype=ids.dtype)
        if queued.numel() != queue_size:
            raise ValueError(
                f"idx_queue must have {queue_size} entries (the queue size), got {queued.numel()}"
            )
    candidates = torch.cat([ids, queued])  # (B+Q,)
    positives = (ids[:, None] == candidates[None, :]) & (candidates[None, :] != EMPTY_QUEUE_ID)
    positives = positives.to(dtype)
    # The diagonal is always a positive (ids are >= 0), so no row sums to zero.
    return positives / positives.sum(dim=1, keepdim=True)


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over rows of -sum_j targets_ij * log_softmax(logits)_ij."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    image_feat_m: Tensor,
    text_feat_m: Tensor,
    image_queue: Tensor,
    text_queue: Tensor,
    temp: Tensor | float,
    alpha: float,
    image_ids: Tensor | None = None,
    idx_queue: Tensor | None = None,
) -> Tensor:
    """Image-text contrastive loss with a momentum queue and momentum distillation.

    Each image is scored against the current batch's momentum text features followed by the
    queued text features (and symmetrically for texts), so the softmax sees ``B + Q``
    candidates instead of ``B``. The soft targets mix the momentum model's own similarity
    distribution (weight ``alpha``) with the ground truth (weight ``1 - alpha``); this is
    BLIP's momentum distillation, which tolerates web captions that also describe other
    images in the batch.

    Args:
        image_feat: (B, E) L2-normalised image features from the online model.
        text_feat: (B, E) L2-normalised text features from the online model.
        image_feat_m: (B, E) normalised image features from the momentum model.
        text_feat_m: (B, E) normalised text features from the momentum model.
        image_queue: (E, Q) queued momentum image features (Q may be 0).
        text_queue: (E, Q) queued momentum text features.
        temp: temperature (scalar tensor or float, > 0); the caller clamps the learnable
            temperature (BLIP: to [0.001, 0.5]) before calling. Gradient flows into it.
        alpha: distillation weight in [0, 1]; 0 means plain ground-truth targets.
        image_ids: optional (B,) integer ids >= 0. When given, every candidate with the same
            id is a positive and each target row is normalised to sum 1 (BLIP retrieval).
        idx_queue: (Q,) or (1, Q) ids of the queued entries, required with ``image_ids``
            when Q > 0. Slots equal to -1 (not yet filled) are never positives.

    Returns:
        Scalar tensor: mean of the image-to-text and text-to-image soft cross-entropies.
        Gradients reach only ``image_feat``, ``text_feat`` and ``temp``: the momentum
        features and queues are treated as constants.
    """
    _check_matrix("image_feat", image_feat, None, None)
    batch_size, embed_dim = image_feat.shape
    if batch_size == 0:
        raise ValueError("itc_loss needs at least one image-text pair")
    _check_matrix("text_feat", text_feat, batch_size, embed_dim)
    _check_matrix("image_feat_m", image_feat_m, batch_size, embed_dim)
    _check_matrix("text_feat_m", text_feat_m, batch_size, embed_dim)
    _check_matrix("image_queue", image_queue, embed_dim, None)
    queue_size = image_queue.shape[1]
    _check_matrix("text_queue", text_queue, embed_dim, queue_size)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(temp, Tensor) and temp <= 0:
        raise ValueError(f"temp must be > 0, got {temp}")
    if idx_queue is not None and image_ids is None:
        raise ValueError("idx_queue was given without image_ids")

    # Candidates: this batch's momentum features first (so column j < B is pair j), then the queue.
    text_all = torch.cat([text_feat_m.t(), text_queue], dim=1).detach()  # (E, B+Q)
    image_all = torch.cat([image_feat_m.t(), image_queue], dim=1).detach()  # (E, B+Q)

    with torch.no_grad():
        targets = _itc_targets(
            batch_size, queue_size, image_ids, idx_queue, device=image_feat.device, dtype=image_feat.dtype
        )
        if alpha > 0:
            temp_const = temp.detach() if isinstance(temp, Tensor) else temp
            sim_i2t_m = image_feat_m.detach() @ text_all / temp_const
            sim_t2i_m = text_feat_m.detach() @ image_all / temp_const
            targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
            targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
        else:
            targets_i2t = targets_t2i = targets

    sim_i2t = image_feat @ text_all / temp  # (B, B+Q)
    sim_t2i = text_feat @ image_all / temp  # (B, B+Q)
    return (_soft_cross_entropy(sim_i2t, targets_i2t) + _soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def hard_negative_indices(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    candidate_ids: Tensor | None = None,
    offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative image per text and one hard negative text per image (for ITM).

    Following BLIP, candidates are weighted by ``softmax(sim) + 1e-4`` so that similar (hard)
    negatives are drawn most often while every negative keeps a chance; the positive (the
    pair's own column, or every candidate sharing the image id) gets weight 0 and can never be
    drawn.

    Args:
        sim_i2t: (B, N) image-to-text similarities of this batch's B images against N >= B
            candidate texts, typically the in-batch block of the ITC logits (N == B), or the
            global batch of every data-parallel rank (row i's own text is column
            ``offset + i``). Not differentiated through.
        sim_t2i: (B, N) text-to-image similarities (row j = text j) against the same candidates.
        image_ids: optional (B,) ids of the rows; pairs sharing an id are all positives.
        generator: optional ``torch.Generator`` (on the sims' device) for reproducible draws.
        candidate_ids: (N,) ids of the candidates, with ``image_ids`` (default: ``image_ids``,
            for N == B).
        offset: the column of row 0's own pair (this rank's first pair in the global batch).

    Returns:
        ``(neg_image_for_text, neg_text_for_image)``, both (B,) int64 candidate indices: entry j
        of the first is the image paired with text j as a negative; entry i of the second is the
        text paired with image i.

    Raises:
        ValueError: when some pair has no negative at all (N == 1, or every candidate has the
        row's image id), since ITM then has nothing to learn from.
    """
    _check_matrix("sim_i2t", sim_i2t, None, None)
    batch_size, candidates = sim_i2t.shape
    _check_matrix("sim_t2i", sim_t2i, batch_size, candidates)
    if candidates < 2:
        raise ValueError(f"ITM hard negatives need a batch of at least 2 pairs, got {candidates}")
    if not 0 <= offset <= candidates - batch_size:
        raise ValueError(f"offset {offset}: rows 0..{batch_size - 1} must have their pair among {candidates} columns")

    with torch.no_grad():
        if image_ids is None:
            own = torch.arange(batch_size, device=sim_i2t.device) + offset
            positive = own[:, None] == torch.arange(candidates, device=sim_i2t.device)[None, :]
        else:
            ids = image_ids.reshape(-1).to(sim_i2t.device)
            if ids.numel() != batch_size:
                raise ValueError(f"image_ids must have {batch_size} entries, got {ids.numel()}")
            others = ids if candidate_ids is None else candidate_ids.reshape(-1).to(sim_i2t.device)
            if others.numel() != candidates:
                raise ValueError(f"candidate_ids must have {candidates} entries, got {others.numel()}")
            positive = ids[:, None] == others[None, :]
            if bool(positive.all(dim=1).any()):
                raise ValueError(
                    "ITM hard negatives need at least two distinct image ids in a batch; "
                    f"all {candidates} pairs share one image id"
                )
        weights_i2t = (F.softmax(sim_i2t.detach().float(), dim=1) + _HARD_NEGATIVE_EPS).masked_fill(
            positive, 0.0
        )
        weights_t2i = (F.softmax(sim_t2i.detach().float(), dim=1) + _HARD_NEGATIVE_EPS).masked_fill(
            positive, 0.0
        )
        neg_image_for_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
        neg_text_for_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    return neg_image_for_text, neg_text_for_image


def itm_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of the image-text matching head.

    Args:
        logits: (3B, 2) ITM logits ordered [B positive pairs; B (negative image, text) pairs;
            B (image, negative text) pairs]; column 1 = "match".

    Returns:
        Scalar tensor: mean cross-entropy against labels ``[1] * B + [0] * 2B``.
    """
    _check_matrix("logits", logits, None, 2)
    rows = logits.shape[0]
    if rows == 0 or rows % 3:
        raise ValueError(f"ITM logits must have 3*B rows (B >= 1), got {rows}")
    batch_size = rows // 3
    labels = torch.zeros(rows, dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    return F.cross_entropy(logits, labels)


def lm_labels(input_ids: Tensor, pad_token_id: int, prompt_length: int) -> Tensor:
    """Decoder targets: a copy of ``input_ids`` with padding and the prompt set to -100.

    ``prompt_length`` counts the leading [DEC] token plus the prompt's tokens (BLIP:
    ``len(tokenizer(prompt).input_ids) - 1``), so the model is not trained to produce the
    prompt it is always given, as BLIP's ``decoder_targets[:, :prompt_length] = -100``.

    Args:
        input_ids: (B, L) decoder input ids, starting with [DEC].
        pad_token_id: id of [PAD].
        prompt_length: number of leading positions to mask, 0 <= prompt_length.

    Returns:
        (B, L) int64 labels for :func:`lm_loss`.
    """
    _check_matrix("input_ids", input_ids, None, None)
    if prompt_length < 0:
        raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
    labels = input_ids.clone()
    labels[input_ids == pad_token_id] = IGNORE_INDEX
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Shifted next-token cross-entropy: position t predicts ``labels[:, t + 1]``.

    Args:
        logits: (B, L, V) decoder logits.
        labels: (B, L) targets from :func:`lm_labels`; -100 entries are skipped.
        label_smoothing: BLIP pre-trains with 0.1 (HF BLIP defaults to 0.0).

    Returns:
        Scalar tensor: mean over the counted (non -100) target tokens; 0 (still attached to
        the graph) when no token is counted, rather than NaN. Computed in float32 so bf16/fp16
        logits do not lose precision in the log-softmax.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, L, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    vocab_size = logits.shape[-1]
    shifted_logits = logits[:, :-1].reshape(-1, vocab_size).float()
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(
        shifted_logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    # Dividing by the count (at least 1) avoids a host sync and a NaN on fully-masked batches.
    counted = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / counted


def alpha_ramp(step: int, steps_per_epoch: int, alpha: float) -> float:
    """Distillation weight at a training step: linear from 0 to ``alpha`` over the first epoch.

    BLIP warms momentum distillation up this way (``alpha * min(1, i / len(loader))`` in epoch
    0, full ``alpha`` afterwards) because the momentum model starts as untrained as the online
    one, so its soft targets are noise at first. ``step`` is the global step, so any step at
    or after ``steps_per_epoch`` gives ``alpha``.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return alpha * min(1.0, step / steps_per_epoch)
