"""Text augmentation for classifiers, EDA-style (Wei & Zou 2019, "EDA: Easy Data Augmentation").

Four operations on a list of word tokens, each seeded by the ``np.random.Generator`` passed in:

- ``random_deletion(tokens, p, rng)``: drop each token with probability p, never all of them (if every
  token is drawn for deletion, one random token stays);
- ``random_swap(tokens, n, rng)``: n times, swap the tokens at two random positions;
- ``random_insertion(tokens, n, rng, source)``: n times, insert a word at a random position: a
  neighbour (in word-vector space) of a random word of the sentence, or, when no word of the sentence
  has neighbours, a word of the source's vocabulary;
- ``random_replacement(tokens, n, rng, source)``: replace up to n distinct words (those the source
  has substitutes for) by a random one of their neighbours.

Where the substitutes come from (``WordSource``): with word vectors, the k nearest words by cosine
(EDA used WordNet synonyms; nearest neighbours in a space trained on the task's own text are the
usual stand-in); without vectors, words drawn (by frequency) from the vocabulary of the training
sentences *of the same class*, so that a replacement is unlikely to flip the label. Only words
(letters or digits) are replaced or inserted, never punctuation.

``Augmenter`` applies one operation, chosen uniformly, to each example with probability ``p``, as
EDA does per augmented sentence. It is meant to be applied on the fly to *training* batches only
(fresh draws every epoch); dev and test examples are never augmented, or model selection and the
reported scores would measure the augmentation rather than the data.

    >>> source = WordSource.from_examples(train_tokens, train_labels)          # doctest: +SKIP
    >>> eda = Augmenter(p=0.5, source=source)                                   # doctest: +SKIP
    >>> batch = eda.batch(batch_tokens, np.random.default_rng(epoch), batch_labels)   # doctest: +SKIP
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from scratchlm.errors import UserError

OPERATIONS = ("delete", "swap", "insert", "replace")


def _is_word(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


def random_deletion(tokens, p: float, rng) -> list:
    """Each token dropped with probability p; a non-empty input never comes back empty."""
    tokens = list(tokens)
    if p <= 0 or len(tokens) <= 1:
        return tokens
    keep = rng.random(len(tokens)) >= p
    if not keep.any():
        return [tokens[int(rng.integers(len(tokens)))]]
    return [t for t, k in zip(tokens, keep) if k]


def random_swap(tokens, n: int, rng) -> list:
    """n swaps of two random positions (a position may be drawn twice: that swap does nothing)."""
    tokens = list(tokens)
    if len(tokens) < 2:
        return tokens
    for _ in range(n):
        i, j = rng.integers(len(tokens), size=2)
        tokens[i], tokens[j] = tokens[j], tokens[i]
    return tokens


class WordSource:
    """Substitute words: nearest neighbours in a vector space, or a same-class vocabulary.

    ``vectors``: (words, matrix (V, D)) e.g. from ``scratchlm.models.word2vec.load_vectors``;
    ``class_vocab``: {label: Counter of words} e.g. from ``WordSource.from_examples``.
    """

    def __init__(self, vectors=None, class_vocab=None, k: int = 5):
        if vectors is None and not class_vocab:
            raise UserError("augmentation needs word vectors or a vocabulary to draw words from")
        self.k = int(k)
        self._cache = {}
        if vectors is not None:
            words, matrix = vectors
            self.words = list(words)
            self.index = {w: i for i, w in enumerate(self.words)}
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            self.unit = np.asarray(matrix, dtype=np.float64) / np.maximum(norms, 1e-12)   # (V, D)
        else:
            self.words, self.index, self.unit = [], {}, None
        self.class_vocab = {}
        for label, counts in (class_vocab or {}).items():
            words = sorted(w for w in counts if _is_word(w))
            weights = np.array([counts[w] for w in words], dtype=np.float64)
            self.class_vocab[label] = (words, weights / weights.sum() if len(words) else weights)

    @classmethod
    def from_examples(cls, token_lists, labels, vectors=None, k: int = 5) -> "WordSource":
        """Count each class's words in the training examples (never the dev or test ones)."""
        vocab = {}
        for tokens, label in zip(token_lists, labels):
            vocab.setdefault(label, Counter()).update(tokens)
        return cls(vectors=vectors, class_vocab=vocab, k=k)

    def neighbours(self, word: str) -> list:
        """The k nearest words to ``word`` by cosine (words only, itself excluded); [] if unknown."""
        if self.unit is None or word not in self.index:
            return []
        if word not in self._cache:
            scores = self.unit @ self.unit[self.index[word]]                       # (V,)
            order = np.argsort(-scores, kind="stable")
            self._cache[word] = [self.words[i] for i in order
                                 if self.words[i] != word and _is_word(self.words[i])][:self.k]
        return self._cache[word]

    def vocabulary_word(self, label, rng):
        """A word of the class's vocabulary (all classes pooled when label is None), by frequency."""
        if label is None or label not in self.class_vocab:
            pools = [p for p in self.class_vocab.values() if len(p[0])]
            if not pools:
                if self.unit is None:
                    return None
                words = [w for w in self.words if _is_word(w)]
                return words[int(rng.integers(len(words)))] if words else None
            words, weights = pools[int(rng.integers(len(pools)))]
        else:
            words, weights = self.class_vocab[label]
            if not len(words):
                return None
        return words[int(rng.choice(len(words), p=weights))]

    def substitute(self, word: str, label, rng):
        """A neighbour of ``word`` if it has any, else a same-class vocabulary word (or None)."""
        options = self.neighbours(word)
        if options:
            return options[int(rng.integers(len(options)))]
        if self.unit is None:
            return self.vocabulary_word(label, rng)
        return None


def random_insertion(tokens, n: int, rng, source: WordSource, label=None) -> list:
    """Insert exactly n words (neighbours of the sentence's words, else vocabulary words)."""
    tokens = list(tokens)
    for _ in range(n):
        candidates = [t for t in tokens if source.neighbours(t)]
        if candidates:
            word = source.substitute(candidates[int(rng.integers(len(candidates)))], label, rng)
        else:
            word = source.vocabulary_word(label, rng)
        if word is None:
            raise UserError("augmentation: no word to insert (empty vocabulary for this class)")
        tokens.insert(int(rng.integers(len(tokens) + 1)), word)
    return tokens


def random_replacement(tokens, n: int, rng, source: WordSource, label=None) -> list:
    """Replace up to n distinct word positions by a substitute (neighbour or same-class word)."""
    tokens = list(tokens)
    positions = [i for i, t in enumerate(tokens) if _is_word(t)]
    replaced = 0
    for i in rng.permutation(positions) if positions else []:
        if replaced == n:
            break
        word = source.substitute(tokens[i], label, rng)
        if word is not None:
            tokens[i] = word
            replaced += 1
    return tokens


class Augmenter:
    """Per example, with probability ``p``, one EDA operation chosen uniformly from ``operations``.

    ``p_delete`` is the deletion probability per token; ``n_swap``, ``n_insert``, ``n_replace`` the
    counts; ``source`` a ``WordSource`` (needed for insert and replace).
    """

    def __init__(self, p: float = 0.5, operations=OPERATIONS, p_delete: float = 0.1, n_swap: int = 1,
                 n_insert: int = 1, n_replace: int = 1, source: WordSource | None = None):
        operations = tuple(operations)
        for op in operations:
            if op not in OPERATIONS:
                raise UserError(f"unknown augmentation {op!r}; choose from {', '.join(OPERATIONS)}")
        if not 0.0 <= p <= 1.0 or not 0.0 <= p_delete < 1.0:
            raise UserError(f"augmentation probabilities must be in [0, 1): p={p}, p_delete={p_delete}")
        if source is None and {"insert", "replace"} & set(operations):
            raise UserError("augmentation 'insert' and 'replace' need word vectors or a training vocabulary")
        self.p, self.operations, self.source = p, operations, source
        self.p_delete, self.n_swap, self.n_insert, self.n_replace = p_delete, n_swap, n_insert, n_replace

    def __call__(self, tokens, rng, label=None) -> list:
        if not self.operations or self.p == 0 or rng.random() >= self.p:
            return list(tokens)
        op = self.operations[int(rng.integers(len(self.operations)))]
        if op == "delete":
            return random_deletion(tokens, self.p_delete, rng)
        if op == "swap":
            return random_swap(tokens, self.n_swap, rng)
        if op == "insert":
            return random_insertion(tokens, self.n_insert, rng, self.source, label)
        return random_replacement(tokens, self.n_replace, rng, self.source, label)

    def batch(self, token_lists, rng, labels=None) -> list:
        """Augment a training batch (one draw per example)."""
        labels = [None] * len(token_lists) if labels is None else labels
        return [self(tokens, rng, label) for tokens, label in zip(token_lists, labels)]
