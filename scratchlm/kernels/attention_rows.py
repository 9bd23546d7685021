"""The softmax row passes of the batched-BLAS attention paths (2b and 2c of ``kernels.attention``):
a block of scores becomes P in place (forward, with the row's log-sum-exp) or scale * dS
(backward, recomputing P from the saved log-sum-exp when asked), one row at a time while it sits
in L1. Masks: the causal one by index, any other through a ``blocked`` (B, Tq, Tk) array.
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm.kernels import intrinsic, llvm_ir, njit, types

# The row passes below turn a block of scores into P (forward) or scale * dS (backward) in place,
# one row at a time while it sits in L1: a running max over the scores' bits as ordered integers,
# one loop doing exp and the row sum, one normalising multiply. The float32 exp is exp2 of the
# base-2 score x = s * scale * log2(e) (``_exp2_float32``: a branch-free polynomial written as one
# loop, no libm call, no int32 scratch row); float64 uses math.exp. The row sum may be
# reassociated ("reassoc") and multiply-adds contracted, so the loops vectorise; the exp has no
# other fast-math flag. A pass is serial (one strip of a chunk of heads) and compiled nogil, so
# the strip path's worker threads run passes of different chunks at once (parallel Numba
# versions over a strip were earlier found no faster at 2 threads, and far slower on the loaded
# machine, next to OpenBLAS's spinning threads). Measured on one (16, 128, 2048) causal strip,
# one thread, median process CPU time on the shared 2-core machine:
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


@njit(cache=True, nogil=True, fastmath={"reassoc"})
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
    """The (Tk,) blocked flags of ``row`` of stacked head ``head`` (= b * H + h, counted over the
    whole (B*H) stack), broadcasting blocked's size-1 batch and query axes."""
    b = head // heads_per_batch if blocked.shape[0] > 1 else 0
    return blocked[b, row if blocked.shape[1] > 1 else 0]


@njit(inline="always")
def _set_where(row, count, flags, value):
    """row[j] = value where flags[j], for j < count."""
    for j in range(count):
        if flags[j]:
            row[j] = value


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _softmax_rows_kernel(scores, causal, scale, fast, blocked, heads_per_batch, row_offset, head_offset):
    """scores (N, Tq, Tk) = Q K^T, in place -> P = softmax(scale S + mask) row by row; returns lse (N, Tq).

    Row i keeps its visible keys j <= i + (Tk - Tq) when causal; the rest of the row becomes 0
    (exactly the -inf score's weight). ``blocked`` (B|1, Tq'|1, Tk' >= Tk) bool, or empty for
    none: key j of row i of head n is skipped where blocked[b, row_offset + i, j] with
    b = (head_offset + n) // heads_per_batch (row_offset places a strip of rows, head_offset a
    chunk of heads in the (B*H) stack). A row with no visible key gets P = 0 and lse = -inf.
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
                flags = _blocked_row(blocked, head_offset + head, row_offset + i, heads_per_batch)
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


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def _softmax_backward_rows_kernel(scores, dprobs, do, o, lse, causal, scale, fast, recompute,
                                  blocked, heads_per_batch, row_offset, head_offset):
    """In place: scores (N, Tq, Tk) = Q K^T -> P;  dprobs (N, Tq, Tk) = dO V^T -> scale * dS.
    With ``recompute=False`` scores already holds P (zeros where masked) and is only read.
    ``blocked``, ``heads_per_batch``, ``row_offset``, ``head_offset``: as in ``_softmax_rows_kernel``.

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
                    flags = _blocked_row(blocked, head_offset + head, row_offset + i, heads_per_batch)
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
