"""A GPT decode step over a few rows: the NumPy reference and a fused Numba kernel.

Shapes: B rows in the step, C channels, H heads, D = C / H head size, F = 4C hidden units,
V vocabulary, S cache slots, T the cache's length (block_size).

The step, for rows b = 0..B-1, row b feeding token i_b at position t_b and using cache slot s_b:

    x = wte[i_b] + pos[t_b]                                              (B, C)
    per block:
        h    = ln_1(x)
        qkv  = h @ W_attn + b_attn = [q | k | v]                         (B, 3C)
        K[s_b, :, t_b] = k_b,   V[s_b, :, t_b] = v_b                      this position's keys and values
        a_bh = sum_u softmax_u(q_bh . K[s_b, h, u] / sqrt(D)) V[s_b, h, u]   over u = 0..t_b, per head h
        x   += a @ W_proj + b_proj
        x   += gelu(ln_2(x) @ W_fc + b_fc) @ W_out + b_out                (B, C), via (B, F)
    logits = ln_f(x) @ wte^T                                             (B, V), the tied head

K and V are the caller's ``LayerKVCache`` buffers, (S, H, T, D) per block, written in place. A
prefill is the same step with the prompt's positions as rows that all use one slot: row t
attends over positions 0..t, and every row's keys are written before any row reads them.

Why a kernel. At batch 1 a step reads every weight once and does two flops per weight, so its
speed is the memory bandwidth it draws. The NumPy path (the reference below) makes ~15 array
calls per block, each a few microseconds of Python and C, and its matrix-vector products run on
one BLAS thread (two OpenBLAS threads hand off at every call, and on a busy machine they waited
for each other), so it draws one core's bandwidth. The kernel runs the whole step in one call:

- Work is cut into *shares* that write disjoint outputs. A block has two phases: attention,
  cut by heads (a share computes its heads' q, k, v columns, their attention, and their part of
  the output projection, partial_s = a[:, heads_s] @ W_proj[heads_s, :]; a head needs nothing
  from another head), and the MLP, cut by hidden units (partial_s = gelu(h @ W_fc[:, units_s] +
  b_fc[units_s]) @ W_out[units_s, :]). Then x += bias + sum_s partial_s. The head is a phase
  cut by vocabulary rows.
- Threads *claim* shares from a counter (an atomic increment) and count them done; before a
  phase a thread waits until every share of the previous one is done, then adds the partials to
  its own copy of x (each thread keeps one; the sums run in the same order, so the copies are
  equal bit for bit). One parallel region per step: Numba's workqueue threads take ~50-100 us
  to start and join a region (they wait on condition variables), too much to pay per product.
- No thread waits for one that has not started: a thread that starts late (the workqueue wakes
  its threads one by one) finds the early shares taken and joins in, and a single thread runs
  the whole step alone. A thread waits only for shares another has claimed and is running, so
  nothing deadlocks, whatever the thread count or scheduling, and two threads degrade towards one.
  A step smaller than PARALLEL_MIN_MACS runs on one thread without a region.

The products stream W in the order it is stored ((n_in, n_out), contiguous rows): out[:, j] +=
x[:, i] W[i, j] for eight rows i at a time. Sums run in another order than BLAS's, so float32
logits differ from the reference's in the last bits (the tests bound it). The kernel is float32
only (the dtype models decode in); float64 runs the reference.
"""
from __future__ import annotations

import math
import platform
from typing import NamedTuple

import numpy as np

from scratchlm import backend
from scratchlm.kernels import intrinsic, llvm_ir, njit, num_threads, numba, pick, prange, types
from scratchlm.kernels.attention_rows import _exp2_float32 as exp2_float32

carray = numba.carray if numba is not None else None


class BlockWeights(NamedTuple):
    """The arrays of one GPT block (models/gpt.py's ``Block``) that a decode step reads.
    Matrices are (n_in, n_out); a missing bias (``bias=False``) is passed as zeros."""
    ln1_weight: object      # (C,)
    ln1_bias: object        # (C,)
    attn_weight: object     # (C, 3C)
    attn_bias: object       # (3C,)
    proj_weight: object     # (C, C)
    proj_bias: object       # (C,)
    ln2_weight: object      # (C,)
    ln2_bias: object        # (C,)
    fc_weight: object       # (C, F)
    fc_bias: object         # (F,)
    out_weight: object      # (F, C)
    out_bias: object        # (C,)
    eps: float              # the layer norms' epsilon


class StepWeights(NamedTuple):
    """Every array a decode step reads: the embeddings, the blocks, the final norm (the head is wte)."""
    wte: object             # (V, C), also the head
    positions: object       # (T, C): wpe, or the sinusoidal table
    blocks: tuple           # of BlockWeights, one per block
    lnf_weight: object      # (C,)
    lnf_bias: object        # (C,)
    lnf_eps: float


class Scratch:
    """Buffers of a step over up to ``rows`` rows, allocated once: a step allocates nothing but
    the reference's few temporaries. ``kernel``: the Numba kernel's own, for float32 NumPy arrays
    (models decode in float32; float64, a test's precision, runs the reference and compiles nothing)."""

    def __init__(self, rows: int, logit_rows: int, n_embd: int, n_head: int, n_layer: int, vocab_size: int,
                 block_size: int, dtype, xp):
        C, F = n_embd, 4 * n_embd
        self.x = xp.empty((rows, C), dtype)                       # the residual stream
        self.h = xp.empty((rows, C), dtype)                       # a layer norm's output, then a sublayer's
        self.qkv = xp.empty((rows, 3 * C), dtype)
        self.attended = xp.empty((rows, C), dtype)                # the heads' outputs, side by side
        self.fc = xp.empty((rows, F), dtype)
        self.tmp = xp.empty((rows, F), dtype)                     # the reference GELU's scratch
        self.scores = xp.empty((rows, n_head, 1, block_size), dtype)
        self.mask = xp.empty((rows, 1, 1, block_size), dtype)     # 0 up to a row's position, -inf after
        self.logits = xp.empty((logit_rows, vocab_size), dtype)       # a step's rows (a prefill's last)
        self.kernel = None
        if pick(self.x, "decode") == "numba" and self.x.dtype == np.float32:
            self.kernel = KernelScratch(min(rows, KERNEL_MAX_ROWS), n_embd, n_head, n_layer, block_size, dtype)


# Above this many rows the kernel's products (each W row times every row, no register blocking)
# fall behind BLAS's matrix-matrix kernels and the reference runs (a long prefill, a large batch).
KERNEL_MAX_ROWS = 32


# ============================================================== 1. reference (the truth)

def step_reference(weights: StepWeights, keys, values, tokens, positions, slots, read, scratch: Scratch,
                   last_only: bool = False):
    """The step above on the backend's arrays -> logits (B, V), or (1, V) of the last row with
    ``last_only`` (a view of ``scratch.logits``). tokens, positions, slots: (B,) backend ints;
    ``read``: the cache rows attend over, an index giving B slots or a slice of the one slot every
    row shares (a prefill's: gathering it B times would copy it B times). keys, values: one
    (S, H, T, D) array per block."""
    xp = backend.xp
    B = len(tokens)
    x = scratch.x[:B]
    xp.add(weights.wte[tokens], weights.positions[positions], out=x)          # (B, C)
    for block, k, v in zip(weights.blocks, keys, values):
        block_reference(x, block, k, v, slots, positions, read, scratch)
    if last_only:
        x = x[-1:]
    h = scratch.h[:len(x)]
    layer_norm_reference(x, weights.lnf_weight, weights.lnf_bias, weights.lnf_eps, h)
    logits = scratch.logits[:len(x)]
    xp.matmul(h, weights.wte.T, out=logits)                                   # (B, V)
    return logits


def block_reference(x, w: BlockWeights, keys, values, slots, positions, read, scratch: Scratch) -> None:
    """One block of the step, in place on x (B, C), keys and values. Scores past a row's position
    get -inf: its slot holds another sequence's or stale keys there."""
    xp = backend.xp
    B, C = x.shape
    H, D = keys.shape[1], keys.shape[3]
    L = int(positions.max()) + 1                                               # positions the longest row attends
    h, qkv, fc, attended = scratch.h[:B], scratch.qkv[:B], scratch.fc[:B], scratch.attended[:B]
    mask = scratch.mask[:B, :, :, :L]                                          # (B, 1, 1, L)
    mask[...] = 0
    mask[(xp.arange(L)[None, :] > positions[:, None])[:, None, None, :]] = -xp.inf
    scores = scratch.scores[:B, :, :, :L]                                      # (B, H, 1, L)
    layer_norm_reference(x, w.ln1_weight, w.ln1_bias, w.eps, h)
    linear_reference(h, w.attn_weight, w.attn_bias, qkv)                      # (B, 3C)
    keys[slots, :, positions] = qkv[:, C:2 * C].reshape(B, H, D)
    values[slots, :, positions] = qkv[:, 2 * C:].reshape(B, H, D)
    q = qkv[:, :C].reshape(B, H, 1, D)
    xp.matmul(q, keys[read, :, :L].swapaxes(-1, -2), out=scores)              # (B, H, 1, L)
    scores *= 1.0 / math.sqrt(D)
    scores += mask
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    xp.matmul(scores, values[read, :, :L], out=attended.reshape(B, H, 1, D))  # (B, H, 1, D)
    linear_reference(attended, w.proj_weight, w.proj_bias, h)
    x += h
    layer_norm_reference(x, w.ln2_weight, w.ln2_bias, w.eps, h)
    linear_reference(h, w.fc_weight, w.fc_bias, fc)                           # (B, F)
    gelu_tanh_reference(fc, scratch.tmp[:B])
    linear_reference(fc, w.out_weight, w.out_bias, h)
    x += h


def linear_reference(x, weight, bias, out) -> None:
    """out = x @ W + b, in place (W stored (n_in, n_out), as ``nn.Linear``'s)."""
    backend.xp.matmul(x, weight, out=out)
    out += bias


def layer_norm_reference(x, weight, bias, eps: float, out) -> None:
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (an ``nn.LayerNorm``)."""
    xp = backend.xp
    inv_c = 1.0 / x.shape[-1]                # sum * 1/C: ndarray.mean's Python wrapper costs more than the sum here
    xp.subtract(x, x.sum(axis=-1, keepdims=True) * inv_c, out=out)
    out /= xp.sqrt((out * out).sum(axis=-1, keepdims=True) * inv_c + eps)
    out *= weight
    out += bias


SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
LOG2_E = 1.0 / math.log(2.0)


def gelu_tanh_reference(x, tmp) -> None:
    """x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in place (GPT-2's GELU), ``tmp`` as scratch."""
    xp = backend.xp
    xp.multiply(x, x, out=tmp)
    tmp *= TANH_CUBIC
    tmp += 1.0
    tmp *= x
    tmp *= SQRT_2_OVER_PI                    # sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(tmp, out=tmp)
    tmp += 1.0
    tmp *= 0.5
    x *= tmp


# ============================================================== 2. Numba (CPU)

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
        self.bound = None

    def bind(self, weights: StepWeights, keys, values) -> None:
        """The address table of these blocks and caches (see ``_pointer``), made on first use."""
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
    """Shares per phase at ``threads`` threads: two each, so a thread that starts late or is
    descheduled leaves at most half a thread's work to wait for, yet each share still streams
    long runs of a matrix."""
    return 2 * threads


# A step of fewer multiply-adds than this (rows x weights) runs on one thread: starting and joining a
# parallel region of Numba's workqueue takes ~20-100 us (it is longer on a busy machine), as long as
# a whole one-row step of the nano-cpu model (0.8M weights, ~0.15 ms). The 6-layer 384-wide model's
# one-row step (10.6M) and nano-cpu's 16-row step (13M) run on every thread.
PARALLEL_MIN_MACS = 1 << 22


# int64 counters 64 bytes apart: two threads' counters never share a cache line.
COUNTER_STRIDE = 8


def step_numba(weights: StepWeights, keys, values, tokens, positions, slots, scratch: Scratch,
               last_only: bool = False, threads: int | None = None):
    """Same contract as ``step_reference`` (every row reads its own slot, so no ``read``), on
    ``threads`` threads (default: Numba's current count, or 1 below PARALLEL_MIN_MACS)."""
    k = scratch.kernel
    k.bind(weights, keys, values)
    B = len(tokens)
    C, H, F, V = k.shape[0], k.shape[1], 4 * k.shape[0], weights.wte.shape[0]
    if threads is None:                        # a small step on one thread: a region's start costs more
        threads = num_threads() if B * (12 * C * C * len(weights.blocks) + V * C) >= PARALLEL_MIN_MACS else 1
    threads = min(threads, len(k.x))           # buffers for this many
    shares = max_shares(threads)
    head_shares = min(H, k.max_shares, shares)
    unit_shares = max(1, min(shares, k.max_shares, F // 64))
    vocab_shares = max(1, min(shares, k.max_shares, V // 64))
    first_row = B - 1 if last_only else 0
    scale = weights.wte.dtype.type(1.0 / math.sqrt(C // H))
    k.counters[:] = 0
    # whole buffers (B is an argument): a slice's layout would depend on B, and each layout is a compile
    args = (weights.wte, weights.positions, k.addresses, k.eps, k.shape, weights.lnf_weight, weights.lnf_bias,
            weights.lnf_eps, B, tokens, positions, slots, scale, head_shares, unit_shares, vocab_shares, first_row,
            k.x, k.h, k.qkv, k.attended, k.fc, k.scores, k.partials, k.counters, scratch.logits)
    if threads <= 1:
        _run_step(0, *args)                    # no parallel region: one thread claims every share
    else:
        _step_parallel(threads, *args)
    return scratch.logits[:B - first_row]


@njit(parallel=True, cache=True)
def _step_parallel(threads, wte, table, addresses, eps, shape, lnf_weight, lnf_bias, lnf_eps, B, tokens, positions,
                   slots, scale, head_shares, unit_shares, vocab_shares, first_row, x, h, qkv, attended, fc, scores,
                   partials, counters, logits):
    """``threads`` copies of ``_run_step`` in one parallel region, each with its own buffers."""
    for thread in prange(threads):          # (prange's index is unsigned: cast, or _run_step compiles twice)
        _run_step(np.int64(thread), wte, table, addresses, eps, shape, lnf_weight, lnf_bias, lnf_eps, B, tokens,
                  positions, slots, scale, head_shares, unit_shares, vocab_shares, first_row, x, h, qkv, attended, fc,
                  scores, partials, counters, logits)


@njit(cache=True)
def _run_step(thread, wte, table, addresses, eps, shape, lnf_weight, lnf_bias, lnf_eps, B, tokens, positions, slots,
              scale, head_shares, unit_shares, vocab_shares, first_row, xs, hs, qkvs, attendeds, fcs, scoress,
              partials, counters, logits):
    """One thread's part of the step over rows 0..B-1: every share it claims, and its own copy of x."""
    x, h, qkv, attended = xs[thread], hs[thread], qkvs[thread], attendeds[thread]          # this thread's own
    fc, scores = fcs[thread], scoress[thread]
    C, H, S, T = shape[0], shape[1], shape[2], shape[3]
    D, F, V = C // H, 4 * C, wte.shape[0]
    for b in range(B):
        for j in range(C):
            x[b, j] = wte[tokens[b], j] + table[positions[b], j]
    for layer in range(addresses.shape[0]):
        at = addresses[layer]                                                  # this block's arrays, as views
        keys, values = _view4(wte, at[12], S, H, T, D), _view4(wte, at[13], S, H, T, D)
        phase = 2 * layer                                                      # attention, cut by heads
        _layer_norm_rows(x, 0, B, _view1(wte, at[0], C), _view1(wte, at[1], C), eps[layer], h)
        w_attn, b_attn, w_proj = _view2(wte, at[2], C, 3 * C), _view1(wte, at[3], 3 * C), _view2(wte, at[4], C, C)
        share = _claim(counters, phase, head_shares)
        while share >= 0:
            first, last = share * H // head_shares, (share + 1) * H // head_shares
            _attention_share(B, h, w_attn, b_attn, w_proj, keys, values, slots, positions, scale, first, last,
                             qkv, attended, scores, partials[phase, share])
            _finish(counters, phase)
            share = _claim(counters, phase, head_shares)
        _wait_all(counters, phase, head_shares)
        _add_partials(x, B, partials[phase], head_shares, _view1(wte, at[5], C))
        phase += 1                                                             # the MLP, cut by hidden units
        _layer_norm_rows(x, 0, B, _view1(wte, at[6], C), _view1(wte, at[7], C), eps[layer], h)
        w_fc, b_fc, w_out = _view2(wte, at[8], C, F), _view1(wte, at[9], F), _view2(wte, at[10], F, C)
        share = _claim(counters, phase, unit_shares)
        while share >= 0:
            first, last = _aligned_range(F, share, unit_shares)
            _mlp_share(B, h, w_fc, b_fc, w_out, first, last, fc, partials[phase, share])
            _finish(counters, phase)
            share = _claim(counters, phase, unit_shares)
        _wait_all(counters, phase, unit_shares)
        _add_partials(x, B, partials[phase], unit_shares, _view1(wte, at[11], C))
    _layer_norm_rows(x, first_row, B, lnf_weight, lnf_bias, lnf_eps, h)
    phase = 2 * addresses.shape[0]                                             # the head, cut by vocabulary
    share = _claim(counters, phase, vocab_shares)
    while share >= 0:
        first, last = _aligned_range(V, share, vocab_shares)
        _head_share(h, first_row, B, wte, first, last, logits)
        share = _claim(counters, phase, vocab_shares)
    # the region's end waits for every thread: no count of finished head shares is needed


# ---------------------------------------------------------------- the blocks' arrays as addresses

# A Numba parallel region takes arrays and numbers, not tuples of arrays (a block's weights), and
# one region per block would pay the start and join per block. So the kernel gets a table of the
# blocks' arrays' addresses, (n_layer, 14) int64, and rebuilds each as a view inside (carray: no
# copy). The table is made from the arrays themselves, which ``KernelScratch.bind`` keeps
# referenced while the table is in use, after checking that each is C-contiguous with the
# expected shape and dtype (a view built from an address trusts both).

@intrinsic
def _pointer(typingctx, like, address):
    """``address`` as a pointer to elements of ``like``'s dtype."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[1], context.get_value_type(signature.return_type))
    return types.CPointer(like.dtype)(like, types.int64), codegen


@njit(cache=True)
def _view1(like, address, n):
    return carray(_pointer(like, address), (n,))


@njit(cache=True)
def _view2(like, address, rows, cols):
    return carray(_pointer(like, address), (rows, cols))


@njit(cache=True)
def _view4(like, address, a, b, c, d):
    return carray(_pointer(like, address), (a, b, c, d))


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
    for part in range(3):                                                      # their q, k and v columns
        start = part * C
        for b in range(B):
            for j in range(start + lo, start + hi):
                qkv[b, j] = b_attn[j]
        _accumulate_product(B, h, 0, C, w_attn, start + lo, start + hi, qkv)
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
def _head_share(h, first_row, B, wte, first, last, logits):
    """logits[b - first_row, v] = h[b] . wte[v] for rows [first_row, B) and vocabulary entries
    [first, last) (the tied head: rows of wte are contiguous, so each logit is one dot product,
    reassociated as in ``_attend``)."""
    C = h.shape[1]
    for b in range(first_row, B):
        for v in range(first, last):
            dot = h[b, 0] * wte[v, 0]
            for j in range(1, C):
                dot += h[b, j] * wte[v, j]
            logits[b - first_row, v] = dot


@njit(cache=True, fastmath={"contract"})
def _accumulate_product(B, x, i_first, i_last, weight, j_first, j_last, out):
    """out[b, j] += sum_i x[b, i] W[i, j] over i in [i_first, i_last), for rows b < B and columns j
    in [j_first, j_last).

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
        for b in range(B):
            x0, x1, x2, x3, x4, x5, x6, x7 = x[b, i], x[b, i + 1], x[b, i + 2], x[b, i + 3], \
                x[b, i + 4], x[b, i + 5], x[b, i + 6], x[b, i + 7]
            row = out[b, j_first:j_last]
            for j in range(row.shape[0]):
                row[j] += (x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j]) + \
                          (x4 * w4[j] + x5 * w5[j] + x6 * w6[j] + x7 * w7[j])
        i += 8
    while i < i_last:
        w0 = weight[i, j_first:j_last]
        for b in range(B):
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
    """out = (x - mean) / sqrt(var + eps) * weight + bias for rows [first, last) of x, sums in float64."""
    C = x.shape[1]
    for b in range(first, last):
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
            out[b, j] = (x[b, j] - mean) * rstd * weight[j] + bias[j]


# ---------------------------------------------------------------- claiming shares

# Counters of phase p: claimed at index 2p * COUNTER_STRIDE, done at (2p + 1) * COUNTER_STRIDE.
# The increments are atomic read-modify-writes (sequentially consistent: a share's partial is
# written before its "done" count is seen); the wait reads with acquire ordering.

@njit(cache=True)
def _claim(counters, phase, shares):
    """The next unclaimed share of ``phase``, or -1 when all are taken."""
    share = _atomic_add(counters, 2 * phase * COUNTER_STRIDE, 1)
    return share if share < shares else -1


@njit(cache=True)
def _finish(counters, phase):
    _atomic_add(counters, (2 * phase + 1) * COUNTER_STRIDE, 1)


# A thread that waits longer than this many spins (~10 us; a share's threads usually finish within
# a few us of each other) is likely waiting on a descheduled thread: it yields its core (sched_yield
# returns at once when nothing else wants it) instead of spinning through a time slice.
SPINS_BEFORE_YIELD = 500


@njit(cache=True)
def _wait_all(counters, phase, shares):
    """Return once every share of ``phase`` is done. The shares are claimed by running threads and
    wait for nothing, so this ends."""
    spins = 0
    while _atomic_load(counters, (2 * phase + 1) * COUNTER_STRIDE) < shares:
        spins += 1
        if spins < SPINS_BEFORE_YIELD:
            _spin_pause()
        else:
            _yield_core()


def _element_pointer(context, builder, array_type, array, index):
    from numba.core import cgutils
    data = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, data, [index])


@intrinsic
def _atomic_add(typingctx, counters, index, value):
    """counters[index] += value as one atomic instruction; returns the value before."""
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")
    return types.int64(types.Array(types.int64, 1, "C"), types.intp, types.int64), codegen


@intrinsic
def _atomic_load(typingctx, counters, index):
    """counters[index], read atomically (acquire: later reads see what was written before it)."""
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(types.Array(types.int64, 1, "C"), types.intp), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _spin_pause(typingctx):
    """The x86 ``pause`` hint inside a spin loop (the core backs off; nothing elsewhere)."""
    def codegen(context, builder, signature, args):
        if _X86:
            from numba.core import cgutils
            hint = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), []),
                                                  "llvm.x86.sse2.pause")
            builder.call(hint, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _yield_core(typingctx):
    """POSIX sched_yield(): let another runnable thread have this core."""
    def codegen(context, builder, signature, args):
        from numba.core import cgutils
        function = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(llvm_ir.IntType(32), []),
                                                  "sched_yield")
        builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen


# ============================================================== dispatch

def uses_kernel(scratch: Scratch, rows: int) -> bool:
    """Does a step over ``rows`` rows run the Numba kernel? When the scratch was made for it (NumPy
    float32 arrays, Numba importable), the rung is not forced to the reference (``pick``), and
    rows <= KERNEL_MAX_ROWS."""
    return scratch.kernel is not None and rows <= scratch.kernel.rows and pick(scratch.x, "decode") == "numba"


def step(weights: StepWeights, keys, values, tokens, positions, slots, read, scratch: Scratch,
         last_only: bool = False):
    """The step on the fastest rung (``uses_kernel``). tokens, positions, slots: host int64 arrays
    (moved to the device for the reference on CuPy)."""
    if uses_kernel(scratch, len(tokens)):
        return step_numba(weights, keys, values, tokens, positions, slots, scratch, last_only)
    to = backend.to_device
    return step_reference(weights, keys, values, to(tokens), to(positions), to(slots), read, scratch, last_only)
