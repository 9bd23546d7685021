"""GELU, exact (erf) and tanh-approximated: the reference, a Numba kernel, and dispatch.

Shapes: x, y, dy, dx any shape (elementwise), typically (B, T, 4C).

Exact ("none"): with Phi the standard normal CDF and phi its density,

    y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
    dy/dx = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

Tanh approximation ("tanh", GPT-2's): with u = sqrt(2/pi) (x + 0.044715 x^3) and t = tanh u,

    y = 0.5 x (1 + t)
    dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

Nothing is saved but x; the backward recomputes t (or Phi).
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm import backend
from scratchlm.kernels import cuda_kernel, njit, pick, prange


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
TANH_CUBIC = 0.044715
APPROXIMATIONS = ("none", "tanh")


def _check_approximate(approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gelu approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


# ============================================================== 1. reference (the truth)

def _erf(x):
    """Elementwise erf on a backend array. NumPy has no erf, so the reference borrows it:
    CuPy's from cupyx.scipy.special, SciPy's when installed, else Python's math.erf per element
    (exact and slow; the Numba kernel is the fast CPU path)."""
    xp = backend.xp
    if type(x).__module__.startswith("cupy"):
        from cupyx.scipy.special import erf
        return erf(x)
    try:
        from scipy.special import erf
        return erf(x).astype(x.dtype, copy=False)
    except ImportError:
        return xp.asarray(np.vectorize(math.erf, otypes=[x.dtype])(backend.to_numpy(x)))


def forward_reference(x, approximate: str = "none"):
    """y = gelu(x), exact or tanh-approximated."""
    _check_approximate(approximate)
    xp = backend.xp
    if approximate == "tanh":
        t = xp.tanh(SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x))
        return 0.5 * x * (1.0 + t)
    return 0.5 * x * (1.0 + _erf(x * INV_SQRT_2))


def backward_reference(dy, x, approximate: str = "none"):
    """dx = dy * gelu'(x)."""
    _check_approximate(approximate)
    xp = backend.xp
    if approximate == "tanh":
        t = xp.tanh(SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x))
        du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
    cdf = 0.5 * (1.0 + _erf(x * INV_SQRT_2))                     # Phi(x)
    pdf = INV_SQRT_2PI * xp.exp(-0.5 * x * x)                    # phi(x)
    return dy * (cdf + x * pdf)


# ============================================================== 2. Numba (CPU)

def forward_numba(x, approximate: str = "none"):
    """Same contract as ``forward_reference``.

    The tanh form stays on NumPy: its tanh is SIMD-vectorised, while a Numba loop calls libm's
    tanh one element at a time (measured: ~1 ms against ~4 ms for (768, 512) float32). The exact
    form needs erf, which NumPy lacks, so it runs in the Numba loop.
    """
    _check_approximate(approximate)
    if approximate == "tanh" or _gelu_erf_forward_kernel is None or x.dtype not in (np.float32, np.float64):
        return forward_reference(x, approximate)
    flat = np.ascontiguousarray(x).reshape(-1)
    return _gelu_erf_forward_kernel(flat).reshape(x.shape)


def backward_numba(dy, x, approximate: str = "none"):
    """Same contract as ``backward_reference``: one fused pass instead of NumPy's ~10 temporaries.

    For the tanh form the one transcendental, exp(-2u), comes from NumPy's vectorised exp and
    the rest of dx = dy * gelu'(x) is fused into one loop (libm calls per element are slow).
    """
    _check_approximate(approximate)
    if _gelu_tanh_backward_kernel is None or x.dtype not in (np.float32, np.float64) or dy.dtype != x.dtype:
        return backward_reference(dy, x, approximate)
    flat_x = np.ascontiguousarray(x).reshape(-1)
    flat_dy = np.ascontiguousarray(dy).reshape(-1)
    if approximate == "tanh":
        # e = exp(-2u) from NumPy's vectorised exp; u is clamped to [-40, 40] so e stays finite
        # (gelu' there is 0 or 1 to float precision anyway)
        u = SQRT_2_OVER_PI * (flat_x + TANH_CUBIC * flat_x * flat_x * flat_x)
        e = np.exp(-2.0 * np.clip(u, -40.0, 40.0))
        return _gelu_tanh_backward_kernel(flat_dy, flat_x, e).reshape(x.shape)
    return _gelu_erf_backward_kernel(flat_dy, flat_x).reshape(x.shape)


@njit(parallel=True, cache=True)
def _gelu_erf_forward_kernel(x):
    """x flat (M,) -> y = x Phi(x) (M,), elementwise, in parallel."""
    y = np.empty_like(x)
    for n in prange(x.size):
        value = x[n]
        y[n] = 0.5 * value * (1.0 + math.erf(value * INV_SQRT_2))
    return y


@njit(parallel=True, cache=True)
def _gelu_tanh_backward_kernel(dy, x, e):
    """dy, x, e = exp(-2u(x)) flat (M,) -> dx = dy * gelu'(x) (M,).

    With s = 1 / (1 + e) = sigmoid(2u): 0.5 (1 + t) = s and 0.5 (1 - t^2) = 2 s (1 - s) = 2 s^2 e,
    so gelu'(x) = s + 2 x s^2 e du/dx. Unlike 1 - t^2 with t ~ -1 in float32, nothing here
    cancels, so the float32 result keeps its relative precision in the tails.
    """
    dx = np.empty_like(x)
    for n in prange(x.size):
        value = x[n]
        s = 1.0 / (1.0 + e[n])
        du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * value * value)
        dx[n] = dy[n] * (s + 2.0 * value * s * s * e[n] * du_dx)
    return dx


@njit(parallel=True, cache=True)
def _gelu_erf_backward_kernel(dy, x):
    """dy, x flat (M,) -> dx = dy * (Phi(x) + x phi(x)) (M,), elementwise, in parallel."""
    dx = np.empty_like(x)
    for n in prange(x.size):
        value = x[n]
        cdf = 0.5 * (1.0 + math.erf(value * INV_SQRT_2))
        dx[n] = dy[n] * (cdf + value * INV_SQRT_2PI * math.exp(-0.5 * value * value))
    return dx


# ============================================================== dispatch

def forward(x, approximate: str = "none"):
    """y = gelu(x) on the fastest rung for ``x``: CUDA for CuPy, Numba for NumPy, else reference."""
    rung = pick(x)
    if rung == "cuda":
        kernel = cuda_kernel("gelu_forward")
        if kernel is not None:
            return kernel(x, approximate)
    elif rung == "numba":
        return forward_numba(x, approximate)
    return forward_reference(x, approximate)


def backward(dy, x, approximate: str = "none"):
    """dx on the fastest rung for ``x`` (see ``forward``)."""
    rung = pick(x)
    if rung == "cuda":
        kernel = cuda_kernel("gelu_backward")
        if kernel is not None:
            return kernel(dy, x, approximate)
    elif rung == "numba":
        return backward_numba(dy, x, approximate)
    return backward_reference(dy, x, approximate)
