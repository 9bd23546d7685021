"""A GPT decode step over a few rows: the NumPy reference, the dispatch, and why a fused kernel
(the Numba rung is kernels/decode_numba.py; its thread machinery kernels/claims.py).

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
attends over positions 0..t, and every row's keys are written before any row reads them. Several
prompts prefill together the same way, each prompt's rows in its own slot; only the rows named
``head_rows`` (each prompt's last) go through ln_f and the head.

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
  A model whose weights fit the caches (under PARALLEL_MIN_WEIGHT_BYTES) steps on one thread.

The products stream W in the order it is stored ((n_in, n_out), contiguous rows): out[:, j] +=
x[:, i] W[i, j] for eight rows i at a time, applied to four step rows at once (each load of W
feeds four rows' multiply-adds: at batch 1 a step is bound by reading the weights, at batch 16 it
was bound by re-reading them from L1 for every row). Sums run in another order than BLAS's, so float32
logits differ from the reference's in the last bits (the tests bound it). The kernel is float32
only (the dtype models decode in); float64 runs the reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from scratchlm import backend
from scratchlm.kernels import pick
from scratchlm.kernels.decode_numba import KERNEL_MAX_ROWS, KernelScratch, step_numba  # noqa: F401
from scratchlm.kernels.gelu import SQRT_2_OVER_PI, TANH_CUBIC


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
        self.logits = xp.empty((logit_rows, vocab_size), dtype)       # a step's rows (a prefill's prompts' last)
        self.kernel = None
        if pick(self.x, "decode") == "numba" and self.x.dtype == np.float32:
            self.kernel = KernelScratch(min(rows, KERNEL_MAX_ROWS), n_embd, n_head, n_layer, block_size, dtype)


# ============================================================== 1. reference (the truth)

def step_reference(weights: StepWeights, keys, values, tokens, positions, slots, read, scratch: Scratch,
                   head_rows=None):
    """The step above on the backend's arrays -> logits (B, V), or (N, V) of the rows ``head_rows``
    (N backend ints; a view of ``scratch.logits``). tokens, positions, slots: (B,) backend ints;
    ``read``: the cache rows attend over, an index giving B slots or a slice of the one slot every
    row shares (a prefill's: gathering it B times would copy it B times). keys, values: one
    (S, H, T, D) array per block."""
    xp = backend.xp
    B = len(tokens)
    x = scratch.x[:B]
    xp.add(weights.wte[tokens], weights.positions[positions], out=x)          # (B, C)
    for block, k, v in zip(weights.blocks, keys, values):
        block_reference(x, block, k, v, slots, positions, read, scratch)
    if head_rows is not None:
        x = x[head_rows]                                                       # (N, C)
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


# ============================================================== dispatch

def uses_kernel(scratch: Scratch, rows: int) -> bool:
    """Does a step over ``rows`` rows run the Numba kernel? When the scratch was made for it (NumPy
    float32 arrays, Numba importable), the rung is not forced to the reference (``pick``), and
    rows <= KERNEL_MAX_ROWS."""
    return scratch.kernel is not None and rows <= scratch.kernel.rows and pick(scratch.x, "decode") == "numba"


def step(weights: StepWeights, keys, values, tokens, positions, slots, read, scratch: Scratch,
         head_rows=None):
    """The step on the fastest rung (``uses_kernel``). tokens, positions, slots, head_rows (None: every
    row): host int64 arrays (moved to the device for the reference on CuPy)."""
    if uses_kernel(scratch, len(tokens)):
        return step_numba(weights, keys, values, tokens, positions, slots, scratch, head_rows)
    to = backend.to_device
    read = read if isinstance(read, slice) else to(read)
    return step_reference(weights, keys, values, to(tokens), to(positions), to(slots), read, scratch,
                          None if head_rows is None else to(head_rows))
