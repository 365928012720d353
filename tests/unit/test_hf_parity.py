"""MED vs Hugging Face BLIP: same weights give the same numbers (the minGPT-vs-GPT-2 check).

Tiny random ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` models are built
in-process (no hub access), saved with ``save_pretrained`` and imported into MED.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import randomise, tiny_blip_config
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

from model.hf import (
    config_from_hf,
    export_captioner,
    export_filter,
    hf_config,
    import_hf,
    import_hf_with_report,
    load_any,
)
from model.med import MED, CheckpointError, MEDConfig, parameter_counts
from model.tokenizer import train_tokenizer

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ATOL = 1e-4
VARIANT = "cross"  # image width 48 != text width 32: the cross-attention key/value shapes are exercised
CORPUS = [
    "a dog runs on the grass",
    "two cats sleep on a red couch",
    "a man rides a bike down the street",
    "a plate of food with broccoli",
    "a picture of a train at the station",
    "people walking in the snow",
    "a bird sitting on a branch",
    "a red car parked near a house",
    "children play football in a park",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=120)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf")
    cfg = tiny_blip_config(tokenizer, VARIANT)
    cap = randomise(BlipForConditionalGeneration(cfg), 0)
    fil = randomise(BlipForImageTextRetrieval(cfg), 1)
    cap.save_pretrained(root / "captioner")
    fil.save_pretrained(root / "filter")
    tokenizer.save_pretrained(root / "captioner")
    tokenizer.save_pretrained(root / "filter")
    return {"captioner": root / "captioner", "filter": root / "filter", "cap": cap, "fil": fil}


def _inputs(tokenizer, texts=("a dog on the grass", "two red cats sleep on a couch", "a train")):
    torch.manual_seed(3)
    pixels = torch.randn(len(texts), 3, 32, 32)
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    return pixels, enc["input_ids"], enc["attention_mask"]


def test_config_round_trip(tokenizer):
    cfg = tiny_blip_config(tokenizer, VARIANT)
    med_cfg = config_from_hf(cfg)
    assert (med_cfg.vision_width, med_cfg.text_width, med_cfg.embed_dim) == (48, 32, 16)
    back = config_from_hf(hf_config(med_cfg))
    assert back == med_cfg.replace(label_smoothing=back.label_smoothing)
    assert hf_config(med_cfg).text_config.encoder_hidden_size == 48


def test_decoder_logits_match_hf(hf_dirs, tokenizer):
    med, tok = import_hf(captioner=hf_dirs["captioner"])
    assert tok is not None and med.config.bos_token_id == tok.bos_token_id
    pixels, ids, mask = _inputs(tokenizer)
    ids = ids.clone()
    ids[:, 0] = med.config.bos_token_id
    with torch.no_grad():
        ref = hf_dirs["cap"](pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        ours = med.eval().decoder_logits(med.encode_image(pixels), ids, mask)
    valid = mask.bool()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours[valid], ref[valid], atol=ATOL, rtol=1e-4)


def test_itm_and_itc_match_hf(hf_dirs, tokenizer):
    med, _ = import_hf(filter=hf_dirs["filter"], itm_use_enc_token=False)
    med.eval()
    pixels, ids, mask = _inputs(tokenizer)
    with torch.no_grad():
        ref_itm = hf_dirs["fil"](input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(
            -1
        )
        ref_itc = hf_dirs["fil"](
            input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False
        ).itm_score
        image_embeds = med.encode_image(pixels)
        ours_itm = med.itm_logits(image_embeds, ids, mask).softmax(-1)
        ours_itc = med.image_features(image_embeds) @ med.text_features(med.encode_text(ids, mask)).T
    torch.testing.assert_close(ours_itm, ref_itm, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(ours_itc, ref_itc, atol=ATOL, rtol=1e-4)
    # With [ENC] at position 0 (BLIP's choice) the score differs from HF's [CLS] convention.
    with torch.no_grad():
        enc_itm = med.config.replace(itm_use_enc_token=True)
        med.config = enc_itm
        assert not torch.allclose(med.itm_logits(image_embeds, ids, mask).softmax(-1), ref_itm, atol=ATOL)


def _pad_to(x: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad)


def _beam_score(
    med: MED, pixels: torch.Tensor, prefix: torch.Tensor, new: torch.Tensor, pad: int
) -> torch.Tensor:
    """HF's beam score: sum of token log-probs of the new tokens / their number."""
    ids = torch.cat([prefix, new], dim=1)
    lengths = (new != pad).sum(dim=1)
    with torch.no_grad():
        logp = med.decoder_logits(med.encode_image(pixels), ids, torch.ones_like(ids)).log_softmax(-1)
    token_logp = logp[:, prefix.shape[1] - 1 : -1].gather(2, new[:, :, None]).squeeze(2)
    token_logp = token_logp.masked_fill(new == pad, 0.0)
    return token_logp.sum(dim=1) / lengths


def test_greedy_and_beam_generation_match_hf(hf_dirs, tokenizer):
    med, _ = import_hf(captioner=hf_dirs["captioner"])
    med.eval()
    pixels, _, _ = _inputs(tokenizer)
    pad = tokenizer.pad_token_id
    prompt = tokenizer("a picture of", add_special_tokens=False).input_ids
    processor_ids = torch.tensor([[tokenizer.cls_token_id, *prompt, tokenizer.sep_token_id]] * len(pixels))
    prefix = 1 + len(prompt)

    hf_settings = dict(pixel_values=pixels, max_length=14, min_length=8, do_sample=False)
    ref = hf_dirs["cap"].generate(input_ids=processor_ids.clone(), num_beams=1, **hf_settings)
    ours = med.generate(pixels, prompt_ids=prompt, max_length=14, min_length=8, sample=False, num_beams=1)
    width = max(ours.shape[1], ref.shape[1] - prefix)
    assert torch.equal(_pad_to(ours, width, pad), _pad_to(ref[:, prefix:], width, pad))

    # Beam search: the random tiny model repeats tokens, so equal-score permutations tie and
    # their order is float noise; compare the returned beams' scores instead of their ids.
    ref = hf_dirs["cap"].generate(
        input_ids=processor_ids.clone(),
        num_beams=3,
        **hf_settings,
        num_return_sequences=2,
        output_scores=True,
        return_dict_in_generate=True,
    )
    ours = med.generate(
        pixels, prompt_ids=prompt, max_length=14, min_length=8, sample=False, num_beams=3, num_captions=2
    )
    assert ours.shape[0] == len(pixels) * 2
    prefix_ids = ref.sequences[:, :prefix]
    ours_scores = _beam_score(med, pixels.repeat_interleave(2, 0), prefix_ids, ours, pad)
    torch.testing.assert_close(ours_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)


def test_export_reloads_in_hf_with_same_outputs(hf_dirs, tokenizer, tmp_path):
    med, tok = import_hf(captioner=hf_dirs["captioner"], filter=hf_dirs["filter"])
    med.eval()
    export_captioner(med, tok, tmp_path / "cap")
    export_filter(med, tok, tmp_path / "fil")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "capfilt.json",
    ):
        assert (tmp_path / "cap" / name).is_file() and (tmp_path / "fil" / name).is_file(), name
    text_cfg = json.loads((tmp_path / "cap" / "config.json").read_text())["text_config"]
    assert text_cfg["bos_token_id"] == tok.bos_token_id and text_cfg["vocab_size"] == len(tok)
    assert text_cfg["label_smoothing"] == pytest.approx(med.config.label_smoothing)
    cap = BlipForConditionalGeneration.from_pretrained(tmp_path / "cap").eval()
    fil = BlipForImageTextRetrieval.from_pretrained(tmp_path / "fil").eval()
    pixels, ids, mask = _inputs(tokenizer)
    dec_ids = ids.clone()
    dec_ids[:, 0] = med.config.bos_token_id
    with torch.no_grad():
        image_embeds = med.encode_image(pixels)
        torch.testing.assert_close(
            med.decoder_logits(image_embeds, dec_ids, mask)[mask.bool()],
            cap(pixel_values=pixels, input_ids=dec_ids, attention_mask=mask).logits[mask.bool()],
            atol=ATOL,
            rtol=1e-4,
        )
        med.config = med.config.replace(itm_use_enc_token=False)
        torch.testing.assert_close(
            med.itm_logits(image_embeds, ids, mask),
            fil(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score,
            atol=ATOL,
            rtol=1e-4,
        )
    # load_any dispatches on the architecture and restores the MED config from capfilt.json.
    again, tok2 = load_any(tmp_path / "fil")
    assert again.config.itm_use_enc_token is False and tok2 is not None
    torch.testing.assert_close(
        again.vision_model.post_layernorm.weight, med.vision_model.post_layernorm.weight
    )
    cap_again, _ = load_any(tmp_path / "cap")
    torch.testing.assert_close(
        cap_again.text_decoder.cls.predictions.transform.dense.weight,
        med.text_decoder.cls.predictions.transform.dense.weight,
    )


def test_import_key_accounting(hf_dirs):
    cap_sd = load_file(hf_dirs["captioner"] / "model.safetensors")
    fil_sd = load_file(hf_dirs["filter"] / "model.safetensors")

    med, _, report = import_hf_with_report(captioner=hf_dirs["captioner"])
    enc_q = med.text_encoder.encoder.layer[1].attention.self.query.weight
    assert torch.equal(enc_q, cap_sd["text_decoder.bert.encoder.layer.1.attention.self.query.weight"])
    assert "text_encoder.encoder.layer.1.attention.self.query.weight" in report.copied
    assert "itm_head.weight" in report.random and "vision_proj.weight" in report.random
    assert not any("predictions.transform" in k for k in report.random)
    # Momentum encoders start equal to the online ones.
    torch.testing.assert_close(med.text_encoder_m.encoder.layer[1].attention.self.query.weight, enc_q)

    med, _, report = import_hf_with_report(filter=hf_dirs["filter"])
    dec_k = med.text_decoder.bert.encoder.layer[0].attention.self.key.weight
    assert torch.equal(dec_k, fil_sd["text_encoder.encoder.layer.0.attention.self.key.weight"])
    assert "text_decoder.cls.predictions.transform.dense.weight" in report.random
    assert torch.equal(
        med.text_decoder.cls.predictions.decoder.weight,
        fil_sd["text_encoder.embeddings.word_embeddings.weight"],
    )

    med, _, report = import_hf_with_report(captioner=hf_dirs["captioner"], filter=hf_dirs["filter"])
    assert not report.copied
    assert torch.equal(
        med.vision_model.embeddings.patch_embedding.weight,
        fil_sd["vision_model.embeddings.patch_embedding.weight"],
    )
    assert torch.equal(
        med.text_decoder.bert.encoder.layer[0].attention.self.value.weight,
        cap_sd["text_decoder.bert.encoder.layer.0.attention.self.value.weight"],
    )
    assert torch.equal(
        med.text_decoder.bert.encoder.layer[0].intermediate.dense.weight,
        fil_sd["text_encoder.encoder.layer.0.intermediate.dense.weight"],
    )
    assert "captioner:vision_model.embeddings.class_embedding" in report.superseded


def test_import_rejects_unknown_and_missing_keys(hf_dirs, tmp_path):
    src = hf_dirs["filter"]
    for name in ("extra", "missing"):
        d = tmp_path / name
        d.mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors":
                (d / f.name).write_bytes(f.read_bytes())
        sd = load_file(src / "model.safetensors")
        if name == "extra":
            sd["text_encoder.pooler.dense.weight"] = torch.zeros(2, 2)
        else:
            del sd["text_encoder.encoder.layer.1.output.dense.bias"]
        save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="text_encoder.pooler.dense.weight"):
        import_hf(filter=tmp_path / "extra")
    with pytest.raises(CheckpointError, match=r"layer\.1\.output\.dense\.bias"):
        import_hf(filter=tmp_path / "missing")
    with pytest.raises(CheckpointError, match="BlipForConditionalGeneration"):
        import_hf(captioner=src)


def test_pickle_weights_outside_the_hf_names_need_allow_pickle(hf_dirs, tmp_path):
    """pytorch_model.bin loads with weights_only (tests/unit/test_hf_layouts.py); any other
    .pt/.pth file (BLIP's own releases) is only unpickled with allow_pickle."""
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_bytes((hf_dirs["filter"] / "config.json").read_bytes())
    torch.save({"model": load_file(hf_dirs["filter"] / "model.safetensors")}, d / "model_base_retrieval.pth")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_any(d)
    med, tok = load_any(d, allow_pickle=True)
    assert tok is None and isinstance(med, MED)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_any(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_any(tmp_path / "empty")


@pytest.mark.slow
def test_base_size_hf_models_import_without_key_surprises(tmp_path: Path, capsys):
    cfg = BlipConfig(text_config={"num_attention_heads": 12})
    for cls, role in ((BlipForConditionalGeneration, "captioner"), (BlipForImageTextRetrieval, "filter")):
        cls(cfg).save_pretrained(tmp_path / role)
    med, _, report = import_hf_with_report(captioner=tmp_path / "captioner", filter=tmp_path / "filter")
    assert not report.random and not report.copied
    counts = parameter_counts(med)
    with capsys.disabled():
        print("\nbase MED parameter counts:", json.dumps(counts, indent=1))
    assert med.config == config_from_hf(cfg).replace(
        label_smoothing=0.0, cls_token_id=101, enc_token_id=30523
    )
    assert 250e6 < counts["total_trainable"] < 255e6  # paper Table 3: 252M ("all except SA")
    assert MEDConfig.preset("base").replace(label_smoothing=0.0, itm_use_enc_token=False) == med.config
