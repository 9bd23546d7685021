"""Word tokenizer: lowercase words, punctuation as tokens of its own, a counted vocabulary.

The classifiers, word2vec and text augmentation work on words, the unit the articles use
(Keras' ``Tokenizer``, torchtext's ``basic_english``). Splitting, in two rules:

- the text is lowercased, then cut into *words* -- runs of letters and digits, with an apostrophe
  inside a word kept (``don't``, ``it's``, ``o'clock`` stay whole) -- and *punctuation*: every other
  non-space character is a token by itself (``"great!!"`` -> ``great ! !``);
- whitespace only separates; it never becomes a token.

Vocabulary: the special tokens first, in a fixed order -- ``<pad>`` = 0 (so zero-padded batches need
no remapping) and ``<unk>`` = 1, then whichever of ``<bos>``, ``<eos>``, ``<cls>`` were asked for --
then the words of the training text seen at least ``min_count`` times, most frequent first (ties
alphabetical, so a corpus always gives the same ids), at most ``max_size`` entries in all.

Unknown words map to ``<unk>``; ``encode(text, count_unknown=True)`` also returns how many did, so a
caller can say it once ("12 of 300 words were not in the vocabulary") instead of per word.
``decode`` joins words with spaces and glues closing punctuation to the word before it; it cannot
restore case or the original spacing.

    >>> tok = WordTokenizer.from_text("The food was great! the service was not.", min_count=1)
    >>> tok.tokenize("The FOOD, great!")
    ['the', 'food', ',', 'great', '!']
    >>> tok.decode(tok.encode("the food was awful."))
    'the food was <unk>.'
"""
from __future__ import annotations

import re
from collections import Counter

from scratchlm.errors import UserError
from scratchlm.tokenizers.base import Tokenizer, check_header, register

VERSION = 1
PAD, UNK, BOS, EOS, CLS = "<pad>", "<unk>", "<bos>", "<eos>", "<cls>"
OPTIONAL_SPECIALS = (BOS, EOS, CLS)
DEFAULT_MIN_COUNT = 2   # a word seen once teaches a model little, and <unk> then gets trained too

# A word: letters/digits ([^\W_] is \w without the underscore), apostrophes allowed between them.
# Anything else that is not whitespace is one punctuation token per character.
_TOKEN = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*|[^\w\s]|_")
# Punctuation that reads glued to the word before it when decoding.
_CLOSING = re.compile(r" ([.,!?;:%)\]}])")


def split_words(text: str) -> list[str]:
    """Lowercase ``text`` and cut it into word and punctuation tokens (the rules above)."""
    return _TOKEN.findall(text.lower())


@register("word")
class WordTokenizer(Tokenizer):
    def __init__(self, words, specials=(), min_count: int = DEFAULT_MIN_COUNT, max_size=None):
        """``words``: the vocabulary after the specials, in id order; ``specials``: optional ones."""
        specials = list(specials)
        for s in specials:
            if s not in OPTIONAL_SPECIALS:
                raise UserError(f"unknown special token {s!r}; choose from {list(OPTIONAL_SPECIALS)}")
        specials = [s for s in OPTIONAL_SPECIALS if s in specials]   # fixed order, no repeats
        self.specials = specials
        self.min_count = int(min_count)
        self.max_size = None if max_size is None else int(max_size)
        self.itos = [PAD, UNK] + specials + list(words)           # id -> token
        self.stoi = {w: i for i, w in enumerate(self.itos)}       # token -> id
        if len(self.stoi) != len(self.itos):
            raise UserError("word tokenizer vocabulary has a repeated entry")
        self.vocab_size = len(self.itos)
        self.pad_id, self.unk_id = 0, 1

    @classmethod
    def from_text(cls, text_or_texts, min_count: int = DEFAULT_MIN_COUNT, max_size=None,
                  specials=()) -> "WordTokenizer":
        """Count the words of a string or of an iterable of strings and keep the frequent ones."""
        if min_count < 1:
            raise UserError(f"min_count must be >= 1, got {min_count}")
        texts = [text_or_texts] if isinstance(text_or_texts, str) else text_or_texts
        counts = Counter()
        for text in texts:
            counts.update(split_words(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        n_special = 2 + len(set(specials) & set(OPTIONAL_SPECIALS))
        if max_size is not None:
            if max_size <= n_special:
                raise UserError(f"max_size {max_size} leaves no room for words after {n_special} "
                                f"special tokens; use a larger max_size")
            kept = kept[:max_size - n_special]
        if not kept:
            raise UserError(f"no word occurs at least min_count={min_count} times in the training "
                            f"text; lower min_count or give more text")
        tok = cls(kept, specials=specials, min_count=min_count, max_size=max_size)
        tok.counts = {w: counts[w] for w in kept}
        return tok

    def token_id(self, token: str) -> int:
        """The id of a token (e.g. ``"<cls>"``); one line naming it when it is not in the vocabulary."""
        try:
            return self.stoi[token]
        except KeyError:
            raise UserError(f"token {token!r} is not in the word vocabulary "
                            f"(special tokens here: {[PAD, UNK] + self.specials})") from None

    def tokenize(self, text: str) -> list[str]:
        return split_words(text)

    def encode(self, text: str, count_unknown: bool = False):
        """``text`` -> ids; with ``count_unknown=True`` -> (ids, number of words mapped to <unk>)."""
        stoi, unk = self.stoi, self.unk_id
        ids = [stoi.get(w, unk) for w in split_words(text)]
        if count_unknown:
            return ids, sum(1 for i in ids if i == unk)
        return ids

    def decode(self, ids, skip_pad: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is outside the word vocabulary (0..{self.vocab_size - 1})")
            if skip_pad and i == self.pad_id:
                continue
            out.append(self.itos[i])
        return _CLOSING.sub(r"\1", " ".join(out))

    def to_dict(self) -> dict:
        return {"type": "word", "version": VERSION, "vocab_size": self.vocab_size,
                "min_count": self.min_count, "max_size": self.max_size, "specials": self.specials,
                "words": self.itos[2 + len(self.specials):]}

    @classmethod
    def from_dict(cls, d) -> "WordTokenizer":
        check_header(d, "word", VERSION)
        words, specials = d.get("words"), d.get("specials", [])
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise UserError("word tokenizer data has no \"words\" list of non-empty strings")
        if not isinstance(specials, list):
            raise UserError("word tokenizer data: \"specials\" must be a list")
        tok = cls(words, specials=specials, min_count=d.get("min_count", DEFAULT_MIN_COUNT),
                  max_size=d.get("max_size"))
        if d.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise UserError(f"word tokenizer says vocab_size {d.get('vocab_size')} but lists "
                            f"{tok.vocab_size} tokens")
        return tok

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, min_count={self.min_count})"
