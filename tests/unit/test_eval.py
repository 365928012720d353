"""Tests for capfilt.eval: pure metrics first, then an end-to-end run on a tiny random MED."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
from support import tiny_med, tiny_tokenizer

from capfilt import eval as ev
from capfilt.errors import UserError

# ---------------------------------------------------------------------------------------------
# retrieval_metrics
# ---------------------------------------------------------------------------------------------


def _retrieval_fixture() -> tuple[np.ndarray, list[int], list[list[int]]]:
    """3 images, 6 texts (2 captions each); each row's ranks are set by hand.

    image 0 owns texts 0,1: text 1 is ranked first  -> txt rank 0
    image 1 owns texts 2,3: best own text is 3rd    -> txt rank 2 (texts 0 and 5 above it)
    image 2 owns texts 4,5: best own text is 6th    -> txt rank 4 (others all above)
    """
    sim = np.array(
        [
            [0.5, 0.9, 0.1, 0.2, 0.3, 0.4],
            [0.9, 0.1, 0.5, 0.2, 0.3, 0.8],
            [0.9, 0.8, 0.7, 0.6, 0.1, 0.1],
        ]
    )
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txts = [[0, 1], [2, 3], [4, 5]]
    return sim, txt2img, img2txts


def test_retrieval_metrics_hand_built_ranks() -> None:
    sim, txt2img, img2txts = _retrieval_fixture()
    m = ev.retrieval_metrics(sim, txt2img, img2txts)
    # image->text ranks [0, 2, 4]: one in top 1, all three in top 5 and 10.
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r5"] == pytest.approx(100.0)
    assert m["txt_r10"] == pytest.approx(100.0)
    # text->image, column by column: text0 -> image 0 scores 0.5 vs 0.9, 0.9 -> rank 2;
    # t1 0.9 vs .1 .8 -> 0; t2 .5 vs .1 .7 -> 1; t3 .2 vs .2 .6 -> tie counts against: 2;
    # t4 .1 vs .3 .3 -> 2; t5 .1 vs .4 .8 -> 2.  Ranks [2,0,1,2,2,2].
    assert m["img_r1"] == pytest.approx(100 / 6)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["img_r_mean"] == pytest.approx((100 / 6 + 200) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_retrieval_metrics_recall_at_10_boundary_and_separate_t2i() -> None:
    # Image 0 owns text 0, image 1 owns texts 1..11.
    txt2img = [0] + [1] * 11
    img2txts = [[0], list(range(1, 12))]
    row0 = np.r_[1.5, np.arange(1.0, 12.0)]  # wrong texts 2..11 (values 2..11) above -> rank 10
    row1 = np.r_[10.0, np.linspace(9.0, 0.0, 11)]  # one wrong text above the best own -> rank 1
    m = ev.retrieval_metrics(np.stack([row0, row1]), txt2img, img2txts)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == pytest.approx((0.0, 50.0, 50.0))
    row0[0] = 2.5  # now 9 wrong texts above -> rank 9, a hit at R@10
    m = ev.retrieval_metrics(np.stack([row0, row1]), txt2img, img2txts)
    assert m["txt_r10"] == pytest.approx(100.0)
    # A separate t2i matrix overrides the transpose: every text prefers its own image.
    t2i = np.zeros((12, 2))
    t2i[0, 0] = 1.0
    t2i[1:, 1] = 1.0
    m2 = ev.retrieval_metrics(np.stack([row0, row1]), txt2img, img2txts, sim_t2i=t2i)
    assert m2["img_r1"] == pytest.approx(100.0)
    assert m2["txt_r10"] == m["txt_r10"]


def test_retrieval_metrics_constant_scores_are_not_rewarded() -> None:
    sim = np.zeros((4, 4))
    m = ev.retrieval_metrics(sim, [0, 1, 2, 3], [[0], [1], [2], [3]])
    assert m["txt_r1"] == 0.0 and m["img_r1"] == 0.0


def test_retrieval_metrics_rejects_mismatched_shapes() -> None:
    sim, txt2img, img2txts = _retrieval_fixture()
    with pytest.raises(ValueError, match="txt2img"):
        ev.retrieval_metrics(sim, txt2img[:-1], img2txts)
    with pytest.raises(ValueError, match="no captions"):
        ev.retrieval_metrics(sim, txt2img, [[0, 1], [2, 3], []])


# ---------------------------------------------------------------------------------------------
# AUC and filter_metrics
# ---------------------------------------------------------------------------------------------


def _brute_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Values on a coarse grid so ties within and across the groups are frequent.
    pos = rng.integers(0, 6, size=37) / 5
    neg = rng.integers(0, 4, size=23) / 5
    assert ev.roc_auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)


def test_roc_auc_edges() -> None:
    assert ev.roc_auc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert ev.roc_auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
    assert ev.roc_auc(np.full(5, 0.3), np.full(7, 0.3)) == 0.5
    assert ev.roc_auc(np.array([]), np.array([1.0])) is None


def test_auc_text_does_not_round_a_miss_up_to_the_target() -> None:
    # a .ci/run's mismatched ROC-AUC was 0.8994 against a 0.90 target; two decimals printed "0.90"
    assert ev.auc_text(0.8994402985074627) == "0.899"
    assert ev.auc_text(1) == "1.000" and ev.auc_text(0.5) == "0.500"
    assert ev.auc_text(None) == "n/a" and ev.auc_text(True) == "n/a" and ev.auc_text("0.9") == "n/a"


def test_filter_metrics_by_hand() -> None:
    scores = [0.9, 0.8, 0.4, 0.2, 0.6, 0.1, 0.45, 0.7]
    types = ["clean", "clean", "clean", "junk", "junk", "mismatched", "mismatched", "wrong_attribute"]
    noisy = [t != "clean" for t in types]
    m = ev.filter_metrics(scores, noisy, types, threshold=0.5)
    # removed (< 0.5): rows 2 (clean), 3, 5, 6 (noisy) -> precision 3/4, recall 3/5.
    assert m["n_removed"] == 4 and m["n_noisy"] == 5
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["removed_by_type"] == pytest.approx(
        {"clean": 1 / 3, "junk": 1 / 2, "mismatched": 1.0, "wrong_attribute": 0.0}
    )
    assert m["count_by_type"] == {"clean": 3, "junk": 2, "mismatched": 2, "wrong_attribute": 1}
    clean = np.array([0.9, 0.8, 0.4])
    assert m["auc"] == pytest.approx(_brute_auc(clean, np.array([0.2, 0.6, 0.1, 0.45, 0.7])))
    assert m["auc_by_type"]["mismatched"] == pytest.approx(5 / 6)  # only 0.45 > 0.4 loses
    assert m["auc_by_type"]["junk"] == pytest.approx(_brute_auc(clean, np.array([0.2, 0.6])))
    assert m["auc_by_type"]["wrong_attribute"] == pytest.approx(2 / 3)
    assert "clean" not in m["auc_by_type"]
    json.dumps(m, allow_nan=False)  # JSON-able as is


def test_filter_metrics_undefined_parts_are_none() -> None:
    m = ev.filter_metrics([0.9, 0.8], [False, False], ["clean", "clean"], threshold=0.5)
    assert m["precision"] is None and m["recall"] is None and m["auc"] is None
    assert m["removed_by_type"] == {"clean": 0.0}
    with pytest.raises(ValueError, match="length"):
        ev.filter_metrics([0.1], [True, False], ["junk", "clean"])


# ---------------------------------------------------------------------------------------------
# caption_metrics
# ---------------------------------------------------------------------------------------------

_REFS = {
    "a": ["a red cube to the left of a small blue sphere", "a red cube beside a blue ball"],
    "b": ["two green cylinders standing on a wooden table", "green cylinders on a table"],
    "c": ["a yellow cone in front of a large purple box", "a cone and a purple box"],
}


@pytest.mark.parametrize(
    "tokenizer",
    [
        "simple",
        pytest.param(
            "ptb", marks=pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer needs java")
        ),
    ],
)
def test_caption_metrics_exact_beats_wrong(tokenizer: str) -> None:
    exact = {k: v[0] for k, v in _REFS.items()}
    wrong = {"a": "a dog running on the grass", "b": "a man riding a horse", "c": "a plate of food"}
    good = ev.caption_metrics(exact, _REFS, tokenizer=tokenizer)
    bad = ev.caption_metrics(wrong, _REFS, tokenizer=tokenizer)
    assert good["tokenizer"] == tokenizer
    assert good["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert good["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert good["cider"] > bad["cider"] + 1.0
    assert bad["bleu_4"] < 0.1 and bad["bleu_1"] < good["bleu_1"]
    assert good["n_images"] == 3


def test_caption_metrics_auto_falls_back_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev.shutil, "which", lambda _name: None)
    out = ev.caption_metrics({k: v[0] for k, v in _REFS.items()}, _REFS)
    assert out["tokenizer"] == "simple"
    with pytest.raises(UserError, match="java"):
        ev.caption_metrics({"a": "x"}, _REFS, tokenizer="ptb")


def test_caption_metrics_needs_references() -> None:
    with pytest.raises(UserError, match="'z'"):
        ev.caption_metrics({"z": "a cube"}, _REFS, tokenizer="simple")


def test_write_json_roundtrip(tmp_path) -> None:
    path = ev.write_json({"a": 1, "b": {"c": [1.5, None]}}, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text()) == {"a": 1, "b": {"c": [1.5, None]}}


# ---------------------------------------------------------------------------------------------
# Model-driven parts, on a tiny random MED and a few synthetic images
# ---------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    from capfilt import synth

    out = tmp_path_factory.mktemp("corpus")
    synth.make_corpus(
        out, images=8, seed=0, human_images=0, test_images=6, size=32, progress=False, workers=1
    )
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(MED, tokenizer, checkpoint dir): support's tiny random MED with the synthetic world's vocabulary."""
    from capfilt import synth

    med, tokenizer = tiny_med(seed=0, tokenizer=tiny_tokenizer(synth.all_words(), vocab_size=500))
    directory = med.save(tmp_path_factory.mktemp("ckpt") / "med", tokenizer=tokenizer)
    return med, tokenizer, directory


def _test_rows(corpus):
    import pyarrow.parquet as pq

    table = pq.read_table(corpus / "test.parquet")
    return table.column("image").to_pylist(), table.column("captions").to_pylist()


BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_preprocess_normalises_like_blip() -> None:
    from PIL import Image

    red = Image.new("RGB", (50, 20), (255, 0, 0))
    gray = Image.new("L", (8, 8), 128)  # non-RGB input is converted
    px = ev.preprocess([red, gray], 16)
    assert px.shape == (2, 3, 16, 16) and px.dtype == torch.float32
    expected_red = [(c - m) / s for c, m, s in zip((1.0, 0.0, 0.0), BLIP_MEAN, BLIP_STD, strict=True)]
    assert px[0, :, 5, 5].tolist() == pytest.approx(expected_red, abs=1e-5)
    expected_gray = [(128 / 255 - m) / s for m, s in zip(BLIP_MEAN, BLIP_STD, strict=True)]
    assert px[1, :, 0, 0].tolist() == pytest.approx(expected_gray, abs=1e-5)
    with pytest.raises(UserError, match="row 7: cannot be decoded"):
        ev.preprocess([red, b"not an image"], 16, first_index=6)
    with pytest.raises(UserError, match="row 0: expected encoded image bytes"):
        ev.preprocess([None], 16)


def test_retrieval_scores_follow_blip_protocol(tiny, corpus) -> None:
    med, tokenizer, _ = tiny
    images, captions = _test_rows(corpus)
    texts = [caps[0] for caps in captions] + [captions[0][1]]  # 6 images, 7 texts
    med.train()
    sims, s_i2t, s_t2i, k_i2t, k_t2i = ev.retrieval_scores(
        med, tokenizer, images, texts, k_test=100, batch_size=4
    )
    assert med.training  # the caller's mode is restored
    assert (k_i2t, k_t2i) == (7, 6) and sims.shape == (6, 7)

    # Brute force: every pair's ITM match logit + ITC cosine similarity.
    med.eval()
    with torch.no_grad():
        px = ev.preprocess(images, med.config.image_size)
        emb = med.encode_image(px)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        tfeat = med.text_features(med.encode_text(enc["input_ids"], enc["attention_mask"]))
        itc = (med.image_features(emb) @ tfeat.T).numpy()
        itm = np.array(
            [
                [
                    med.itm_logits(
                        emb[i : i + 1], enc["input_ids"][t : t + 1], enc["attention_mask"][t : t + 1]
                    )[0, 1].item()
                    for t in range(len(texts))
                ]
                for i in range(len(images))
            ]
        )
    np.testing.assert_allclose(sims, itc, atol=1e-5)
    np.testing.assert_allclose(s_i2t, itm + itc, atol=1e-4)
    np.testing.assert_allclose(s_t2i, (itm + itc).T, atol=1e-4)

    # With k < N only each row's top-k ITC entries are re-scored; the rest rank last.
    _, s_i2t_k, s_t2i_k, k1, k2 = ev.retrieval_scores(med, tokenizer, images, texts, k_test=2, batch_size=64)
    assert (k1, k2) == (2, 2)
    for row_sims, row_scores, full in zip(sims, s_i2t_k, itm + itc, strict=True):
        top = set(np.argsort(-row_sims)[:2])
        assert set(np.flatnonzero(np.isfinite(row_scores))) == top
        np.testing.assert_allclose(row_scores[list(top)], full[list(top)], atol=1e-4)
    assert (np.isfinite(s_t2i_k).sum(axis=1) == 2).all()


def test_score_retrieval_keys_and_ranges(tiny, corpus) -> None:
    med, tokenizer, _ = tiny
    images, captions = _test_rows(corpus)
    texts = [c for caps in captions for c in caps[:2]]
    txt2img = [i for i in range(len(images)) for _ in range(2)]
    img2txts = [[2 * i, 2 * i + 1] for i in range(len(images))]
    m = ev.score_retrieval(med, tokenizer, images, texts, txt2img, img2txts, k_test=3, batch_size=5)
    for prefix in ("txt", "img"):
        for k in (1, 5, 10):
            assert 0.0 <= m[f"{prefix}_r{k}"] <= 100.0 and 0.0 <= m["itc"][f"{prefix}_r{k}"] <= 100.0
    assert m["txt_r1"] <= m["txt_r5"] <= m["txt_r10"]
    assert m["k_test"] == {"i2t": 3, "t2i": 3} and (m["n_images"], m["n_texts"]) == (6, 12)


def test_itm_match_probs_are_softmax_of_itm(tiny, corpus) -> None:
    med, tokenizer, _ = tiny
    images, captions = _test_rows(corpus)
    texts = [caps[0] for caps in captions]
    probs = ev.itm_match_probs(med, tokenizer, images, texts, batch_size=4)
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        emb = med.encode_image(ev.preprocess(images, med.config.image_size))
        direct = torch.softmax(med.itm_logits(emb, enc["input_ids"], enc["attention_mask"]), -1)[:, 1]
    np.testing.assert_allclose(probs, direct.numpy(), atol=1e-5)
    assert ((probs > 0) & (probs < 1)).all()


def test_generate_captions_one_string_per_image(tiny, corpus) -> None:
    med, tokenizer, _ = tiny
    images, _ = _test_rows(corpus)
    caps = ev.generate_captions(med, tokenizer, images[:3], max_length=12, min_length=5, batch_size=2)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    # min_length counts [DEC] + prompt ("a picture of": 3 pieces) + new tokens, so >= 1 new word.
    assert all(c for c in caps)
    assert not any(c.startswith("a picture of") for c in caps)  # the prompt is stripped


def test_evaluate_rejects_bad_inputs_before_loading(tmp_path, corpus) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(UserError, match="no such file"):
        ev.evaluate(tmp_path / "none", tmp_path / "missing.parquet")
    pq.write_table(pa.table({"image": [b"x"], "text": ["a cube"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="'captions'"):
        ev.evaluate(tmp_path / "none", tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="'noisy'"):
        ev.evaluate(tmp_path / "none", corpus / "test.parquet", filter_data=tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="threshold"):
        ev.evaluate(tmp_path / "none", corpus / "test.parquet", threshold=1.5)


def test_evaluate_reports_a_bad_checkpoint_as_user_error(tmp_path, corpus) -> None:
    pytest.importorskip("model.hf")
    with pytest.raises(UserError, match="model: .*not found"):
        ev.evaluate(tmp_path / "no" / "such" / "ckpt", corpus / "test.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model: "):
        ev.evaluate(tmp_path / "empty", corpus / "test.parquet")


def test_evaluate_end_to_end(tiny, corpus, tmp_path) -> None:
    pytest.importorskip("model.hf")
    _, _, ckpt = tiny
    result = ev.evaluate(
        ckpt, corpus / "test.parquet", filter_data=corpus / "web.parquet", batch_size=4, k_test=4,
        max_length=10, limit=5, device="cpu",
    )  # fmt: skip
    assert result["n_images"] == 5 and result["n_texts"] == 25 and result["device"] == "cpu"
    cap = result["captioning"]
    assert {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "attribute_accuracy"} <= cap.keys()
    assert all(0.0 <= cap[f"bleu_{n}"] <= 1.0 for n in range(1, 5)) and cap["cider"] >= 0.0
    assert 0.0 <= cap["attribute_accuracy"] <= 1.0 and cap["tokenizer"] in ("ptb", "simple")
    assert len(cap["examples"]) == 5 and all(len(e["references"]) == 5 for e in cap["examples"])
    ret = result["retrieval"]
    assert ret["k_test"] == {"i2t": 4, "t2i": 4}
    assert all(0.0 <= ret[k] <= 100.0 for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"))
    # 5 images: every image is within the top 5, whatever the model.
    assert ret["img_r5"] == 100.0 and ret["itc"]["img_r5"] == 100.0
    flt = result["filter"]
    assert flt["n"] == 5 and sum(flt["count_by_type"].values()) == 5
    assert flt["auc"] is None or 0.0 <= flt["auc"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in flt["removed_by_type"].values())
    assert all(0.0 < v < 1.0 for v in flt["mean_itm_by_type"].values())
    assert result["settings"]["prompt"] == "a picture of " and result["seconds"]["total"] > 0
    path = ev.write_json(result, tmp_path / "eval.json")
    assert json.loads(path.read_text())["retrieval"]["r_mean"] == pytest.approx(ret["r_mean"])


def test_evaluate_isolated_equals_in_process_and_reports_errors_as_here(tiny, corpus) -> None:
    """The bootstrap's concurrent evaluations (``--ablation``) run in spawned processes: the same
    result as in this process at the same thread count, and a bad checkpoint is still a UserError."""
    pytest.importorskip("model.hf")
    from capfilt.bootstrap.backend import evaluate_isolated

    _, _, ckpt = tiny
    settings = dict(batch_size=4, k_test=4, max_length=10, limit=4, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = ev.evaluate(ckpt, corpus / "test.parquet", **settings)
    finally:
        torch.set_num_threads(threads)
    there = evaluate_isolated(ckpt, corpus / "test.parquet", 1, **settings)
    assert there["n_images"] == 4 and there["retrieval"] == here["retrieval"]
    assert there["captioning"] == here["captioning"] and there["settings"] == here["settings"]
    with pytest.raises(UserError, match="model: .*not found"):
        evaluate_isolated(corpus / "no" / "such" / "ckpt", corpus / "test.parquet", 1)
