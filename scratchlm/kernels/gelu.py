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
from scratchlm.kernels.attention import _exp_shifted as exp_shifted


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
    """Same contract as ``forward_reference``: one fused pass.

    Tanh form: 0.5 x (1 + tanh u) = x sigmoid(2u) = x / (1 + exp(-2u)), with exp from the
    branch-free polynomial of kernels/attention.py for float32 (libm's expf or tanhf called one
    element at a time are slow; NumPy's vectorised tanh needs ~6 temporaries around it).
    The exact form needs erf, which NumPy lacks, so it runs in a Numba loop too.
    """
    _check_approximate(approximate)
    if x.dtype not in (np.float32, np.float64):
        return forward_reference(x, approximate)
    flat = np.ascontiguousarray(x).reshape(-1)
    if approximate == "tanh":
        return _gelu_tanh_kernel(flat, flat, False, x.dtype == np.float32).reshape(x.shape)
    return _gelu_erf_forward_kernel(flat).reshape(x.shape)


def backward_numba(dy, x, approximate: str = "none"):
    """Same contract as ``backward_reference``: one fused pass instead of NumPy's ~10 temporaries."""
    _check_approximate(approximate)
    if x.dtype not in (np.float32, np.float64) or dy.dtype != x.dtype:
        return backward_reference(dy, x, approximate)
    flat_x = np.ascontiguousarray(x).reshape(-1)
    flat_dy = np.ascontiguousarray(dy).reshape(-1)
    if approximate == "tanh":
        return _gelu_tanh_kernel(flat_dy, flat_x, True, x.dtype == np.float32).reshape(x.shape)
    return _gelu_erf_backward_kernel(flat_dy, flat_x).reshape(x.shape)


# Elements per chunk of the tanh kernel: its scratch rows (e and the exp's bit patterns) stay in L1.
TANH_CHUNK = 1024


# Serial on purpose: on the 2-core development machine a prange version of this loop ran 2-3x
# slower (0.5-1.0 ms against 0.26 ms at (768, 512) float32): the parallel body did not vectorise.
@njit(cache=True, error_model="numpy")
def _gelu_tanh_kernel(dy, x, backward, fast):
    """x flat (M,) -> y = x s (forward), or dy, x -> dx = dy gelu'(x) (backward), s = sigmoid(2u).

    With u = sqrt(2/pi) (x + 0.044715 x^3), e = exp(-2u) and s = 1 / (1 + e):
    0.5 (1 + t) = s and 0.5 (1 - t^2) = 2 s (1 - s) = 2 s^2 e, so

        y = x s,    gelu'(x) = s + 2 x s^2 e du/dx,    du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).

    Unlike 1 - t^2 with t ~ -1 in float32, nothing here cancels, so the float32 result keeps
    its relative precision in the tails. u is clamped to [-40, 40] so e stays finite (gelu'
    there is 0 or 1 to float precision anyway). ``dy`` is ignored in the forward.
    """
    out = np.empty_like(x)
    # Constants in x's dtype: a Python float literal would turn float32 arithmetic into float64,
    # which halves the SIMD width and makes the division scalar.
    # error_model="numpy": a division follows IEEE (no Python ZeroDivisionError check per
    # element, which kept the division loops from vectorising; 1 + e >= 1 here anyway).
    constants = np.empty(7, dtype=x.dtype)
    constants[0], constants[1], constants[2] = 0.0, 1.0, 2.0
    constants[3], constants[4], constants[5] = SQRT_2_OVER_PI, TANH_CUBIC, 40.0
    constants[6] = 3.0 * TANH_CUBIC
    zero, one, two = constants[0], constants[1], constants[2]
    sqrt_2_over_pi, cubic, u_limit, three_cubic = constants[3], constants[4], constants[5], constants[6]
    n_chunks = (x.size + TANH_CHUNK - 1) // TANH_CHUNK
    e = np.empty(TANH_CHUNK, dtype=x.dtype)
    bits = np.empty(TANH_CHUNK, dtype=np.int32)
    for chunk in range(n_chunks):
        start = chunk * TANH_CHUNK
        count = min(TANH_CHUNK, x.size - start)
        for n in range(count):
            value = x[start + n]
            u = sqrt_2_over_pi * (value + cubic * value * value * value)
            e[n] = -two * min(max(u, -u_limit), u_limit)
        exp_shifted(e, count, zero, fast, bits)                     # e = exp(-2u)
        if backward:
            for n in range(count):
                value = x[start + n]
                s = one / (one + e[n])
                du_dx = sqrt_2_over_pi * (one + three_cubic * value * value)
                out[start + n] = dy[start + n] * (s + two * value * s * s * e[n] * du_dx)
        else:
            for n in range(count):
                out[start + n] = x[start + n] / (one + e[n])
    return out


@njit(parallel=True, cache=True)
def _gelu_erf_forward_kernel(x):
    """x flat (M,) -> y = x Phi(x) (M,), elementwise, in parallel."""
    y = np.empty_like(x)
    for n in prange(x.size):
        value = x[n]
        y[n] = 0.5 * value * (1.0 + math.erf(value * INV_SQRT_2))
    return y


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
    rung = pick(x, "gelu")
    if rung == "cuda":
        kernel = cuda_kernel("gelu_forward")
        if kernel is not None:
            return kernel(x, approximate)
    elif rung == "numba":
        return forward_numba(x, approximate)
    return forward_reference(x, approximate)


def backward(dy, x, approximate: str = "none"):
    """dx on the fastest rung for ``x`` (see ``forward``)."""
    rung = pick(x, "gelu")
    if rung == "cuda":
        kernel = cuda_kernel("gelu_backward")
        if kernel is not None:
            return kernel(dy, x, approximate)
    elif rung == "numba":
        return backward_numba(dy, x, approximate)
    return backward_reference(dy, x, approximate)
