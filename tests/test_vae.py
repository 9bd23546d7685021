"""The sentence VAE and its ops.

Ops (scratchlm/ops/latent.py): the KL op equals the closed form computed in NumPy, and a
10^5-sample Monte-Carlo estimate of E_q[log q(z) - log p(z)] within 4 standard errors; both ops'
backwards agree with finite differences (NumPy and the strict backend).
Model (scratchlm/models/vae.py): the bound's terms have the right signs (bound >= the
reconstruction NLL of the same decoder at the same z; every bound >= -log p(x) computed by
quadrature over a 1-D latent), the importance-weighted bound tightens with k, schedules, free
bits, and the shapes of sampling, reconstruction and interpolation.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scratchlm as sl
from scratchlm.errors import UserError
from scratchlm.ops.latent import gaussian_kl, reparameterise
from gradcheck import check_gradients


def _gaussians(seed, B=3, D=4):
    rng = np.random.default_rng(seed)
    return rng.uniform(-2, 2, (B, D)), rng.uniform(-3, 2, (B, D))


# ================================================================ ops

def test_kl_equals_closed_form(any_backend):
    mu, logvar = _gaussians(0)
    got = gaussian_kl(sl.tensor(mu), sl.tensor(logvar)).numpy()
    expected = 0.5 * (mu ** 2 + np.exp(logvar) - logvar - 1.0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    zero = gaussian_kl(sl.tensor(np.zeros((2, 3))), sl.tensor(np.zeros((2, 3)))).numpy()
    assert np.all(zero == 0.0)                        # the prior's KL to itself is 0 (the missing -1 gives 1/2)


def test_kl_matches_monte_carlo(float64):
    """KL = E_q[log q(z) - log p(z)], estimated with 10^5 draws z = mu + sigma eps; the estimate's
    standard error is the sample std / sqrt(n), and the closed form must lie within 4 of them."""
    rng = np.random.default_rng(1)
    mu, logvar = np.array([0.7, -1.3, 0.0, 2.0]), np.array([-1.0, 0.5, 0.0, -2.5])
    n = 100_000
    eps = rng.standard_normal((n, mu.size))
    sigma = np.exp(0.5 * logvar)
    z = mu + sigma * eps
    log_q = (-0.5 * np.log(2 * np.pi) - 0.5 * logvar - 0.5 * eps ** 2).sum(-1)
    log_p = (-0.5 * np.log(2 * np.pi) - 0.5 * z ** 2).sum(-1)
    draws = log_q - log_p
    estimate, stderr = draws.mean(), draws.std(ddof=1) / math.sqrt(n)
    closed = gaussian_kl(sl.tensor(mu[None]), sl.tensor(logvar[None])).numpy().sum()
    assert abs(closed - estimate) <= 4 * stderr, (closed, estimate, stderr)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 10_000))
def test_kl_gradient_finite_differences(B, D, seed):
    rng = np.random.default_rng(seed)
    mu, logvar = rng.uniform(-3, 3, (B, D)), rng.uniform(-3, 3, (B, D))
    check_gradients(gaussian_kl, mu, logvar, seed=seed)
    m, l = sl.tensor(mu, requires_grad=True, dtype=np.float64), sl.tensor(logvar, requires_grad=True, dtype=np.float64)
    gaussian_kl(m, l).sum().backward()                        # the docstring's formulas
    np.testing.assert_allclose(m.grad, mu, rtol=1e-12)
    np.testing.assert_allclose(l.grad, 0.5 * (np.exp(logvar) - 1), rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 10_000))
def test_reparameterise_gradient_finite_differences(B, D, seed):
    rng = np.random.default_rng(seed)
    mu, logvar, eps = rng.uniform(-3, 3, (B, D)), rng.uniform(-3, 3, (B, D)), rng.standard_normal((B, D))
    check_gradients(reparameterise, mu, logvar, eps, seed=seed)


def test_ops_on_strict_backend(any_backend):
    mu, logvar = _gaussians(2)
    eps = np.random.default_rng(3).standard_normal(mu.shape)
    check_gradients(gaussian_kl, mu, logvar)
    check_gradients(reparameterise, mu, logvar, eps)
    z = reparameterise(sl.tensor(mu), sl.tensor(logvar), sl.tensor(eps)).numpy()
    np.testing.assert_allclose(z, mu + np.exp(logvar / 2) * eps, rtol=1e-12)


# ================================================================ the model

from scratchlm.models.vae import SentenceVAE, VAEConfig, active_units  # noqa: E402

V, B_ = 7, 0        # vocabulary; id 0 is the boundary (the word tokenizer's <pad>), 1 is <unk>


def tiny_vae(seed=0, **options):
    config = VAEConfig(**{**dict(vocab_size=V, block_size=6, n_embd=4, n_hidden=5, n_latent=2, word_dropout=0.0),
                          **options})
    model = SentenceVAE(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():                                   # weights far from the init's near-zero
        p.data[...] = sl.backend.to_device(rng.uniform(-0.8, 0.8, p.shape), p.dtype)
    return model


def sentences(rows):
    """Framed batch (x, y) of word-id lists, padded as scratchlm.tasks.DocumentLM pads."""
    T = max(map(len, rows)) + 1
    x = np.zeros((len(rows), T), dtype=np.int64)
    y = np.full((len(rows), T), -100, dtype=np.int64)
    for r, words in enumerate(rows):
        x[r, 1:len(words) + 1] = words
        y[r, :len(words)] = words
        y[r, len(words)] = B_
    return x, y


BATCH = sentences([[2, 3, 4], [5, 6], [3, 3, 2, 6, 4]])


def test_bound_is_never_below_the_reconstruction(float64):
    """The sign check of the issue: for the same batch and the same z (fixed eps), the bound
    recon + KL is never below the reconstruction NLL of the decoder run deterministically
    (eval mode: no dropout, no word dropout) -- each sentence's KL term is >= 0."""
    model = tiny_vae(word_dropout=0.5, dropout=0.3)
    model.eval()
    eps = np.random.default_rng(4).standard_normal((3, 2))
    for _ in range(3):
        recon, kl, tokens = model.terms(*BATCH, eps=eps)
        per_sentence_kl = kl.numpy().sum(axis=1)
        assert np.all(per_sentence_kl >= 0)
        bound = recon.item() + per_sentence_kl.sum()
        assert bound >= recon.item()
        logits, loss = model(*BATCH)
        assert loss.item() * tokens >= 0
        eps = eps * 3                                              # z far out: still holds


def _quadrature(model, words):
    """-log p(x) and the exact ELBO for a 1-D latent, by the trapezoid rule on a fine z grid."""
    x, y = sentences([words])
    z = np.linspace(-12, 12, 4801)
    nll = model._sentence_nll(np.repeat(x, len(z), 0), np.repeat(y, len(z), 0),
                              sl.tensor(z[:, None]))                       # (Z,): -log p(x|z)
    log_prior = -0.5 * (z ** 2 + np.log(2 * np.pi))
    log_joint = -nll + log_prior
    top = log_joint.max()
    nll_x = -(top + np.log(np.trapezoid(np.exp(log_joint - top), z)))
    mu, logvar = (t.numpy()[0, 0] for t in model.encode(y))
    q = np.exp(-0.5 * (z - mu) ** 2 / np.exp(logvar)) / np.sqrt(2 * np.pi * np.exp(logvar))
    kl = 0.5 * (mu ** 2 + np.exp(logvar) - logvar - 1)
    return nll_x, np.trapezoid(q * nll, z) + kl


def test_bounds_against_exact_likelihood_by_quadrature(float64):
    """With one latent dimension, -log p(x) = -log integral p(x|z) N(z; 0, 1) dz is computable:
    the ELBO (recon + closed-form KL) and every importance-weighted bound lie above it, and the
    bound with many samples comes close to it."""
    model = tiny_vae(n_latent=1)
    model.eval()
    for words in ([2, 3, 4], [5, 6, 6, 2]):
        nll_x, elbo = _quadrature(model, words)
        assert elbo >= nll_x - 1e-9
        x, y = sentences([words])
        scores = model.sentence_scores(x, y, k=4000, seed=0)
        assert abs(scores["iw_bound"][0] - nll_x) < 0.02, (scores["iw_bound"][0], nll_x)
        assert scores["kl"][0] >= 0


def test_importance_weighted_bound_tightens_with_k(float64):
    """E[bound_1] >= E[bound_10] (Burda et al. Theorem 1): averaged over 200 fixed seeds."""
    model = tiny_vae()
    k1 = np.mean([model.sentence_scores(*BATCH, k=1, seed=s)["iw_bound"] for s in range(200)])
    k10 = np.mean([model.sentence_scores(*BATCH, k=10, seed=s)["iw_bound"] for s in range(200)])
    assert k1 > k10


def test_kl_schedules_and_free_bits(float64):
    linear = VAEConfig(vocab_size=V, kl_anneal="linear", kl_anneal_iters=100)
    assert [linear.kl_weight(i) for i in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    logistic = VAEConfig(vocab_size=V, kl_anneal="logistic", kl_anneal_iters=100, kl_anneal_k=0.1)
    weights = [logistic.kl_weight(i) for i in range(0, 300, 10)]
    assert logistic.kl_weight(50) == 0.5 and all(a < b for a, b in zip(weights, weights[1:]))
    assert VAEConfig(vocab_size=V, kl_anneal="none").kl_weight(0) == 1.0
    # free bits: with a floor above every dimension's KL, the KL part of the loss is the floor
    model = tiny_vae(free_bits=50.0, kl_anneal="none")
    sl.manual_seed(0)
    loss, terms = model.training_loss(BATCH, it=0)
    sl.manual_seed(0)
    recon, kl, tokens = model.terms(*BATCH)
    assert kl.numpy().mean(axis=0).max() < 50
    np.testing.assert_allclose(loss.item(), (recon.item() + 50.0 * 2 * 3) / tokens, rtol=1e-12)
    loss.backward()                         # the floor passes no gradient: only the reconstruction's
    with_floor = sl.backend.to_numpy(model.to_logvar.weight.grad).copy()
    model.zero_grad()
    sl.manual_seed(0)
    recon, _, tokens = model.terms(*BATCH)
    (recon / tokens).backward()
    np.testing.assert_allclose(with_floor, sl.backend.to_numpy(model.to_logvar.weight.grad), rtol=1e-10)
    with pytest.raises(UserError):
        VAEConfig(vocab_size=V, kl_anneal="cosine")


def test_active_units():
    mu = np.array([[0.0, 1.0, 0.05], [0.0, -1.0, -0.05], [0.0, 1.0, 0.05]])
    assert active_units(mu) == 1                                   # variances 0, 0.89, 0.0022


def test_stepwise_decoding_equals_teacher_forcing(float64):
    """The decoder with z fixed, stepped token by token through the sampler's interface, gives
    the same logits as the teacher-forced decode at every position (the state is the cache)."""
    model = tiny_vae(n_layer=2)
    model.eval()
    x, _ = BATCH
    z = np.random.default_rng(5).standard_normal((3, 2))
    full = model.decode(x, sl.tensor(z)).numpy()                   # (B, T, V)
    decoder = model.decoder_for(z)
    state = decoder.init_state(3)
    for t in range(x.shape[1]):
        logits, state = decoder.step(sl.backend.to_device(x[:, t]), state)
        np.testing.assert_allclose(logits.numpy(), full[:, t], rtol=1e-10, atol=1e-12)


def test_sample_reconstruct_interpolate_shapes():
    model = tiny_vae()
    samples = model.sample(4, boundary=B_, seed=0)
    assert len(samples) == 4 and all(len(s) <= 6 for s in samples)       # at most max_len = block_size tokens
    assert all(1 <= t < V for s in samples for t in s)             # the boundary is cut off
    assert samples == model.sample(4, boundary=B_, seed=0)          # seeded
    recon = model.reconstruct(BATCH[1], boundary=B_)
    assert len(recon) == 3
    pair = sentences([[2, 3, 4], [5, 6]])[1]
    path = model.interpolate(pair, boundary=B_, steps=5)
    assert len(path) == 5
    ends = model.reconstruct(pair, boundary=B_)
    assert path[0] == ends[0] and path[-1] == ends[1]              # t = 0 and 1 are the two posterior means


def test_config_parameter_count_matches_the_model():
    config = VAEConfig(vocab_size=V, block_size=6, n_embd=4, n_hidden=5, n_latent=2, n_layer=2)
    assert config.num_parameters() == sum(p.size for p in SentenceVAE(config).parameters())
    parts = config.memory_estimate(batch_size=2)
    assert parts["parameters"] == 4 * config.num_parameters() and parts["activations"] > 0


# ================================================================ the latent checks (commands/vae.py)

def test_word_edits_against_nltk_and_by_hand():
    from scratchlm.commands.vae import word_edits
    assert word_edits("kitten".split("t"), "kitten".split("t")) == 0
    assert word_edits(list("kitten"), list("sitting")) == 3          # 2 substitutions, 1 insertion
    assert word_edits([], [1, 2, 3]) == 3 and word_edits([1, 2], []) == 2
    nltk = pytest.importorskip("nltk")
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = (list(rng.integers(0, 4, rng.integers(0, 8))) for _ in range(2))
        assert word_edits(a, b) == nltk.edit_distance(a, b)


class _Words:
    """A word tokenizer over the tiny vocabulary: ids 2..6 are the words w2..w6."""
    unk_id, pad_id = 1, 0

    def encode(self, text, count_unknown=False):
        ids = [int(w[1:]) for w in text.split()]
        return (ids, 0) if count_unknown else ids

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_latent_checks_agree_with_the_model_uses(monkeypatch):
    """latent_checks' batched homotopies equal ``interpolate`` run pair by pair, its reconstructions
    ``reconstruct``; its figures recomputed from those paths by hand (distinct sentences, word edits)."""
    from scratchlm.commands import textgen
    from scratchlm.commands.vae import latent_checks, word_edits
    monkeypatch.setattr(textgen, "boundary_id", lambda tokenizer: B_)
    model, words = tiny_vae(), _Words()
    model.eval()
    sentences = ["w2 w3 w4", "w5 w6", "w3 w3 w2 w6 w4", "w6", "w4 w4 w5", "w2 w6 w5 w3"]
    out = latent_checks(model, words, sentences, reconstructions=2, pairs=2, steps=4, seed=3)
    chosen = np.random.default_rng(3).choice(len(sentences), 6, replace=False)
    picked = [sentences[i] for i in chosen]
    recon = model.reconstruct(textgen.encode_sentences(words, picked[:2], "t")[1], boundary=B_)
    assert out["recon_exact"] == np.mean([r == words.encode(s) for r, s in zip(recon, picked[:2])])
    edits = sum(word_edits(r, words.encode(s)) for r, s in zip(recon, picked[:2]))
    assert out["recon_wer"] == edits / sum(len(s.split()) for s in picked[:2])
    distinct, steps, shares = [], [], []
    for p in range(2):
        a, b = picked[2 + 2 * p], picked[3 + 2 * p]
        path = model.interpolate(textgen.encode_sentences(words, [a, b], "t")[1], boundary=B_, steps=4)
        assert out["paths"][p] == {"a": a, "b": b, "path": [words.decode(s) for s in path]}
        distinct.append(len({tuple(s) for s in path}))
        moves = [word_edits(u, v) for u, v in zip(path, path[1:])]
        steps.append(np.mean(moves))
        if path[0] != path[-1]:
            shares.append(max(moves) / word_edits(path[0], path[-1]))
    assert out["path_distinct"] == np.mean(distinct) and 1 <= out["path_distinct"] <= 4
    np.testing.assert_allclose(out["step_edits"], np.mean(steps))
    if shares:
        np.testing.assert_allclose(out["largest_step_share"], np.mean(shares))


class _LengthCode:
    """A stand-in VAE with a 1-D code: mu = the sentence's word count; z decodes to round(z) words w2."""

    def posterior_mean(self, y):
        return ((np.asarray(y) != -100).sum(axis=1) - 1.0)[:, None]            # (B, 1)

    def decode_z(self, z, boundary, temperature=1.0):
        return [[2] * int(round(float(v))) for v in np.asarray(z)[:, 0]]


def test_latent_checks_by_hand(monkeypatch):
    """Figures worked out by hand for a code that keeps only a sentence's length."""
    from scratchlm.commands import textgen
    from scratchlm.commands.vae import latent_checks
    monkeypatch.setattr(textgen, "boundary_id", lambda tokenizer: B_)
    sentences = ["w2 w2", "w3", "w2", "w4 w4 w4 w4", "w5 w6", "w6 w5"]
    monkeypatch.setattr(np.random, "default_rng", lambda seed: type("Fixed", (), {
        "choice": lambda self, n, k, replace: np.arange(k)})())          # take the sentences in order
    out = latent_checks(_LengthCode(), _Words(), sentences, reconstructions=2, pairs=2, steps=4)
    # reconstructions: "w2 w2" -> w2 w2 (exact), "w3" -> w2 (1 substitution): WER 1/3, half exact
    assert out["recon_exact"] == 0.5 and out["recon_wer"] == 1 / 3
    # pair 1: lengths 1 -> 4: z = 1, 2, 3, 4 -> 1..4 words, each step 1 insertion; pair 2: 2 -> 2, still
    assert out["paths"][0]["path"] == ["w2", "w2 w2", "w2 w2 w2", "w2 w2 w2 w2"]
    assert out["path_distinct"] == (4 + 1) / 2 and out["step_edits"] == (1 + 0) / 2
    assert out["largest_step_edits"] == (1 + 0) / 2 and out["paths_with_middle"] == 0.5
    assert out["largest_step_share"] == 1 / 3                        # only pair 1's ends differ: 1 of 3 edits
    # ends: "w2" -> w2 (BLEU 100); "w4 w4 w4 w4", "w5 w6", "w6 w5" -> only w2s (BLEU 0)
    assert out["ends_bleu"] == pytest.approx(np.mean([100.0, 0.0, 0.0, 0.0]))


# ================================================================ whole-model gradient, the bidirectional encoder

def _directional_check(model, loss_fn, seed=0, eps=1e-6):
    """Central differences of loss_fn() along one random direction u over every parameter against
    the tape's <grad, u> (the random-direction check of tests/gradcheck.py, for a whole model)."""
    rng = np.random.default_rng(seed)
    params = list(model.parameters())
    model.zero_grad()
    loss_fn().backward()
    u = [rng.standard_normal(p.shape) for p in params]
    analytic = sum(float(np.sum(sl.backend.to_numpy(p.grad) * d)) for p, d in zip(params, u))
    start = [p.data.copy() for p in params]

    def at(step):
        for p, p0, d in zip(params, start, u):
            p.data[...] = p0 + step * d
        with sl.no_grad():
            return loss_fn().item()
    numeric = (at(eps) - at(-eps)) / (2 * eps)
    at(0.0)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_training_objective_gradient_finite_differences(float64, bidirectional):
    """The annealed, free-bits objective through encoder(s), reparameterisation, the decoder that
    reads z at its start and at every input, and the head: one directional derivative over all
    parameters. Word dropout, dropout and eps are redrawn from the same seed at every evaluation."""
    model = tiny_vae(n_layer=2, bidirectional=bidirectional, word_dropout=0.3, free_bits=0.4)

    def loss():
        sl.manual_seed(7)
        return model.training_loss(BATCH, it=10)[0]
    _directional_check(model, loss)


def test_bidirectional_encoder_reads_each_sentence_backwards_unpadded(float64):
    """Each row's code equals the one computed by hand from that sentence alone: the forward
    reader's output after b, the reverse reader's after w_1 of (b w_n .. w_1) -- the same in any
    batch, whatever the padding."""
    model = tiny_vae(bidirectional=True)
    model.eval()
    mu, logvar = (t.numpy() for t in model.encode(BATCH[1]))
    for r, words in enumerate([[2, 3, 4], [5, 6], [3, 3, 2, 6, 4]]):
        forward, _ = model.encoder(model.wte(sl.backend.to_device(np.array([words + [B_]]))))
        backward, _ = model.encoder_reverse(model.wte(sl.backend.to_device(np.array([[B_] + words[::-1]]))))
        h = np.concatenate([forward.numpy()[0, -1], backward.numpy()[0, -1]])
        np.testing.assert_allclose(mu[r], h @ model.to_mu.weight.numpy() + model.to_mu.bias.numpy(), rtol=1e-10)
        alone = model.encode(sentences([words])[1])[1].numpy()[0]
        np.testing.assert_allclose(logvar[r], alone, rtol=1e-10)
    config = VAEConfig(vocab_size=V, block_size=6, n_embd=4, n_hidden=5, n_latent=2, bidirectional=True)
    assert config.num_parameters() == sum(p.size for p in SentenceVAE(config).parameters())
