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

import math

import numpy as np

from scratchlm.kernels import cuda_kernel, intrinsic, llvm_ir, njit, numba_path, pick, types
from scratchlm.kernels.attention_reference import (  # noqa: F401  (the reference rung, re-exported)
    _causal_allowed, _default_scale, _masked_scores, backward_reference, blocked_keys, forward_reference,
    probs_reference)
from scratchlm.kernels.attention_tiled import (  # noqa: F401  (the tiled rung, re-exported)
    BLOCK_K, BLOCK_Q, _as_heads, _exp_shifted, backward_numba, forward_numba)


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
                               _blocked_rows(blocked), q.shape[1], 0)    # scores -> P
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
                                  q.dtype == np.float32, recompute, _blocked_rows(blocked), q.shape[1], 0)
    # (S -> P), dP -> scale dS
    dv = np.matmul(np.swapaxes(scores, -1, -2), do)                     # P^T dO      (B, H, Tk, D)
    dq = np.matmul(dscores, k)                                           # scale dS K  (B, H, Tq, D)
    dk = np.matmul(np.swapaxes(dscores, -1, -2), q)                     # scale dS^T Q (B, H, Tk, D)
    return dq, dk, dv


# The row passes below turn a block of scores into P (forward) or scale * dS (backward) in place,
# one row at a time while it sits in L1: a running max over the scores' bits as ordered integers,
# one loop doing exp and the row sum, one normalising multiply. The float32 exp is exp2 of the
# base-2 score x = s * scale * log2(e) (``_exp2_float32``: a branch-free polynomial written as one
# loop, no libm call, no int32 scratch row); float64 uses math.exp. The row sum may be
# reassociated ("reassoc") and multiply-adds contracted, so the loops vectorise; the exp has no
# other fast-math flag. The passes are serial: OpenBLAS's threads spin between the matmuls, and
# parallel (Numba workqueue) versions were earlier found no faster at 2 threads; on the loaded
# machine they were far slower. Measured on one (16, 128, 2048) causal strip, one thread, median
# process CPU time on the shared 2-core machine:
# forward pass 6.2 -> 4.1 ms (1.5 -> 1.0 ns per score), backward pass 4.0 -> 2.4 ms, against the
# previous two-loop Cody-Waite exp with a scalar max.

LOG2_E = 1.0 / math.log(2.0)
LN_2 = math.log(2.0)
# 2^r = exp(r ln 2) = sum_k (ln 2)^k r^k / k!, degree 7: relative error < 1e-8 on |r| <= 1/2.
_EXP2_TAYLOR = tuple(LN_2 ** n / math.factorial(n) for n in range(8))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a register reinterpretation)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always")
def _exp2_float32(x):
    """2^x for a float32 x, branch-free so a loop of it vectorises.

    x = n + r with n = round(x), |r| <= 1/2: 2^x = 2^n 2^r, 2^r by its degree-7 Taylor polynomial
    (relative error < 1e-8, below float32's 6e-8), 2^n by writing n + 127 into a float32's
    exponent bits. x is clamped to [-126, 127] (2^-126 ~ 1.2e-38 stands in for 0: callers that
    need an exact 0 for a masked score write it themselves); a NaN passes the clamps and stays NaN.
    """
    x = np.float32(-126.0) if x < np.float32(-126.0) else x
    x = np.float32(127.0) if x > np.float32(127.0) else x
    n = np.floor(x + np.float32(0.5))
    r = x - n
    poly = np.float32(_EXP2_TAYLOR[7])
    poly = poly * r + np.float32(_EXP2_TAYLOR[6])
    poly = poly * r + np.float32(_EXP2_TAYLOR[5])
    poly = poly * r + np.float32(_EXP2_TAYLOR[4])
    poly = poly * r + np.float32(_EXP2_TAYLOR[3])
    poly = poly * r + np.float32(_EXP2_TAYLOR[2])
    poly = poly * r + np.float32(_EXP2_TAYLOR[1])
    poly = poly * r + np.float32(1.0)
    return poly * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@intrinsic
def _float32_bits(typingctx, value):
    """The int32 holding the IEEE bits of the float32 ``value``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))
    return types.int32(types.float32), codegen


@njit(inline="always")
def _ordered_int(bits):
    """Flip the magnitude bits of negative floats: then int32 order is float order (and back:
    the map is its own inverse). -inf < finite < +inf < NaN with the sign bit clear."""
    return bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))


@njit(inline="always")
def _scaled_row_max(row, count, factor, fast):
    """max_{j < count} factor * row[j], with row[j] *= factor in place; count >= 1; ``fast``
    for float32 rows.

    A running max of floats is a chain of compares LLVM will not vectorise without fast-math
    (which would also let it drop NaNs); over the float32 bits mapped to ordered int32s it is an
    integer max, which it does (measured: 0.57 -> 0.11 ns per element). A NaN with the sign bit
    clear wins the max; any other NaN reaches the exp pass, which carries it into the row sum.
    """
    if not fast:
        peak = row.dtype.type(-np.inf)
        for j in range(count):
            x = row[j] * factor
            row[j] = x
            peak = max(peak, x)
        return peak
    peak_key = np.int32(-2**31)
    for j in range(count):
        x = row[j] * factor
        row[j] = x
        key = _ordered_int(_float32_bits(x))
        peak_key = key if key > peak_key else peak_key
    return _float32_from_bits(_ordered_int(peak_key))


@njit(cache=True, fastmath={"reassoc"})
def _row_dot(a, b):
    """sum_d a[d] b[d] over two rows of equal length, accumulated in float64."""
    total = 0.0
    for d in range(a.shape[0]):
        total += a[d] * b[d]
    return total


# No mask but the causal one: the row kernels take this empty "blocked" array (one compiled type).
_NOTHING_BLOCKED = np.zeros((0, 0, 0), dtype=np.bool_)


def _blocked_rows(blocked):
    """``blocked`` (B|1, Tq|1, Tk) as the C-contiguous bool array the row kernels read."""
    return _NOTHING_BLOCKED if blocked is None else np.ascontiguousarray(blocked, dtype=np.bool_)


@njit(inline="always")
def _blocked_row(blocked, head, row, heads_per_batch):
    """The (Tk,) blocked flags of ``row`` of stacked head ``head`` (= b * H + h), broadcasting
    blocked's size-1 batch and query axes."""
    b = head // heads_per_batch if blocked.shape[0] > 1 else 0
    return blocked[b, row if blocked.shape[1] > 1 else 0]


@njit(inline="always")
def _set_where(row, count, flags, value):
    """row[j] = value where flags[j], for j < count."""
    for j in range(count):
        if flags[j]:
            row[j] = value


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _softmax_rows_kernel(scores, causal, scale, fast, blocked, heads_per_batch, row_offset):
    """scores (N, Tq, Tk) = Q K^T, in place -> P = softmax(scale S + mask) row by row; returns lse (N, Tq).

    Row i keeps its visible keys j <= i + (Tk - Tq) when causal; the rest of the row becomes 0
    (exactly the -inf score's weight). ``blocked`` (B|1, Tq'|1, Tk' >= Tk) bool, or empty for
    none: key j of row i is skipped where blocked[b, row_offset + i, j] (N = B * heads_per_batch;
    row_offset places a strip of rows). A row with no visible key gets P = 0 and lse = -inf.
    ``fast`` (float32): the scores are taken in base 2, x = s * scale * log2(e), so
    P = 2^(x - max x) / sum and lse = ln 2 * (max x + log2(sum)).
    """
    n_heads, t_query, t_key = scores.shape
    offset = t_key - t_query
    masked = blocked.shape[0] > 0
    factor = scores.dtype.type(scale * LOG2_E) if fast else scores.dtype.type(scale)
    one = scores.dtype.type(1)
    lse = np.empty((n_heads, t_query), dtype=scores.dtype)
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
            if masked:                                               # blocked scores -> -inf
                flags = _blocked_row(blocked, head, row_offset + i, heads_per_batch)
                _set_where(row, visible, flags, -np.inf)
            row_max = _scaled_row_max(row, visible, factor, fast)   # row -> x = factor * s
            if row_max == -np.inf:                                   # every visible key blocked
                for j in range(visible):
                    row[j] = 0
                continue
            row_sum = row_max * 0                                    # sum_j exp(x_j - max)
            if fast:
                for j in range(visible):
                    p = _exp2_float32(row[j] - row_max)
                    row[j] = p
                    row_sum += p
            else:
                for j in range(visible):
                    p = math.exp(row[j] - row_max)
                    row[j] = p
                    row_sum += p
            if masked:                                               # the fast exp clamps -inf to
                _set_where(row, visible, flags, 0)                   # 2^-126; make it exactly 0
            if row_sum > 0:
                inverse = one / row_sum
                for j in range(visible):
                    row[j] *= inverse
                if fast:
                    lse[head, i] = (row_max + math.log2(row_sum)) * LN_2
                else:
                    lse[head, i] = row_max + math.log(row_sum)
    return lse


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _softmax_backward_rows_kernel(scores, dprobs, do, o, lse, causal, scale, fast, recompute,
                                  blocked, heads_per_batch, row_offset):
    """In place: scores (N, Tq, Tk) = Q K^T -> P;  dprobs (N, Tq, Tk) = dO V^T -> scale * dS.
    With ``recompute=False`` scores already holds P (zeros where masked) and is only read.
    ``blocked``, ``heads_per_batch``, ``row_offset``: as in ``_softmax_rows_kernel``.

    P = exp(scale s_ij - lse_i) on visible keys and 0 elsewhere (as 2^(x_ij - lse_i log2 e)
    with x = s scale log2(e) when ``fast``);
    dS = P * (dP - delta_i) with delta_i = dO_i . o_i  (do, o: (N, Tq, D); lse: (N, Tq)).
    The scale of dQ = scale dS K and dK = scale dS^T Q is folded into dS here.
    """
    n_heads, t_query, t_key = scores.shape
    offset = t_key - t_query
    masked = blocked.shape[0] > 0
    dtype = scores.dtype.type
    factor = dtype(scale * LOG2_E) if fast else dtype(scale)
    for head in range(n_heads):
        for i in range(t_query):
            probs = scores[head, i]
            dscores = dprobs[head, i]
            visible = t_key
            if causal:
                visible = max(0, min(t_key, i + offset + 1))
            row_delta = dtype(_row_dot(do[head, i], o[head, i]))
            if recompute:
                if masked:
                    flags = _blocked_row(blocked, head, row_offset + i, heads_per_batch)
                    if lse[head, i] == -np.inf:                      # a row with every key blocked
                        visible = 0
                if fast:
                    shift = dtype(lse[head, i] * LOG2_E)
                    for j in range(visible):
                        probs[j] = _exp2_float32(probs[j] * factor - shift)
                else:
                    shift = lse[head, i]
                    for j in range(visible):
                        probs[j] = math.exp(probs[j] * factor - shift)
                if masked:
                    _set_where(probs, visible, flags, 0)
                for j in range(visible, t_key):
                    probs[j] = 0
            for j in range(visible):
                dscores[j] = scale * probs[j] * (dscores[j] - row_delta)
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


def forward_strips_blas(q, k, v, causal: bool, scale: float | None = None, blocked=None):
    """Same contract as ``forward_reference``, for long T: per query strip [a, b) of STRIP_Q rows,

        S = Q[a:b] K[:e]^T (batched BLAS, (N, b - a, e)),  e = Tk, or b + (Tk - Tq) when causal;
        P, lse[a:b] = masked softmax of scale * S (Numba, in place; masked P exactly 0);
        O[a:b] = P V[:e] (batched BLAS).

    Needs Tq <= Tk (every row sees a key); other shapes and dtypes go to the tiled kernel
    (and from there, with ``blocked``, to the reference).
    """
    scale = _default_scale(q, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    if (q.dtype not in (np.float32, np.float64) or not (q.dtype == k.dtype == v.dtype)
            or t_query > t_key):
        return forward_numba(q, k, v, causal, scale, blocked)
    flags = _blocked_rows(blocked)
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
                                                  q.dtype == np.float32, flags, q.shape[1], start)                 # S -> P
        np.matmul(scores, v3[:, :key_stop], out=out[:, start:stop])                     # P V
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward_strips_blas(do, q, k, v, o, lse, causal: bool, scale: float | None = None, blocked=None):
    """Same contract as ``backward_reference``, for long T: per query strip [a, b), keys [0, e),

        S = Q[a:b] K[:e]^T,  dP = dO[a:b] V[:e]^T (batched BLAS);
        P = exp(scale S - lse[a:b]),  dS' = scale P (dP - delta), delta_i = dO_i . o_i (Numba);
        dV[:e] += P^T dO[a:b],  dK[:e] += dS'^T Q[a:b],  dQ[a:b] = dS' K[:e] (batched BLAS).
    """
    scale = _default_scale(q, scale)
    t_query, t_key = q.shape[-2], k.shape[-2]
    if (len({a.dtype for a in (do, q, k, v, o)}) != 1 or q.dtype not in (np.float32, np.float64)
            or t_query > t_key):
        return backward_numba(do, q, k, v, o, lse, causal, scale, blocked)
    flags = _blocked_rows(blocked)
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
                                      bool(causal), q.dtype.type(scale), q.dtype == np.float32, True,
                                      flags, q.shape[1], start)
        key_grad = key_grad_buffer[:, :key_stop]
        dv[:, :key_stop] += np.matmul(np.swapaxes(scores, -1, -2), do_strip, out=key_grad)    # P^T dO
        dk[:, :key_stop] += np.matmul(np.swapaxes(dscores, -1, -2), q_strip, out=key_grad)    # scale dS^T Q
        np.matmul(dscores, keys, out=dq[:, start:stop])                          # scale dS K
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
    """(o, lse, probs) for a training step: as ``forward``, plus P (B, H, Tq, Tk) where the
    batched path made it anyway (short T on the Numba rung), else None. Hand ``probs`` to
    ``backward_from_probs``."""
    if pick(q, "attention") == "numba" and _numba_path(q, k) == "batched":
        return forward_batched_numba(q, k, v, causal, scale, blocked, keep_probs=True)
    o, lse = forward(q, k, v, causal, scale, blocked)
    return o, lse, None


def backward_from_probs(do, q, k, v, o, lse, probs, causal: bool, scale: float | None = None, blocked=None):
    """(dq, dk, dv) as ``backward``, reusing P from ``forward_keeping_probs`` when it kept one."""
    if probs is not None and pick(q, "attention") == "numba":
        return backward_batched_numba(do, q, k, v, o, lse, causal, scale, blocked, probs=probs)
    return backward(do, q, k, v, o, lse, causal, scale, blocked)


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
