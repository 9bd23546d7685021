"""Scaled dot-product attention: the ladder of rungs and the dispatch.

1. ``attention_reference``: the reference on ``backend.xp`` (the math, masks included, is in its
   docstring);
2a. ``attention_tiled``: a FlashAttention-style tiled Numba kernel, BLAS-free;
2b. here: a batched-BLAS path for short sequences (``forward_batched_numba``: materialises the
   (T, T) scores, which is cheap there);
2c. here: a batched-BLAS path for long ones (``forward_strips_blas``: the same BLAS matmuls and
   Numba softmax passes, one strip of STRIP_Q query rows at a time, so memory stays linear in T);
3. ``cuda.attention_forward/backward`` (CuPy), causal mask only.

Dispatch on the Numba rung: batched BLAS up to ``BATCHED_MAX_SCORES`` scores per head, else
strips. Masks: the 2b and 2c softmax passes skip ``blocked`` keys (key padding and boolean
attention masks); the tiled kernel and the CUDA kernel know only the causal mask, so masked calls
that would reach them run the reference. Every public name of the three modules is importable
from here.

The softmax row passes that 2b and 2c share are in ``attention_rows``.

Speed (bench/attention.py, B=4, H=4, D=64, causal, float32, 2-core development machine): an
earlier quiet measurement at 2 threads gave the strip path 26.9 / 88.2 / 349 ms at
T = 512 / 1024 / 2048 against 28.2 / 76.4 / 253 ms for torch SDPA. Since the softmax passes were
rewritten they are a small share: at T = 2048, one thread, the strips' forward+backward is about
7 matmuls of ~70 ms each (OpenBLAS at ~65 GFLOP/s on shapes with depth D = 64 or 128) and
~10 ms of passes, so what is left of the gap to torch (MKL) is matmul throughput.
Inference prefill never builds a (T, T) matrix on this rung: above BATCHED_MAX_SCORES the
forward holds one (B*H, STRIP_Q, T) strip of scores at a time, and it accepts Tq < Tk (a chunk
of new queries over a longer cache, causal offset Tk - Tq).
"""
from __future__ import annotations

import numpy as np

from scratchlm.kernels import attention_threads, cuda_kernel, numba_path, pick
from scratchlm.kernels.attention_reference import (  # noqa: F401  (the reference rung, re-exported)
    _causal_allowed, _default_scale, _masked_scores, backward_reference, blocked_keys, forward_reference,
    probs_reference)
from scratchlm.kernels.attention_tiled import (  # noqa: F401  (the tiled rung, re-exported)
    BLOCK_K, BLOCK_Q, _as_heads, _exp_shifted, backward_numba, forward_numba)
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


# ============================================================== 2c. batched BLAS in query strips (long T)

# Long sequences: the (B*H) stack is walked one strip of STRIP_Q query rows at a time. A strip's
# scores against the keys it may see, (N, STRIP_Q, Tk_visible), come from one batched BLAS
# matmul (30-55 GFLOP/s per core measured here, against ~16 for the tiled kernel's row loops), the serial
# Numba softmax passes of 2b turn them into P (or scale dS) in place, and BLAS multiplies again.
# Only one strip's scores live at a time, so memory is O(N * STRIP_Q * T): linear in T, never
# (T x T). Causal strips stop at their last row's last visible key, which skips the future.
# On several cores the stack is cut into chunks of whole heads, one per thread, each thread's
# BLAS on one thread (``attention_threads``: faster than BLAS threading these small matmuls).
STRIP_Q = 128

# A training step's forward may keep every strip's P for the backward, which then skips
# recomputing S = Q K^T (one of its four matmuls) and the exps. Causal P is ~N T^2 / 2 floats:
# 34 MB at B*H = 16, T = 1024 float32, 134 MB at T = 2048. Measured at one thread (process CPU
# time, medians, on the loaded shared machine): at T = 1024 forward+backward went 200 -> 180 ms;
# at T = 2048 user time fell 670 -> 560 ms but the page faults on 134 MB of fresh memory every
# step cost 10 -> 320 ms of system time, a net loss (and the memory grows as T^2 per layer). So P
# is kept only up to this many bytes; above it the backward recomputes.
KEPT_PROBS_MAX_BYTES = 64 * 2**20


class StripProbs:
    """P as the strip forward left it, for ``backward_strips_blas``: per chunk of heads
    (start, stop), one flat buffer holding that chunk's strips one after another, strip
    [a, b) x keys [0, e) as a C-contiguous (stop - start, b - a, e) block. ``strip`` is the
    STRIP_Q it was cut with (the backward must walk the same strips)."""

    def __init__(self, strip: int, t_query: int, t_key: int, causal: bool, parts):
        self.strip, self.t_query, self.t_key, self.causal, self.parts = strip, t_query, t_key, causal, parts

    def fits(self, q, k, causal: bool) -> bool:
        return (self.strip == STRIP_Q and (self.t_query, self.t_key, self.causal) == (q.shape[-2], k.shape[-2], causal)
                and all(buffer.dtype == q.dtype for _, _, buffer in self.parts))


def _strips(t_query: int, t_key: int, causal: bool):
    """(start, stop, key_stop) of each query strip: rows [start, stop) see keys [0, key_stop)."""
    offset = t_key - t_query
    return [(start, min(start + STRIP_Q, t_query),
             min(t_key, min(start + STRIP_Q, t_query) + offset) if causal else t_key)
            for start in range(0, t_query, STRIP_Q)]


def _strip_view(buffer, n_heads: int, rows: int, cols: int, at: int = 0):
    """A C-contiguous (N, rows, cols) view of a flat buffer from ``at``: every strip reuses one
    scratch allocation (strips of growing causal width would otherwise each take a new one)."""
    return buffer[at:at + n_heads * rows * cols].reshape(n_heads, rows, cols)


def _strip_dtypes_ok(*arrays) -> bool:
    return len({a.dtype for a in arrays}) == 1 and arrays[0].dtype in (np.float32, np.float64)


def forward_strips_blas(q, k, v, causal: bool, scale: float | None = None, blocked=None,
                        keep_probs: bool = False):
    """Same contract as ``forward_reference``, for long T: per query strip [a, b) of STRIP_Q rows,

        S = Q[a:b] K[:e]^T (batched BLAS, (N, b - a, e)),  e = Tk, or b + (Tk - Tq) when causal;
        P, lse[a:b] = masked softmax of scale * S (Numba, in place; masked P exactly 0);
        O[a:b] = P V[:e] (batched BLAS).

    ``keep_probs=True`` returns (o, lse, probs) with probs a ``StripProbs`` for
    ``backward_strips_blas`` when P fits KEPT_PROBS_MAX_BYTES, else None.
    Needs Tq <= Tk (every row sees a key); other shapes and dtypes go to the tiled kernel
    (and from there, with ``blocked``, to the reference).
    """
    scale = _default_scale(q, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    if not _strip_dtypes_ok(q, k, v) or t_query > t_key:
        result = forward_numba(q, k, v, causal, scale, blocked)
        return (*result, None) if keep_probs else result
    flags = _blocked_rows(blocked)
    q3, k3, v3 = _as_heads(q), _as_heads(k), _as_heads(v)              # (N, T, D)
    out = np.empty_like(q3)
    lse = np.empty(q3.shape[:2], dtype=q.dtype)                          # (N, Tq)
    strips = _strips(t_query, t_key, causal)
    kept_floats = sum((stop - start) * key_stop for start, stop, key_stop in strips)
    keep = keep_probs and q3.shape[0] * kept_floats * q.itemsize <= KEPT_PROBS_MAX_BYTES
    scale = q.dtype.type(scale)

    def heads(first: int, last: int):                                   # heads [first, last)
        n_heads = last - first
        buffer = np.empty(n_heads * (kept_floats if keep else min(STRIP_Q, t_query) * t_key), q.dtype)
        at = 0
        for start, stop, key_stop in strips:
            # The strip's causal offset is key_stop - (stop - start) = start + offset, which the
            # softmax pass reads from the strip's shape: row i sees strip keys j <= i + start + offset.
            scores = _strip_view(buffer, n_heads, stop - start, key_stop, at)                 # (n, rows, e)
            at += scores.size if keep else 0
            np.matmul(q3[first:last, start:stop], np.swapaxes(k3[first:last, :key_stop], -1, -2), out=scores)
            lse[first:last, start:stop] = _softmax_rows_kernel(scores, bool(causal), scale, q.dtype == np.float32,
                                                               flags, q.shape[1], start, first)  # S -> P
            np.matmul(scores, v3[first:last, :key_stop], out=out[first:last, start:stop])    # P V
        return buffer if keep else None

    head_bytes = min(STRIP_Q, t_query) * t_key * q.itemsize              # one head's strip of scores
    parts = attention_threads.over_heads(heads, attention_threads.split(q3.shape[0], head_bytes))
    o, lse = out.reshape(q.shape), lse.reshape(q.shape[:-1])
    if not keep_probs:
        return o, lse
    return o, lse, (StripProbs(STRIP_Q, t_query, t_key, bool(causal), parts) if keep else None)


def backward_strips_blas(do, q, k, v, o, lse, causal: bool, scale: float | None = None, blocked=None,
                         probs: StripProbs | None = None):
    """Same contract as ``backward_reference``, for long T: per query strip [a, b), keys [0, e),

        S = Q[a:b] K[:e]^T,  dP = dO[a:b] V[:e]^T (batched BLAS);
        P = exp(scale S - lse[a:b]),  dS' = scale P (dP - delta), delta_i = dO_i . o_i (Numba);
        dV[:e] += P^T dO[a:b],  dK[:e] += dS'^T Q[a:b],  dQ[a:b] = dS' K[:e] (batched BLAS).
    ``probs``: the forward's ``StripProbs``; then S and P are not recomputed (P is only read).
    """
    scale = _default_scale(q, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    if not _strip_dtypes_ok(do, q, k, v, o) or t_query > t_key:
        return backward_numba(do, q, k, v, o, lse, causal, scale, blocked)
    flags = _blocked_rows(blocked)
    do3, q3, k3, v3, o3 = (_as_heads(a) for a in (do, q, k, v, o))
    lse2 = np.ascontiguousarray(lse, dtype=q.dtype).reshape(q3.shape[:2])   # (N, Tq)
    dq = np.empty_like(q3)
    dk = np.zeros_like(k3)
    dv = np.zeros_like(v3)
    strips = _strips(t_query, t_key, causal)
    kept = probs is not None and probs.fits(q, k, causal)
    kept_buffers = {(first, last): buffer for first, last, buffer in probs.parts} if kept else {}
    scale = q.dtype.type(scale)

    def heads(first: int, last: int):                                   # heads [first, last)
        n_heads, strip_size = last - first, (last - first) * min(STRIP_Q, t_query) * t_key
        kept_buffer = kept_buffers.get((first, last))
        scores_buffer = np.empty(strip_size, q.dtype) if kept_buffer is None else kept_buffer
        dscores_buffer = np.empty(strip_size, q.dtype)
        key_grad_buffer = np.empty_like(k3[first:last])                # one strip's share of dK or dV
        at = 0
        for start, stop, key_stop in strips:
            q_strip, do_strip = q3[first:last, start:stop], do3[first:last, start:stop]   # (n, rows, D)
            keys, values = k3[first:last, :key_stop], v3[first:last, :key_stop]          # (n, e, D)
            scores = _strip_view(scores_buffer, n_heads, stop - start, key_stop, at)
            dscores = _strip_view(dscores_buffer, n_heads, stop - start, key_stop)
            if kept_buffer is None:
                np.matmul(q_strip, np.swapaxes(keys, -1, -2), out=scores)   # S   (n, rows, e)
            else:
                at += scores.size                                          # P, kept by the forward
            np.matmul(do_strip, np.swapaxes(values, -1, -2), out=dscores)  # dP  (n, rows, e)
            _softmax_backward_rows_kernel(scores, dscores, do_strip, o3[first:last, start:stop],
                                          lse2[first:last, start:stop], bool(causal), scale,
                                          q.dtype == np.float32, kept_buffer is None, flags, q.shape[1],
                                          start, first)                # (S -> P), dP -> scale dS
            key_grad = key_grad_buffer[:, :key_stop]
            dv[first:last, :key_stop] += np.matmul(np.swapaxes(scores, -1, -2), do_strip, out=key_grad)   # P^T dO
            dk[first:last, :key_stop] += np.matmul(np.swapaxes(dscores, -1, -2), q_strip, out=key_grad)   # scale dS^T Q
            np.matmul(dscores, keys, out=dq[first:last, start:stop])                          # scale dS K

    n_heads = q3.shape[0]
    head_bytes = min(STRIP_Q, t_query) * t_key * q.itemsize              # one head's strip of scores
    bounds = list(kept_buffers) if kept else attention_threads.split(n_heads, head_bytes)
    attention_threads.over_heads(heads, bounds)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


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
