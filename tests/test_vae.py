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
