"""Latent-variable ops: the KL divergence of a diagonal Gaussian to N(0, I), and the
reparameterisation z = mu + sigma * eps. Both are what a VAE (models/vae.py) adds to an autoencoder.

The encoder gives, per example and latent dimension d, a mean mu_d and a log-variance
l_d = log sigma_d^2 (the log keeps sigma positive without a constraint). Shapes: (B, D).

GaussianKL -- KL(q || p) with q = N(mu, diag sigma^2), p = N(0, I), one term per dimension
-----------------------------------------------------------------------------------------
Derivation, one dimension (the dimensions are independent, so the KL is the sum over d):

    log q(z) = -1/2 log(2 pi) - 1/2 log sigma^2 - (z - mu)^2 / (2 sigma^2)
    log p(z) = -1/2 log(2 pi) - z^2 / 2
    KL = E_q[log q(z) - log p(z)]
       = -1/2 log sigma^2 - E_q[(z - mu)^2] / (2 sigma^2) + E_q[z^2] / 2
       = -1/2 log sigma^2 - sigma^2 / (2 sigma^2)        + (sigma^2 + mu^2) / 2     (E_q z^2 = var + mean^2)
       = 1/2 (mu^2 + sigma^2 - log sigma^2 - 1)

so KL = 1/2 sum_d (mu_d^2 + exp(l_d) - l_d - 1) >= 0, zero exactly at mu = 0, sigma = 1 (each
term is (x - 1 - log x)/2 + mu^2/2 with x = sigma^2, and x - 1 >= log x). The article wrote this
KL with the wrong terms; the two usual slips are dropping the -1 (then the prior's KL to itself is
D/2, not 0) and the sign of log sigma^2 (then it is unbounded below as sigma -> 0): tests/test_vae.py
pins 0 at the prior and the closed form against a Monte-Carlo estimate, which both slips fail.

Gradient (y_d = KL term of dimension d, g = dL/dy_d):

    dy/dmu = mu                    ->  dL/dmu = g mu
    dy/dl  = (exp(l) - 1) / 2      ->  dL/dl  = g (sigma^2 - 1) / 2

Saved: mu and sigma^2 = exp(l) (computed in the forward anyway; the backward needs nothing else).
The op returns the (B, D) terms, not their sum, so free bits (a floor per dimension) and the
active-unit count can look at each dimension; the model sums them.

Reparameterise -- z = mu + exp(l / 2) * eps, eps ~ N(0, I) drawn outside the op
--------------------------------------------------------------------------------
Sampling z ~ q directly has no gradient with respect to mu and l; writing the sample as a
deterministic function of (mu, l) and parameter-free noise eps moves the randomness into an
input, so the gradient flows (Kingma & Welling 2014):

    dz/dmu  = 1                    ->  dL/dmu  = g
    dz/dl   = eps exp(l/2) / 2     ->  dL/dl   = g sigma eps / 2 = g (z - mu) / 2
    dz/deps = exp(l/2)             ->  dL/deps = g sigma     (eps is an input like any other;
                                                               the VAE passes it without grad)

Saved: sigma = exp(l/2) and eps (their product is the logvar gradient's factor).
"""
from __future__ import annotations

from .. import backend
from ..tensor import Function


class GaussianKL(Function):
    """KL terms (B, D) of N(mu, exp(logvar)) to N(0, 1), per dimension: 1/2 (mu^2 + e^l - l - 1).
    See the module docstring for the derivation and the gradient."""

    @staticmethod
    def forward(mu, logvar):
        var = backend.xp.exp(logvar)                                         # sigma^2, (B, D)
        return 0.5 * (mu * mu + var - logvar - 1.0), (mu, var)

    @staticmethod
    def backward(g, saved):
        mu, var = saved
        return g * mu, g * (0.5 * (var - 1.0))


class Reparameterise(Function):
    """z = mu + exp(logvar / 2) * eps: the sample of N(mu, diag exp(logvar)) that eps ~ N(0, I) gives.
    See the module docstring for the gradient."""

    @staticmethod
    def forward(mu, logvar, eps):
        sigma = backend.xp.exp(0.5 * logvar)                                 # (B, D)
        return mu + sigma * eps, (sigma, eps)

    @staticmethod
    def backward(g, saved):
        sigma, eps = saved
        return g, g * (0.5 * sigma * eps), g * sigma


def gaussian_kl(mu, logvar):
    """The (B, D) KL terms of q = N(mu, diag exp(logvar)) to N(0, I); sum over D for the KL of a row."""
    return GaussianKL.apply(mu, logvar)


def reparameterise(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps (B, D); eps a (B, D) array or Tensor of standard normal draws."""
    return Reparameterise.apply(mu, logvar, eps)
