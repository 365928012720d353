"""Fast decoding and ITM equal a plain reference computation (issue #11 items 1-3).

The reference here is the algorithm as written before the speed-ups, spelled out without any
of them: every caption row gets its own copy of the image embeddings (``repeat_interleave``),
every step re-runs the decoder over the whole sequence (no KV cache), nucleus sampling sorts
the whole vocabulary, finished rows stay in the batch writing [PAD]. ``MED.generate`` (cross-
attention keys/values once per image, preallocated self-attention cache, finished rows leaving
the batch, top-k candidates before the nucleus) must write the same tokens, and
``MED.itm_logits`` with an ``ImageContext`` the same scores to float32 tolerance.

(The cached decoder before this change did not append new tokens' keys/values to its
self-attention cache, so it attended to [DEC] + prompt only; the no-cache reference below is
what the model computes, and ``test_cached_decoding_equals_full_recompute`` pins that down.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import tiny_config

from model import med as med_module
from model.med import MED, counter_uniform


def small_med(*, seed: int = 0, vocab: int = 300, sharpen: float = 1.0) -> MED:
    # support's two-layer tiny MED ("deep": the cache is per layer); a vocabulary well above the
    # 64 nucleus candidates and a large init std, so decoding has varied tokens to pick from
    ids = dict(pad_token_id=0, cls_token_id=1, sep_token_id=3, bos_token_id=4, enc_token_id=5)
    config = tiny_config("deep", vocab_size=vocab, init_std=0.2, **ids)
    torch.manual_seed(seed)
    med = MED(config).eval()
    with torch.no_grad():
        # Peaked next-token distributions (sharpen > 1) put the nucleus inside the top-k candidates;
        # a [SEP] bias makes rows finish at different steps.
        med.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(sharpen)
        med.text_decoder.cls.predictions.bias[config.sep_token_id] += 6.0 if sharpen == 1.0 else 40.0
    return med


def reference_top_p_pick(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary nucleus sampling as before: stable sort, mass-before mask, inverse CDF."""
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = torch.cumsum(sorted_probs.double(), dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1)
    pick = torch.minimum(pick, (sorted_probs > 0).sum(dim=-1, keepdim=True) - 1)
    return sorted_ids.gather(1, pick).squeeze(1)


@torch.no_grad()
def reference_generate(
    med: MED,
    pixels: torch.Tensor,
    *,
    prompt_ids: list[int],
    num_captions: int,
    sample: bool,
    top_p: float = 0.9,
    max_length: int = 20,
    min_length: int = 5,
    repetition_penalty: float = 1.0,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    cfg = med.config
    image_embeds = med.encode_image(pixels).repeat_interleave(num_captions, dim=0)
    rows = image_embeds.shape[0]
    prefix = torch.tensor([cfg.bos_token_id, *prompt_ids])
    seqs = prefix.expand(rows, -1).clone()
    finished = torch.zeros(rows, dtype=torch.bool)
    if seeds is not None:
        row_seeds = seeds.repeat_interleave(num_captions)
        caption_index = torch.arange(num_captions).repeat(rows // num_captions)
    while seqs.shape[1] < max_length:
        logits = med.text_decoder(seqs, None, image_embeds)[:, -1].float()
        if repetition_penalty != 1.0:
            score = logits.gather(1, seqs)
            score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
            logits = logits.scatter(1, seqs, score)
        if seqs.shape[1] < min_length:
            logits[:, cfg.sep_token_id] = -math.inf
        if sample:
            u = counter_uniform(row_seeds, caption_index, seqs.shape[1])
            token = reference_top_p_pick(F.softmax(logits, dim=-1), top_p, u)
        else:
            token = logits.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, cfg.pad_token_id), token)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        finished |= token == cfg.sep_token_id
        if bool(finished.all()):
            break
    return seqs[:, len(prefix) :]


PIXELS = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
SEEDS = torch.tensor([11, 22, 33, 44, 55, 66])


@pytest.mark.parametrize("sharpen", [1.0, 12.0])
@pytest.mark.parametrize(
    "settings",
    [
        dict(num_captions=5, top_p=0.9),
        dict(num_captions=1, top_p=0.9),
        dict(num_captions=3, top_p=0.5, repetition_penalty=1.1),
    ],
    ids=["K5", "K1", "K3-penalty"],
)
def test_seeded_sampling_equals_the_reference(sharpen: float, settings: dict) -> None:
    med = small_med(sharpen=sharpen)
    kwargs = dict(prompt_ids=[7, 8], max_length=20, min_length=5, **settings)
    ours = med.generate(PIXELS, seeds=SEEDS, sample=True, **kwargs)
    reference = reference_generate(med, PIXELS, seeds=SEEDS, sample=True, **kwargs)
    assert torch.equal(ours, reference)
    # Rows finish at different steps, so finished rows did leave the batch mid-way.
    lengths = (ours != med.config.pad_token_id).sum(dim=1)
    assert lengths.min() < lengths.max()


def test_captions_do_not_depend_on_batch_size() -> None:
    med = small_med(sharpen=12.0)
    kwargs = dict(prompt_ids=[7, 8], num_captions=5, max_length=20, min_length=5, sample=True)
    whole = med.generate(PIXELS, seeds=SEEDS, **kwargs)
    for size in (1, 2, 4):
        parts = [
            med.generate(PIXELS[i : i + size], seeds=SEEDS[i : i + size], **kwargs) for i in range(0, 6, size)
        ]
        width = max(p.shape[1] for p in parts)
        joined = torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])
        assert torch.equal(
            F.pad(whole, (0, width - whole.shape[1])) if whole.shape[1] < width else whole, joined
        )


@pytest.mark.parametrize("sharpen", [1.0, 12.0])
def test_greedy_equals_the_reference(sharpen: float) -> None:
    med = small_med(sharpen=sharpen)
    kwargs = dict(prompt_ids=[7], num_captions=1, max_length=16, min_length=3)
    ours = med.generate(PIXELS, sample=False, num_beams=1, **kwargs)
    assert torch.equal(ours, reference_generate(med, PIXELS, sample=False, **kwargs))


def test_cached_decoding_equals_full_recompute() -> None:
    """The new tokens' self-attention keys/values are cached and read at every later step."""
    med = small_med(sharpen=4.0)
    with torch.no_grad():
        image = med.image_context(med.encode_image(PIXELS[:2]), group=1)
        ids = torch.tensor([[4, 7, 8, 20, 21, 22], [4, 9, 10, 23, 24, 25]])
        full = med.text_decoder(ids, None, med.encode_image(PIXELS[:2]))
        cache = med._new_cache(capacity=10)
        steps = [med.text_decoder(ids[:, :3], None, None, cache=cache, image=image)]
        for t in range(3, 6):
            steps.append(
                med.text_decoder(ids[:, t : t + 1], None, None, cache=cache, past_length=t, image=image)
            )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_nucleus_candidates_equal_the_full_sort_and_fall_back_when_flat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 500, generator=generator) * torch.linspace(0.1, 12.0, 400)[:, None]
    logits[::7, 10:14] = logits[::7, 10:11]  # exact ties inside the nucleus
    logits[3::11, 40:200] = logits[3::11, 40:41]  # ties straddling the candidate boundary
    probs = F.softmax(logits, dim=-1)
    u = torch.rand(400, generator=generator, dtype=torch.float64)
    fallback_rows: list[int] = []
    real = med_module._top_p_sorted

    def counting(p: torch.Tensor, top_p: float):
        fallback_rows.append(p.shape[0])
        return real(p, top_p)

    monkeypatch.setattr(med_module, "_top_p_sorted", counting)
    for top_p in (0.3, 0.9, 0.99):
        fallback_rows.clear()
        ours = med_module._nucleus_sample(probs, top_p, u, candidates=32)
        assert torch.equal(ours, reference_top_p_pick(probs, top_p, u))
        assert 0 < sum(fallback_rows) < 400, "both the candidate path and the fallback were used"


def test_itm_with_per_image_keys_values_equals_repeated_embeddings() -> None:
    med = small_med()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 300, (7, 9), generator=generator)
    ids[:, 0] = med.config.cls_token_id
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    mask[6, 3:] = 0
    with torch.no_grad():
        embeds = med.encode_image(PIXELS[:3])
        for owner in ([0, 0, 0, 1, 1, 2, 2], [2, 0, 1, 0, 2, 2, 1], [1, 1, 1, 1, 1, 1, 1]):
            row_image = torch.tensor(owner)
            reference = med.itm_logits(embeds.index_select(0, row_image), ids, mask)
            ours = med.itm_logits(None, ids, mask, image=med.image_context(embeds, row_image))
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
