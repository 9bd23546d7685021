"""Layer norm over the last axis: the reference, a fused Numba kernel, and dispatch.

Shapes: x, y, dy, dx (N, C) (N rows, e.g. N = B*T, of C features); weight, bias (C,); mean, rstd (N,).

Forward, for one row x (C values):

    mean = (1/C) sum_c x_c
    rstd = 1 / sqrt((1/C) sum_c (x_c - mean)^2 + eps)
    xhat_c = (x_c - mean) * rstd
    y_c = xhat_c * w_c + b_c                  (no affine part: y = xhat)

Backward, with g_c = dy_c * w_c (g = dy without affine). xhat depends on every x_c through mean and
rstd; differentiating and collecting terms gives the three-term form

    dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
    dw = sum over rows of dy * xhat,   db = sum over rows of dy

Only mean and rstd are saved; xhat is recomputed from x in the backward (one row of C values is
cheap to recompute, a whole (N, C) copy is not cheap to keep).
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm import backend
from scratchlm.kernels import cuda_kernel, njit, pick


# ============================================================== 1. reference (the truth)

def forward_reference(x, weight, bias, eps: float):
    """(y, mean, rstd) for x (N, C); weight/bias (C,) or None."""
    xp = backend.xp
    mean = xp.mean(x, axis=-1)                                   # (N,)
    centered = x - mean[:, None]                                 # (N, C)
    rstd = 1.0 / xp.sqrt(xp.mean(centered * centered, axis=-1) + eps)   # (N,)
    y = centered * rstd[:, None]                                 # xhat (N, C)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, mean, rstd


def backward_reference(dy, x, weight, mean, rstd):
    """(dx, dweight, dbias) by the three-term formula; dweight/dbias are None if weight is None."""
    xp = backend.xp
    xhat = (x - mean[:, None]) * rstd[:, None]                   # recomputed (N, C)
    g = dy * weight if weight is not None else dy                # dL/dxhat (N, C)
    dx = rstd[:, None] * (g - xp.mean(g, axis=-1, keepdims=True)
                          - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    if weight is None:
        return dx, None, None
    dweight = xp.sum(dy * xhat, axis=0)                          # (C,)
    dbias = xp.sum(dy, axis=0)                                   # (C,)
    return dx, dweight, dbias


# ============================================================== 2. Numba (CPU)

def forward_numba(x, weight, bias, eps: float):
    """One pass per row; same contract as ``forward_reference``."""
    if _layer_norm_forward_kernel is None or x.dtype not in (np.float32, np.float64) or x.ndim != 2:
        return forward_reference(x, weight, bias, eps)
    return _layer_norm_forward_kernel(np.ascontiguousarray(x), *_affine(weight, bias, x), eps)


def backward_numba(dy, x, weight, mean, rstd):
    """One serial pass over the rows: dx row by row, dweight and dbias summed along the way."""
    if (_layer_norm_backward_kernel is None or x.dtype not in (np.float32, np.float64)
            or x.ndim != 2 or dy.dtype != x.dtype):
        return backward_reference(dy, x, weight, mean, rstd)
    w, _ = _affine(weight, None, x)
    dx, dweight, dbias = _layer_norm_backward_kernel(
        np.ascontiguousarray(dy), np.ascontiguousarray(x), w,
        np.ascontiguousarray(mean, dtype=x.dtype), np.ascontiguousarray(rstd, dtype=x.dtype))
    if weight is None:
        return dx, None, None
    return dx, dweight, dbias


def _affine(weight, bias, x):
    """Numba wants concrete arrays: ones/zeros stand in for an absent weight/bias."""
    channels = x.shape[1]
    w = np.ones(channels, x.dtype) if weight is None else np.ascontiguousarray(weight, dtype=x.dtype)
    b = np.zeros(channels, x.dtype) if bias is None else np.ascontiguousarray(bias, dtype=x.dtype)
    return w, b


# Sums over a row may be reassociated ("reassoc") so LLVM can vectorise them, and a*b+c may be
# fused ("contract"). Deliberately not the rest of fastmath: no-NaN/no-inf assumptions would let
# LLVM delete NaN checks, and a NaN in the input must come out as a NaN in the output.
_ROW_MATH = {"reassoc", "contract"}

# Serial on purpose: on the 2-core development machine the prange versions of both kernels ran
# 3-5x slower than these plain loops at (768, 128) float32 (forward 0.17 -> 0.06 ms, backward
# 0.33 -> 0.07 ms) and still slower at 16x the rows: the parallel loop bodies did not vectorise
# as well, and one row is too little work to pay for handing it to another thread.


@njit(cache=True, fastmath=_ROW_MATH, error_model="numpy")
def _layer_norm_forward_kernel(x, weight, bias, eps):
    """x (N, C), weight and bias (C,) -> y (N, C), mean (N,), rstd (N,); one row at a time.

    Mean and variance are accumulated in float64 (two passes over the row: the centred second
    pass avoids the cancellation of E[x^2] - E[x]^2).
    """
    rows, channels = x.shape
    y = np.empty_like(x)
    mean = np.empty(rows, dtype=x.dtype)
    rstd = np.empty(rows, dtype=x.dtype)
    for r in range(rows):
        total = 0.0
        for c in range(channels):
            total += x[r, c]
        row_mean = total / channels
        squares = 0.0
        for c in range(channels):
            centred = x[r, c] - row_mean
            squares += centred * centred
        row_rstd = 1.0 / math.sqrt(squares / channels + eps)
        mean[r] = row_mean
        rstd[r] = row_rstd
        for c in range(channels):
            y[r, c] = (x[r, c] - row_mean) * row_rstd * weight[c] + bias[c]
    return y, mean, rstd


@njit(cache=True, fastmath=_ROW_MATH, error_model="numpy")
def _layer_norm_backward_kernel(dy, x, weight, mean, rstd):
    """dy, x (N, C), weight (C,), mean and rstd (N,) -> dx (N, C), dweight (C,), dbias (C,).

    Per row, with xhat = (x - mean) rstd and g = dy * weight:
        dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)),
    and dweight = sum over rows of dy xhat, dbias = sum over rows of dy.
    """
    rows, channels = x.shape
    dx = np.empty_like(x)
    dweight = np.zeros(channels, dtype=x.dtype)
    dbias = np.zeros(channels, dtype=x.dtype)
    for r in range(rows):
        row_mean = mean[r]
        row_rstd = rstd[r]
        g_total = 0.0            # sum_c g_c
        g_xhat_total = 0.0       # sum_c g_c xhat_c
        for c in range(channels):
            xhat = (x[r, c] - row_mean) * row_rstd
            g = dy[r, c] * weight[c]
            g_total += g
            g_xhat_total += g * xhat
            dweight[c] += dy[r, c] * xhat
            dbias[c] += dy[r, c]
        g_mean = g_total / channels
        g_xhat_mean = g_xhat_total / channels
        for c in range(channels):
            xhat = (x[r, c] - row_mean) * row_rstd
            dx[r, c] = row_rstd * (dy[r, c] * weight[c] - g_mean - xhat * g_xhat_mean)
    return dx, dweight, dbias


# ============================================================== dispatch

def forward(x, weight, bias, eps: float):
    """(y, mean, rstd) on the fastest rung for ``x``: CUDA for CuPy, Numba for NumPy, else reference."""
    rung = pick(x, "layer_norm")
    if rung == "cuda":
        kernel = cuda_kernel("layer_norm_forward")
        if kernel is not None:
            return kernel(x, weight, bias, eps)
    elif rung == "numba":
        return forward_numba(x, weight, bias, eps)
    return forward_reference(x, weight, bias, eps)


def backward(dy, x, weight, mean, rstd):
    """(dx, dweight, dbias) on the fastest rung for ``x`` (see ``forward``)."""
    rung = pick(x, "layer_norm")
    if rung == "cuda":
        kernel = cuda_kernel("layer_norm_backward")
        if kernel is not None:
            return kernel(dy, x, weight, mean, rstd)
    elif rung == "numba":
        return backward_numba(dy, x, weight, mean, rstd)
    return backward_reference(dy, x, weight, mean, rstd)


# ============================================================== the residual add fused in front

def add_forward(x, residual, weight, bias, eps: float):
    """(s, y, mean, rstd) for s = x + residual (N, C) and y the layer norm of s (``forward``'s
    contract otherwise). The CUDA rung adds in the row kernel's first pass (one read of x and
    residual, s written once); the others make s with one array add, then ``forward``."""
    if pick(x, "layer_norm") == "cuda":
        kernel = cuda_kernel("add_layer_norm_forward")
        if kernel is not None:
            return kernel(x, residual, weight, bias, eps)
    s = x + residual                                             # (N, C)
    return (s, *forward(s, weight, bias, eps))


def add_backward(ds, dy, s, weight, mean, rstd):
    """(dL/ds, dweight, dbias) with dL/ds = ds + the layer norm's dx (``backward``); ``ds`` (N, C)
    is the gradient that reaches s directly, or None."""
    if pick(s, "layer_norm") == "cuda":
        kernel = cuda_kernel("add_layer_norm_backward")
        if kernel is not None:
            return kernel(ds, dy, s, weight, mean, rstd)
    d_sum, dweight, dbias = backward(dy, s, weight, mean, rstd)
    if ds is not None:
        d_sum += ds                                              # (N, C); backward's dx is a new array
    return d_sum, dweight, dbias
