"""Character tokenizer: one token per distinct character of the training text.

The vocabulary is the sorted set of characters (Unicode code points) in the corpus, so ids are
stable for a given corpus: on tiny shakespeare ``"\\n"`` is 0, ``" "`` is 1, ..., ``"z"`` is 64.

Choices (documented because the alternatives are silent):
- A character outside the vocabulary is an error that names the character and its position
  (``UserError``), never dropped and never mapped to an unknown token: a character model
  cannot say anything useful about a character it has never seen, and a silent replacement
  would corrupt prompts without a trace.
- Text comes in as ``str``. Files that are not valid UTF-8 are refused earlier, by
  ``scratchlm.data.load_corpus``, with the byte offset of the first bad byte; a character
  model over raw bytes is what ``ByteLevelBPE`` with no merges is for.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.encode("hell"), tok.decode([3, 1]), tok.vocab_size
    ([1, 0, 2, 2], 'oh', 4)
"""
from __future__ import annotations

from scratchlm.errors import UserError
from scratchlm.tokenizers.base import Tokenizer, check_header, register

VERSION = 1


@register("char")
class CharTokenizer(Tokenizer):
    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise UserError("a character tokenizer needs at least one character; the corpus is empty")
        if len(set(chars)) != len(chars):
            raise UserError("character tokenizer vocabulary has repeated characters")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise UserError(f"character tokenizer vocabulary entry {c!r} is not a single character")
        self.chars = chars                                   # id -> character
        self.index = {c: i for i, c in enumerate(chars)}     # character -> id
        self.vocab_size = len(chars)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted distinct characters of ``text``."""
        if not text:
            raise UserError("cannot build a character vocabulary from an empty corpus")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        index = self.index
        try:
            return [index[c] for c in text]
        except KeyError:
            pass
        # Slow path, only to build the message: find the first unknown character.
        for position, c in enumerate(text):
            if c not in index:
                raise UserError(
                    f"character {c!r} (U+{ord(c):04X}) at position {position} is not in the "
                    f"{self.vocab_size}-character vocabulary; remove it or train on a corpus that has it")
        raise AssertionError("unreachable")

    def decode(self, ids) -> str:
        chars = self.chars
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is outside the character vocabulary (0..{self.vocab_size - 1})")
            out.append(chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "char", "version": VERSION, "vocab_size": self.vocab_size, "chars": self.chars}

    @classmethod
    def from_dict(cls, d) -> "CharTokenizer":
        check_header(d, "char", VERSION)
        chars = d.get("chars")
        if not isinstance(chars, list):
            raise UserError("char tokenizer data has no \"chars\" list")
        tok = cls(chars)
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise UserError(f"char tokenizer says vocab_size {d.get('vocab_size')} but lists "
                            f"{tok.vocab_size} characters")
        return tok

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
