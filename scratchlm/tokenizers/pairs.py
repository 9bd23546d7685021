"""The vocabulary of a translation model: four special tokens, then characters or words.

    ids 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then the units of the training text, most frequent first.

``level="char"``: a unit is a character. ``level="word"``: a unit is a word or a punctuation mark
together with the spaces before it (" suis", " !", "J'ai"), so decoding is exact concatenation and
French spacing ("Va !") survives; apostrophes and hyphens stay inside words, as sacrebleu's 13a
tokenisation keeps them. Unlike ``CharTokenizer``, a unit outside the vocabulary becomes <unk>
(a translator must answer for any input sentence); ``unknown(text)`` lists such units, so
callers can say which were replaced.

    >>> vocab = PairVocab.from_texts(["Je suis ici.", "Va !"], "word")
    >>> vocab.decode(vocab.encode("Je suis là !"))
    'Je suis<unk> !'
"""
from __future__ import annotations

import re
from collections import Counter

from scratchlm.errors import UserError
from scratchlm.tokenizers.base import Tokenizer, check_header, register

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
UNK = 3
VERSION = 1
_WORD = re.compile(r"\s*[\w'’\-]+|\s*[^\w\s]|\s+$")


def split_units(text: str, level: str) -> list[str]:
    if level == "char":
        return list(text)
    return _WORD.findall(text)


@register("pairs")
class PairVocab(Tokenizer):
    def __init__(self, units, level: str = "char"):
        if level not in ("char", "word"):
            raise UserError(f"tokenizer must be 'char' or 'word', got {level!r}")
        units = [u for u in units if u not in SPECIALS]
        self.level, self.units = level, list(SPECIALS) + units
        self.index = {u: i for i, u in enumerate(self.units)}
        if len(self.index) != len(self.units):
            raise UserError("the pair vocabulary has repeated units")
        self.vocab_size = len(self.units)

    @classmethod
    def from_texts(cls, texts, level: str = "char") -> "PairVocab":
        """Every unit of ``texts``, most frequent first (ties in first-seen order)."""
        counts = Counter(u for text in texts for u in split_units(text, level))
        return cls([u for u, _ in counts.most_common()], level)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(u, UNK) for u in split_units(text, self.level)]

    def unknown(self, text: str) -> list[str]:
        """The units of ``text`` that encode to <unk>, in order, each once."""
        return list(dict.fromkeys(u for u in split_units(text, self.level) if u not in self.index))

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i == UNK:
                out.append("<unk>")
            elif i > UNK:
                out.append(self.units[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "pairs", "version": VERSION, "level": self.level, "vocab_size": self.vocab_size,
                "units": self.units[len(SPECIALS):]}

    @classmethod
    def from_dict(cls, d) -> "PairVocab":
        check_header(d, "pairs", VERSION)
        if not isinstance(d.get("units"), list):
            raise UserError("pairs tokenizer data has no \"units\" list")
        return cls(d["units"], d.get("level", "char"))

    def __repr__(self) -> str:
        return f"PairVocab(level={self.level!r}, vocab_size={self.vocab_size})"
