"""Scaled dot-product attention, rung 2a: a FlashAttention-style tiled Numba kernel (CPU), the
BLAS-free rung (and the strips' fallback for Tq > Tk; see kernels/attention.py for the ladder).
Same contract as ``attention_reference`` for the causal mask; calls with a ``blocked`` mask run
the reference.

The kernel never materialises the (Tq, Tk) scores: it walks key blocks with an online softmax
(running row max m and running sum l, rescaling the output accumulator when m grows), keeps only
lse for the backward, and skips key blocks that are entirely in the causal future; its memory is
linear in T.

Speed (B=4, H=4, T=1024, D=64, causal, float32, 2 threads): it
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

from scratchlm.kernels import njit, num_threads, prange
from scratchlm.kernels.attention_reference import _default_scale, backward_reference, forward_reference


def forward_numba(q, k, v, causal: bool, scale: float | None = None, blocked=None):
    """The tiled online-softmax kernel below; same contract as ``forward_reference``.
    It has no mask but the causal one: calls with ``blocked`` run the reference."""
    scale = _default_scale(q, scale)
    q3, k3, v3 = _as_heads(q), _as_heads(k), _as_heads(v)
    if (q3 is None or k3 is None or v3 is None or not (q.dtype == k.dtype == v.dtype)
            or blocked is not None):
        return forward_reference(q, k, v, causal, scale, blocked)
    out, lse = _attention_forward_kernel(q3, k3, v3, bool(causal), q.dtype.type(scale),
                                         q.dtype == np.float32)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward_numba(do, q, k, v, o, lse, causal: bool, scale: float | None = None, blocked=None):
    """dq, dk, dv by the two-level tiled kernel below; same contract as ``backward_reference``
    (calls with ``blocked`` run the reference)."""
    scale = _default_scale(q, scale)
    arrays = [_as_heads(a) for a in (do, q, k, v, o)]
    if any(a is None for a in arrays) or len({a.dtype for a in arrays}) != 1 or blocked is not None:
        return backward_reference(do, q, k, v, o, lse, causal, scale, blocked)
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
