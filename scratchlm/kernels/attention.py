"""Scaled dot-product attention: the reference, a FlashAttention-style Numba kernel, and dispatch.

Shapes: q (B, H, Tq, D); k, v (B, H, Tk, D); o (B, H, Tq, D); lse (B, H, Tq). Usually Tq == Tk == T.

Forward, for one (batch, head) and query row i:

    s_ij = scale * q_i . k_j                  for the keys j that row i may see
    lse_i = log sum_j exp(s_ij)               (log-sum-exp of the row)
    p_ij = exp(s_ij - lse_i)                  (softmax; rows sum to 1)
    o_i = sum_j p_ij v_j

Causal: row i sees keys j <= i + (Tk - Tq) (bottom-right aligned, so a query block of the last
Tq positions against a KV cache of Tk keys is causal too; with Tq == Tk this is j <= i). Masked
scores are -inf, never a finite constant, so masked keys get exactly zero weight.

Backward, given dO = dL/do, with P recomputed from q, k and the saved lse:

    dV = P^T dO                                (o = P V)
    dP = dO V^T
    dS = P * (dP - delta),  delta_i = sum_j p_ij dP_ij = dO_i . o_i    (softmax backward)
    dQ = scale dS K,  dK = scale dS^T Q       (s = scale Q K^T)

The reference materialises the (Tq, Tk) score matrix: it is short and readable, and its memory
grows as T^2. The Numba kernel never does: it walks key blocks with an online softmax (running
row max m and running sum l, rescaling the output accumulator when m grows), keeps only lse for
the backward, and skips key blocks that are entirely in the causal future; its memory is linear
in T.
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm import backend
from scratchlm.kernels import pick

try:  # Numba is optional: without it the package imports and the reference runs.
    import numba
    from numba import prange
    _njit = numba.njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    prange = range

    def _njit(*args, **kwargs):
        return lambda function: function


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ============================================================== 1. reference (the truth)

def forward_reference(q, k, v, causal: bool, scale: float | None = None):
    """o = softmax(scale q k^T + mask) v and lse = per-row log-sum-exp; materialises (Tq, Tk).

    q (B, H, Tq, D), k and v (B, H, Tk, D) -> o (B, H, Tq, D), lse (B, H, Tq).
    """
    xp = backend.xp
    scale = _default_scale(q, scale)
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale              # (B, H, Tq, Tk)
    if causal:
        scores = xp.where(_causal_allowed(q.shape[-2], k.shape[-2]), scores,
                          xp.asarray(-xp.inf, dtype=scores.dtype))
    row_max = xp.max(scores, axis=-1, keepdims=True)                     # (B, H, Tq, 1)
    lse = row_max[..., 0] + xp.log(xp.sum(xp.exp(scores - row_max), axis=-1))   # (B, H, Tq)
    probs = xp.exp(scores - lse[..., None])                              # (B, H, Tq, Tk)
    out = xp.matmul(probs, v)                                            # (B, H, Tq, D)
    return out, lse


def backward_reference(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """(dq, dk, dv) from do = dL/do, recomputing P = exp(scale q k^T + mask - lse)."""
    xp = backend.xp
    scale = _default_scale(q, scale)
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale              # (B, H, Tq, Tk)
    if causal:
        scores = xp.where(_causal_allowed(q.shape[-2], k.shape[-2]), scores,
                          xp.asarray(-xp.inf, dtype=scores.dtype))
    probs = xp.exp(scores - lse[..., None])                              # P, masked -> exactly 0
    dv = xp.matmul(xp.swapaxes(probs, -1, -2), do)                      # P^T dO   (B, H, Tk, D)
    dprobs = xp.matmul(do, xp.swapaxes(v, -1, -2))                      # dO V^T   (B, H, Tq, Tk)
    delta = xp.sum(do * o, axis=-1, keepdims=True)                       # rowsum(dO * O) (B, H, Tq, 1)
    dscores = probs * (dprobs - delta)                                   # dS
    dq = xp.matmul(dscores, k) * scale                                   # (B, H, Tq, D)
    dk = xp.matmul(xp.swapaxes(dscores, -1, -2), q) * scale              # (B, H, Tk, D)
    return dq, dk, dv


def _causal_allowed(t_query: int, t_key: int):
    """(Tq, Tk) bool: query i may see key j iff j <= i + (Tk - Tq)."""
    xp = backend.xp
    offset = t_key - t_query
    return xp.arange(t_key)[None, :] <= xp.arange(t_query)[:, None] + offset


# ============================================================== 2. Numba (CPU)

def forward_numba(q, k, v, causal: bool, scale: float | None = None):
    """The tiled online-softmax kernel below; same contract as ``forward_reference``."""
    scale = _default_scale(q, scale)
    q3, k3, v3 = _as_heads(q), _as_heads(k), _as_heads(v)
    if (_attention_forward_kernel is None or q3 is None or k3 is None or v3 is None
            or not (q.dtype == k.dtype == v.dtype)):
        return forward_reference(q, k, v, causal, scale)
    out, lse = _attention_forward_kernel(q3, k3, v3, bool(causal), q.dtype.type(scale))
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward_numba(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """dq, dk, dv by the two-level tiled kernel below; same contract as ``backward_reference``."""
    scale = _default_scale(q, scale)
    arrays = [_as_heads(a) for a in (do, q, k, v, o)]
    if (_attention_backward_kernel is None or any(a is None for a in arrays)
            or len({a.dtype for a in arrays}) != 1):
        return backward_reference(do, q, k, v, o, lse, causal, scale)
    do3, q3, k3, v3, o3 = arrays
    lse2 = np.ascontiguousarray(lse, dtype=q.dtype).reshape(q3.shape[0], q3.shape[1])
    dq, dk, dv = _attention_backward_kernel(do3, q3, k3, v3, o3, lse2, bool(causal),
                                            q.dtype.type(scale))
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def _as_heads(array):
    """(B, H, T, D) float32/float64 -> a C-contiguous (B*H, T, D) view or copy; None otherwise."""
    if array.dtype not in (np.float32, np.float64) or array.ndim < 2:
        return None
    return np.ascontiguousarray(array).reshape(-1, array.shape[-2], array.shape[-1])


_attention_forward_kernel = None   # filled in below
_attention_backward_kernel = None


# ============================================================== dispatch

def _cuda_kernel(name: str):
    try:
        from scratchlm.kernels import cuda as cuda_module
    except Exception:   # no CuPy, no GPU, or the CUDA half is absent: use the reference
        return None
    return getattr(cuda_module, name, None)


def forward(q, k, v, causal: bool, scale: float | None = None):
    """(o, lse) on the fastest rung for ``q``: CUDA for CuPy, Numba for NumPy, else the reference."""
    rung = pick(q)
    if rung == "cuda":
        kernel = _cuda_kernel("attention_forward")
        if kernel is not None:
            return kernel(q, k, v, causal, scale)
    elif rung == "numba":
        return forward_numba(q, k, v, causal, scale)
    return forward_reference(q, k, v, causal, scale)


def backward(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """(dq, dk, dv) on the fastest rung for ``q`` (see ``forward``)."""
    rung = pick(q)
    if rung == "cuda":
        kernel = _cuda_kernel("attention_backward")
        if kernel is not None:
            return kernel(do, q, k, v, o, lse, causal, scale)
    elif rung == "numba":
        return backward_numba(do, q, k, v, o, lse, causal, scale)
    return backward_reference(do, q, k, v, o, lse, causal, scale)
