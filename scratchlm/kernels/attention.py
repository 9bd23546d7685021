"""Scaled dot-product attention: the reference, a FlashAttention-style Numba kernel, a batched-BLAS
path for short sequences (``forward_batched_numba``: materialises the (T, T) scores, which is
cheap there), a batched-BLAS path for long ones (``forward_strips_blas``: the same BLAS matmuls
and Numba softmax passes, one strip of STRIP_Q query rows at a time, so memory stays linear in T),
and dispatch on the Numba rung: batched BLAS up to ``BATCHED_MAX_SCORES`` scores per head, else
strips. The tiled Numba kernel stays as the BLAS-free rung (and the strips' fallback for Tq > Tk).

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

Speed (bench/attention.py, B=4, H=4, D=64, causal, float32, 2 threads, 2-core development
machine): forward+backward of the strip path 26.9 / 88.2 / 349 ms at T = 512 / 1024 / 2048 against
32.9 / 131 / 490 ms for the tiled kernel and 28.2 / 76.4 / 253 ms for torch SDPA (1.05 / 0.87 /
0.73x torch). Measured at T = 2048: a third of the strips' time goes to the serial softmax passes,
the rest to the matmuls, where QK^T and dO V^T (depth D = 64, wide outputs) run at about half
the rate of P V.

Tiled kernel alone (B=4, H=4, T=1024, D=64, causal, float32, 2 threads): it
runs forward+backward at about 0.3-0.75x of torch's CPU scaled_dot_product_attention (0.33x on
2 pinned Xeon cores; 0.6-0.75x on the 2-core EPYC development machine, which was shared and
noisy). What limits it: every inner loop is a multiply-add over a row held in memory (there are
no register tiles in Numba), so loads and stores, not arithmetic, set the pace; the
loops are unrolled four ways to cut those, but torch's blocks go through a BLAS micro-kernel
that keeps its tile in registers. Closing the gap needs a register-blocked micro-kernel
(a 4 x 16 accumulator tile written out as scalars for LLVM's SLP vectoriser), or BLAS calls
outside any prange, which is what the strip path does. A register-blocked
dot-product variant with reassociated sums (fastmath "reassoc") was tried and was slower here:
the 64-long sums over D end in too many horizontal additions.
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm import backend
from scratchlm.kernels import cuda_kernel, njit, num_threads, numba_path, pick, prange


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ============================================================== 1. reference (the truth)

def _masked_scores(q, k, causal: bool, scale: float):
    """S = scale q k^T (B, H, Tq, Tk), with exactly -inf where causality forbids a key."""
    xp = backend.xp
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    if causal:
        scores = xp.where(_causal_allowed(q.shape[-2], k.shape[-2]), scores,
                          xp.asarray(-xp.inf, dtype=scores.dtype))
    return scores


def forward_reference(q, k, v, causal: bool, scale: float | None = None):
    """o = softmax(scale q k^T + mask) v and lse = per-row log-sum-exp; materialises (Tq, Tk).

    q (B, H, Tq, D), k and v (B, H, Tk, D) -> o (B, H, Tq, D), lse (B, H, Tq).
    """
    xp = backend.xp
    scale = _default_scale(q, scale)
    scores = _masked_scores(q, k, causal, scale)                        # (B, H, Tq, Tk)
    row_max = xp.max(scores, axis=-1, keepdims=True)                     # (B, H, Tq, 1)
    lse = row_max[..., 0] + xp.log(xp.sum(xp.exp(scores - row_max), axis=-1))   # (B, H, Tq)
    probs = xp.exp(scores - lse[..., None])                              # (B, H, Tq, Tk)
    out = xp.matmul(probs, v)                                            # (B, H, Tq, D)
    return out, lse


def backward_reference(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """(dq, dk, dv) from do = dL/do, recomputing P = exp(scale q k^T + mask - lse)."""
    xp = backend.xp
    scale = _default_scale(q, scale)
    scores = _masked_scores(q, k, causal, scale)                        # (B, H, Tq, Tk)
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
    if q3 is None or k3 is None or v3 is None or not (q.dtype == k.dtype == v.dtype):
        return forward_reference(q, k, v, causal, scale)
    out, lse = _attention_forward_kernel(q3, k3, v3, bool(causal), q.dtype.type(scale),
                                         q.dtype == np.float32)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward_numba(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """dq, dk, dv by the two-level tiled kernel below; same contract as ``backward_reference``."""
    scale = _default_scale(q, scale)
    arrays = [_as_heads(a) for a in (do, q, k, v, o)]
    if any(a is None for a in arrays) or len({a.dtype for a in arrays}) != 1:
        return backward_reference(do, q, k, v, o, lse, causal, scale)
    do3, q3, k3, v3, o3 = arrays
    lse2 = np.ascontiguousarray(lse, dtype=q.dtype).reshape(q3.shape[0], q3.shape[1])
    dq, dk, dv = _attention_backward_kernel(do3, q3, k3, v3, o3, lse2, bool(causal),
                                            q.dtype.type(scale), _group_count(q3.shape[0], k3.shape[1]),
                                            q.dtype == np.float32)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def _as_heads(array):
    """(B, H, T, D) float32/float64 -> a C-contiguous (B*H, T, D) view or copy; None otherwise."""
    if array.dtype not in (np.float32, np.float64) or array.ndim < 2:
        return None
    return np.ascontiguousarray(array).reshape(-1, array.shape[-2], array.shape[-1])


def _group_count(n_heads: int, t_key: int) -> int:
    """Key-block groups per head in the backward: enough (head, group) tasks to feed every thread."""
    threads = num_threads()
    n_key_blocks = -(-t_key // BLOCK_K)
    return max(1, min(n_key_blocks, -(-threads // max(n_heads, 1))))


# Tile sizes: a (BLOCK_Q x BLOCK_K) score tile, a (D x BLOCK_K) transposed key tile and a
# (BLOCK_Q x D) output accumulator stay in L1/L2 while the key loop streams through K and V.
BLOCK_Q = 64
BLOCK_K = 64


@njit(inline="always")
def _exp_shifted(values, count, shift, fast, bits):
    """values[j] = exp(values[j] - shift) for j < count; values is one row (1-D).

    ``fast`` (float32): a branch-free exp, because libm's expf, called one element at a time,
    cost about as much as the tile arithmetic around it (measured here: 1.9 ns per element for
    this one against 10.8 ns for math.exp on a float32 row). With
    x = n ln2 + r, |r| <= ln2 / 2: exp(x) = 2^n exp(r), exp(r) by its degree-7 Taylor
    polynomial (relative error < 1e-8, below float32's 6e-8), 2^n by writing n + 127 into a
    float32's exponent bits. x is clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for 0;
    every x here is <= 0 up to rounding); a NaN passes the clamps and stays NaN.
    float64 rows use math.exp.
    """
    if fast:
        for j in range(count):
            x = values[j] - shift
            x = np.float32(-87.0) if x < np.float32(-87.0) else x
            x = np.float32(88.0) if x > np.float32(88.0) else x
            n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            r = x - n * np.float32(0.693145751953125) - n * np.float32(1.4286068203094173e-06)
            poly = np.float32(1.0 / 5040.0)
            poly = poly * r + np.float32(1.0 / 720.0)
            poly = poly * r + np.float32(1.0 / 120.0)
            poly = poly * r + np.float32(1.0 / 24.0)
            poly = poly * r + np.float32(1.0 / 6.0)
            poly = poly * r + np.float32(0.5)
            poly = poly * r + np.float32(1.0)
            poly = poly * r + np.float32(1.0)
            bits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
            values[j] = poly
        two_to_n = bits.view(np.float32)
        for j in range(count):
            values[j] *= two_to_n[j]
    else:
        for j in range(count):
            values[j] = math.exp(values[j] - shift)


@njit(parallel=True, cache=True)
def _attention_forward_kernel(q, k, v, causal, scale, fast):
    """q (N, Tq, D), k and v (N, Tk, D) with N = B*H -> o (N, Tq, D), lse (N, Tq).

    Parallel over (head, query block) tasks. For each task, key blocks are visited in order and
    each query row keeps a running max m, running sum l = sum exp(s - m) and an unnormalised
    output acc = sum exp(s - m) v. When a new block raises the max to m', the old sums are
    rescaled by exp(m - m'). Key blocks entirely in a row block's causal future are never visited,
    and within a block a row only visits its own visible keys (masked keys are skipped, which is
    the same as a -inf score).
    """
    n_heads, t_query, head_dim = q.shape
    t_key = k.shape[1]
    offset = t_key - t_query                    # causal: row i sees keys j <= i + offset
    out = np.empty_like(q)
    lse = np.empty((n_heads, t_query), dtype=q.dtype)
    n_query_blocks = (t_query + BLOCK_Q - 1) // BLOCK_Q
    for task in prange(n_heads * n_query_blocks):
        head = task // n_query_blocks
        q_start = (task % n_query_blocks) * BLOCK_Q
        rows = min(BLOCK_Q, t_query - q_start)
        q_tile = np.empty((BLOCK_Q, head_dim), dtype=q.dtype)        # scale * q rows
        for i in range(rows):
            for d in range(head_dim):
                q_tile[i, d] = q[head, q_start + i, d] * scale
        acc = np.zeros((BLOCK_Q, head_dim), dtype=q.dtype)          # sum_j exp(s_ij - m_i) v_j
        row_max = np.full(BLOCK_Q, -np.inf, dtype=q.dtype)           # m_i
        row_sum = np.zeros(BLOCK_Q, dtype=np.float64)                # l_i
        scores = np.empty(BLOCK_K, dtype=q.dtype)                    # one row of the tile
        bits = np.empty(BLOCK_K, dtype=np.int32)                     # scratch for the fast exp
        k_tile_t = np.empty((head_dim, BLOCK_K), dtype=q.dtype)      # K block, transposed
        key_stop = t_key
        if causal:
            key_stop = min(t_key, q_start + rows + offset)           # last row's last visible key + 1
        for k_start in range(0, key_stop, BLOCK_K):
            cols = min(BLOCK_K, key_stop - k_start)
            # Transposing the K block once lets the score loop run contiguously over keys
            # (s_j += q_d * kT_dj), which vectorises without reassociating a dot product.
            for j in range(cols):
                for d in range(head_dim):
                    k_tile_t[d, j] = k[head, k_start + j, d]
            for i in range(rows):
                visible = cols
                if causal:
                    visible = min(cols, q_start + i + offset + 1 - k_start)
                if visible <= 0:
                    continue
                # s_j = sum_d q_d kT_dj, four d at a time: each pass over the row of scores
                # then loads and stores s once per four multiply-adds (loads/stores, not
                # arithmetic, are what limits these loops).
                for j in range(visible):
                    scores[j] = 0
                for d in range(0, head_dim - 3, 4):
                    q0, q1, q2, q3 = q_tile[i, d], q_tile[i, d + 1], q_tile[i, d + 2], q_tile[i, d + 3]
                    for j in range(visible):
                        scores[j] += (q0 * k_tile_t[d, j] + q1 * k_tile_t[d + 1, j]
                                      + q2 * k_tile_t[d + 2, j] + q3 * k_tile_t[d + 3, j])
                for d in range(head_dim - head_dim % 4, head_dim):
                    q_id = q_tile[i, d]
                    for j in range(visible):
                        scores[j] += q_id * k_tile_t[d, j]
                block_max = scores[0]                                # in q's dtype, as are
                for j in range(1, visible):                          # new_max and rescale, so
                    block_max = max(block_max, scores[j])            # acc stays float32 SIMD
                new_max = max(row_max[i], block_max)
                rescale = math.exp(row_max[i] - new_max)             # 0 on the first block
                _exp_shifted(scores, visible, new_max, fast, bits)    # p_ij = exp(s_ij - m_i)
                block_sum = 0.0
                for j in range(visible):
                    block_sum += scores[j]
                row_sum[i] = row_sum[i] * rescale + block_sum
                row_max[i] = new_max
                if rescale != 1:
                    for d in range(head_dim):
                        acc[i, d] *= rescale
                # acc += sum_j p_j v_j, four keys at a time (same reason as above)
                for j in range(0, visible - 3, 4):
                    p0, p1, p2, p3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
                    key = k_start + j
                    for d in range(head_dim):
                        acc[i, d] += (p0 * v[head, key, d] + p1 * v[head, key + 1, d]
                                      + p2 * v[head, key + 2, d] + p3 * v[head, key + 3, d])
                for j in range(visible - visible % 4, visible):
                    p = scores[j]
                    for d in range(head_dim):
                        acc[i, d] += p * v[head, k_start + j, d]
        for i in range(rows):
            if row_sum[i] > 0.0:
                inverse = 1.0 / row_sum[i]
                for d in range(head_dim):
                    out[head, q_start + i, d] = acc[i, d] * inverse
                lse[head, q_start + i] = row_max[i] + math.log(row_sum[i])
            else:                                   # a row with no visible key: o = 0, lse = -inf
                for d in range(head_dim):
                    out[head, q_start + i, d] = 0
                lse[head, q_start + i] = -np.inf
    return out, lse


@njit(parallel=True, cache=True)
def _attention_backward_kernel(do, q, k, v, o, lse, causal, scale, n_groups, fast):
    """do, q, o (N, Tq, D); k, v (N, Tk, D); lse (N, Tq) -> dq (N, Tq, D), dk, dv (N, Tk, D).

    Parallel over (head, key-block group) tasks; group g owns key blocks g, g + G, g + 2G, ...
    (round robin, so causal work is balanced). A task owns the dk, dv rows of its key blocks, so
    those need no locks. For each key block it walks the query rows that can see it, four rows at
    a time, recomputes P = exp(scale q k^T - lse) for them and accumulates

        dv_j += p_ij dO_i,   dk_j += scale ds_ij q_i,   dq_i += scale ds_ij k_j
        with ds_ij = p_ij (dO_i . v_j - delta_i), delta_i = dO_i . o_i.

    dq rows are shared by every key block, so each group adds into its own (Tq, D) slice of
    dq_parts (G slices per head, G = 1 when there are at least as many heads as threads) and the
    slices are summed at the end: memory stays linear in T and no two threads write one address.
    """
    n_heads, t_query, head_dim = q.shape
    t_key = k.shape[1]
    offset = t_key - t_query
    n_key_blocks = (t_key + BLOCK_K - 1) // BLOCK_K
    delta = np.empty((n_heads, t_query), dtype=q.dtype)             # delta_i = dO_i . o_i
    for head in prange(n_heads):
        for i in range(t_query):
            total = 0.0
            for d in range(head_dim):
                total += do[head, i, d] * o[head, i, d]
            delta[head, i] = total
    dq_parts = np.zeros((n_groups, n_heads, t_query, head_dim), dtype=q.dtype)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for task in prange(n_heads * n_groups):
        head = task // n_groups
        group = task % n_groups
        k_tile_t = np.empty((head_dim, BLOCK_K), dtype=q.dtype)     # K block, transposed
        v_tile_t = np.empty((head_dim, BLOCK_K), dtype=q.dtype)     # V block, transposed
        # The task walks the query rows four at a time: every dk_j, dv_j row it loads is then
        # updated with four rows' contributions at once (one load/store per four multiply-adds).
        probs = np.zeros((4, BLOCK_K), dtype=q.dtype)              # P rows of the group (0 where masked)
        dscores = np.zeros((4, BLOCK_K), dtype=q.dtype)            # dP rows, then dS rows
        q_rows = np.zeros((4, head_dim), dtype=q.dtype)            # scale * q_i
        do_rows = np.zeros((4, head_dim), dtype=q.dtype)
        dq_row = np.empty(head_dim, dtype=q.dtype)
        bits = np.empty(BLOCK_K, dtype=np.int32)
        for key_block in range(group, n_key_blocks, n_groups):
            k_start = key_block * BLOCK_K
            cols = min(BLOCK_K, t_key - k_start)
            for j in range(cols):
                for d in range(head_dim):
                    k_tile_t[d, j] = k[head, k_start + j, d]
                    v_tile_t[d, j] = v[head, k_start + j, d]
            first_row = 0
            if causal:
                first_row = max(0, k_start - offset)               # first query that sees k_start
            for i0 in range(first_row, t_query, 4):
                n_rows = min(4, t_query - i0)
                group_visible = cols                                # the group's last row sees most
                if causal:
                    group_visible = max(0, min(cols, i0 + n_rows + offset - k_start))
                for r in range(4):
                    for d in range(head_dim):
                        q_rows[r, d] = q[head, i0 + r, d] * scale if r < n_rows else 0
                        do_rows[r, d] = do[head, i0 + r, d] if r < n_rows else 0
                    for j in range(group_visible):
                        probs[r, j] = 0
                        dscores[r, j] = 0
                for r in range(n_rows):
                    i = i0 + r
                    visible = cols
                    if causal:
                        visible = max(0, min(cols, i + offset + 1 - k_start))
                    # s_ij = scale q_i . k_j and dp_ij = dO_i . v_j, contiguous over keys j,
                    # four d at a time
                    for d in range(0, head_dim - 3, 4):
                        a0, a1, a2, a3 = q_rows[r, d], q_rows[r, d + 1], q_rows[r, d + 2], q_rows[r, d + 3]
                        g0, g1, g2, g3 = do_rows[r, d], do_rows[r, d + 1], do_rows[r, d + 2], do_rows[r, d + 3]
                        for j in range(visible):
                            probs[r, j] += (a0 * k_tile_t[d, j] + a1 * k_tile_t[d + 1, j]
                                            + a2 * k_tile_t[d + 2, j] + a3 * k_tile_t[d + 3, j])
                            dscores[r, j] += (g0 * v_tile_t[d, j] + g1 * v_tile_t[d + 1, j]
                                              + g2 * v_tile_t[d + 2, j] + g3 * v_tile_t[d + 3, j])
                    for d in range(head_dim - head_dim % 4, head_dim):
                        for j in range(visible):
                            probs[r, j] += q_rows[r, d] * k_tile_t[d, j]
                            dscores[r, j] += do_rows[r, d] * v_tile_t[d, j]
                    _exp_shifted(probs[r], visible, lse[head, i], fast, bits)   # P from lse
                    row_delta = delta[head, i]
                    for j in range(visible):
                        dscores[r, j] = probs[r, j] * (dscores[r, j] - row_delta)  # ds_ij
                # dv_j += sum_r p_rj dO_r,  dk_j += sum_r ds_rj (scale q_r): this task owns key j
                for j in range(group_visible):
                    p0, p1, p2, p3 = probs[0, j], probs[1, j], probs[2, j], probs[3, j]
                    s0, s1, s2, s3 = dscores[0, j], dscores[1, j], dscores[2, j], dscores[3, j]
                    key = k_start + j
                    for d in range(head_dim):
                        dv[head, key, d] += (p0 * do_rows[0, d] + p1 * do_rows[1, d]
                                             + p2 * do_rows[2, d] + p3 * do_rows[3, d])
                        dk[head, key, d] += (s0 * q_rows[0, d] + s1 * q_rows[1, d]
                                             + s2 * q_rows[2, d] + s3 * q_rows[3, d])
                # dq_r += scale * sum_j ds_rj k_j, four keys at a time
                for r in range(n_rows):
                    for d in range(head_dim):
                        dq_row[d] = 0
                    for j in range(0, group_visible - 3, 4):
                        s0, s1, s2, s3 = dscores[r, j], dscores[r, j + 1], dscores[r, j + 2], dscores[r, j + 3]
                        key = k_start + j
                        for d in range(head_dim):
                            dq_row[d] += (s0 * k[head, key, d] + s1 * k[head, key + 1, d]
                                          + s2 * k[head, key + 2, d] + s3 * k[head, key + 3, d])
                    for j in range(group_visible - group_visible % 4, group_visible):
                        for d in range(head_dim):
                            dq_row[d] += dscores[r, j] * k[head, k_start + j, d]
                    for d in range(head_dim):
                        dq_parts[group, head, i0 + r, d] += scale * dq_row[d]
    dq = dq_parts[0]
    for group in range(1, n_groups):
        dq += dq_parts[group]
    return dq, dk, dv


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


def forward_batched_numba(q, k, v, causal: bool, scale: float | None = None, keep_probs: bool = False):
    """Same contract as ``forward_reference``, for short T: BLAS matmuls around a Numba softmax.

        S = Q K^T (batched BLAS),  P, lse = masked softmax of scale * S (Numba, in place),
        O = P V (batched BLAS).

    ``keep_probs=True`` also returns P (B, H, Tq, Tk), so a training step can hand it to
    ``backward_batched_numba`` instead of recomputing it (it is small at these T).
    """
    scale = _default_scale(q, scale)
    if q.dtype not in (np.float32, np.float64) or not (q.dtype == k.dtype == v.dtype):
        return forward_reference(q, k, v, causal, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    scores = np.matmul(q, np.swapaxes(k, -1, -2))                       # (B, H, Tq, Tk)
    lse = _softmax_rows_kernel(scores.reshape(-1, t_query, t_key), bool(causal),
                               q.dtype.type(scale), q.dtype == np.float32)   # scores -> P
    out = np.matmul(scores, v)                                           # (B, H, Tq, D)
    if keep_probs:
        return out, lse.reshape(q.shape[:-1]), scores
    return out, lse.reshape(q.shape[:-1])


def backward_batched_numba(do, q, k, v, o, lse, causal: bool, scale: float | None = None, probs=None):
    """Same contract as ``backward_reference``, for short T: five BLAS matmuls and one Numba pass.

        S = Q K^T, dP = dO V^T (batched BLAS);  P = exp(scale S - lse) and
        dS' = scale P (dP - delta), delta_i = dO_i . o_i (Numba, in place);
        dV = P^T dO, dQ = dS' K, dK = dS'^T Q (batched BLAS).
    ``probs``: P as ``forward_batched_numba(..., keep_probs=True)`` returned it; then S and P
    are not recomputed (one matmul and the exps fewer). It is only read.
    """
    scale = _default_scale(q, scale)
    if len({a.dtype for a in (do, q, k, v, o)}) != 1 or q.dtype not in (np.float32, np.float64):
        return backward_reference(do, q, k, v, o, lse, causal, scale)
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
                                  q.dtype == np.float32, recompute)      # (S -> P), dP -> scale dS
    dv = np.matmul(np.swapaxes(scores, -1, -2), do)                     # P^T dO      (B, H, Tk, D)
    dq = np.matmul(dscores, k)                                           # scale dS K  (B, H, Tq, D)
    dk = np.matmul(np.swapaxes(dscores, -1, -2), q)                     # scale dS^T Q (B, H, Tk, D)
    return dq, dk, dv


# The row reductions of the two passes below may be reassociated ("reassoc") so LLVM vectorises
# them; nothing else in those passes gets fast-math flags (the exp's Cody-Waite split
# x - n ln2_hi - n ln2_lo must not be regrouped). Flags are per instruction, so they stay here.
@njit(cache=True, fastmath={"reassoc"})
def _row_sum(row, count):
    """sum_{j < count} row[j], accumulated in float64."""
    total = 0.0
    for j in range(count):
        total += row[j]
    return total


@njit(cache=True, fastmath={"reassoc", "contract"})
def _row_dot(a, b):
    """sum_d a[d] b[d] over two rows of equal length, accumulated in float64."""
    total = 0.0
    for d in range(a.shape[0]):
        total += a[d] * b[d]
    return total


@njit(cache=True, error_model="numpy")
def _softmax_rows_kernel(scores, causal, scale, fast):
    """scores (N, Tq, Tk) = Q K^T, in place -> P = softmax(scale S + mask) row by row; returns lse (N, Tq).

    Row i keeps its visible keys j <= i + (Tk - Tq) when causal; the rest of the row becomes 0
    (exactly the -inf score's weight). A row with no visible key gets P = 0 and lse = -inf.
    """
    n_heads, t_query, t_key = scores.shape
    offset = t_key - t_query
    lse = np.empty((n_heads, t_query), dtype=scores.dtype)
    bits = np.empty(t_key, dtype=np.int32)                           # scratch for the fast exp
    for head in range(n_heads):
        for i in range(t_query):
            row = scores[head, i]
            visible = t_key
            if causal:
                visible = max(0, min(t_key, i + offset + 1))
            for j in range(visible, t_key):
                row[j] = 0
            lse[head, i] = -np.inf
            if visible == 0:
                continue
            for j in range(visible):
                row[j] *= scale
            row_max = row[0]                                         # in the scores' dtype, so
            for j in range(1, visible):                              # the fast exp stays float32
                row_max = max(row_max, row[j])
            _exp_shifted(row, visible, row_max, fast, bits)         # exp(s_ij - m_i)
            row_sum = _row_sum(row, visible)
            if row_sum > 0.0:
                inverse = 1.0 / row_sum
                for j in range(visible):
                    row[j] *= inverse
                lse[head, i] = row_max + math.log(row_sum)
    return lse


@njit(cache=True, error_model="numpy")
def _softmax_backward_rows_kernel(scores, dprobs, do, o, lse, causal, scale, fast, recompute):
    """In place: scores (N, Tq, Tk) = Q K^T -> P;  dprobs (N, Tq, Tk) = dO V^T -> scale * dS.
    With ``recompute=False`` scores already holds P (zeros where masked) and is only read.

    P = exp(scale s_ij - lse_i) on visible keys and 0 elsewhere;
    dS = P * (dP - delta_i) with delta_i = dO_i . o_i  (do, o: (N, Tq, D); lse: (N, Tq)).
    The scale of dQ = scale dS K and dK = scale dS^T Q is folded into dS here.
    """
    n_heads, t_query, t_key = scores.shape
    offset = t_key - t_query
    bits = np.empty(t_key, dtype=np.int32)
    row_delta = np.empty(1, dtype=scores.dtype)                      # delta_i in the scores' dtype
    for head in range(n_heads):
        for i in range(t_query):
            probs = scores[head, i]
            dscores = dprobs[head, i]
            visible = t_key
            if causal:
                visible = max(0, min(t_key, i + offset + 1))
            row_delta[0] = _row_dot(do[head, i], o[head, i])
            if recompute:
                for j in range(visible):
                    probs[j] *= scale
                _exp_shifted(probs, visible, lse[head, i], fast, bits)  # P from lse
                for j in range(visible, t_key):
                    probs[j] = 0
            for j in range(visible):
                dscores[j] = scale * probs[j] * (dscores[j] - row_delta[0])
            for j in range(visible, t_key):
                dscores[j] = 0
    return 0


# ============================================================== 2c. batched BLAS in query strips (long T)

# Long sequences: the (B*H) stack is walked one strip of STRIP_Q query rows at a time. A strip's
# scores against the keys it may see, (N, STRIP_Q, Tk_visible), come from one batched BLAS
# matmul (30-55 GFLOP/s per core measured here, against ~16 for the tiled kernel's row loops), the serial
# Numba softmax passes of 2b turn them into P (or scale dS) in place, and BLAS multiplies again.
# Only one strip's scores live at a time, so memory is O(N * STRIP_Q * T): linear in T, never
# (T x T). Causal strips stop at their last row's last visible key, which skips the future.
STRIP_Q = 128


def _strip_view(buffer, n_heads: int, rows: int, cols: int):
    """A C-contiguous (N, rows, cols) view of the front of a flat scratch buffer: every strip
    reuses one allocation (strips of growing causal width would otherwise each take a new one)."""
    return buffer[:n_heads * rows * cols].reshape(n_heads, rows, cols)


def forward_strips_blas(q, k, v, causal: bool, scale: float | None = None):
    """Same contract as ``forward_reference``, for long T: per query strip [a, b) of STRIP_Q rows,

        S = Q[a:b] K[:e]^T (batched BLAS, (N, b - a, e)),  e = Tk, or b + (Tk - Tq) when causal;
        P, lse[a:b] = masked softmax of scale * S (Numba, in place; masked P exactly 0);
        O[a:b] = P V[:e] (batched BLAS).

    Needs Tq <= Tk (every row sees a key); other shapes and dtypes go to the tiled kernel.
    """
    scale = _default_scale(q, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    if (q.dtype not in (np.float32, np.float64) or not (q.dtype == k.dtype == v.dtype)
            or t_query > t_key):
        return forward_numba(q, k, v, causal, scale)
    q3, k3, v3 = _as_heads(q), _as_heads(k), _as_heads(v)              # (N, T, D)
    out = np.empty_like(q3)
    lse = np.empty(q3.shape[:2], dtype=q.dtype)                          # (N, Tq)
    offset = t_key - t_query
    strip_buffer = np.empty(q3.shape[0] * min(STRIP_Q, t_query) * t_key, dtype=q.dtype)
    for start in range(0, t_query, STRIP_Q):
        stop = min(start + STRIP_Q, t_query)
        key_stop = min(t_key, stop + offset) if causal else t_key
        # The strip's causal offset is key_stop - (stop - start) = start + offset, which the
        # softmax pass reads from the strip's shape: row i sees strip keys j <= i + start + offset.
        scores = _strip_view(strip_buffer, q3.shape[0], stop - start, key_stop)         # (N, rows, e)
        np.matmul(q3[:, start:stop], np.swapaxes(k3[:, :key_stop], -1, -2), out=scores)  # S
        lse[:, start:stop] = _softmax_rows_kernel(scores, bool(causal), q.dtype.type(scale),
                                                  q.dtype == np.float32)                 # S -> P
        np.matmul(scores, v3[:, :key_stop], out=out[:, start:stop])                     # P V
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward_strips_blas(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """Same contract as ``backward_reference``, for long T: per query strip [a, b), keys [0, e),

        S = Q[a:b] K[:e]^T,  dP = dO[a:b] V[:e]^T (batched BLAS);
        P = exp(scale S - lse[a:b]),  dS' = scale P (dP - delta), delta_i = dO_i . o_i (Numba);
        dV[:e] += P^T dO[a:b],  dK[:e] += dS'^T Q[a:b],  dQ[a:b] = dS' K[:e] (batched BLAS).
    """
    scale = _default_scale(q, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    if (len({a.dtype for a in (do, q, k, v, o)}) != 1 or q.dtype not in (np.float32, np.float64)
            or t_query > t_key):
        return backward_numba(do, q, k, v, o, lse, causal, scale)
    do3, q3, k3, v3, o3 = (_as_heads(a) for a in (do, q, k, v, o))
    lse2 = np.ascontiguousarray(lse, dtype=q.dtype).reshape(q3.shape[:2])   # (N, Tq)
    dq = np.empty_like(q3)
    dk = np.zeros_like(k3)
    dv = np.zeros_like(v3)
    offset = t_key - t_query
    n_heads, strip_size = q3.shape[0], q3.shape[0] * min(STRIP_Q, t_query) * t_key
    scores_buffer, dscores_buffer = np.empty(strip_size, q.dtype), np.empty(strip_size, q.dtype)
    key_grad_buffer = np.empty_like(k3)                                 # one strip's share of dK or dV
    for start in range(0, t_query, STRIP_Q):
        stop = min(start + STRIP_Q, t_query)
        key_stop = min(t_key, stop + offset) if causal else t_key
        q_strip, do_strip = q3[:, start:stop], do3[:, start:stop]      # (N, rows, D)
        keys, values = k3[:, :key_stop], v3[:, :key_stop]              # (N, e, D)
        scores = _strip_view(scores_buffer, n_heads, stop - start, key_stop)
        dscores = _strip_view(dscores_buffer, n_heads, stop - start, key_stop)
        np.matmul(q_strip, np.swapaxes(keys, -1, -2), out=scores)       # S   (N, rows, e)
        np.matmul(do_strip, np.swapaxes(values, -1, -2), out=dscores)  # dP  (N, rows, e)
        _softmax_backward_rows_kernel(scores, dscores, do_strip, o3[:, start:stop], lse2[:, start:stop],
                                      bool(causal), q.dtype.type(scale), q.dtype == np.float32, True)
        key_grad = key_grad_buffer[:, :key_stop]
        dv[:, :key_stop] += np.matmul(np.swapaxes(scores, -1, -2), do_strip, out=key_grad)    # P^T dO
        dk[:, :key_stop] += np.matmul(np.swapaxes(dscores, -1, -2), q_strip, out=key_grad)    # scale dS^T Q
        np.matmul(dscores, keys, out=dq[:, start:stop])                          # scale dS K
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


# ============================================================== dispatch

def _numba_path(q, k) -> str:
    """The Numba rung's path: batched BLAS while the scores fit, else strips (or a forced one)."""
    return numba_path("attention", "batched" if q.shape[-2] * k.shape[-2] <= BATCHED_MAX_SCORES else "strips")


def forward(q, k, v, causal: bool, scale: float | None = None):
    """(o, lse) on the fastest rung for ``q``: CUDA for CuPy, Numba for NumPy, else the reference."""
    rung = pick(q, "attention")
    if rung == "cuda":
        kernel = cuda_kernel("attention_forward")
        if kernel is not None:
            return kernel(q, k, v, causal, scale)
    elif rung == "numba":
        path = _numba_path(q, k)
        if path == "tiled":
            return forward_numba(q, k, v, causal, scale)
        if path == "batched":
            return forward_batched_numba(q, k, v, causal, scale)
        return forward_strips_blas(q, k, v, causal, scale)
    return forward_reference(q, k, v, causal, scale)


def forward_keeping_probs(q, k, v, causal: bool, scale: float | None = None):
    """(o, lse, probs) for a training step: as ``forward``, plus P (B, H, Tq, Tk) where the
    batched path made it anyway (short T on the Numba rung), else None. Hand ``probs`` to
    ``backward_from_probs``."""
    if pick(q, "attention") == "numba" and _numba_path(q, k) == "batched":
        return forward_batched_numba(q, k, v, causal, scale, keep_probs=True)
    o, lse = forward(q, k, v, causal, scale)
    return o, lse, None


def backward_from_probs(do, q, k, v, o, lse, probs, causal: bool, scale: float | None = None):
    """(dq, dk, dv) as ``backward``, reusing P from ``forward_keeping_probs`` when it kept one."""
    if probs is not None and pick(q, "attention") == "numba":
        return backward_batched_numba(do, q, k, v, o, lse, causal, scale, probs=probs)
    return backward(do, q, k, v, o, lse, causal, scale)


def backward(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """(dq, dk, dv) on the fastest rung for ``q`` (see ``forward``)."""
    rung = pick(q, "attention")
    if rung == "cuda":
        kernel = cuda_kernel("attention_backward")
        if kernel is not None:
            return kernel(do, q, k, v, o, lse, causal, scale)
    elif rung == "numba":
        path = _numba_path(q, k)
        if path == "tiled":
            return backward_numba(do, q, k, v, o, lse, causal, scale)
        if path == "batched":
            return backward_batched_numba(do, q, k, v, o, lse, causal, scale)
        return backward_strips_blas(do, q, k, v, o, lse, causal, scale)
    return backward_reference(do, q, k, v, o, lse, causal, scale)
