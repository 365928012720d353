"""Unit tests for model/losses.py: hand-computed ITC, hard negatives, ITM, LM masking and smoothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import (
    alpha_ramp,
    hard_negative_indices,
    itc_loss,
    itm_loss,
    lm_labels,
    lm_loss,
)

# ---------------------------------------------------------------- plain-python helpers


def _log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax(row)]


def _soft_ce(sims: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over rows of -sum(target * log_softmax(sim))."""
    rows = [
        -sum(t * lp for t, lp in zip(tr, _log_softmax(sr), strict=True))
        for sr, tr in zip(sims, targets, strict=True)
    ]
    return sum(rows) / len(rows)


# ---------------------------------------------------------------- ITC: a 2x2 batch with a queue of 2
#
# E = 2, temp = 0.5. Candidates are [this batch's momentum features; the queue].
#   image_feat = image_feat_m = [(1, 0), (0, 1)]
#   text_feat  = [(0.6, 0.8), (0.8, 0.6)]
#   text_feat_m = [(0, 1), (1, 0)]
#   image_queue columns: (0.6, -0.8), (-1, 0)     text_queue columns: (0, -1), (0.8, 0.6)
# so the candidate texts are (0,1) (1,0) (0,-1) (0.8,0.6) and candidate images (1,0) (0,1) (0.6,-0.8) (-1,0).
# Dot products divided by 0.5:
SIM_I2T = [[0.0, 2.0, 0.0, 1.6], [2.0, 0.0, -2.0, 1.2]]  # online images vs candidate texts
SIM_T2I = [[1.2, 1.6, -0.56, -1.2], [1.6, 1.2, 0.0, -1.6]]  # online texts vs candidate images
SIM_I2T_M = SIM_I2T  # momentum images equal the online ones
SIM_T2I_M = [[0.0, 2.0, -1.6, 0.0], [2.0, 0.0, 1.2, -2.0]]  # momentum texts vs candidate images
ONE_HOT = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def _itc_inputs() -> dict[str, torch.Tensor]:
    t = torch.tensor
    return {
        "image_feat": t([[1.0, 0.0], [0.0, 1.0]]),
        "text_feat": t([[0.6, 0.8], [0.8, 0.6]]),
        "image_feat_m": t([[1.0, 0.0], [0.0, 1.0]]),
        "text_feat_m": t([[0.0, 1.0], [1.0, 0.0]]),
        "image_queue": t([[0.6, -1.0], [-0.8, 0.0]]),
        "text_queue": t([[0.0, 0.8], [-1.0, 0.6]]),
    }


def test_itc_alpha_zero_matches_hand_computation() -> None:
    expected = (_soft_ce(SIM_I2T, ONE_HOT) + _soft_ce(SIM_T2I, ONE_HOT)) / 2
    # Spelled out for the first row: logsumexp(0, 2, 0, 1.6) - 0.
    assert _soft_ce(SIM_I2T[:1], ONE_HOT[:1]) == pytest.approx(
        math.log(math.exp(0) + math.exp(2) + math.exp(0) + math.exp(1.6))
    )
    loss = itc_loss(**_itc_inputs(), temp=0.5, alpha=0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_itc_distillation_matches_hand_computation() -> None:
    alpha = 0.4
    targets_i2t = [
        [alpha * p + (1 - alpha) * y for p, y in zip(_softmax(row), hot, strict=True)]
        for row, hot in zip(SIM_I2T_M, ONE_HOT, strict=True)
    ]
    targets_t2i = [
        [alpha * p + (1 - alpha) * y for p, y in zip(_softmax(row), hot, strict=True)]
        for row, hot in zip(SIM_T2I_M, ONE_HOT, strict=True)
    ]
    expected = (_soft_ce(SIM_I2T, targets_i2t) + _soft_ce(SIM_T2I, targets_t2i)) / 2
    loss = itc_loss(**_itc_inputs(), temp=torch.tensor(0.5), alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Distillation really changes the value here (it is not a no-op on this example).
    assert expected != pytest.approx((_soft_ce(SIM_I2T, ONE_HOT) + _soft_ce(SIM_T2I, ONE_HOT)) / 2, rel=1e-3)


def test_itc_gradients_reach_online_features_and_temp_only() -> None:
    inputs = {k: v.clone().requires_grad_(True) for k, v in _itc_inputs().items()}
    temp = torch.tensor(0.5, requires_grad=True)
    itc_loss(**inputs, temp=temp, alpha=0.4).backward()
    assert inputs["image_feat"].grad is not None and inputs["image_feat"].grad.abs().sum() > 0
    assert inputs["text_feat"].grad is not None and inputs["text_feat"].grad.abs().sum() > 0
    assert temp.grad is not None and temp.grad.item() != 0
    for name in ("image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        assert inputs[name].grad is None, name


def test_itc_ids_make_same_image_captions_positives() -> None:
    torch.manual_seed(0)
    batch, queue, dim = 3, 4, 8
    feats = [F.normalize(torch.randn(batch, dim), dim=1) for _ in range(4)]
    image_queue = F.normalize(torch.randn(dim, queue), dim=0)
    text_queue = F.normalize(torch.randn(dim, queue), dim=0)
    image_ids = torch.tensor([7, 7, 3])
    idx_queue = torch.tensor([[3, -1, 7, 5]])  # (1, Q) as the model's buffer
    temp = 0.1
    loss = itc_loss(*feats, image_queue, text_queue, temp, 0.0, image_ids=image_ids, idx_queue=idx_queue)

    # Candidate ids: [7, 7, 3 | 3, -1, 7, 5]
    targets = torch.tensor(
        [
            [1 / 3, 1 / 3, 0, 0, 0, 1 / 3, 0],
            [1 / 3, 1 / 3, 0, 0, 0, 1 / 3, 0],
            [0, 0, 1 / 2, 1 / 2, 0, 0, 0],
        ]
    )
    image_feat, text_feat, image_feat_m, text_feat_m = feats
    sim_i2t = image_feat @ torch.cat([text_feat_m.t(), text_queue], 1) / temp
    sim_t2i = text_feat @ torch.cat([image_feat_m.t(), image_queue], 1) / temp
    expected = (
        _soft_ce(sim_i2t.tolist(), targets.tolist()) + _soft_ce(sim_t2i.tolist(), targets.tolist())
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_itc_empty_queue_slots_are_negatives_and_unique_ids_equal_one_hot() -> None:
    torch.manual_seed(1)
    batch, queue, dim = 4, 3, 6
    args = [F.normalize(torch.randn(batch, dim), dim=1) for _ in range(4)]
    args += [F.normalize(torch.randn(dim, queue), dim=0) for _ in range(2)]
    ids = torch.tensor([0, 1, 2, 3])
    plain = itc_loss(*args, 0.07, 0.4)
    # Ids that never repeat give exactly the one-hot targets, whether a slot is empty (-1) or unrelated.
    with_empty = itc_loss(*args, 0.07, 0.4, image_ids=ids, idx_queue=torch.tensor([-1, -1, 9]))
    with_other = itc_loss(*args, 0.07, 0.4, image_ids=ids, idx_queue=torch.tensor([11, 10, 9]))
    assert with_empty.item() == pytest.approx(plain.item(), rel=1e-6)
    assert with_other.item() == pytest.approx(plain.item(), rel=1e-6)
    # A queued entry of the same image does change the loss (it became a positive).
    with_match = itc_loss(*args, 0.07, 0.4, image_ids=ids, idx_queue=torch.tensor([2, -1, 9]))
    assert with_match.item() != pytest.approx(plain.item(), rel=1e-4)


def test_itc_rejects_bad_inputs() -> None:
    inputs = _itc_inputs()
    with pytest.raises(ValueError, match="image_ids must be >= 0"):
        itc_loss(
            **inputs, temp=0.5, alpha=0.0, image_ids=torch.tensor([-1, 2]), idx_queue=torch.tensor([1, 2])
        )
    with pytest.raises(ValueError, match="idx_queue must have 2"):
        itc_loss(**inputs, temp=0.5, alpha=0.0, image_ids=torch.tensor([1, 2]), idx_queue=torch.tensor([1]))
    with pytest.raises(ValueError, match="idx_queue is required"):
        itc_loss(**inputs, temp=0.5, alpha=0.0, image_ids=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="alpha"):
        itc_loss(**inputs, temp=0.5, alpha=1.5)
    bad = dict(inputs, text_queue=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="text_queue"):
        itc_loss(**bad, temp=0.5, alpha=0.0)


def test_itc_works_without_a_queue() -> None:
    inputs = dict(_itc_inputs(), image_queue=torch.zeros(2, 0), text_queue=torch.zeros(2, 0))
    sims_i2t = [row[:2] for row in SIM_I2T]
    sims_t2i = [row[:2] for row in SIM_T2I]
    expected = (
        _soft_ce(sims_i2t, [r[:2] for r in ONE_HOT]) + _soft_ce(sims_t2i, [r[:2] for r in ONE_HOT])
    ) / 2
    assert itc_loss(**inputs, temp=0.5, alpha=0.0).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- hard negatives


def test_hard_negatives_never_return_the_positive() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        batch = int(torch.randint(2, 9, (1,), generator=gen))
        # Make the positives the most similar pairs, the worst case for a sampler that forgot the mask.
        sim_i2t = torch.randn(batch, batch, generator=gen) + 50 * torch.eye(batch)
        sim_t2i = torch.randn(batch, batch, generator=gen) + 50 * torch.eye(batch)
        if trial % 2:
            ids = torch.randint(0, 3, (batch,), generator=gen)
            if bool((ids == ids[0]).all()):
                ids[-1] = ids[0] + 1
        else:
            ids = None
        neg_img, neg_txt = hard_negative_indices(sim_i2t, sim_t2i, image_ids=ids, generator=gen)
        assert neg_img.shape == neg_txt.shape == (batch,)
        assert neg_img.dtype == neg_txt.dtype == torch.long
        own = torch.arange(batch)
        if ids is None:
            assert bool((neg_img != own).all()) and bool((neg_txt != own).all())
        else:
            assert bool((ids[neg_img] != ids).all()), (ids, neg_img)
            assert bool((ids[neg_txt] != ids).all()), (ids, neg_txt)


def test_hard_negatives_prefer_similar_pairs_and_follow_the_right_matrix() -> None:
    batch = 4
    # Text j's most similar wrong image is (j + 1) % 4; image i's most similar wrong text is (i + 2) % 4.
    sim_t2i = torch.zeros(batch, batch)
    sim_i2t = torch.zeros(batch, batch)
    for k in range(batch):
        sim_t2i[k, (k + 1) % batch] = 30.0
        sim_i2t[k, (k + 2) % batch] = 30.0
    gen = torch.Generator().manual_seed(3)
    neg_img, neg_txt = hard_negative_indices(sim_i2t, sim_t2i, generator=gen)
    assert neg_img.tolist() == [(k + 1) % batch for k in range(batch)]
    assert neg_txt.tolist() == [(k + 2) % batch for k in range(batch)]


def test_hard_negatives_over_a_global_batch_never_draw_the_rows_own_pair() -> None:
    """A data-parallel rank draws from every rank's pairs: rows are its B pairs, columns the N of
    the global batch, its own pair at column offset + i (or any column sharing its image id)."""
    gen = torch.Generator().manual_seed(1)
    batch, ranks = 4, 3
    for rank in range(ranks):
        offset = rank * batch
        # make the row's own column by far the most similar: a sampler ignoring the offset picks it
        sims = torch.randn(batch, batch * ranks, generator=gen)
        sims[torch.arange(batch), offset + torch.arange(batch)] += 50
        neg_img, neg_txt = hard_negative_indices(sims, sims.clone(), generator=gen, offset=offset)
        assert bool((neg_img != offset + torch.arange(batch)).all()) and bool((neg_txt != offset + torch.arange(batch)).all())
        assert int(neg_img.max()) < batch * ranks
        ids_all = torch.arange(batch * ranks) % 5  # ids repeat across ranks: every match is a positive
        ids = ids_all[offset : offset + batch]
        neg_img, neg_txt = hard_negative_indices(
            sims, sims.clone(), image_ids=ids, generator=gen, candidate_ids=ids_all, offset=offset
        )
        assert bool((ids_all[neg_img] != ids).all()) and bool((ids_all[neg_txt] != ids).all())
    with pytest.raises(ValueError, match="offset"):
        hard_negative_indices(torch.zeros(4, 8), torch.zeros(4, 8), offset=5)
    with pytest.raises(ValueError, match="candidate_ids"):
        hard_negative_indices(torch.zeros(2, 4), torch.zeros(2, 4), image_ids=torch.tensor([0, 1]))


def test_hard_negatives_reproducible_with_generator() -> None:
    sims = torch.randn(6, 6, generator=torch.Generator().manual_seed(5))
    first = hard_negative_indices(sims, sims.t(), generator=torch.Generator().manual_seed(9))
    second = hard_negative_indices(sims, sims.t(), generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_hard_negatives_degenerate_batches_raise() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        hard_negative_indices(torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="share one image id"):
        hard_negative_indices(torch.zeros(3, 3), torch.zeros(3, 3), image_ids=torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match="sim_t2i"):
        hard_negative_indices(torch.zeros(3, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------- ITM


def test_itm_loss_labels_first_third_positive() -> None:
    # B = 2: rows 0-1 positives, rows 2-5 negatives. Logits (a, b) give CE = lse(a, b) - chosen.
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    chosen = [2.0, 0.0, 3.0, 0.0, 0.0, 2.0]
    expected = (
        sum(
            math.log(math.exp(a) + math.exp(b)) - c for (a, b), c in zip(logits.tolist(), chosen, strict=True)
        )
        / 6
    )
    assert itm_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_itm_loss_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="3\\*B"):
        itm_loss(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="2 columns"):
        itm_loss(torch.zeros(3, 3))


# ---------------------------------------------------------------- LM

PAD = 0


def test_lm_labels_masks_prompt_and_padding() -> None:
    input_ids = torch.tensor([[9, 5, 6, 7, 3, PAD], [9, 5, 6, 3, PAD, PAD]])
    labels = lm_labels(input_ids, pad_token_id=PAD, prompt_length=2)
    assert labels.tolist() == [[-100, -100, 6, 7, 3, -100], [-100, -100, 6, 3, -100, -100]]
    assert input_ids[0, 0] == 9  # the input is not modified
    assert lm_labels(input_ids, PAD, 0).tolist()[1] == [9, 5, 6, 3, -100, -100]
    with pytest.raises(ValueError, match="prompt_length"):
        lm_labels(input_ids, PAD, -1)


def test_lm_loss_ignores_prompt_and_padding_and_matches_hand_computation() -> None:
    vocab = 5
    input_ids = torch.tensor([[4, 1, 2, 3, PAD], [4, 1, 3, PAD, PAD]])
    labels = lm_labels(input_ids, PAD, prompt_length=2)  # counted targets: (0,2)=2, (0,3)=3, (1,2)=3
    torch.manual_seed(0)
    logits = torch.randn(2, 5, vocab)
    loss = lm_loss(logits, labels, label_smoothing=0.0)

    # Position t predicts label t+1, so the counted predictions are at (0,1), (0,2), (1,1).
    def nll(b: int, t: int, target: int) -> float:
        row = logits[b, t].tolist()
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    expected = (nll(0, 1, 2) + nll(0, 2, 3) + nll(1, 1, 3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # Changing logits wherever the next label is masked (prompt, padding, last position) changes nothing.
    perturbed = logits.clone()
    for b, t in [(0, 0), (0, 3), (0, 4), (1, 0), (1, 2), (1, 3), (1, 4)]:
        perturbed[b, t] = torch.randn(vocab) * 10
    assert lm_loss(perturbed, labels, label_smoothing=0.0).item() == pytest.approx(loss.item(), rel=1e-6)
    assert lm_loss(perturbed, labels).item() == pytest.approx(lm_loss(logits, labels).item(), rel=1e-6)
    # ... while changing a counted position does.
    perturbed[0, 1] = torch.randn(vocab) * 10
    assert lm_loss(perturbed, labels, label_smoothing=0.0).item() != pytest.approx(loss.item(), rel=1e-4)


def test_lm_loss_label_smoothing_matches_torch() -> None:
    torch.manual_seed(2)
    vocab = 11
    logits = torch.randn(3, 7, vocab)
    labels = torch.randint(0, vocab, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    keep = labels[:, 1:] != -100
    reference = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], label_smoothing=0.1)
    assert lm_loss(logits, labels, label_smoothing=0.1).item() == pytest.approx(reference.item(), rel=1e-5)
    assert lm_loss(logits, labels, label_smoothing=0.1).item() != pytest.approx(
        lm_loss(logits, labels, label_smoothing=0.0).item(), rel=1e-4
    )


def test_lm_loss_fully_masked_batch_is_zero_not_nan() -> None:
    logits = torch.randn(2, 4, 6, requires_grad=True)
    loss = lm_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_lm_loss_upcasts_half_precision_logits() -> None:
    torch.manual_seed(4)
    logits = torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    full = lm_loss(logits, labels)
    half = lm_loss(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


def test_lm_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="labels must have shape"):
        lm_loss(torch.zeros(2, 4, 6), torch.zeros(2, 5, dtype=torch.long))


# ---------------------------------------------------------------- alpha ramp


def test_alpha_ramp_is_linear_over_the_first_epoch_then_flat() -> None:
    assert alpha_ramp(0, 100, 0.4) == 0.0
    assert alpha_ramp(25, 100, 0.4) == pytest.approx(0.1)
    assert alpha_ramp(100, 100, 0.4) == pytest.approx(0.4)
    assert alpha_ramp(10_000, 100, 0.4) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        alpha_ramp(1, 0, 0.4)
    with pytest.raises(ValueError, match="step"):
        alpha_ramp(-1, 10, 0.4)
