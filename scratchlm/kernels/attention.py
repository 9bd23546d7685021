"""Scaled dot-product attention: the ladder of rungs and the dispatch.

1. ``attention_reference``: the reference on ``backend.xp`` (the math, masks included, is in its
   docstring);
2a. ``attention_tiled``: a FlashAttention-style tiled Numba kernel, BLAS-free;
2b. here: a batched-BLAS path for short sequences (``forward_batched_numba``: materialises the
   (T, T) scores, which is cheap there);
2c. ``attention_strips``: a batched-BLAS path for long ones (``forward_strips_blas``: the same
   BLAS matmuls and Numba softmax passes, one strip of STRIP_Q query rows at a time, so memory
   stays linear in T; chunks of heads on several threads, ``attention_threads``);
3. ``cuda.attention_forward/backward`` (CuPy), causal mask only.

Dispatch on the Numba rung: batched BLAS up to ``BATCHED_MAX_SCORES`` scores per head, else
strips. Masks: the 2b and 2c softmax passes skip ``blocked`` keys (key padding and boolean
attention masks); the tiled kernel and the CUDA kernel know only the causal mask, so masked calls
that would reach them run the reference. Every public name of the rung modules is importable
from here. Causal masks are bottom-right aligned on every rung: with Tq < Tk, query i sees keys
j <= i + Tk - Tq (a chunk of new queries over a filled KV cache).

The softmax row passes that 2b and 2c share are in ``attention_rows``.

Speed (bench/attention.py --quick, B=4, H=4, D=64, causal, float32, forward+backward, 2-core
development machine): the last quiet measurement before the head chunks gave the strip path
107.7 / 322.5 ms at T = 1024 / 2048 with 2 threads against 106.6 / 267.9 ms for torch SDPA
(OpenBLAS threading each small strip matmul), 152.9 / 631.1 ms at one thread. At T = 2048 the
time is 7 matmuls of ~70 ms each at one thread (OpenBLAS at ~65 GFLOP/s on shapes with depth
D = 64 or 128), ~10 ms of passes and ~11 ms of dK/dV accumulation. Chunks of one head per thread
(BLAS at one thread in each) and P kept at T = 1024 then gave, on the loaded shared machine
(load 5-6, same process, interleaved, medians): 2 threads 302 / 1072 ms against SDPA's
374 / 1570 (1.24x / 1.46x wall, 1.39x / 1.12x process CPU); one thread 1.24x / 1.14x.
Inference prefill never builds a (T, T) matrix on this rung: above BATCHED_MAX_SCORES the
forward holds one (heads, STRIP_Q, T) strip of scores per thread at a time.
"""
from __future__ import annotations

import numpy as np

from scratchlm.kernels import cuda_kernel, numba_path, pick
from scratchlm.kernels.attention_reference import (  # noqa: F401  (the reference rung, re-exported)
    _causal_allowed, _default_scale, _masked_scores, backward_reference, blocked_keys, forward_reference,
    probs_reference)
from scratchlm.kernels.attention_tiled import (  # noqa: F401  (the tiled rung, re-exported)
    BLOCK_K, BLOCK_Q, _as_heads, _exp_shifted, backward_numba, forward_numba)
from scratchlm.kernels.attention_strips import (  # noqa: F401  (the strip rung, re-exported)
    KEPT_PROBS_MAX_BYTES, STRIP_Q, StripProbs, backward_strips_blas, forward_strips_blas)
from scratchlm.kernels.attention_rows import (  # noqa: F401  (the row passes of 2b and 2c)
    _blocked_rows, _exp2_float32, _scaled_row_max, _softmax_backward_rows_kernel, _softmax_rows_kernel)


# ============================================================== 2b. Numba + batched BLAS (small T)

# At short sequences the tiled kernel's row-at-a-time loops run at ~16 GFLOP/s while a batched
# BLAS matmul over the (B*H) stack of (T x T) score matrices runs several times faster, and the
# materialised scores are small: (B, H, T, T) float32 is 0.8 MB at B*H = 48, T = 64. Up to this
# many score entries per head the dispatcher takes the batched path. Measured at B*H = 48,
# T = 64, D = 32 float32 on 2 cores: forward 0.85 -> 0.67 ms, backward 1.3-2.1 -> 1.06 ms
# standalone; in the nano-cpu training step (q, k, v are strided views of one qkv projection,
# which the BLAS path reads in place) attention went from ~20 to ~13 ms per step.
# The Numba passes are serial: parallel versions were no faster on the 2-core machine.
BATCHED_MAX_SCORES = 128 * 128


def forward_batched_numba(q, k, v, causal: bool, scale: float | None = None, blocked=None,
                          keep_probs: bool = False):
    """Same contract as ``forward_reference``, for short T: BLAS matmuls around a Numba softmax.

        S = Q K^T (batched BLAS),  P, lse = masked softmax of scale * S (Numba, in place),
        O = P V (batched BLAS).

    ``keep_probs=True`` also returns P (B, H, Tq, Tk), so a training step can hand it to
    ``backward_batched_numba`` instead of recomputing it (it is small at these T).
    ``blocked`` as in ``forward_reference``: blocked keys are skipped by the softmax pass.
    """
    scale = _default_scale(q, scale)
    if q.dtype not in (np.float32, np.float64) or not (q.dtype == k.dtype == v.dtype):
        return forward_reference(q, k, v, causal, scale, blocked, keep_probs=keep_probs)
    t_query, t_key = q.shape[-2], k.shape[-2]
    scores = np.matmul(q, np.swapaxes(k, -1, -2))                       # (B, H, Tq, Tk)
    lse = _softmax_rows_kernel(scores.reshape(-1, t_query, t_key), bool(causal),
                               q.dtype.type(scale), q.dtype == np.float32,
                               _blocked_rows(blocked), q.shape[1], 0, 0)  # scores -> P
    out = np.matmul(scores, v)                                           # (B, H, Tq, D)
    if keep_probs:
        return out, lse.reshape(q.shape[:-1]), scores
    return out, lse.reshape(q.shape[:-1])


def backward_batched_numba(do, q, k, v, o, lse, causal: bool, scale: float | None = None, blocked=None,
                           probs=None):
    """Same contract as ``backward_reference``, for short T: five BLAS matmuls and one Numba pass.

        S = Q K^T, dP = dO V^T (batched BLAS);  P = exp(scale S - lse) and
        dS' = scale P (dP - delta), delta_i = dO_i . o_i (Numba, in place);
        dV = P^T dO, dQ = dS' K, dK = dS'^T Q (batched BLAS).
    ``probs``: P as ``forward_batched_numba(..., keep_probs=True)`` returned it; then S and P
    are not recomputed (one matmul and the exps fewer). It is only read. ``blocked``: as the forward's.
    """
    scale = _default_scale(q, scale)
    if len({a.dtype for a in (do, q, k, v, o)}) != 1 or q.dtype not in (np.float32, np.float64):
        return backward_reference(do, q, k, v, o, lse, causal, scale, blocked)
    t_query, t_key = q.shape[-2], k.shape[-2]
    recompute = probs is None or probs.dtype != q.dtype or not probs.flags.c_contiguous
    if recompute:
        scores = np.matmul(q, np.swapaxes(k, -1, -2))                   # S   (B, H, Tq, Tk)
    else:
        scores = probs                                                   # P   (B, H, Tq, Tk)
    dscores = np.matmul(do, np.swapaxes(v, -1, -2))                     # dP  (B, H, Tq, Tk)
    lse3 = np.ascontiguousarray(lse, dtype=q.dtype).reshape(-1, t_query)
    _softmax_backward_rows_kernel(scores.reshape(-1, t_query, t_key), dscores.reshape(-1, t_query, t_key),
                                  _as_heads(do), _as_heads(o), lse3, bool(causal), q.dtype.type(scale),
                                  q.dtype == np.float32, recompute, _blocked_rows(blocked), q.shape[1], 0, 0)
    # (S -> P), dP -> scale dS
    dv = np.matmul(np.swapaxes(scores, -1, -2), do)                     # P^T dO      (B, H, Tk, D)
    dq = np.matmul(dscores, k)                                           # scale dS K  (B, H, Tq, D)
    dk = np.matmul(np.swapaxes(dscores, -1, -2), q)                     # scale dS^T Q (B, H, Tk, D)
    return dq, dk, dv


# ============================================================== dispatch
# Masked calls (``blocked`` given) run the batched or strip path on the Numba rung (their softmax
# passes skip blocked keys) and the reference on CuPy: the CUDA kernel knows only the causal mask.

def _numba_path(q, k) -> str:
    """The Numba rung's path: batched BLAS while the scores fit, else strips (or a forced one)."""
    return numba_path("attention", "batched" if q.shape[-2] * k.shape[-2] <= BATCHED_MAX_SCORES else "strips")


def forward(q, k, v, causal: bool, scale: float | None = None, blocked=None):
    """(o, lse) on the fastest rung for ``q``: CUDA for CuPy, Numba for NumPy, else the reference."""
    rung = pick(q, "attention")
    if rung == "cuda" and blocked is None:
        kernel = cuda_kernel("attention_forward")
        if kernel is not None:
            return kernel(q, k, v, causal, scale)
    elif rung == "numba":
        path = _numba_path(q, k)
        if path == "tiled":                 # (with ``blocked`` it hands over to the reference)
            return forward_numba(q, k, v, causal, scale, blocked)
        if path == "batched":
            return forward_batched_numba(q, k, v, causal, scale, blocked)
        return forward_strips_blas(q, k, v, causal, scale, blocked)
    return forward_reference(q, k, v, causal, scale, blocked)


def forward_keeping_probs(q, k, v, causal: bool, scale: float | None = None, blocked=None):
    """(o, lse, probs) for a training step: as ``forward``, plus what the backward can reuse
    instead of recomputing P: P (B, H, Tq, Tk) where the batched path made it anyway (short T
    on the Numba rung), a ``StripProbs`` where the strip path kept its strips (within
    KEPT_PROBS_MAX_BYTES), else None. Hand ``probs`` to ``backward_from_probs``."""
    if pick(q, "attention") == "numba":
        path = _numba_path(q, k)
        if path == "batched":
            return forward_batched_numba(q, k, v, causal, scale, blocked, keep_probs=True)
        if path == "strips":
            return forward_strips_blas(q, k, v, causal, scale, blocked, keep_probs=True)
    o, lse = forward(q, k, v, causal, scale, blocked)
    return o, lse, None


def backward_from_probs(do, q, k, v, o, lse, probs, causal: bool, scale: float | None = None, blocked=None):
    """(dq, dk, dv) as ``backward``, reusing P from ``forward_keeping_probs`` when it kept one."""
    if isinstance(probs, StripProbs):
        return backward_strips_blas(do, q, k, v, o, lse, causal, scale, blocked, probs=probs)
    if probs is not None and pick(q, "attention") == "numba":
        return backward_batched_numba(do, q, k, v, o, lse, causal, scale, blocked, probs=probs)
    return backward(do, q, k, v, o, lse, causal, scale, blocked)


def attention_weights(q, k, lse, probs, causal: bool, scale: float | None = None, blocked=None):
    """P (B, H, Tq, Tk), the attention weights (need_weights): ``probs`` from
    ``forward_keeping_probs`` when it is that array (a copy), else rebuilt from lse."""
    if probs is not None and not isinstance(probs, StripProbs):
        return probs.copy()
    return probs_reference(q, k, lse, causal, scale, blocked)


def backward(do, q, k, v, o, lse, causal: bool, scale: float | None = None, blocked=None):
    """(dq, dk, dv) on the fastest rung for ``q`` (see ``forward``)."""
    rung = pick(q, "attention")
    if rung == "cuda" and blocked is None:
        kernel = cuda_kernel("attention_backward")
        if kernel is not None:
            return kernel(do, q, k, v, o, lse, causal, scale)
    elif rung == "numba":
        path = _numba_path(q, k)
        if path == "tiled":
            return backward_numba(do, q, k, v, o, lse, causal, scale, blocked)
        if path == "batched":
            return backward_batched_numba(do, q, k, v, o, lse, causal, scale, blocked)
        return backward_strips_blas(do, q, k, v, o, lse, causal, scale, blocked)
    return backward_reference(do, q, k, v, o, lse, causal, scale, blocked)
