"""Decoding a ``Seq2SeqTransformer``: greedy search and beam search, batched over sentences.

    from scratchlm.translate import greedy_search, beam_search
    hyps = greedy_search(model, src)                          # src (B, S) ids -> B lists of ids
    nbest = beam_search(model, src, beam=4, alpha=0.6, n_best=2)   # B lists of (tokens, score)

Both run the encoder once and feed the decoder one token per step against a ``DecoderCache``:
each decoder layer keeps the keys and values of its self-attention for the positions so far
(appending one per step) and projects the memory's cross-attention keys/values once, so step t
costs O(t) attention and no recomputation of the prefix. ``use_cache=False`` recomputes the whole
prefix every step (the reference the tests compare against).

Beam search (Wu et al. 2016, "Google's Neural Machine Translation System", section 7): each
sentence keeps ``beam`` live hypotheses ranked by their log-probability log P(Y|X); a step extends
every live one by every token and keeps the 2K best extensions: those ending in </s> among the
first K become finished hypotheses, scored with the length penalty

    s(Y) = log P(Y|X) / lp(Y),    lp(Y) = ((5 + |Y|) / 6)^alpha     (|Y| counts </s>; alpha=0: none)

and the best K others stay live. A sentence stops when it has ``beam`` finished hypotheses
(early stop at </s>, as fairseq and Hugging Face's ``early_stopping=True``), or at ``max_len``
tokens, where the live ones are finished as they are (cut). The n-best list is the finished ones
by s(Y). With beam 1 this is greedy search whatever alpha is: the one live hypothesis is the
argmax extension, and one finished hypothesis stops the search.
"""
from __future__ import annotations

import numpy as np

from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.generate import LayerKVCache
from scratchlm.models.seq2seq import BOS, EOS, PAD
from scratchlm.tensor import Tensor, no_grad


# ================================================================ the cache

class LayerCache(LayerKVCache):
    """One decoder layer's cache: its self-attention keys/values (``LayerKVCache``) and its
    cross-attention keys/values of the memory, projected on first use. The protocol
    ``nn.TransformerDecoderLayer.forward(..., cache=...)`` calls."""

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype=None, keep_weights=False):
        super().__init__(batch_size, n_head, max_len, head_dim, dtype)
        self.memory_kv, self.keep_weights, self.weights = None, keep_weights, []

    def causal_mask(self, t_new: int):
        """(T, past + T) True where a new position would see a later one; None for one new position."""
        if t_new == 1:
            return None
        past = self.length - t_new
        return np.arange(past + t_new)[None, :] > past + np.arange(t_new)[:, None]

    def memory_key_value(self, attn, memory: Tensor):
        if self.memory_kv is None:
            self.memory_kv = attn.project_key_value(memory)                     # 2 x (B, H, S, D)
        return self.memory_kv

    def record_weights(self, weights) -> None:
        if weights is not None:
            self.weights.append(backend.to_numpy(weights.data))                 # (B, H, T, S)

    def reorder(self, rows: np.ndarray) -> None:
        """Keep batch rows ``rows`` (beam search picks which hypotheses go on). The memory's
        keys/values are not touched: a sentence's beams share its memory rows."""
        rows = backend.to_device(rows)
        self.keys, self.values = self.keys[rows], self.values[rows]


class DecoderCache:
    """A ``LayerCache`` per decoder layer of a ``Seq2SeqTransformer``; ``length`` = target
    positions cached = the position of the next token."""

    def __init__(self, model, batch_size: int, max_len: int | None = None, keep_weights: bool = False):
        c = model.config
        dtype = model.tgt_embed.weight.dtype
        self.layers = [LayerCache(batch_size, c.nhead, max_len or c.max_len, c.d_model // c.nhead, dtype,
                                  keep_weights) for _ in range(c.num_decoder_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, rows: np.ndarray) -> None:
        for layer in self.layers:
            layer.reorder(rows)


# ================================================================ one step

def _next_log_probs(model, prefix: np.ndarray, memory, src_pad_mask, cache) -> np.ndarray:
    """log p(next | prefix, source) (N, V) float64 on the host; <pad> and <s> are never produced.
    With a cache only the newest token goes in; without one the whole prefix does."""
    ids = prefix[:, -1:] if cache is not None else prefix
    logits = model.decode(backend.to_device(ids), memory, src_pad_mask, cache=cache)    # (N, t, V)
    z = backend.to_numpy(logits.data[:, -1, :]).astype(np.float64)                    # (N, V)
    z[:, [PAD, BOS]] = -np.inf
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _source(model, src):
    src = np.asarray(src, dtype=np.int64)
    if src.ndim != 2 or src.shape[1] == 0:
        raise UserError(f"the source must be ids of shape (B, S) with S >= 1, got shape {src.shape}")
    if src.shape[1] > model.config.max_len:
        raise UserError(f"a source of {src.shape[1]} tokens is longer than the model's max_len "
                        f"{model.config.max_len}; cut it first")
    return src


def _max_len(model, max_len):
    limit = model.config.max_len
    if max_len is None:
        return limit
    if not 1 <= int(max_len) <= limit:
        raise UserError(f"max_len must be between 1 and the model's max_len {limit}, got {max_len}")
    return int(max_len)


def _strip(tokens) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


# ================================================================ greedy

def greedy_search(model, src, max_len: int | None = None, use_cache: bool = True,
                  keep_weights: bool = False):
    """The argmax token at every step until </s> (or max_len tokens): B lists of ids, </s> removed.
    ``keep_weights``: also return the cross-attention weights per layer, (B, H, T, S) each."""
    src, max_len = _source(model, src), _max_len(model, max_len)
    B = len(src)
    with no_grad():
        memory, src_pad_mask = model.encode(backend.to_device(src))
        cache = DecoderCache(model, B, max_len, keep_weights) if use_cache or keep_weights else None
        prefix = np.full((B, 1), BOS, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        for _ in range(max_len):
            next_tokens = _next_log_probs(model, prefix, memory, src_pad_mask, cache).argmax(axis=1)
            next_tokens[done] = PAD
            prefix = np.concatenate([prefix, next_tokens[:, None]], axis=1)
            done |= next_tokens == EOS
            if done.all():
                break
    hyps = [_strip(row[1:]) for row in prefix]
    if keep_weights:
        return hyps, [np.concatenate(layer.weights, axis=2) for layer in cache.layers]
    return hyps


# ================================================================ beam search

BEAM_STEP_BYTES = 2 ** 31      # beam_search refuses a beam whose per-step scores would take more


def length_penalty(length: int, alpha: float) -> float:
    """Wu et al. 2016: lp(Y) = ((5 + |Y|) / 6)^alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(model, src, beam: int = 4, alpha: float = 0.6, max_len: int | None = None, n_best: int = 1,
                use_cache: bool = True):
    """Beam search (module docstring): B lists of the ``n_best`` best (tokens, s(Y)), best first;
    tokens without </s>, s(Y) = log P(Y|X) / lp(Y)."""
    if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)) or beam < 1:
        raise UserError(f"the beam size must be a whole number >= 1, got {beam!r}")
    if not 1 <= n_best <= beam:
        raise UserError(f"n_best must be between 1 and the beam size {beam}, got {n_best}")
    src, max_len = _source(model, src), _max_len(model, max_len)
    step_bytes = 8 * len(src) * int(beam) * model.config.vocab_size     # a step's (BK, V) float64 log-probs
    if step_bytes > BEAM_STEP_BYTES:
        raise UserError(f"beam {beam} over {len(src)} sentence(s) and a vocabulary of {model.config.vocab_size} "
                        f"needs {step_bytes / 2**30:.1f} GiB a step, more than the {BEAM_STEP_BYTES / 2**30:.0f} "
                        f"GiB allowed; use a smaller beam (4 to 10 is usual)")
    B, K = len(src), int(beam)
    finished = [[] for _ in range(B)]                     # per sentence: (s(Y), log P, tokens)
    active = np.ones(B, dtype=bool)
    with no_grad():
        memory, src_pad_mask = model.encode(backend.to_device(src))
        rows = backend.to_device(np.repeat(np.arange(B), K))                  # sentence b -> rows bK..bK+K-1
        memory, src_pad_mask = Tensor(memory.data[rows]), src_pad_mask[rows]  # (BK, S, C), (BK, S)
        cache = DecoderCache(model, B * K, max_len) if use_cache else None
        prefix = np.full((B * K, 1), BOS, dtype=np.int64)                     # (BK, t)
        scores = np.full((B, K), -np.inf)
        scores[:, 0] = 0.0                                                    # one live hypothesis: <s>
        for t in range(1, max_len + 1):                                       # t: tokens after this step
            log_p = _next_log_probs(model, prefix, memory, src_pad_mask, cache)        # (BK, V)
            V = log_p.shape[1]
            candidates = (scores.reshape(B * K, 1) + log_p).reshape(B, K * V)          # (B, KV)
            best = np.argsort(-candidates, axis=1, kind="stable")[:, :2 * K]          # (B, 2K)
            keep_rows = np.repeat(np.arange(B)[:, None] * K, K, axis=1) + np.arange(K)  # default: stay
            keep_tokens = np.full((B, K), PAD, dtype=np.int64)
            new_scores = np.full((B, K), -np.inf)
            for b in np.flatnonzero(active):
                alive = 0
                for rank, c in enumerate(best[b]):
                    score = candidates[b, c]
                    if score == -np.inf:
                        break
                    k, token = divmod(int(c), V)
                    if token == EOS:
                        if rank < K:
                            finished[b].append((score / length_penalty(t, alpha), score, prefix[b * K + k, 1:]))
                        continue
                    keep_rows[b, alive], keep_tokens[b, alive], new_scores[b, alive] = b * K + k, token, score
                    alive += 1
                    if alive == K:
                        break
                if len(finished[b]) >= K or alive == 0:
                    active[b] = False
            prefix = np.concatenate([prefix[keep_rows.reshape(-1)], keep_tokens.reshape(-1, 1)], axis=1)
            scores = new_scores
            if t == max_len:                                                  # cut: finish the live ones
                for b in np.flatnonzero(active):
                    for k in np.flatnonzero(np.isfinite(scores[b])):
                        finished[b].append((scores[b, k] / length_penalty(t, alpha), scores[b, k],
                                            prefix[b * K + k, 1:]))
            if not active.any():
                break
            if cache is not None:
                cache.reorder(keep_rows.reshape(-1))
    out = []
    for hyps in finished:
        hyps = sorted(hyps, key=lambda h: -h[0])[:n_best]
        out.append([(_strip(tokens), float(score)) for score, _, tokens in hyps])
    return out


def decode(model, src, beam: int = 1, alpha: float = 0.6, max_len: int | None = None, batch_size: int = 64,
           use_cache: bool = True, search=None):
    """The best hypothesis of each source row (greedy when beam == 1), ``batch_size`` sentences a
    batch, rows sorted by length first so a batch pads little. src: a list of id lists.
    ``search(ids (B, S), beam, alpha, max_len)`` -> B token lists replaces this module's searches
    (bench/seq2seq.py's PyTorch twin decodes with its own, on the same batches)."""
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    out = [None] * len(src)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(src[i]) for i in chunk)
        ids = np.full((len(chunk), width), PAD, dtype=np.int64)
        for row, i in enumerate(chunk):
            ids[row, :len(src[i])] = src[i]
        if search is not None:
            hyps = search(ids, beam, alpha, max_len)
        elif beam == 1:
            hyps = greedy_search(model, ids, max_len, use_cache=use_cache)
        else:
            hyps = [nbest[0][0] for nbest in beam_search(model, ids, beam, alpha, max_len, use_cache=use_cache)]
        for row, i in enumerate(chunk):
            out[i] = hyps[row]
    return out
