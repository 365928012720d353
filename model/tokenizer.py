"""BERT WordPiece tokenizers with BLIP's two extra special tokens.

BLIP uses bert-base-uncased plus [DEC] (the decoder's begin-of-sequence token, replacing
[CLS] for captioning) and [ENC] (replacing [CLS] at position 0 for image-text matching).
Hugging Face's BLIP checkpoints ship the plain BERT tokenizer, so :func:`add_blip_tokens`
appends both; for models trained from scratch, :func:`train_tokenizer` builds a small
WordPiece vocabulary with the same layout.

The vocabulary is built with the ``tokenizers`` library and wrapped with
``BertTokenizerFast(tokenizer_object=...)``: in transformers 5 building a BERT tokenizer
from a ``vocab_file`` silently maps every word to [UNK].
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
DEC = "[DEC]"
"""Decoder begin-of-sequence token (``bos_token``)."""
ENC = "[ENC]"
"""Token put at position 0 of the text for image-text matching (an additional special token)."""

BERT_SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
"""Special tokens at the start of a trained vocabulary, in id order ([PAD] = 0 as BLIP expects)."""


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4000, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a lowercase BERT WordPiece tokenizer on ``texts`` and add [DEC]/[ENC].

    The layout mirrors bert-base-uncased + BLIP: ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK],
    then the learned word pieces, then [DEC] and [ENC] as the last two ids. Encoding wraps
    text as ``[CLS] ... [SEP]``.

    Args:
        texts: training corpus (captions); consumed once.
        vocab_size: target size of the whole vocabulary, the seven special tokens included.
            A small corpus may give fewer pieces; the trainer also always keeps every
            character it saw (and its ``##`` form), so a size below that alphabet is exceeded.
        min_frequency: minimum count for a merge to enter the vocabulary.

    Returns:
        A ``BertTokenizerFast`` with pad/unk/cls/sep/mask/bos tokens set and [ENC] registered
        as an additional special token.
    """
    n_special = len(BERT_SPECIAL_TOKENS) + 2
    if vocab_size <= n_special:
        raise ValueError(f"vocab_size must exceed the {n_special} special tokens, got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    backend = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size - 2,  # leave room for [DEC] and [ENC]
        min_frequency=min_frequency,
        special_tokens=list(BERT_SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() <= len(BERT_SPECIAL_TOKENS):
        raise ValueError("train_tokenizer got no text to learn from (empty corpus)")
    # Appended after training so they take the last two ids, as in bert-base-uncased + BLIP.
    backend.add_special_tokens([DEC, ENC])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, backend.token_to_id(CLS)), (SEP, backend.token_to_id(SEP))],
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        sep_token=SEP,
        pad_token=PAD,
        cls_token=CLS,
        mask_token=MASK,
        bos_token=DEC,
        additional_special_tokens=[ENC],
    )
    add_blip_tokens(tokenizer)  # registers [DEC]/[ENC] the same way as for a loaded checkpoint
    return tokenizer


def add_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a BERT tokenizer BLIP's [DEC] (as ``bos_token``) and [ENC] tokens; idempotent.

    On bert-base-uncased (30,522 entries) [DEC] becomes id 30522 and [ENC] 30523, the ids
    BLIP's checkpoints were trained with. Tokens already present keep their ids, so calling
    this on a tokenizer from :func:`train_tokenizer` or twice in a row changes nothing.
    The tokenizer is modified in place and returned.
    """
    vocab = tokenizer.get_vocab()
    if DEC not in vocab or tokenizer.bos_token != DEC:
        # Added first so that it gets the lower of the two new ids.
        tokenizer.add_special_tokens({"bos_token": DEC})
    enc_registered = ENC in vocab and ENC in tokenizer.all_special_tokens
    if not enc_registered:
        # Positional False = keep existing additional special tokens; the keyword is
        # replace_additional_special_tokens in transformers 4 and replace_extra_special_tokens in 5.
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC]}, False)
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a BERT tokenizer saved with ``save_pretrained`` (a directory with tokenizer.json).

    Works for capfilt checkpoints and Hugging Face BLIP checkpoint directories alike;
    :func:`add_blip_tokens` is applied so both come back with [DEC] and [ENC].
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"tokenizer path {directory} is not a directory")
    if not (directory / "tokenizer.json").is_file():
        raise ValueError(
            f"tokenizer path {directory} has no tokenizer.json (save it with save_pretrained of a fast tokenizer)"
        )
    tokenizer = BertTokenizerFast.from_pretrained(str(directory))
    return add_blip_tokens(tokenizer)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The token ids and vocabulary size that ``MEDConfig`` needs, read from a tokenizer.

    Returns a dict with ``pad_token_id``, ``cls_token_id``, ``sep_token_id``,
    ``bos_token_id`` ([DEC]), ``enc_token_id`` ([ENC]) and ``vocab_size`` (``len(tokenizer)``,
    added tokens included). Raises ValueError naming the first missing token.
    """
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "enc_token_id": tokenizer.get_vocab().get(ENC),
    }
    for name, value in ids.items():
        if value is None:
            raise ValueError(f"tokenizer has no {name.removesuffix('_id')} (call add_blip_tokens first?)")
    return {**ids, "vocab_size": len(tokenizer)}
