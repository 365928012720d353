"""Unit tests for model/tokenizer.py: trained WordPiece vocabularies and BLIP's [DEC]/[ENC] tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import BertTokenizerFast

from model.tokenizer import DEC, ENC, add_blip_tokens, load_tokenizer, special_ids, train_tokenizer

CAPTIONS = [
    "a dog running on the beach",
    "two cats sitting on a red sofa",
    "a man riding a bicycle down the street",
    "a picture of a brown dog",
    "a red bus parked on the street",
    "two dogs playing with a ball on the grass",
]


@pytest.fixture(scope="module")
def trained() -> BertTokenizerFast:
    return train_tokenizer(CAPTIONS, vocab_size=300)


def test_trained_tokenizer_gives_real_words_real_ids(trained: BertTokenizerFast) -> None:
    ids = trained("A Dog riding the RED bicycle", add_special_tokens=False).input_ids
    tokens = trained.convert_ids_to_tokens(ids)
    assert tokens == ["a", "dog", "riding", "the", "red", "bicycle"]  # lowercased, no [UNK]
    assert trained.unk_token_id not in ids
    # A word made of seen characters is split into word pieces rather than [UNK].
    pieces = trained.tokenize("dogcat")
    assert "[UNK]" not in pieces and len(pieces) > 1 and pieces[1].startswith("##")
    # Characters never seen are unknown.
    assert trained("zzzq", add_special_tokens=False).input_ids == [trained.unk_token_id]


def test_encoding_adds_cls_and_sep_and_pads_with_zero(trained: BertTokenizerFast) -> None:
    enc = trained(["a dog", "two cats on a sofa"], padding="longest")
    first, second = enc.input_ids
    assert first[0] == second[0] == trained.cls_token_id
    assert second[-1] == trained.sep_token_id
    # [CLS] a dog [SEP] [PAD]...
    assert first[3] == trained.sep_token_id and first[4:] == [0] * (len(first) - 4)
    assert enc.attention_mask[0] == [1, 1, 1, 1] + [0] * (len(first) - 4)
    assert trained.decode(second, skip_special_tokens=True) == "two cats on a sofa"


def test_special_token_layout(trained: BertTokenizerFast) -> None:
    vocab = trained.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    ids = special_ids(trained)
    size = len(trained)
    assert ids == {
        "pad_token_id": 0,
        "cls_token_id": 2,
        "sep_token_id": 3,
        "bos_token_id": size - 2,
        "enc_token_id": size - 1,
        "vocab_size": size,
    }
    assert trained.bos_token == DEC
    assert ENC in trained.all_special_tokens
    assert max(vocab.values()) == size - 1  # no gaps: the embedding table has exactly vocab_size rows
    # The special tokens are never split: [DEC]/[ENC] in text map to their ids.
    assert trained(f"{DEC} a dog", add_special_tokens=False).input_ids[0] == ids["bos_token_id"]


def test_vocab_size_is_an_upper_bound_including_special_tokens() -> None:
    small = train_tokenizer(CAPTIONS * 3, vocab_size=60)
    assert len(small) == 60  # this corpus has more than 60 candidate pieces
    assert special_ids(small)["enc_token_id"] == len(small) - 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, vocab_size=7)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], vocab_size=100)


def test_save_and_load_round_trip(trained: BertTokenizerFast, tmp_path: Path) -> None:
    trained.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    texts = ["A dog on the beach", "two cats [SEP] on a red sofa", "dogcat zzz"]
    assert loaded(texts, padding="longest").input_ids == trained(texts, padding="longest").input_ids
    assert special_ids(loaded) == special_ids(trained)
    assert loaded.get_vocab() == trained.get_vocab()


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def _bert_style_tokenizer() -> BertTokenizerFast:
    """A tiny stand-in for bert-base-uncased: BERT specials and words, no [DEC]/[ENC]."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "on", "the", "##s"]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def test_add_blip_tokens_appends_dec_then_enc_and_is_idempotent(tmp_path: Path) -> None:
    tokenizer = _bert_style_tokenizer()
    base_size = len(tokenizer)
    assert tokenizer.bos_token is None and DEC not in tokenizer.get_vocab()
    with pytest.raises(ValueError, match="bos_token"):
        special_ids(tokenizer)

    assert add_blip_tokens(tokenizer) is tokenizer
    ids = special_ids(tokenizer)
    # As bert-base-uncased (30522 entries) gets [DEC] = 30522 and [ENC] = 30523.
    assert (ids["bos_token_id"], ids["enc_token_id"], ids["vocab_size"]) == (
        base_size,
        base_size + 1,
        base_size + 2,
    )
    assert tokenizer.bos_token == DEC and ENC in tokenizer.all_special_tokens

    add_blip_tokens(tokenizer)
    assert special_ids(tokenizer) == ids and len(tokenizer) == base_size + 2

    # Saved and reloaded, the tokens keep their ids and are not added again.
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert special_ids(reloaded) == ids
    assert reloaded("the dogs on a cat", add_special_tokens=False).input_ids == [9, 6, 10, 8, 5, 7]


def test_add_blip_tokens_keeps_other_additional_special_tokens() -> None:
    tokenizer = _bert_style_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[FOO]"]})
    add_blip_tokens(tokenizer)
    assert "[FOO]" in tokenizer.all_special_tokens and ENC in tokenizer.all_special_tokens
