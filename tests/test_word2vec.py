"""word2vec: the SGNS gradient by finite differences, the kernel against its NumPy reference on the
same random streams, one kernel step against explicit SGD steps, the noise and subsampling tables,
the text format (and gensim reading it), and planted topics ending up apart."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from scratchlm.errors import UserError
from scratchlm.kernels import numba_available
from scratchlm.kernels import word2vec as kernel
from scratchlm.models import word2vec as w2v

finite = st.floats(-2.0, 2.0, allow_nan=False, width=64)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, 5, elements=finite), arrays(np.float64, 5, elements=finite),
       arrays(np.float64, (3, 5), elements=finite))
def test_sgns_gradient_matches_finite_differences(v_w, u_c, u_n):
    grads = w2v.pair_gradients(v_w, u_c, u_n)
    eps = 1e-6
    for which, (arg, grad) in enumerate(zip((v_w, u_c, u_n), grads)):
        numeric = np.zeros_like(arg)
        for idx in np.ndindex(arg.shape):
            plus, minus = [a.copy() for a in (v_w, u_c, u_n)], [a.copy() for a in (v_w, u_c, u_n)]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            numeric[idx] = (w2v.pair_loss(*plus) - w2v.pair_loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def _tiny_setup(dtype, V=7, D=6, seed=0):
    rng = np.random.default_rng(seed)
    sentences = [list(rng.integers(0, V, size=rng.integers(1, 9))) for _ in range(12)]
    corpus = np.concatenate(sentences).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])]).astype(np.int64)
    counts = np.bincount(corpus, minlength=V) + 1
    syn0 = ((rng.random((V, D)) - 0.5)).astype(dtype)
    syn1neg = (rng.standard_normal((V, D)) * 0.3).astype(dtype)
    return corpus, offsets, counts, syn0, syn1neg


@pytest.mark.skipif(not numba_available(), reason="numba not installed")
@pytest.mark.parametrize("cbow", [False, True])
@pytest.mark.parametrize("sample", [0.0, 0.05])
def test_kernel_equals_reference_on_the_same_draws(cbow, sample):
    corpus, offsets, counts, syn0, syn1neg = _tiny_setup(np.float64)
    keep = w2v.keep_table(counts, sample)
    cum = w2v.noise_table(counts)
    lo, hi = np.array([0]), np.array([len(offsets) - 1])
    results = []
    for train in (kernel.train_block_reference, kernel.train_block_numba):
        s0, s1, seeds = syn0.copy(), syn1neg.copy(), np.array([12345], dtype=np.uint64)
        trained = train(s0, s1, corpus, offsets, lo, hi, seeds, keep, cum, 0.05, 0.01, 3, 4, cbow)
        results.append((s0, s1, int(seeds[0]), trained.tolist()))
    (r0, r1, rseed, rtrained), (k0, k1, kseed, ktrained) = results
    assert rseed == kseed and rtrained == ktrained           # same draws, same words kept
    assert not np.allclose(r0, syn0)                         # training did something
    np.testing.assert_allclose(k0, r0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(k1, r1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [kernel.train_block_reference, kernel.train_block])
def test_one_sentence_is_two_sgd_steps_of_the_derived_gradient(train):
    # Vocabulary {0, 1, 2}; sentence [0, 1]; window 1; no subsampling; all noise mass on word 2,
    # one negative. Skip-gram then does: input 1 predicts 0 (noise 2), then input 0 predicts 1.
    rng = np.random.default_rng(3)
    syn0, syn1neg = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    alpha = 0.1
    expect0, expect1 = syn0.copy(), syn1neg.copy()
    for inp, pos in ((1, 0), (0, 1)):
        dv, du_c, du_n = w2v.pair_gradients(expect0[inp], expect1[pos], expect1[[2]])
        expect0[inp] -= alpha * dv
        expect1[pos] -= alpha * du_c
        expect1[2] -= alpha * du_n[0]
    cum = np.array([0, 0, 1000], dtype=np.int64)
    keep = w2v.keep_table(np.array([1, 1, 1]), 0.0)
    train(syn0, syn1neg, np.array([0, 1], np.int32), np.array([0, 2]), np.array([0]), np.array([1]),
          np.array([7], dtype=np.uint64), keep, cum, alpha, alpha, 1, 1, False)
    np.testing.assert_allclose(syn0, expect0, rtol=1e-10)
    np.testing.assert_allclose(syn1neg, expect1, rtol=1e-10)


def test_noise_table_follows_unigram_to_the_three_quarters():
    counts = np.array([1000, 300, 50, 7, 1])
    cum = w2v.noise_table(counts)
    p = counts ** 0.75 / (counts ** 0.75).sum()
    # The table's intervals are the probabilities (to rounding of a 2^31 domain) ...
    widths = np.diff(np.concatenate([[0], cum])) / cum[-1]
    np.testing.assert_allclose(widths, p, atol=2e-9)
    # ... and draws by the kernel's rule land with those frequencies: 400k draws, so a frequency's
    # standard deviation is at most 0.0008; allow 5 of them.
    x = np.random.default_rng(0).integers(0, cum[-1], size=400_000)
    freq = np.bincount(np.searchsorted(cum, x, side="right"), minlength=len(counts)) / x.size
    np.testing.assert_allclose(freq, p, atol=0.004)


def test_keep_table_is_word2vec_c_formula_by_hand():
    counts = np.array([900, 90, 10])              # total 1000, t = 0.01: threshold count 10
    keep = w2v.keep_table(counts, 0.01) / 2**32
    by_hand = [(np.sqrt(900 / 10) + 1) * 10 / 900, (np.sqrt(9) + 1) * 10 / 90, 1.0]
    np.testing.assert_allclose(keep, by_hand, rtol=1e-9)
    assert (w2v.keep_table(counts, 0.0) == 2**32).all()


def test_keep_table_equals_gensims_sample_int():
    gensim_models = pytest.importorskip("gensim.models")
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    sentences = [list(rng.choice(words, size=10, p=np.arange(30, 0, -1) / 465)) for _ in range(300)]
    g = gensim_models.Word2Vec(vector_size=8, min_count=1, sample=1e-2, workers=1)
    g.build_vocab(sentences)
    ours = w2v.Word2Vec(dim=8, min_count=1, sample=1e-2)
    ours.build_vocab(sentences)
    keep = w2v.keep_table(ours.counts, 1e-2)
    theirs = np.array([g.wv.get_vecattr(w, "sample_int") for w in ours.words])
    np.testing.assert_allclose(keep, theirs, rtol=1e-9, atol=1)


def test_vocabulary_order_and_blocks_cover_every_sentence():
    sentences = [["b", "a", "c"], ["a", "b"], ["a", "d"]]
    model = w2v.Word2Vec(min_count=2, dim=4)
    model.build_vocab(sentences)
    assert model.words == ["a", "b"] and model.counts.tolist() == [3, 2]   # c, d below min_count
    corpus, offsets, raw = model.encode(sentences)
    assert corpus.tolist() == [1, 0, 0, 1, 0] and offsets.tolist() == [0, 2, 4, 5] and raw == 7
    offsets = np.concatenate([[0], np.cumsum(np.random.default_rng(0).integers(1, 50, 5000))])
    blocks = w2v.Word2Vec._blocks(offsets, workers=3)
    ranges = [(a, b) for lo, hi, _, _ in blocks for a, b in zip(lo, hi)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 5000
    assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:]))
    assert blocks[-1][3] == offsets[-1]


def _two_topics(n=400, seed=0):
    rng = np.random.default_rng(seed)
    topics = [[f"animal{i}" for i in range(8)], [f"metal{i}" for i in range(8)]]
    return topics, [list(rng.choice(topics[i % 2], size=8)) for i in range(n)]


def test_planted_topics_end_closer_within_than_across(tmp_path):
    topics, sentences = _two_topics()
    stats = w2v.train_word2vec(sentences, tmp_path, progress=False, dim=16, min_count=1, epochs=5,
                               window=3, sample=0.0, workers=1, seed=0)
    assert stats["vocab_size"] == 16
    model = w2v.Word2Vec.load(tmp_path)
    within = [model.similarity(a, b) for t in topics for a in t for b in t if a < b]
    across = [model.similarity(a, b) for a in topics[0] for b in topics[1]]
    assert min(within) > max(across)
    neighbours = [w for w, _ in model.most_similar("animal0", k=7)]
    assert sorted(neighbours) == sorted(topics[0][1:])


def test_cbow_learns_the_planted_topics_too(tmp_path):
    topics, sentences = _two_topics(seed=1)
    model = w2v.Word2Vec(model="cbow", dim=16, min_count=1, epochs=5, window=3, sample=0.0, workers=2)
    model.train(sentences, progress=False)
    within = np.mean([model.similarity(a, b) for t in topics for a in t for b in t if a < b])
    across = np.mean([model.similarity(a, b) for a in topics[0] for b in topics[1]])
    assert within > across + 0.5


def test_text_format_round_trips_and_refuses_a_wrong_dimension(tmp_path):
    words = ["the", "cat", "naïve"]
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    w2v.save_vectors(tmp_path / "v.txt", words, vectors)
    lines = (tmp_path / "v.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "3 5" and lines[2].split(" ")[0] == "cat" and len(lines[2].split(" ")) == 6
    back_words, back = w2v.load_vectors(tmp_path / "v.txt", dim=5)
    assert back_words == words
    np.testing.assert_allclose(back, vectors, rtol=1e-5)
    with pytest.raises(UserError, match="5-dimensional vectors but 100 are needed"):
        w2v.load_vectors(tmp_path / "v.txt", dim=100)
    (tmp_path / "bad.txt").write_text("2 3\na 1 2 3\nb 1 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.txt:3: expected a word and 3 numbers"):
        w2v.load_vectors(tmp_path / "bad.txt")


def test_gensim_reads_our_vectors(tmp_path):
    keyed = pytest.importorskip("gensim.models").KeyedVectors
    words = ["alpha", "beta", "gamma", "delta"]
    vectors = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
    w2v.save_vectors(tmp_path / "vectors.txt", words, vectors)
    kv = keyed.load_word2vec_format(str(tmp_path / "vectors.txt"), binary=False)
    assert list(kv.index_to_key) == words
    np.testing.assert_allclose(kv.vectors, vectors, rtol=1e-5)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    ours = w2v.most_similar(words, unit, vectors[0], k=3, exclude="alpha")
    theirs = kv.most_similar("alpha", topn=3)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)


def test_embedding_from_vectors_and_user_errors(tmp_path):
    w2v.save_vectors(tmp_path / "v.txt", ["good", "bad"], np.ones((2, 4), np.float32))
    table, hits = w2v.embedding_from_vectors(["<pad>", "<unk>", "bad", "meh"], tmp_path / "v.txt", 4,
                                             np.random.default_rng(0))
    assert hits == 1 and (table[2] == 1).all() and (table[0] == 0).all() and not (table[3] == 1).all()
    with pytest.raises(UserError, match="unknown word2vec setting"):
        w2v.Word2Vec(dimension=3)
    with pytest.raises(UserError, match="skipgram"):
        w2v.Word2Vec(model="glove")
    with pytest.raises(UserError, match="fewer than two words"):
        w2v.train_word2vec("a b c", tmp_path / "x", progress=False, min_count=5)
    model = w2v.Word2Vec(min_count=1, dim=4)
    model.build_vocab([["a", "b"]])
    with pytest.raises(UserError, match="not in the word2vec vocabulary"):
        model.most_similar("zebra")


def test_same_seed_same_vectors_with_one_worker_and_more_workers_than_sentences():
    _, sentences = _two_topics(n=40)
    runs = []
    for _ in range(2):
        model = w2v.Word2Vec(dim=8, min_count=1, epochs=2, sample=1e-2, workers=1, seed=5)
        model.train(sentences, progress=False)
        runs.append(model.syn0)
    np.testing.assert_array_equal(runs[0], runs[1])
    model = w2v.Word2Vec(dim=8, min_count=1, epochs=1, workers=4, seed=5)
    stats = model.train(sentences[:2], progress=False)       # two of the four ranges are empty
    assert stats["vocab_words_per_epoch"] == 16 and np.isfinite(model.syn0).all()
