"""Evaluate a captioner/filter model the way BLIP reports it: captioning, retrieval, filtering.

``capfilt eval CKPT_OR_HF_DIR --data test.parquet`` calls :func:`evaluate`, which loads any
checkpoint :func:`model.hf.load_any` understands and measures

- captioning: beam search as BLIP's COCO evaluation (beams 3, max 20, min 5), BLEU-1..4 and CIDEr
  against the reference captions (pycocoevalcap), plus attribute accuracy on synthetic data;
- retrieval: BLIP's protocol (ITC similarities rank everything, ITM re-scores the top ``k_test``
  of each row, final score = ITM match logit + ITC similarity), recall@1/5/10 both directions;
- filtering (optional): how well the ITM match probability separates clean web pairs from each
  kind of noise, as ROC-AUC and as precision/recall of what a threshold would remove.

The metric functions are pure (numpy in, dict out) so they are tested without a model; the
model-driven parts only use the MED interface documented in docs/architecture.md.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capfilt.errors import UserError

if TYPE_CHECKING:  # heavy imports stay out of `capfilt --help` and the pure-metric tests
    import torch
    from PIL import Image

# BLIP tokenizes retrieval texts to at most 35 tokens (train_retrieval.py evaluation).
RETRIEVAL_MAX_TOKENS = 35


# ----------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------


def _recalls(ranks: np.ndarray) -> tuple[float, float, float]:
    """Percent of queries whose first correct answer is within the top 1, 5 and 10."""
    if ranks.size == 0:
        return (0.0, 0.0, 0.0)
    return tuple(float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10))  # type: ignore[return-value]


def retrieval_metrics(
    sim_i2t: np.ndarray,
    txt2img: Sequence[int],
    img2txts: Sequence[Sequence[int]],
    sim_t2i: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K in both directions, as BLIP's ``itm_eval``.

    ``sim_i2t[i, j]`` scores image i against text j. Image->text ("txt_r*"): an image's rank is
    the best rank of any of its captions, i.e. the number of wrong texts ranked above its best
    caption. Text->image ("img_r*"): the number of other images ranked above the caption's image.
    ``sim_t2i`` (N_txt, N_img) is the text-side matrix when it differs from ``sim_i2t.T`` (BLIP's
    ITM re-ranking fills the two directions separately); it defaults to the transpose.

    Ties are ranked pessimistically (a wrong item scoring the same as the right one counts as
    above it). BLIP's argsort leaves tie order to the sort; counting ties against the model makes
    a constant scorer get recall ~0 instead of a score that depends on index order.
    """
    sim_i2t = np.asarray(sim_i2t, dtype=np.float64)
    if sim_i2t.ndim != 2:
        raise ValueError(f"sim_i2t must be 2-D (N_img, N_txt), got shape {sim_i2t.shape}")
    n_img, n_txt = sim_i2t.shape
    sim_t2i = sim_i2t.T if sim_t2i is None else np.asarray(sim_t2i, dtype=np.float64)
    if sim_t2i.shape != (n_txt, n_img):
        raise ValueError(f"sim_t2i must have shape {(n_txt, n_img)}, got {sim_t2i.shape}")
    if len(txt2img) != n_txt or len(img2txts) != n_img:
        raise ValueError(
            f"txt2img has {len(txt2img)} entries and img2txts {len(img2txts)}; "
            f"the matrix is {n_img} images x {n_txt} texts"
        )

    txt_ranks = np.empty(n_img)
    for i, own in enumerate(img2txts):
        if len(own) == 0:
            raise ValueError(f"image {i} has no captions in img2txts")
        row = sim_i2t[i]
        correct = np.zeros(n_txt, dtype=bool)
        correct[list(own)] = True
        best = row[correct].max()
        txt_ranks[i] = np.count_nonzero((row >= best) & ~correct)

    img_ranks = np.empty(n_txt)
    for t, target in enumerate(txt2img):
        row = sim_t2i[t]
        img_ranks[t] = np.count_nonzero(row >= row[target]) - 1

    tr1, tr5, tr10 = _recalls(txt_ranks)
    ir1, ir5, ir10 = _recalls(img_ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    return {
        "txt_r1": tr1,
        "txt_r5": tr5,
        "txt_r10": tr10,
        "txt_r_mean": tr_mean,
        "img_r1": ir1,
        "img_r5": ir5,
        "img_r10": ir10,
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


_SIMPLE_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _simple_tokenize(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Lowercase word tokenizer used when java (for the PTB tokenizer) is unavailable."""
    return {k: [" ".join(_SIMPLE_TOKEN.findall(c.lower())) for c in v] for k, v in captions.items()}


def _ptb_tokenize(captions: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The COCO-caption PTB tokenizer (java), with its progress line silenced."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    # The wrapper pairs output lines with input lines by position; a java failure shows up as
    # missing keys or short lists, which must not pass as a (wrong) score.
    if tokenized.keys() != captions.keys() or any(len(tokenized[k]) != len(v) for k, v in captions.items()):
        raise RuntimeError("PTB tokenizer returned a different number of captions than it was given")
    return tokenized


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    *,
    tokenizer: str = "auto",
) -> dict[str, Any]:
    """BLEU-1..4 and CIDEr(-D) of one predicted caption per image against its references.

    Uses pycocoevalcap's Bleu and Cider scorers, the numbers BLIP and the COCO leaderboard
    report. Text is tokenized by the Stanford PTB tokenizer (needs ``java``) as in the COCO
    evaluation; ``tokenizer="auto"`` falls back to a lowercase regex tokenizer when java is
    missing or fails, and the result says which was used under ``"tokenizer"`` ("ptb" or
    "simple"), since the two give slightly different scores. Scores are fractions as
    pycocoevalcap returns them (BLIP's paper reports them x100: CIDEr 1.297 is "129.7"). Every predicted key needs
    references; references without a prediction are ignored. CIDEr's idf comes from the evaluated
    references themselves, so it is only meaningful over several images.
    """
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    if not predictions:
        raise UserError("caption evaluation: no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise UserError(f"caption evaluation: no reference captions for key {missing[0]!r}")

    keys = [str(k) for k in predictions]
    res = {str(k): [str(v)] for k, v in predictions.items()}
    gts = {str(k): [str(r) for r in references[k]] for k in predictions}
    if len(set(keys)) != len(keys):
        raise UserError("caption evaluation: keys must be distinct after conversion to str")

    used = "simple"
    if tokenizer != "simple" and shutil.which("java") is not None:
        try:
            gts_tok, res_tok = _ptb_tokenize(gts), _ptb_tokenize(res)
            used = "ptb"
        except (OSError, RuntimeError, subprocess.SubprocessError):
            if tokenizer == "ptb":
                raise
    elif tokenizer == "ptb":
        raise UserError("caption evaluation: tokenizer 'ptb' needs java on PATH")
    if used == "simple":
        gts_tok, res_tok = _simple_tokenize(gts), _simple_tokenize(res)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    cider, _ = Cider().compute_score(gts_tok, res_tok)
    out: dict[str, Any] = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider"] = float(cider)
    out["tokenizer"] = used
    out["n_images"] = len(keys)
    return out


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties given the average of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc_text(value: Any) -> str:
    """A ROC-AUC as printed and reported: three decimals (0.8994 is "0.899", not a "0.90" that
    reads as meeting a 0.90 target), "n/a" when there is none."""
    return "n/a" if not isinstance(value, int | float) or isinstance(value, bool) else f"{value:.3f}"


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative) + 0.5 P(tie): the Mann-Whitney U / (n+ n-).

    Computed from midranks in O(n log n). None when either side is empty (AUC undefined).
    """
    pos = np.asarray(scores_pos, dtype=np.float64).ravel()
    neg = np.asarray(scores_neg, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return None
    ranks = _midranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def filter_metrics(
    scores: Sequence[float] | np.ndarray,
    noisy: Sequence[bool] | np.ndarray,
    noise_type: Sequence[str] | np.ndarray,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """How well ITM match probabilities separate clean pairs from noisy ones.

    ``scores`` are match probabilities (high = keep). A row is "removed" when its score is below
    ``threshold``, as CapFilt drops captions under 0.5. Reported:

    - ``auc``: ROC-AUC of clean (positive) vs noisy rows, i.e. the chance a random clean pair
      outscores a random noisy one; ``auc_by_type[t]`` is the same for noisy rows of type t
      against all clean rows. 0.5 = chance, 1.0 = perfect separation. None when undefined.
    - ``precision``: share of removed rows that were noisy (None when nothing is removed);
      ``recall``: share of noisy rows removed (None when there is none).
    - ``removed_by_type[t]``: share of rows of each type (clean included: its share is the
      false-removal rate) that were removed; ``count_by_type``: row counts.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(noisy, dtype=bool).ravel()
    types = np.asarray(noise_type, dtype=object).ravel()
    if not (s.size == y.size == types.size):
        raise ValueError(f"scores, noisy and noise_type differ in length: {s.size}, {y.size}, {types.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")

    removed = s < threshold
    clean_scores = s[~y]
    n_removed = int(removed.sum())
    n_noisy = int(y.sum())
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "n": int(s.size),
        "n_noisy": n_noisy,
        "n_removed": n_removed,
        "auc": roc_auc(clean_scores, s[y]),
        "precision": float((removed & y).sum() / n_removed) if n_removed else None,
        "recall": float((removed & y).sum() / n_noisy) if n_noisy else None,
        "auc_by_type": {},
        "removed_by_type": {},
        "count_by_type": {},
    }
    for t in sorted({str(t) for t in types}):
        in_type = types.astype(str) == t
        out["count_by_type"][t] = int(in_type.sum())
        out["removed_by_type"][t] = float(removed[in_type].mean())
        noisy_of_type = in_type & y
        if noisy_of_type.any():
            out["auc_by_type"][t] = roc_auc(clean_scores, s[noisy_of_type])
    return out


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write an evaluation result as indented JSON (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# Model-driven parts
# ----------------------------------------------------------------------------------------------


def _to_pil(image: bytes | Image.Image | Mapping[str, Any], index: int) -> Image.Image:
    """Decode one image (encoded bytes, a PIL image, or a datasets-style {"bytes": ...} dict)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Mapping):
        image = image.get("bytes")  # Hugging Face datasets' Image feature stores {bytes, path}
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, bytes | bytearray | memoryview):
        raise UserError(
            f"image at row {index}: expected encoded image bytes or a PIL image, got {type(image).__name__}"
        )
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"image at row {index}: cannot be decoded ({exc})") from exc


def preprocess(
    images: Sequence[bytes | Image.Image], image_size: int, *, first_index: int = 0
) -> torch.Tensor:
    """Decode and apply BLIP's test transform: RGB, bicubic squash to a square, normalise.

    Returns float32 pixel values (B, 3, image_size, image_size), prepared exactly as the
    pipeline's caption and filter stages prepare theirs (``capfilt.inference.decode_image`` and
    ``pixel_values``). ``first_index`` is the position of ``images[0]`` in the whole data set,
    for error messages.
    """
    import torch

    from capfilt.inference import decode_image, pixel_values

    if not images:
        return torch.empty(0, 3, image_size, image_size)
    pixels = np.stack([decode_image(_to_pil(im, first_index + i), image_size) for i, im in enumerate(images)])
    return pixel_values(pixels, device=torch.device("cpu"), dtype=torch.float32)


def _progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    """tqdm on stderr, shown only when stderr is a terminal (quiet in logs and tests)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False)


@contextmanager
def _eval_mode(med: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode without gradients, restoring the caller's train/eval state after."""
    import torch

    was_training = med.training
    med.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        med.train(was_training)


def _image_size(med: Any) -> int:
    return int(med.config.image_size)


def _model_device(med: torch.nn.Module) -> torch.device:
    return next(med.parameters()).device


def _pixel_batches(
    images: Sequence[bytes | Image.Image] | torch.Tensor, image_size: int, batch_size: int, desc: str
) -> Iterator[torch.Tensor]:
    """Pixel values batch by batch: already-preprocessed tensors are sliced, raw images decoded.

    Decoding lazily keeps memory at one batch of pixels however many images are evaluated.
    """
    import torch

    n = len(images)
    for start in _progress(range(0, n, batch_size), desc, total=-(-n // batch_size)):
        chunk = images[start : start + batch_size]
        yield chunk if isinstance(chunk, torch.Tensor) else preprocess(chunk, image_size, first_index=start)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = RETRIEVAL_MAX_TOKENS) -> dict[str, Any]:
    """[CLS] text [SEP], padded to the longest, truncated as BLIP does for retrieval (35 tokens)."""
    from capfilt.inference import tokenize

    return tokenize(tokenizer, texts, max_length)


def _itm_match_logits(
    med: Any,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    img_idx: torch.Tensor,
    txt_idx: torch.Tensor,
    batch_size: int,
    desc: str,
) -> torch.Tensor:
    """ITM logits (N_pairs, 2) for the (image, text) pairs given by index, batch by batch.

    ``image_embeds`` may live in host memory (:func:`_embed_store_device`); each batch is moved to
    the model's device and its padding trimmed to its longest text, so long texts elsewhere in
    the set do not slow every batch down. Each distinct image of a batch has its cross-attention
    keys/values computed once for all of its pairs (``MED.image_context``): image->text
    re-ranking scores k texts per image.
    """
    import torch

    device = _model_device(med)
    out = []
    n = len(img_idx)
    for start in _progress(range(0, n, batch_size), desc, total=-(-n // batch_size)):
        ii = img_idx[start : start + batch_size]
        tt = txt_idx[start : start + batch_size]
        mask = attention_mask[tt]
        width = int(mask.sum(dim=1).max())
        used, local = torch.unique(ii, return_inverse=True)
        image = med.image_context(image_embeds[used].to(device), local.to(device))
        logits = med.itm_logits(
            None, input_ids[tt, :width].to(device), mask[:, :width].to(device), image=image
        )
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 2)


def _embed_store_device(med: Any, n_images: int) -> torch.device:
    """Where to keep the vision outputs that ITM re-scoring reads again and again.

    On an accelerator they stay there when they take under a quarter of the free memory (ViT-B at
    384 px: ~1.8 MB per image, 5k COCO images ~9 GB); otherwise they go to host memory as in BLIP
    and each ITM batch is copied over.
    """
    import torch

    device = _model_device(med)
    if device.type != "cuda":
        return device
    cfg = med.config
    need = n_images * (1 + cfg.num_patches) * cfg.vision_width * 4
    free, _total = torch.cuda.mem_get_info(device)
    return device if need < free // 4 else torch.device("cpu")


def _encode_images(
    med: Any, images: Sequence[bytes | Image.Image] | torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision encoder outputs (kept where :func:`_embed_store_device` says) and ITC features (CPU)."""
    import torch

    device = _model_device(med)
    store = _embed_store_device(med, len(images))
    embeds, feats = [], []
    for pixels in _pixel_batches(images, _image_size(med), batch_size, "encode images"):
        e = med.encode_image(pixels.to(device))
        feats.append(med.image_features(e).float().cpu())
        embeds.append(e.to(store))
    return torch.cat(embeds), torch.cat(feats)


def _encode_texts(
    med: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Normalised ITC text features (N, E) on the CPU from the unimodal text encoder."""
    import torch

    device = _model_device(med)
    feats = []
    n = len(input_ids)
    for start in _progress(range(0, n, batch_size), "encode texts", total=-(-n // batch_size)):
        mask = attention_mask[start : start + batch_size]
        width = int(mask.sum(dim=1).max())  # right padding: drop columns no text in the batch uses
        ids = input_ids[start : start + batch_size, :width].to(device)
        mask = mask[:, :width].to(device)
        feats.append(med.text_features(med.encode_text(ids, mask)).float().cpu())
    return torch.cat(feats)


def retrieval_scores(
    med: Any,
    tokenizer: Any,
    images: Sequence[bytes | Image.Image] | torch.Tensor,
    texts: Sequence[str],
    *,
    k_test: int = 256,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """BLIP's retrieval score matrices: ITC ranks all pairs, ITM re-scores each row's top k.

    Returns ``(itc_sim, score_i2t, score_t2i, k_i2t, k_t2i)``: the ITC cosine similarities
    (N_img, N_txt); the image->text scores (N_img, N_txt) where each image's top ``k_i2t`` texts
    by ITC hold ``ITM match logit + ITC similarity`` and every other entry is -inf (BLIP fills
    -100: both mean "ranked below the re-scored ones"); and the text->image scores
    (N_txt, N_img) built the same way per text. k is ``min(k_test, number of candidates)``.
    ``images`` are encoded images/PIL images or preprocessed pixel values (N, 3, H, W).
    """
    import torch

    if k_test < 1:
        raise UserError(f"k_test must be >= 1, got {k_test}")
    if len(images) == 0 or len(texts) == 0:
        raise UserError("retrieval: needs at least one image and one text")
    with _eval_mode(med):
        image_embeds, image_feats = _encode_images(med, images, batch_size)
        tok = _tokenize(tokenizer, texts)
        text_feats = _encode_texts(med, tok["input_ids"], tok["attention_mask"], batch_size)
        sims = image_feats @ text_feats.T  # (N_img, N_txt)
        n_img, n_txt = sims.shape

        def rescore(rows: torch.Tensor, k: int, image_major: bool, desc: str) -> torch.Tensor:
            topk_sim, topk_idx = rows.topk(k, dim=1)  # (R, k)
            row_idx = torch.arange(rows.shape[0]).repeat_interleave(k)
            col_idx = topk_idx.reshape(-1)
            img_idx, txt_idx = (row_idx, col_idx) if image_major else (col_idx, row_idx)
            logits = _itm_match_logits(
                med, image_embeds, tok["input_ids"], tok["attention_mask"], img_idx, txt_idx, batch_size, desc
            )
            score = torch.full_like(rows, float("-inf"))
            score.scatter_(1, topk_idx, logits[:, 1].view(-1, k) + topk_sim)
            return score

        k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
        score_i2t = rescore(sims, k_i2t, True, "ITM image->text")
        score_t2i = rescore(sims.T.contiguous(), k_t2i, False, "ITM text->image")
    return sims.numpy(), score_i2t.numpy(), score_t2i.numpy(), k_i2t, k_t2i


def score_retrieval(
    med: Any,
    tokenizer: Any,
    images: Sequence[bytes | Image.Image] | torch.Tensor,
    texts: Sequence[str],
    txt2img: Sequence[int],
    img2txts: Sequence[Sequence[int]],
    k_test: int = 256,
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Recall@1/5/10 both ways under BLIP's ITC-then-ITM protocol (see :func:`retrieval_scores`).

    The top-level keys are the ITM re-ranked metrics (what BLIP reports); ``"itc"`` holds the
    same metrics from ITC similarities alone, which shows what the re-ranking adds.
    """
    sims, score_i2t, score_t2i, k_i2t, k_t2i = retrieval_scores(
        med, tokenizer, images, texts, k_test=k_test, batch_size=batch_size
    )
    result: dict[str, Any] = retrieval_metrics(score_i2t, txt2img, img2txts, sim_t2i=score_t2i)
    result["k_test"] = {"i2t": k_i2t, "t2i": k_t2i}
    result["n_images"], result["n_texts"] = len(img2txts), len(txt2img)
    result["itc"] = retrieval_metrics(sims, txt2img, img2txts)
    return result


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    from capfilt.inference import prompt_ids

    return prompt_ids(tokenizer, prompt)


def generate_captions(
    med: Any,
    tokenizer: Any,
    images: Sequence[bytes | Image.Image] | torch.Tensor,
    *,
    prompt: str | None = None,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    batch_size: int = 64,
) -> list[str]:
    """One beam-search caption per image, as BLIP's COCO captioning evaluation (3 / 20 / 5).

    ``prompt`` defaults to the model's own (``med.config.prompt``, BLIP's "a picture of "); the
    prompt is not part of the returned text, as BLIP strips it before scoring.
    """
    prompt = med.config.prompt if prompt is None else prompt
    captions: list[str] = []
    with _eval_mode(med):
        device = _model_device(med)
        prompt_ids = _prompt_ids(tokenizer, prompt or "")
        for pixels in _pixel_batches(images, _image_size(med), batch_size, "caption"):
            ids = med.generate(
                pixels.to(device),
                prompt_ids=prompt_ids,
                num_captions=1,
                sample=False,
                num_beams=num_beams,
                max_length=max_length,
                min_length=min_length,
            )
            captions.extend(t.strip() for t in tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True))
    return captions


def itm_match_probs(
    med: Any,
    tokenizer: Any,
    images: Sequence[bytes | Image.Image] | torch.Tensor,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """ITM softmax probability of "match" for each (image i, text i) pair: CapFilt's filter score."""
    from capfilt.inference import itm_scores

    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    probs: list[np.ndarray] = []
    with _eval_mode(med):
        device = _model_device(med)
        for start, pixels in zip(
            range(0, len(texts), batch_size),
            _pixel_batches(images, _image_size(med), batch_size, "ITM filter"),
            strict=True,
        ):
            chunk = texts[start : start + batch_size]
            embeds = med.encode_image(pixels.to(device))
            itm, _ = itm_scores(med, tokenizer, embeds, chunk, range(len(chunk)), batch_size=batch_size)
            probs.append(itm.numpy())
    return np.concatenate(probs) if probs else np.empty(0)


def _read_parquet(path: str | Path, required: Sequence[str], limit: int | None, what: str) -> dict[str, list]:
    """Columns of a Parquet file as Python lists, checking the ones evaluation needs."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}: {path}: no such file or directory")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{what}: {path}: cannot be read as Parquet ({exc})") from exc
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise UserError(
            f"{what}: {path} has no column {missing[0]!r} (columns: {', '.join(table.column_names)})"
        )
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be >= 1, got {limit}")
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise UserError(f"{what}: {path} has no rows")
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _attribute_accuracy(captions: Sequence[str], objects: Sequence[Any]) -> float:
    """Share of captions whose colour/shape words agree with the scene (synthetic data only)."""
    from capfilt import synth

    return float(synth.attribute_accuracy(list(captions), list(objects)))


def evaluate(
    model_path: str | Path,
    data_path: str | Path,
    *,
    batch_size: int = 64,
    k_test: int = 128,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    prompt: str | None = None,
    filter_data: str | Path | None = None,
    threshold: float = 0.5,
    limit: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Caption, retrieval and (optionally) filter metrics of one model on a test Parquet file.

    ``data_path`` needs ``image`` (encoded bytes) and ``captions`` (list of references) columns,
    optionally ``key`` (defaults to the row number) and ``objects`` (synthetic scenes as JSON,
    enabling ``captioning.attribute_accuracy``). ``filter_data`` is a web Parquet with ``image``,
    ``text``, ``noisy`` and ``noise_type``: its pairs are scored by ITM match probability and
    judged by :func:`filter_metrics` at ``threshold``. ``limit`` keeps the first N rows of each
    file. Returns a JSON-able dict (no NaN): ``captioning``, ``retrieval``, ``filter`` (None without
    ``filter_data``), ``seconds`` per part, and the settings used.
    """
    started = time.perf_counter()
    for name, value in (("batch_size", batch_size), ("num_beams", num_beams), ("max_length", max_length)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"threshold must be within [0, 1], got {threshold}")
    from capfilt.inference import resolve_device

    torch_device = resolve_device(device)
    data = _read_parquet(data_path, ("image", "captions"), limit, "data")
    web = (
        _read_parquet(filter_data, ("image", "text", "noisy", "noise_type"), limit, "filter_data")
        if filter_data is not None
        else None
    )

    from capfilt.inference import is_hub_id, resolve_model
    from model.hf import load_any

    # A hub id ("owner/name") is fetched as the pipeline fetches it; load_any reports a missing path.
    try:
        source = resolve_model(str(model_path)) if is_hub_id(str(model_path)) else model_path
        med, tokenizer = load_any(source)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        raise UserError(f"model: {exc}") from exc
    if tokenizer is None:
        raise UserError(f"model: {model_path}: has no tokenizer (tokenizer.json) saved with it")
    med.to(torch_device)
    seconds: dict[str, float] = {"load": time.perf_counter() - started}

    images = data["image"]
    keys = [str(k) for k in data["key"]] if "key" in data else [str(i) for i in range(len(images))]
    if len(set(keys)) != len(keys):
        raise UserError(f"data: {data_path}: column 'key' has duplicate values")
    references: dict[str, list[str]] = {}
    for key, caps in zip(keys, data["captions"], strict=True):
        caps = [caps] if isinstance(caps, str) else [str(c) for c in (caps or []) if str(c).strip()]
        if not caps:
            raise UserError(f"data: {data_path}: row with key {key!r} has no reference captions")
        references[key] = caps

    t0 = time.perf_counter()
    predictions = generate_captions(
        med, tokenizer, images, prompt=prompt, num_beams=num_beams, max_length=max_length,
        min_length=min_length, batch_size=batch_size,
    )  # fmt: skip
    captioning: dict[str, Any] = caption_metrics(dict(zip(keys, predictions, strict=True)), references)
    if "objects" in data:
        captioning["attribute_accuracy"] = _attribute_accuracy(predictions, data["objects"])
    captioning["examples"] = [
        {"key": k, "prediction": p, "references": references[k]}
        for k, p in zip(keys[:5], predictions[:5], strict=True)
    ]
    seconds["captioning"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = [c for k in keys for c in references[k]]
    txt2img = [i for i, k in enumerate(keys) for _ in references[k]]
    img2txts: list[list[int]] = [[] for _ in keys]
    for t, i in enumerate(txt2img):
        img2txts[i].append(t)
    retrieval = score_retrieval(
        med, tokenizer, images, texts, txt2img, img2txts, k_test, batch_size=batch_size
    )
    seconds["retrieval"] = time.perf_counter() - t0

    filtering = None
    if web is not None:
        t0 = time.perf_counter()
        probs = itm_match_probs(
            med, tokenizer, web["image"], [str(t) for t in web["text"]], batch_size=batch_size
        )
        filtering = filter_metrics(probs, web["noisy"], web["noise_type"], threshold=threshold)
        filtering["mean_itm_by_type"] = {
            t: float(probs[np.asarray(web["noise_type"], dtype=object) == t].mean())
            for t in filtering["count_by_type"]
        }
        seconds["filter"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started

    return {
        "model": str(model_path),
        "data": str(data_path),
        "filter_data": None if filter_data is None else str(filter_data),
        "device": str(torch_device),
        "n_images": len(keys),
        "n_texts": len(texts),
        "settings": {
            "batch_size": batch_size,
            "k_test": k_test,
            "num_beams": num_beams,
            "max_length": max_length,
            "min_length": min_length,
            "prompt": med.config.prompt if prompt is None else prompt,
            "threshold": threshold,
            "limit": limit,
        },
        "captioning": captioning,
        "retrieval": retrieval,
        "filter": filtering,
        "seconds": seconds,
    }
