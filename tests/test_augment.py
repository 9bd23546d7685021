"""EDA augmentation: invariants of each operation (Hypothesis), seeding, p=0 identity, and where
inserted and replacing words come from."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from scratchlm import augment
from scratchlm.errors import UserError

SETTINGS = settings(max_examples=50, deadline=None)
token_lists = st.lists(st.sampled_from(["the", "food", "was", "great", "bad", ".", "!", "not"]),
                       min_size=1, max_size=15)
seeds = st.integers(0, 2**32 - 1)

# A tiny vector space: two clusters, so the neighbours of each word are known by construction.
WORDS = ["good", "great", "fine", "bad", "awful", "poor"]
VECTORS = np.array([[1, 0.1], [1, 0.2], [1, 0.0], [-1, 0.1], [-1, 0.2], [-1, 0.0]])
POSITIVE, NEGATIVE = set(WORDS[:3]), set(WORDS[3:])


def vector_source(k=2):
    return augment.WordSource(vectors=(WORDS, VECTORS), k=k)


def vocab_source():
    return augment.WordSource.from_examples([["tasty", "yum", "!"], ["yuck", "gross"]], ["pos", "neg"])


@SETTINGS
@given(token_lists, st.floats(0.0, 0.99), seeds)
def test_deletion_never_empties_and_keeps_order(tokens, p, seed):
    out = augment.random_deletion(tokens, p, np.random.default_rng(seed))
    assert 1 <= len(out) <= len(tokens)
    it = iter(tokens)                                  # out is a subsequence of tokens
    assert all(any(t == u for u in it) for t in out)
    assert augment.random_deletion(tokens, 1.0 - 1e-12, np.random.default_rng(seed)) != []


@SETTINGS
@given(token_lists, st.integers(0, 5), seeds)
def test_swap_preserves_the_multiset(tokens, n, seed):
    out = augment.random_swap(tokens, n, np.random.default_rng(seed))
    assert Counter(out) == Counter(tokens) and len(out) == len(tokens)


@SETTINGS
@given(token_lists, st.integers(0, 4), seeds)
def test_insertion_adds_exactly_n_vocabulary_words(tokens, n, seed):
    source = vocab_source()
    out = augment.random_insertion(tokens, n, np.random.default_rng(seed), source, label="pos")
    added = Counter(out) - Counter(tokens)
    assert len(out) == len(tokens) + n and sum(added.values()) == n
    assert set(added) <= {"tasty", "yum"}                    # same class, words only (no "!")


@SETTINGS
@given(st.lists(st.sampled_from(WORDS + ["the", "."]), min_size=1, max_size=10), st.integers(0, 4), seeds)
def test_insertion_with_vectors_adds_neighbours(tokens, n, seed):
    out = augment.random_insertion(tokens, n, np.random.default_rng(seed), vector_source())
    assert len(out) == len(tokens) + n
    added = Counter(out) - Counter(tokens)
    assert set(added) <= set(WORDS)
    if set(tokens) & POSITIVE and not set(tokens) & NEGATIVE:   # only positive words have neighbours
        assert set(added) <= POSITIVE


def test_neighbours_are_the_nearest_by_cosine():
    source = vector_source(k=2)
    assert source.neighbours("good") == ["great", "fine"]
    assert source.neighbours("awful") == ["bad", "poor"]
    assert source.neighbours("unknown") == []


@SETTINGS
@given(st.lists(st.sampled_from(WORDS + ["the", "."]), min_size=1, max_size=10), st.integers(0, 4), seeds)
def test_replacement_swaps_words_for_their_neighbours_only(tokens, n, seed):
    source = vector_source(k=2)
    out = augment.random_replacement(tokens, n, np.random.default_rng(seed), source)
    assert len(out) == len(tokens)
    changed = [(a, b) for a, b in zip(tokens, out) if a != b]
    assert len(changed) <= n
    for before, after in changed:
        assert after in source.neighbours(before)


@SETTINGS
@given(token_lists, seeds)
def test_same_seed_same_output_and_p_zero_is_identity(tokens, seed):
    eda = augment.Augmenter(p=1.0, source=vocab_source(), n_swap=2, n_insert=2, n_replace=2)
    a = eda.batch([tokens] * 5, np.random.default_rng(seed), labels=["pos"] * 5)
    b = eda.batch([tokens] * 5, np.random.default_rng(seed), labels=["pos"] * 5)
    assert a == b
    rng = np.random.default_rng(seed)
    assert augment.Augmenter(p=0.0, source=vocab_source())(tokens, rng, "pos") == tokens
    assert augment.random_deletion(tokens, 0.0, rng) == tokens
    assert augment.random_swap(tokens, 0, rng) == tokens
    assert augment.random_insertion(tokens, 0, rng, vocab_source(), "pos") == tokens
    assert augment.random_replacement(tokens, 0, rng, vocab_source(), "pos") == tokens


def test_augmenter_uses_every_operation_and_errors():
    eda = augment.Augmenter(p=1.0, source=vocab_source(), p_delete=0.5)
    rng = np.random.default_rng(0)
    tokens = ["the", "food", "was", "great", "."]
    outs = [eda(tokens, rng, "pos") for _ in range(200)]
    lengths = Counter(len(o) for o in outs)
    assert lengths[6] > 0 and any(n < 5 for n in lengths)                 # insert, delete
    assert any(len(o) == 5 and Counter(o) == Counter(tokens) and o != tokens for o in outs)   # swap
    assert any(len(o) == 5 and Counter(o) != Counter(tokens) for o in outs)                   # replace
    with pytest.raises(UserError, match="unknown augmentation"):
        augment.Augmenter(operations=("shuffle",))
    with pytest.raises(UserError, match="need word vectors"):
        augment.Augmenter(operations=("insert",))
    with pytest.raises(UserError, match="word vectors or a vocabulary"):
        augment.WordSource()
