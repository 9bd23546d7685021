"""The Numba rung of the decode step (kernels/decode.py has the math, the reference and why):
the whole step of a GPT over a few rows in one call, its work cut into shares that threads claim.

    _run_step        one thread's part: embeddings, then per block the attention phase (shares =
                     ranges of heads) and the MLP phase (shares = ranges of hidden units), then the
                     head (shares = ranges of the vocabulary); its own copy of the residual stream
    _step_parallel   ``threads`` copies of it in one Numba parallel region
    step_numba       the entry point: buffers, share counts, one thread or a region

Float32 only (the dtype models decode in).
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm.kernels import njit, num_threads, prange
from scratchlm.kernels.attention_rows import LOG2_E
from scratchlm.kernels.attention_rows import _exp2_float32 as exp2_float32
from scratchlm.kernels.claims import COUNTER_STRIDE, claim, finish, view1, view2, view4, wait_all
from scratchlm.kernels.gelu import SQRT_2_OVER_PI, TANH_CUBIC

# Above this many rows the kernel's products (each W row times every row, no register blocking)
# fall behind BLAS's matrix-matrix kernels and the reference runs (a long prefill, a large batch).
KERNEL_MAX_ROWS = 32


class KernelScratch:
    """The kernel's buffers: per thread a copy of the residual stream and of every intermediate
    (each thread runs whole shares on its own), per phase and share a partial sum (B, C) written
    once (a phase's partials are never reused within a step: a late thread may still be reading
    them while the others are phases ahead), and the claim/done counters, one cache line each."""

    def __init__(self, rows: int, n_embd: int, n_head: int, n_layer: int, block_size: int, dtype):
        threads = max_threads()
        C, F = n_embd, 4 * n_embd
        self.rows = rows
        self.x = np.empty((threads, rows, C), dtype)
        self.h = np.empty((threads, rows, C), dtype)
        self.qkv = np.empty((threads, rows, 3 * C), dtype)
        self.attended = np.empty((threads, rows, C), dtype)
        self.fc = np.empty((threads, rows, F), dtype)
        self.scores = np.empty((threads, block_size), dtype)
        phases = 2 * n_layer
        self.max_shares = max(n_head, max_shares(threads))
        self.partials = np.empty((phases, self.max_shares, rows, C), dtype)
        self.counters = np.zeros(2 * (phases + 1) * COUNTER_STRIDE, np.int64)
        self.every_row = np.arange(rows, dtype=np.int64)          # the head rows of a step: all of them
        self.bound = None

    def bind(self, weights, keys, values) -> None:
        """The address table of these blocks and caches (kernels/claims.py's ``view2``: a Numba
        parallel region takes arrays and numbers, not a tuple of a block's arrays), made on first use.
        Each array must be C-contiguous with the expected shape and dtype: a view built from an
        address trusts both. ``bound`` keeps every array of the table alive."""
        if self.bound is not None and self.bound[0] is weights and self.bound[1] is keys and self.bound[2] is values:
            return
        C = weights.wte.shape[1]
        S, H, T, D = keys[0].shape
        dtype = weights.wte.dtype
        expected = {0: (C,), 1: (C,), 2: (C, 3 * C), 3: (3 * C,), 4: (C, C), 5: (C,), 6: (C,), 7: (C,),
                    8: (C, 4 * C), 9: (4 * C,), 10: (4 * C, C), 11: (C,), 12: (S, H, T, D), 13: (S, H, T, D)}
        addresses = np.empty((len(weights.blocks), 14), np.int64)
        for layer, (block, k, v) in enumerate(zip(weights.blocks, keys, values)):
            for index, array in enumerate(block[:12] + (k, v)):
                if (not isinstance(array, np.ndarray) or array.shape != expected[index] or array.dtype != dtype
                        or not array.flags.c_contiguous):
                    raise ValueError(f"decode kernel: block {layer} array {index} is not a C-contiguous {dtype} "
                                     f"array of shape {expected[index]}")
                addresses[layer, index] = array.ctypes.data
        self.addresses = addresses
        self.eps = np.array([block.eps for block in weights.blocks], np.float64)
        self.shape = np.array([C, H, S, T], np.int64)
        self.bound = (weights, keys, values)          # keeps every array of the table alive


def max_threads() -> int:
    """The most threads a Numba region may use in this process (1 without Numba)."""
    from scratchlm.kernels import numba
    return numba.config.NUMBA_NUM_THREADS if numba is not None else 1


def max_shares(threads: int) -> int:
    """Shares per phase at ``threads`` threads: SHARES_PER_THREAD each."""
    return SHARES_PER_THREAD * threads


# One share per thread: a share reads a block of columns of W_attn and W_fc (and rows of W_proj and
# W_out), and the longer the runs of a row it streams, the faster. Measured on the 6-layer 384-wide
# step at 2 threads on the busy 2-core machine (load 6, 25 interleaved rounds): 1 share per thread
# 5.1 ms CPU per step (median), 2 shares 5.6, 3 shares 6.1. A thread that starts late still finds
# the other's share taken and is not waited for.
SHARES_PER_THREAD = 1


# A model whose weights are smaller than this runs its steps on one thread. A step streams every
# weight once: when they come from memory (the 6-layer 384-wide model: 42.7 MB), two cores read
# them faster than one (quiet machine, one row: 358 vs 263 tokens/s). When they sit in the caches
# (nano-cpu: 3.2 MB), a step is a few hundred us of arithmetic, and starting a parallel region
# (~20-100 us) and the threads' waits between phases cost more than the split saves (quiet machine,
# 16 rows: 1.05 ms on one thread, 1.15 on two).
PARALLEL_MIN_WEIGHT_BYTES = 8 << 20


def step_numba(weights, keys, values, tokens, positions, slots, scratch,
               head_rows=None, threads: int | None = None):
    """Same contract as decode.py's ``step_reference`` (every row reads its own slot, so no ``read``), on
    ``threads`` threads (default: Numba's current count, or 1 below PARALLEL_MIN_WEIGHT_BYTES)."""
    k = scratch.kernel
    k.bind(weights, keys, values)
    B = len(tokens)
    C, H, F, V = k.shape[0], k.shape[1], 4 * k.shape[0], weights.wte.shape[0]
    if threads is None:                        # weights in the caches: one thread (PARALLEL_MIN_WEIGHT_BYTES)
        weight_bytes = (12 * C * C * len(weights.blocks) + V * C) * weights.wte.dtype.itemsize
        threads = num_threads() if weight_bytes >= PARALLEL_MIN_WEIGHT_BYTES else 1
    threads = min(threads, len(k.x))           # buffers for this many
    shares = max_shares(threads)
    head_shares = min(H, k.max_shares, shares)
    unit_shares = max(1, min(shares, k.max_shares, F // 64))
    vocab_shares = max(1, min(shares, k.max_shares, V // 64))
    head_rows = k.every_row[:B] if head_rows is None else np.asarray(head_rows, dtype=np.int64)
    scale = weights.wte.dtype.type(1.0 / math.sqrt(C // H))
    k.counters[:] = 0
    # whole buffers (B is an argument): a slice's layout would depend on B, and each layout is a compile
    args = (weights.wte, weights.positions, k.addresses, k.eps, k.shape, weights.lnf_weight, weights.lnf_bias,
            weights.lnf_eps, B, tokens, positions, slots, scale, head_shares, unit_shares, vocab_shares, head_rows,
            k.x, k.h, k.qkv, k.attended, k.fc, k.scores, k.partials, k.counters, scratch.logits)
    if threads <= 1:
        _run_step(0, *args)                    # no parallel region: one thread claims every share
    else:
        _step_parallel(threads, *args)
    return scratch.logits[:len(head_rows)]


@njit(parallel=True, cache=True)
def _step_parallel(threads, wte, table, addresses, eps, shape, lnf_weight, lnf_bias, lnf_eps, B, tokens, positions,
                   slots, scale, head_shares, unit_shares, vocab_shares, head_rows, x, h, qkv, attended, fc,
                   scores, partials, counters, logits):
    """``threads`` copies of ``_run_step`` in one parallel region, each with its own buffers."""
    for thread in prange(threads):          # (prange's index is unsigned: cast, or _run_step compiles twice)
        _run_step(np.int64(thread), wte, table, addresses, eps, shape, lnf_weight, lnf_bias, lnf_eps, B, tokens,
                  positions, slots, scale, head_shares, unit_shares, vocab_shares, head_rows, x, h, qkv, attended, fc,
                  scores, partials, counters, logits)


@njit(cache=True)
def _run_step(thread, wte, table, addresses, eps, shape, lnf_weight, lnf_bias, lnf_eps, B, tokens, positions, slots,
              scale, head_shares, unit_shares, vocab_shares, head_rows, xs, hs, qkvs, attendeds, fcs, scoress,
              partials, counters, logits):
    """One thread's part of the step over rows 0..B-1: every share it claims, and its own copy of x.
    Only the rows ``head_rows`` go through the final norm and the head (logits row k: head_rows[k])."""
    x, h, qkv, attended = xs[thread], hs[thread], qkvs[thread], attendeds[thread]          # this thread's own
    fc, scores = fcs[thread], scoress[thread]
    C, H, S, T = shape[0], shape[1], shape[2], shape[3]
    D, F, V = C // H, 4 * C, wte.shape[0]
    for b in range(B):
        for j in range(C):
            x[b, j] = wte[tokens[b], j] + table[positions[b], j]
    for layer in range(addresses.shape[0]):
        at = addresses[layer]                                                  # this block's arrays, as views
        keys, values = view4(wte, at[12], S, H, T, D), view4(wte, at[13], S, H, T, D)
        phase = 2 * layer                                                      # attention, cut by heads
        _layer_norm_rows(x, 0, B, view1(wte, at[0], C), view1(wte, at[1], C), eps[layer], h)
        w_attn, b_attn, w_proj = view2(wte, at[2], C, 3 * C), view1(wte, at[3], 3 * C), view2(wte, at[4], C, C)
        share = claim(counters, phase, head_shares)
        while share >= 0:
            first, last = share * H // head_shares, (share + 1) * H // head_shares
            _attention_share(B, h, w_attn, b_attn, w_proj, keys, values, slots, positions, scale, first, last,
                             qkv, attended, scores, partials[phase, share])
            finish(counters, phase)
            share = claim(counters, phase, head_shares)
        wait_all(counters, phase, head_shares)
        _add_partials(x, B, partials[phase], head_shares, view1(wte, at[5], C))
        phase += 1                                                             # the MLP, cut by hidden units
        _layer_norm_rows(x, 0, B, view1(wte, at[6], C), view1(wte, at[7], C), eps[layer], h)
        w_fc, b_fc, w_out = view2(wte, at[8], C, F), view1(wte, at[9], F), view2(wte, at[10], F, C)
        share = claim(counters, phase, unit_shares)
        while share >= 0:
            first, last = _aligned_range(F, share, unit_shares)
            _mlp_share(B, h, w_fc, b_fc, w_out, first, last, fc, partials[phase, share])
            finish(counters, phase)
            share = claim(counters, phase, unit_shares)
        wait_all(counters, phase, unit_shares)
        _add_partials(x, B, partials[phase], unit_shares, view1(wte, at[11], C))
    for k in range(head_rows.shape[0]):
        _layer_norm_row(x, head_rows[k], lnf_weight, lnf_bias, lnf_eps, h, k)
    phase = 2 * addresses.shape[0]                                             # the head, cut by vocabulary
    share = claim(counters, phase, vocab_shares)
    while share >= 0:
        first, last = _aligned_range(V, share, vocab_shares)
        _head_share(h, head_rows.shape[0], wte, first, last, logits)
        share = claim(counters, phase, vocab_shares)
    # the region's end waits for every thread: no count of finished head shares is needed


@njit(cache=True)
def _aligned_range(n, part, parts):
    """[first, last) of part ``part`` of ``parts`` over 0..n, cut at multiples of 16 (whole 64-byte
    lines of float32, so two threads never write one cache line)."""
    step = (n + parts - 1) // parts
    step = (step + 15) // 16 * 16
    return min(n, part * step), min(n, (part + 1) * step)


@njit(cache=True)
def _attention_share(B, h, w_attn, b_attn, w_proj, keys, values, slots, positions, scale, first, last, qkv,
                     attended, scores, partial):
    """Heads [first, last) of rows 0..B-1: their q, k, v, their attention, and their part of the
    output projection, partial = a[:, heads] @ W_proj[heads, :] (B, C)."""
    C = h.shape[1]
    D = keys.shape[3]
    lo, hi = first * D, last * D                                               # these heads' channels
    for b in range(B):                                                         # their q, k and v columns
        for part in range(3):
            for j in range(part * C + lo, part * C + hi):
                qkv[b, j] = b_attn[j]
    if lo == 0 and hi == C:                    # every head: whole rows of W_attn, one contiguous stream
        _accumulate_product(B, h, 0, C, w_attn, 0, 3 * C, qkv)
    else:
        for part in range(3):
            _accumulate_product(B, h, 0, C, w_attn, part * C + lo, part * C + hi, qkv)
    for b in range(B):                                                         # every row writes, then rows read:
        for head in range(first, last):                                        # a prefill's rows share one slot
            keys[slots[b], head, positions[b]] = qkv[b, C + head * D:C + (head + 1) * D]
            values[slots[b], head, positions[b]] = qkv[b, 2 * C + head * D:2 * C + (head + 1) * D]
    for b in range(B):
        for head in range(first, last):
            _attend(qkv[b, head * D:(head + 1) * D], keys[slots[b], head], values[slots[b], head],
                    positions[b] + 1, scale, scores, attended[b, head * D:(head + 1) * D])
    partial[:B] = 0
    _accumulate_product(B, attended, lo, hi, w_proj, 0, C, partial)


# A score is a D-term dot product: summed in order it is a chain of D dependent additions
# (latency-bound: it was the largest cost at long contexts). "reassoc" lets LLVM split it over
# SIMD lanes, "contract" fuse the multiply-adds; neither touches NaN or infinity handling (no
# blanket fastmath: the max below starts from the first score, not from a -inf it would assume away).
@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _attend(q, keys, values, length, scale, scores, out):
    """out (D,) = sum_u softmax_u(q . keys[u] * scale) values[u] over u < length (one head, one row)."""
    D = q.shape[0]
    for u in range(length):
        dot = q[0] * keys[u, 0]
        for d in range(1, D):
            dot += q[d] * keys[u, d]
        scores[u] = dot * scale
    top = scores[0]
    for u in range(1, length):
        top = max(top, scores[u])
    total = np.float32(0.0)
    for u in range(length):                    # exp(s - top) = 2^((s - top) log2 e), vectorised
        e = exp2_float32((scores[u] - top) * np.float32(LOG2_E))
        scores[u] = e
        total += e
    out[:] = 0
    for u in range(length):
        weight = scores[u]
        for d in range(D):
            out[d] += weight * values[u, d]
    inv = 1.0 / total
    for d in range(D):
        out[d] *= inv


@njit(cache=True, error_model="numpy")
def _mlp_share(B, h, w_fc, b_fc, w_out, first, last, fc, partial):
    """Hidden units [first, last) of rows 0..B-1: f = gelu(h @ W_fc[:, units] + b_fc[units]) into
    fc, and their part of the output, partial = f @ W_out[units, :] (B, C)."""
    C = h.shape[1]
    for b in range(B):
        for j in range(first, last):
            fc[b, j] = b_fc[j]
    _accumulate_product(B, h, 0, C, w_fc, first, last, fc)
    for b in range(B):
        units = fc[b, first:last]              # gelu(v) = v sigmoid(2u) = v / (1 + 2^(-2u log2 e)), vectorised
        for j in range(units.shape[0]):
            v = units[j]
            u = np.float32(SQRT_2_OVER_PI) * (v + np.float32(TANH_CUBIC) * v * v * v)
            units[j] = v / (np.float32(1.0) + exp2_float32(np.float32(-2.0 * LOG2_E) * u))
    partial[:B] = 0
    _accumulate_product(B, fc, first, last, w_out, 0, C, partial)


@njit(cache=True, fastmath={"reassoc", "contract"})
def _head_share(h, n, wte, first, last, logits):
    """logits[k, v] = h[k] . wte[v] for rows k < n and vocabulary entries
    [first, last) (the tied head: rows of wte are contiguous, so each logit is one dot product,
    reassociated as in ``_attend``)."""
    C = h.shape[1]
    for k in range(n):
        for v in range(first, last):
            dot = h[k, 0] * wte[v, 0]
            for j in range(1, C):
                dot += h[k, j] * wte[v, j]
            logits[k, v] = dot


@njit(cache=True, fastmath={"contract"})
def _accumulate_product(B, x, i_first, i_last, weight, j_first, j_last, out):
    """out[b, j] += sum_i x[b, i] W[i, j] over i in [i_first, i_last), for rows b < B and columns j
    in [j_first, j_last): rows four at a time (``_accumulate_four_rows``), the rest one at a time
    (``_accumulate_rows``). Every row's sums run in the same order either way (eight W rows per
    bracketed group, groups in order), so a row's result does not depend on B or on its place
    in the step: a prompt prefilled with others, or a row decoded with others, gets the bits it
    would get alone (on the same thread count).

    (Taking W eight rows at a time for every block of four, so that W streams once per product
    however many blocks, measured no faster on the 6-layer 384-wide model at 16 and 32 rows, and
    slower where W stays in cache: more, shorter inner loops.)"""
    b = 0
    while b + 4 <= B:
        _accumulate_four_rows(b, x, i_first, i_last, weight, j_first, j_last, out)
        b += 4
    if b < B:
        _accumulate_rows(b, B, x, i_first, i_last, weight, j_first, j_last, out)


@njit(cache=True, fastmath={"contract"})
def _accumulate_four_rows(b, x, i_first, i_last, weight, j_first, j_last, out):
    """``_accumulate_rows`` for rows b..b+3, register-blocked: each load of a W element feeds four
    rows' multiply-adds (eight loads of W and four loads and stores of out per 32 of them, against
    eight and one per 8 row by row). At 16 rows this is what makes a step cost less than 16 one-row
    steps: the products were bound by loads from L1, not by arithmetic."""
    r0, r1, r2, r3 = out[b, j_first:j_last], out[b + 1, j_first:j_last], \
        out[b + 2, j_first:j_last], out[b + 3, j_first:j_last]
    x0, x1, x2, x3 = x[b], x[b + 1], x[b + 2], x[b + 3]
    i = i_first
    while i + 8 <= i_last:
        w0, w1, w2, w3 = weight[i, j_first:j_last], weight[i + 1, j_first:j_last], \
            weight[i + 2, j_first:j_last], weight[i + 3, j_first:j_last]
        w4, w5, w6, w7 = weight[i + 4, j_first:j_last], weight[i + 5, j_first:j_last], \
            weight[i + 6, j_first:j_last], weight[i + 7, j_first:j_last]
        a0, a1, a2, a3, a4, a5, a6, a7 = x0[i], x0[i + 1], x0[i + 2], x0[i + 3], \
            x0[i + 4], x0[i + 5], x0[i + 6], x0[i + 7]
        b0, b1, b2, b3, b4, b5, b6, b7 = x1[i], x1[i + 1], x1[i + 2], x1[i + 3], \
            x1[i + 4], x1[i + 5], x1[i + 6], x1[i + 7]
        c0, c1, c2, c3, c4, c5, c6, c7 = x2[i], x2[i + 1], x2[i + 2], x2[i + 3], \
            x2[i + 4], x2[i + 5], x2[i + 6], x2[i + 7]
        d0, d1, d2, d3, d4, d5, d6, d7 = x3[i], x3[i + 1], x3[i + 2], x3[i + 3], \
            x3[i + 4], x3[i + 5], x3[i + 6], x3[i + 7]
        for j in range(r0.shape[0]):
            v0, v1, v2, v3, v4, v5, v6, v7 = w0[j], w1[j], w2[j], w3[j], w4[j], w5[j], w6[j], w7[j]
            r0[j] += (a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3) + (a4 * v4 + a5 * v5 + a6 * v6 + a7 * v7)
            r1[j] += (b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3) + (b4 * v4 + b5 * v5 + b6 * v6 + b7 * v7)
            r2[j] += (c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3) + (c4 * v4 + c5 * v5 + c6 * v6 + c7 * v7)
            r3[j] += (d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3) + (d4 * v4 + d5 * v5 + d6 * v6 + d7 * v7)
        i += 8
    while i < i_last:
        w0 = weight[i, j_first:j_last]
        a0, b0, c0, d0 = x0[i], x1[i], x2[i], x3[i]
        for j in range(r0.shape[0]):
            v0 = w0[j]
            r0[j] += a0 * v0
            r1[j] += b0 * v0
            r2[j] += c0 * v0
            r3[j] += d0 * v0
        i += 1


@njit(cache=True, fastmath={"contract"})
def _accumulate_rows(b_first, B, x, i_first, i_last, weight, j_first, j_last, out):
    """out[b, j] += sum_i x[b, i] W[i, j] for rows b in [b_first, B), one row at a time.

    Streams W's rows in storage order, eight at a time: one load and store of an output row per
    eight multiply-adds (four at a time ran 25% slower at batch 1, as did cutting the columns into
    L1-sized tiles). The eight rows of W, a few KB, stay in L1 while each of the B rows uses them.
    The inner loop runs over views from index 0: Numba then knows the index is never negative,
    drops its wraparound check, and the loop vectorises (with range(j_first, j_last) it stayed
    scalar, 4x slower). "contract" lets the multiply-adds fuse (FMA): no reordering of the sums."""
    i = i_first
    while i + 8 <= i_last:
        w0, w1, w2, w3 = weight[i, j_first:j_last], weight[i + 1, j_first:j_last], \
            weight[i + 2, j_first:j_last], weight[i + 3, j_first:j_last]
        w4, w5, w6, w7 = weight[i + 4, j_first:j_last], weight[i + 5, j_first:j_last], \
            weight[i + 6, j_first:j_last], weight[i + 7, j_first:j_last]
        for b in range(b_first, B):
            x0, x1, x2, x3, x4, x5, x6, x7 = x[b, i], x[b, i + 1], x[b, i + 2], x[b, i + 3], \
                x[b, i + 4], x[b, i + 5], x[b, i + 6], x[b, i + 7]
            row = out[b, j_first:j_last]
            for j in range(row.shape[0]):
                row[j] += (x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]) + \
                          (x4 * w4[j] + x5 * w5[j] + x6 * w6[j] + x7 * w7[j])
        i += 8
    while i < i_last:
        w0 = weight[i, j_first:j_last]
        for b in range(b_first, B):
            x0 = x[b, i]
            row = out[b, j_first:j_last]
            for j in range(row.shape[0]):
                row[j] += x0 * w0[j]
        i += 1


@njit(cache=True)
def _add_partials(x, B, partials, shares, bias):
    """x[:B] += bias + sum_s partials[s, :B] over a phase's shares, in share order (B, C)."""
    C = x.shape[1]
    for b in range(B):
        for j in range(C):
            total = bias[j]
            for s in range(shares):
                total += partials[s, b, j]
            x[b, j] += total


@njit(cache=True)
def _layer_norm_rows(x, first, last, weight, bias, eps, out):
    """out[b] = layer_norm(x[b]) for rows b in [first, last) (``_layer_norm_row``)."""
    for b in range(first, last):
        _layer_norm_row(x, b, weight, bias, eps, out, b)


@njit(cache=True)
def _layer_norm_row(x, b, weight, bias, eps, out, o):
    """out[o] = (x[b] - mean) / sqrt(var + eps) * weight + bias over the row, sums in float64."""
    C = x.shape[1]
    total = 0.0
    for j in range(C):
        total += x[b, j]
    mean = total / C
    total = 0.0
    for j in range(C):
        centered = x[b, j] - mean
        total += centered * centered
    rstd = 1.0 / math.sqrt(total / C + eps)
    for j in range(C):
        out[o, j] = (x[b, j] - mean) * rstd * weight[j] + bias[j]
