"""Tokenizers: text <-> token ids. Character-level, byte-level BPE and word-level, trained from scratch.

    >>> from scratchlm.tokenizers import make_tokenizer, load
    >>> tok = make_tokenizer("bpe:300", "the cat sat on the mat. " * 20)
    >>> tok.decode(tok.encode("the rat")) == "the rat"
    True

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``to_dict()`` / ``save(path)``; ``from_dict(d)`` and ``load(path)`` rebuild either kind from
its ``"type"`` field.
"""
from __future__ import annotations

from scratchlm.errors import UserError
from scratchlm.tokenizers.base import Tokenizer, from_dict, load
from scratchlm.tokenizers.bpe import ByteLevelBPE, StreamDecoder, pretokenize
from scratchlm.tokenizers.char import CharTokenizer
from scratchlm.tokenizers.pairs import PairVocab  # noqa: F401  (registers the "pairs" type: seq2seq runs)
from scratchlm.tokenizers.word import DEFAULT_MIN_COUNT, WordTokenizer

DEFAULT_BPE_VOCAB = 1024

__all__ = ["Tokenizer", "CharTokenizer", "ByteLevelBPE", "WordTokenizer", "StreamDecoder", "pretokenize",
           "from_dict", "load", "make_tokenizer", "DEFAULT_BPE_VOCAB"]


def make_tokenizer(spec: str, text: str, progress: bool = False) -> Tokenizer:
    """Build a tokenizer from a short spec, trained on ``text``.

    ``"char"`` -> CharTokenizer; ``"bpe"`` -> ByteLevelBPE with 1024 tokens; ``"bpe:N"`` -> N tokens
    (256 bytes + merges + ``<|endoftext|>``); ``"word"`` -> WordTokenizer (words seen at least twice);
    ``"word:MIN_COUNT"`` -> words seen at least MIN_COUNT times.
    """
    if not isinstance(spec, str):
        raise UserError(f"tokenizer spec must be a string like 'char', 'bpe' or 'bpe:1024', got {spec!r}")
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "char" and not arg:
        return CharTokenizer.from_text(text)
    if kind == "bpe":
        if not arg:
            vocab_size = DEFAULT_BPE_VOCAB
        else:
            try:
                vocab_size = int(arg)
            except ValueError:
                raise UserError(f"tokenizer spec {spec!r}: {arg!r} is not a vocabulary size; "
                                f"write e.g. 'bpe:1024'") from None
        return ByteLevelBPE.train(text, vocab_size, progress=progress)
    if kind == "word":
        try:
            min_count = int(arg) if arg else DEFAULT_MIN_COUNT
        except ValueError:
            raise UserError(f"tokenizer spec {spec!r}: {arg!r} is not a minimum count; "
                            f"write e.g. 'word:2'") from None
        return WordTokenizer.from_text(text, min_count=min_count)
    raise UserError(f"unknown tokenizer spec {spec!r}; use 'char', 'bpe', 'bpe:VOCAB' (e.g. 'bpe:1024'), "
                    f"'word' or 'word:MIN_COUNT'")
