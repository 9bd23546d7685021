"""word2vec training with negative sampling: the reference, a Numba kernel, and dispatch.

Shapes: syn0 (V, D) input vectors ("v", the word vectors one keeps); syn1neg (V, D) output vectors
("u"); corpus (N,) int32 word ids of all sentences back to back; offsets (S + 1,) int64, sentence s
is corpus[offsets[s]:offsets[s + 1]].

One call trains a *block* of sentences, cut into contiguous ranges, one per worker:
``lo[t] <= s < hi[t]``. Workers run at once and write the shared matrices without locks (Hogwild,
as word2vec.c and gensim do: two threads rarely touch the same row at the same moment, and a lost
update is noise SGD absorbs). Worker t's learning rate falls linearly from ``alpha_start`` to
``alpha_end`` across its range, so that the whole block follows the global linear decay.

Per sentence, with each worker's own random stream (word2vec.c's 48-bit linear congruential
generator, ``r <- r * 25214903917 + 11 mod 2^48``, the same one gensim uses):

1. Subsampling: word w is kept when ``keep[w] >= (r >> 16) mod 2^32`` (keep[w] = P(keep w) * 2^32,
   computed in ``models.word2vec.keep_table``); one draw per word.
2. For each kept position i, a reduced window b = (r >> 16) mod window (uniform on 0..window-1), so
   the context is the ``window - b`` words on each side.
3. Skip-gram: for each context word c of centre w, the input vector of c predicts w (word2vec.c's
   and gensim's order) -- ``pair_update(v = syn0[c], positive = w)``. CBOW: h = mean of the context
   words' input vectors predicts w -- ``pair_update(v = h, positive = w)``, and the error vector is
   added to every context word's input vector unscaled, as word2vec.c and gensim do.
4. ``pair_update`` (negative sampling): with label 1 for the positive word and 0 for each of the
   ``negative`` noise words n_k drawn from the cumulative table (a noise word equal to the positive
   is skipped, as in word2vec.c), for each target t:
       f = u_t . v;   g = alpha * (label - sigmoid(f))
       e += g * u_t;   u_t += g * v            (e, the input's error, starts at 0)
   then v += e. That is one SGD step on L = -log s(u_w.v) - sum_k log s(-u_nk.v): see the gradient
   derivation in ``scratchlm.models.word2vec``. The sigmoid is computed exactly (word2vec.c uses a
   1000-entry table and skips |f| > 6; the exact value changes no result that matters).

The noise table: ``cum[i] = sum_{j <= i} count_j^0.75`` (integers); a draw x = (r >> 16) mod cum[-1]
picks the first i with cum[i] > x, so word i is drawn with probability count_i^0.75 / sum.
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm.kernels import njit, pick, prange

LCG_MUL, LCG_ADD, LCG_MASK = 25214903917, 11, (1 << 48) - 1


# ============================================================== 1. reference (the truth)

def _next(r: int) -> int:
    return (r * LCG_MUL + LCG_ADD) & LCG_MASK


def _draw_noise(cum, x) -> int:
    return int(np.searchsorted(cum, x, side="right"))


def _pair_update_reference(v, syn1neg, positive, negative, cum, r, alpha):
    """One negative-sampling step on input vector v (updated in place); returns the new stream."""
    e = np.zeros_like(v)
    for d in range(negative + 1):
        if d == 0:
            target, label = positive, 1.0
        else:
            target = _draw_noise(cum, (r >> 16) % int(cum[-1]))
            r = _next(r)
            if target == positive:
                continue
            label = 0.0
        u = syn1neg[target]
        f = float(np.dot(u, v))
        g = alpha * (label - 1.0 / (1.0 + math.exp(-f)))
        e += g * u
        syn1neg[target] += g * v
    return e, r


def train_block_reference(syn0, syn1neg, corpus, offsets, lo, hi, seeds, keep, cum,
                          alpha_start, alpha_end, window, negative, cbow):
    """Plain Python/NumPy twin of the kernel (workers taken one after the other).

    Updates syn0, syn1neg and seeds (uint64, one per worker) in place; returns the number of
    words trained on (kept by subsampling) per worker.
    """
    trained = np.zeros(len(lo), dtype=np.int64)
    for t in range(len(lo)):
        r = int(seeds[t])
        total = max(1, int(offsets[hi[t]] - offsets[lo[t]]))
        for s in range(lo[t], hi[t]):
            done = int(offsets[s] - offsets[lo[t]])
            alpha = alpha_start + (alpha_end - alpha_start) * done / total
            sentence = []
            for w in corpus[offsets[s]:offsets[s + 1]]:
                draw = (r >> 16) & 0xFFFFFFFF
                r = _next(r)
                if keep[w] >= draw:
                    sentence.append(int(w))
            n = len(sentence)
            trained[t] += n
            for i in range(n):
                b = (r >> 16) % window
                r = _next(r)
                start, stop = max(0, i - window + b), min(n, i + window + 1 - b)
                context = [sentence[j] for j in range(start, stop) if j != i]
                if not context:
                    continue
                if cbow:
                    h = syn0[context].mean(axis=0)
                    e, r = _pair_update_reference(h, syn1neg, sentence[i], negative, cum, r, alpha)
                    for c in context:
                        syn0[c] += e
                else:
                    for c in context:
                        e, r = _pair_update_reference(syn0[c], syn1neg, sentence[i], negative, cum, r, alpha)
                        syn0[c] += e
        seeds[t] = r
    return trained


# ============================================================== 2. Numba (CPU)

# 'reassoc' lets LLVM vectorise the dot products' sums (the hot loop); 'contract' allows FMA.
# Neither touches NaN/inf semantics (that would be 'nnan'/'ninf', which we do not ask for).
_FAST = {"reassoc", "contract"}


# Rows are addressed as (matrix, row index), never as views: a view of a shared matrix costs an
# atomic reference-count update on that matrix, and two workers doing that on every pair make its
# counter's cache line bounce between the cores (measured: no gain from the second thread).

@njit(cache=True, fastmath=_FAST, inline="always")
def _dot(a, i, b, j):
    acc = a.dtype.type(0)
    for k in range(a.shape[1]):
        acc += a[i, k] * b[j, k]
    return acc


@njit(cache=True, fastmath=_FAST, inline="always")
def _axpy(g, x, i, y, j):
    """y[j] += g * x[i]"""
    for k in range(x.shape[1]):
        y[j, k] += g * x[i, k]


@njit(cache=True, fastmath=_FAST, inline="always")
def _pair_update_numba(vs, iv, syn1neg, positive, negative, cum, r, alpha, e):
    """Kernel twin of _pair_update_reference on v = vs[iv]; e (1, D) receives the input's error."""
    mul, add, mask = np.uint64(LCG_MUL), np.uint64(LCG_ADD), np.uint64(LCG_MASK)
    e[0, :] = 0
    total = np.uint64(cum[cum.shape[0] - 1])
    for d in range(negative + 1):
        if d == 0:
            target = positive
            label = 1.0
        else:
            x = np.int64((r >> np.uint64(16)) % total)
            target = np.searchsorted(cum, x, side="right")
            r = (r * mul + add) & mask
            if target == positive:
                continue
            label = 0.0
        f = _dot(syn1neg, target, vs, iv)
        g = vs.dtype.type(alpha * (label - 1.0 / (1.0 + math.exp(-f))))
        for k in range(vs.shape[1]):             # e += g u_t; u_t += g v, in one pass over u_t
            u_k = syn1neg[target, k]
            e[0, k] += g * u_k
            syn1neg[target, k] = u_k + g * vs[iv, k]
    return r


@njit(cache=True, parallel=True, fastmath=_FAST)
def _train_block_kernel(syn0, syn1neg, corpus, offsets, lo, hi, seeds, keep, cum,
                        alpha_start, alpha_end, window, negative, cbow, max_len):
    n_workers = lo.shape[0]
    trained = np.zeros(n_workers, dtype=np.int64)
    mul, add, mask = np.uint64(LCG_MUL), np.uint64(LCG_ADD), np.uint64(LCG_MASK)
    low32 = np.uint64(0xFFFFFFFF)
    D = syn0.shape[1]
    one = syn0.dtype.type(1)
    for t in prange(n_workers):
        r = seeds[t]
        sentence = np.empty(max_len, dtype=np.int64)    # this worker's subsampled sentence
        e = np.empty((1, D), dtype=syn0.dtype)          # the input's error vector
        h = np.empty((1, D), dtype=syn0.dtype)          # CBOW's mean context vector
        total = max(1, offsets[hi[t]] - offsets[lo[t]])
        count = 0
        for s in range(lo[t], hi[t]):
            done = offsets[s] - offsets[lo[t]]
            alpha = alpha_start + (alpha_end - alpha_start) * done / total
            n = 0
            for p in range(offsets[s], offsets[s + 1]):
                w = corpus[p]
                draw = (r >> np.uint64(16)) & low32
                r = (r * mul + add) & mask
                if np.uint64(keep[w]) >= draw:
                    sentence[n] = w
                    n += 1
            count += n
            for i in range(n):
                b = np.int64((r >> np.uint64(16)) % np.uint64(window))
                r = (r * mul + add) & mask
                start = max(0, i - window + b)
                stop = min(n, i + window + 1 - b)
                if stop - start <= 1:
                    continue
                if cbow:
                    h[0, :] = 0
                    for j in range(start, stop):
                        if j != i:
                            _axpy(one, syn0, sentence[j], h, 0)
                    inv = syn0.dtype.type(1.0 / (stop - start - 1))
                    for k in range(D):
                        h[0, k] *= inv
                    r = _pair_update_numba(h, 0, syn1neg, sentence[i], negative, cum, r, alpha, e)
                    for j in range(start, stop):
                        if j != i:
                            _axpy(one, e, 0, syn0, sentence[j])
                else:
                    for j in range(start, stop):
                        if j != i:
                            r = _pair_update_numba(syn0, sentence[j], syn1neg, sentence[i], negative,
                                                   cum, r, alpha, e)
                            _axpy(one, e, 0, syn0, sentence[j])
        seeds[t] = r
        trained[t] = count
    return trained


def train_block_numba(syn0, syn1neg, corpus, offsets, lo, hi, seeds, keep, cum,
                      alpha_start, alpha_end, window, negative, cbow):
    lengths = np.diff(offsets[lo.min():hi.max() + 1]) if len(lo) else np.zeros(1, np.int64)
    max_len = int(lengths.max()) if lengths.size else 1
    return _train_block_kernel(syn0, syn1neg, corpus, offsets, lo, hi, seeds, keep, cum,
                               float(alpha_start), float(alpha_end), int(window), int(negative),
                               bool(cbow), max(1, max_len))


# ============================================================== dispatch

def train_block(syn0, syn1neg, corpus, offsets, lo, hi, seeds, keep, cum,
                alpha_start, alpha_end, window, negative, cbow):
    """Train one block (see the module docstring); the Numba kernel when available."""
    args = (syn0, syn1neg, np.ascontiguousarray(corpus, dtype=np.int32),
            np.ascontiguousarray(offsets, dtype=np.int64), np.asarray(lo, dtype=np.int64),
            np.asarray(hi, dtype=np.int64), seeds, np.ascontiguousarray(keep, dtype=np.int64),
            np.ascontiguousarray(cum, dtype=np.int64), alpha_start, alpha_end, window, negative, cbow)
    if pick(syn0) == "numba":
        return train_block_numba(*args)
    return train_block_reference(*args)
