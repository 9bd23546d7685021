"""Scaled dot-product attention, rung 2c: batched BLAS in query strips, for long sequences.

The same BLAS matmuls and Numba softmax row passes (``attention_rows``) as the batched path 2b
of ``kernels.attention``, one strip of STRIP_Q query rows at a time, so memory stays linear in T;
the (B*H) head stack is cut into chunks that run on several threads (``attention_threads``).
A training step's forward may keep P for the backward (``StripProbs``, within
KEPT_PROBS_MAX_BYTES). Same contract as ``attention_reference``; accepts Tq <= Tk (a chunk of
new queries over a longer cache, causal offset Tk - Tq).
"""
from __future__ import annotations

import numpy as np

from scratchlm.kernels import attention_threads
from scratchlm.kernels.attention_reference import _default_scale
from scratchlm.kernels.attention_rows import _blocked_rows, _softmax_backward_rows_kernel, _softmax_rows_kernel
from scratchlm.kernels.attention_tiled import _as_heads, backward_numba, forward_numba

# Long sequences: a chunk of heads of the (B*H) stack is walked one strip of STRIP_Q query rows
# at a time. A strip's scores against the keys it may see, (n, STRIP_Q, Tk_visible), come from
# one batched BLAS matmul (30-65 GFLOP/s per core measured here, against ~16 for the tiled
# kernel's row loops), the Numba softmax passes of 2b turn them into P (or scale dS) in place,
# and BLAS multiplies again. Only one strip's scores per chunk live at a time, so memory is
# O(n * STRIP_Q * T): linear in T, never (T x T). Causal strips stop at their last row's last
# visible key, which skips the future. The chunks (``attention_threads.split``: at most an L2's
# worth of strip scores each) run on the worker threads, each thread's BLAS on one thread:
# faster than BLAS threading these small matmuls, and robust when another process holds a core.
# STRIP_Q = 128: 64 and 256 were slower at T = 2048, one thread (773 and 670 ms against 598,
# process CPU, load ~7): narrower strips run the depth-64 matmuls less efficiently, wider ones
# waste more of the causal triangle and leave the cache.
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
