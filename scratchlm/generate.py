"""Generation: sampling controls, the KV cache, the decoding loop, and streaming text.

A language model gives, for a context of tokens, logits over the next token. Generating is a loop:
pick a token from those logits, append it, ask again. This file is that loop, made fast and
steerable:

1. **Sampling controls** (``check_sampling_args``, ``apply_repetition_penalty``,
   ``sample_next_token``): repetition penalty, then temperature, then top-k, then top-p
   (nucleus), then one draw from a seeded NumPy generator on the host. Temperature 0 (or
   top_k=1) is greedy. The last position's logits (B, V) come to the host once per token:
   one small transfer, and the draws are the same on NumPy and CuPy.
2. **The KV cache** (``KVCache``, ``LayerKVCache``; ``prefill``, ``decode_step``): without it
   every new token re-runs the model over the whole context, O(T) work per token for the
   projections and O(T^2) for attention. But the keys and values of the past positions do not
   change when a token is appended (attention is causal), so each layer keeps them in a
   preallocated (B, H, block_size, D) buffer: one *prefill* over the prompt, then each *decode
   step* runs the model on one token at its absolute position and attends over the cache.
   A recurrent model (RNN, LSTM, GRU; the bigram and MLP rungs too) has no keys to keep: its
   state after the tokens seen so far is its cache (``RecurrentState``: ``model.init_state(B)``,
   then ``model.step(token, state)``), one fixed-size step per token, and no window to slide.
   ``new_cache(model)`` picks the kind; prefill, decode_step and the loop below serve both.
   **Rows with their own positions** (``RowDecoder``, in rowdecode.py; ``sample_rows``): the
   batched step of a GPT in which every row has its own cache slot, position and sampling
   settings, on the arrays with preallocated buffers (a fused Numba kernel, kernels/decode.py,
   for a few rows); the loop below decodes a GPT with it, and so does the server
   (``scratchlm.serve.batching``), whose concurrent requests have different lengths.
3. **The loop** (``iter_tokens``, ``generate``) with a sliding window: a GPT with learned position
   embeddings cannot see more than block_size tokens (``wpe`` has block_size rows), and its cached
   keys depend on their absolute positions, so the cache cannot simply be shifted. When the next
   token does not fit, the window slides: the oldest tokens are dropped, the newest
   ``window_keep`` are kept, and the cache is rebuilt by a fresh prefill of those. The default,
   ``window_keep = block_size``, keeps the whole window: the model always sees the last
   block_size tokens, exactly as nanoGPT's loop without a cache (and the tokens are the same),
   at the price of a full prefill for every token past the window. A smaller ``window_keep``
   (e.g. block_size // 2, like llama.cpp's context shift) rebuilds only every
   block_size - window_keep tokens, at the price of a shorter context right after a slide.
   ``use_cache=False`` runs the same window rule with a full forward per token: the reference
   that the cached path must match token for token.
4. **Text** (``stream_text``, ``generate_text``): encode the prompt, run the loop, and yield text
   pieces as soon as they are complete characters. A byte-level BPE token can end in the middle
   of a multi-byte UTF-8 character, so bytes are buffered in an incremental UTF-8 decoder and
   only whole characters come out. Stop strings end the text before the stop string, which is
   never emitted (text that could be the start of a stop string is held back until it is not).

    >>> from scratchlm.models import GPT, GPTConfig
    >>> from scratchlm.tokenizers import CharTokenizer
    >>> tok = CharTokenizer.from_text("abc ")
    >>> model = GPT(GPTConfig(vocab_size=4, block_size=16, n_layer=1, n_head=1, n_embd=8), seed=0)
    >>> text = "".join(stream_text(model, tok, "ab", max_new_tokens=5, temperature=0))
    >>> len(text) <= 5
    True

Shapes: B batch (rows generated together), T context length, V vocabulary, H heads, D head size.
"""
from __future__ import annotations

import codecs
import math
import signal
from typing import Iterator

import numpy as np

from . import backend
from .errors import UserError
from .tensor import Tensor, is_grad_enabled, no_grad
from .rowdecode import RowDecoder, blas_threads_for  # noqa: F401  (the batched step; callers import it from here)


class SamplingArgumentError(UserError, ValueError):
    """A bad sampling control or prompt: a UserError for the CLI, a ValueError for Python."""


# ====================================================================== 1. sampling controls

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_sampling_args(max_new_tokens=0, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                        stop=None, seed=0, window_keep=None, block_size=None, names=None) -> None:
    """Refuse a bad control up front, with one line that names it and its valid range.

    ``names`` maps a parameter to what the user typed for it (``{"top_k": "--top-k"}`` on the
    command line, ``{"top_k": "/topk"}`` in chat), so the message names that."""
    names = names or {}

    def name(key):
        return names.get(key, key)

    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise SamplingArgumentError(f"{name('max_new_tokens')} must be an integer >= 0, got {max_new_tokens!r}")
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise SamplingArgumentError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise SamplingArgumentError(f"{name('top_k')} must be None, 0 (both: off) or an integer >= 1 (1 = greedy), got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise SamplingArgumentError(f"{name('top_p')} must be None (off) or a number in (0, 1] (1 = off), got {top_p!r}")
    if not _is_number(repetition_penalty) or not 0 < repetition_penalty < math.inf:
        raise SamplingArgumentError(f"{name('repetition_penalty')} must be a finite number > 0 (1 = off, > 1 discourages "
                                    f"repeats), got {repetition_penalty!r}")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
            raise SamplingArgumentError(f"{name('stop')} must be a non-empty string or a list of them, got {stop!r}")
    if not _is_int(seed) or seed < 0:
        raise SamplingArgumentError(f"{name('seed')} must be an integer >= 0, got {seed!r}")
    if window_keep is not None and (not _is_int(window_keep) or window_keep < 1
                                    or (block_size is not None and window_keep > block_size)):
        raise SamplingArgumentError(f"{name('window_keep')} must be None (= block_size) or an integer in [1, "
                                    f"{block_size if block_size is not None else 'block_size'}], got {window_keep!r}")


def apply_repetition_penalty(logits: np.ndarray, context: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty (Keskar et al. 2019, as in Hugging Face): for every token that
    already occurs in the row's context, divide its logit by ``penalty`` if positive and multiply
    it if negative -- both lower it when penalty > 1. A token counts once however often it occurs.

    logits (B, V) float, context (B, T) int -> new logits (B, V); penalty 1 returns the input.
    """
    if penalty == 1 or context.shape[1] == 0:
        return logits
    seen = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(seen, context, True, axis=-1)                       # (B, V): token in the context
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits)


def sample_next_token(logits: np.ndarray, temperature, top_k, top_p, rng) -> np.ndarray:
    """One token id per row of host logits (B, V): temperature, then top-k, then top-p, then a draw.

    Greedy (argmax, no random number drawn) when temperature is 0 or top_k is 1. ``temperature``
    may also be one value per row, (B,), all > 0 (``sample_rows``: rows with different
    temperatures in one pass; row b's result is the same as with its own value alone). Top-k
    keeps the k largest logits (ties at the k-th value all stay); top-p keeps the smallest set of
    most likely tokens whose probability reaches p (the most likely token always stays).
    Filtered-out tokens get probability exactly 0. The draw inverts the cumulative distribution
    with one uniform number per row.
    """
    per_row = np.ndim(temperature) == 1
    if (not per_row and temperature == 0) or top_k == 1:
        return logits.argmax(axis=-1)
    B, V = logits.shape
    logits = logits / (np.asarray(temperature)[:, None] if per_row else temperature)   # (B, V)
    if top_k and top_k < V:
        kth_largest = np.partition(logits, V - top_k, axis=-1)[:, V - top_k : V - top_k + 1]   # (B, 1)
        logits = np.where(logits < kth_largest, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)                                            # (B, V)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")                               # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(keep, order, mass_before < top_p, axis=-1)   # the top token always stays
        probs = np.where(keep, probs, 0.0)
    cdf = np.cumsum(probs, axis=-1)                                                       # (B, V)
    u = rng.random((B, 1)) * cdf[:, -1:]
    # the first index whose cdf exceeds u; zero-probability tokens never do (their cdf equals the previous one)
    return np.minimum((cdf <= u).sum(axis=-1), V - 1)


# ====================================================================== 2. the KV cache

class LayerKVCache:
    """Keys and values of one attention layer for the positions seen so far.

    Two preallocated buffers of shape (B, H, max_len, D) on the current backend; positions
    [0, length) are filled. ``append(k, v)`` writes the new (B, H, T, D) keys and values after
    them and returns all the filled ones (views, no gradient): this is the protocol
    ``CausalSelfAttention.forward(x, cache=...)`` uses. Inference only.
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype=None):
        xp = backend.xp
        dtype = dtype or backend.get_default_dtype()
        self.keys = xp.zeros((batch_size, n_head, max_len, head_dim), dtype=dtype)      # (B, H, max_len, D)
        self.values = xp.zeros((batch_size, n_head, max_len, head_dim), dtype=dtype)    # (B, H, max_len, D)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError("the KV cache is for inference: run the model under scratchlm.no_grad()")
        T, start = k.shape[2], self.length
        if start + T > self.keys.shape[2]:
            raise ValueError(f"KV cache overflow: {start} cached + {T} new positions > {self.keys.shape[2]}")
        self.keys[:, :, start:start + T] = k.data
        self.values[:, :, start:start + T] = v.data
        self.length = start + T
        return Tensor(self.keys[:, :, :self.length]), Tensor(self.values[:, :, :self.length])


class KVCache:
    """One ``LayerKVCache`` per transformer block of a GPT; ``length`` = positions cached, which is
    also the absolute position of the next token (``GPT.forward(idx, cache=...)`` starts there)."""

    def __init__(self, config, batch_size: int = 1, dtype=None):
        head_dim = config.n_embd // config.n_head
        self.max_len = config.block_size
        self.layers = [LayerKVCache(batch_size, config.n_head, config.block_size, head_dim, dtype)
                       for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @length.setter
    def length(self, value: int) -> None:
        for layer in self.layers:
            layer.length = value

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        for layer in self.layers:
            layer.length = 0

    def copy_row(self, source: "KVCache", source_row: int, row: int, length: int) -> None:
        """Copy positions [0, length) of ``source``'s row ``source_row`` into this cache's ``row``
        (a prefill into a one-row cache joining a batch; a row moving into a freed slot)."""
        for layer, other in zip(self.layers, source.layers):
            layer.keys[row, :, :length] = other.keys[source_row, :, :length]
            layer.values[row, :, :length] = other.values[source_row, :, :length]


class RecurrentState:
    """The "KV cache" of a recurrent model (RNN, LSTM, GRU; also the bigram and MLP models, whose
    state is the last few tokens): its state after the tokens seen so far. A transformer must
    keep every past key and value because attention looks back at all of them; a recurrent model
    has folded the past into a fixed-size state, so one ``model.step(token, state)`` per new token
    is the whole work, O(1) per token however long the text is.

    The model provides ``init_state(B)`` and ``step(tokens (B,), state) -> (logits (B, V), state)``.
    """

    def __init__(self, model, batch_size: int = 1):
        self.model, self.batch_size = model, batch_size
        self.reset()

    def reset(self) -> None:
        self.state, self.length = self.model.init_state(self.batch_size), 0

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed tokens (B,) host ints; return the next-token logits (B, V) on the host, float64."""
        logits, self.state = self.model.step(backend.to_device(np.asarray(tokens, dtype=np.int64)), self.state)
        self.length += 1
        data = logits.data if isinstance(logits, Tensor) else logits
        return backend.to_numpy(data).astype(np.float64)                        # (B, V)


def is_recurrent(model) -> bool:
    """Does ``model`` decode with a state (``init_state`` / ``step``) rather than a KV cache?"""
    return hasattr(model, "init_state") and hasattr(model, "step")


def context_window(model) -> int | None:
    """How many past tokens the model can see: a GPT's block_size; None (unbounded) for a model
    that carries a state (a bigram or MLP model sees a fixed few, and its state keeps them)."""
    return None if is_recurrent(model) else model.config.block_size


def new_cache(model, batch_size: int = 1):
    """The decoding cache that fits ``model``: a ``RecurrentState`` or a GPT's ``KVCache``."""
    if is_recurrent(model):
        return RecurrentState(model, batch_size)
    return KVCache(model.config, batch_size, model.transformer.wte.weight.dtype)


def _last_logits(model, ids: np.ndarray, cache: KVCache | None) -> np.ndarray:
    """Run ``model`` on host ids (B, T) (after what ``cache`` holds) and return the logits of the
    last position on the host, (B, V) float64. A GPT sends only that position through the head."""
    if not hasattr(model, "_features"):                                      # any other LM: a full forward
        logits, _ = model(backend.to_device(ids))                            # (B, T, V)
        return backend.to_numpy(logits.data[:, -1, :]).astype(np.float64)    # (B, V)
    features = model._features(backend.to_device(ids), cache=cache)          # (B, T, C)
    last = model.lm_head(features[:, -1:, :])                                # (B, 1, V)
    return backend.to_numpy(last.data[:, 0, :]).astype(np.float64)          # (B, V)


def prefill(model, ids: np.ndarray, cache) -> np.ndarray:
    """Empty ``cache``, run the whole context ids (B, T) through ``model`` filling it; return the
    next-token logits (B, V) on the host. A GPT's causal attention takes the T tokens at once (T <=
    block_size); a recurrent state steps through them."""
    cache.reset()
    with no_grad():
        if isinstance(cache, RecurrentState):
            for t in range(ids.shape[1]):
                logits = cache.step(ids[:, t])
            return logits
        return _last_logits(model, ids, cache)


def decode_step(model, token: np.ndarray, cache) -> np.ndarray:
    """Run one new token per row, token (B,), at position ``cache.length`` against the cache;
    return the next-token logits (B, V) on the host."""
    with no_grad():
        if isinstance(cache, RecurrentState):
            return cache.step(np.asarray(token).reshape(-1))
        return _last_logits(model, np.asarray(token).reshape(-1, 1), cache)


# ====================================================================== 2b. rows with their own positions

# ``RowDecoder`` (the batched step: every row its own cache slot and position) lives in
# scratchlm/rowdecode.py, its kernel in scratchlm/kernels/decode.py; sampling rows apart is here.

class RowGenerators:
    """The generator ``sample_next_token`` draws from when rows are sampled together but each must
    draw from its own: row b's uniform number comes from ``rngs[b]`` (``random()`` and
    ``random((1, 1))`` take the same one double from a stream), so a row's tokens do not depend on
    its batch mates, and row b of a batch equals the row sampled alone with the same generator."""

    def __init__(self, rngs):
        self.rngs = rngs

    def random(self, shape):
        return np.array([rng.random() for rng in self.rngs]).reshape(shape)


def sample_rows(rows, logits: np.ndarray) -> list[int]:
    """The next token of each row from logits (B, V), each row with its own controls: ``rows[b]``
    has ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``context`` (its token ids,
    for the penalty) and ``rng``. One pass over the rows of a kind, whatever their temperatures:
    the greedy rows in one argmax; the others in one ``sample_next_token`` call per (top_k, top_p)
    pair (one call for all rows without them), each row with its own temperature and its own
    generator; a penalised row alone. Row b's token is the one it gets sampled alone."""
    tokens = [0] * len(rows)
    greedy: list[int] = []
    groups: dict[tuple, list[int]] = {}
    for b, row in enumerate(rows):
        if row.repetition_penalty != 1:
            controlled = apply_repetition_penalty(logits[b:b + 1], row.context[None], row.repetition_penalty)
            tokens[b] = int(sample_next_token(controlled, row.temperature, row.top_k, row.top_p, row.rng)[0])
        elif row.temperature == 0 or row.top_k == 1:
            greedy.append(b)
        else:
            groups.setdefault((row.top_k or None, row.top_p), []).append(b)

    def of(members):                         # their logits (M, V): no copy when they are all the rows
        return logits if len(members) == len(rows) else logits[members]

    if greedy:
        for b, token in zip(greedy, of(greedy).argmax(axis=-1).tolist()):
            tokens[b] = token
    for (top_k, top_p), members in groups.items():
        temperatures = np.array([rows[b].temperature for b in members], dtype=logits.dtype)   # (M,)
        chosen = sample_next_token(of(members), temperatures, top_k, top_p,
                                   RowGenerators([rows[b].rng for b in members]))
        for b, token in zip(members, chosen.tolist()):
            tokens[b] = token
    return tokens


def token_logprobs(logits: np.ndarray, token: int, n: int):
    """log p(token) and the n likeliest (token, log p) under softmax(logits (V,)), most likely first."""
    shifted = logits - logits.max()
    logp = shifted - math.log(np.exp(shifted).sum())                          # (V,)
    n = min(n, len(logp))
    if n == 0:
        return float(logp[token]), []
    top = np.argpartition(-logp, n - 1)[:n]
    top = top[np.argsort(-logp[top], kind="stable")]
    return float(logp[token]), [(int(t), float(logp[t])) for t in top]


# ====================================================================== 3. the loop

def _prompt_ids(model, idx) -> np.ndarray:
    """Prompt token ids as a host int64 array (B, T >= 1), checked against the vocabulary."""
    data = idx.data if isinstance(idx, Tensor) else idx
    ids = backend.to_numpy(data) if hasattr(data, "dtype") else np.asarray(data)
    if ids.ndim != 2 or (ids.size and ids.dtype.kind not in "iu"):
        raise SamplingArgumentError(f"prompt ids must be a 2-D integer array (B, T), got dtype {ids.dtype} "
                                    f"and shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise SamplingArgumentError("generate needs a prompt of at least one token")
    vocab_size = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise SamplingArgumentError(f"prompt token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64)


def iter_tokens(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                repetition_penalty: float = 1.0, seed: int = 0, use_cache: bool = True,
                window_keep: int | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of each row, (B,) host ints, ``max_new_tokens`` times.

    The window: the model sees ids[start:], at most block_size tokens (a longer prompt starts
    with its last block_size). When the token just sampled does not fit, the window slides to
    the newest ``window_keep`` tokens (None = block_size) and the cache is rebuilt by a prefill
    of them; otherwise one decode step runs. The repetition penalty looks at the window.
    With ``use_cache=False`` every step is a full forward over the window (same rule, same
    tokens). Dropout is off; the model's training mode is restored when the loop ends or is
    closed. The arguments are checked here, before the first token is asked for.

    Rows are independent: row b draws from its own generator seeded ``seed + b``, so row b of a
    batch is the tokens of its prompt alone with seed ``seed + b`` (one row: ``seed`` itself).
    A GPT decodes with ``RowDecoder``, the same batched step that serves concurrent requests.
    """
    block_size = context_window(model)
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, None, seed,
                        window_keep, block_size)
    ids = _prompt_ids(model, idx)
    keep = block_size if window_keep is None else window_keep
    return _token_loop(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                       use_cache, keep)


def _token_loop(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, use_cache,
                keep):
    block_size = context_window(model)                              # None: a recurrent model, no window
    B = ids.shape[0]
    rng = np.random.default_rng(seed) if B == 1 else RowGenerators([np.random.default_rng(seed + b) for b in range(B)])
    rows = RowDecoder(model, B) if use_cache and block_size is not None else None   # a GPT: the batched step
    cache = (rows.cache if rows is not None else new_cache(model, B)) if use_cache else None
    start = 0 if block_size is None else max(0, ids.shape[1] - block_size)

    def full_window():
        if rows is not None:                                       # each row into its slot
            logits = rows.prefill_rows(list(ids[:, start:]), range(B))                # (B, V)
            cache.length = ids.shape[1] - start
            return logits
        return prefill(model, ids[:, start:], cache) if use_cache else _forward_window(model, ids[:, start:])

    was_training = model.training
    model.eval()
    try:
        logits = full_window() if max_new_tokens else None                     # (B, V)
        for step in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, ids[:, start:], repetition_penalty)
            token = sample_next_token(logits, temperature, top_k, top_p, rng)  # (B,)
            ids = np.concatenate([ids, token[:, None]], axis=1)
            yield token
            if step == max_new_tokens - 1:
                break                                      # no forward for a token nobody asks for
            if block_size is not None and ids.shape[1] - start > block_size:    # it does not fit: slide
                start = ids.shape[1] - keep
                logits = full_window()
            elif rows is not None:
                logits = rows.step(token, np.full(B, cache.length))
                cache.length += 1
            elif use_cache:
                logits = decode_step(model, token, cache)
            else:
                logits = full_window()
    finally:
        model.train(was_training)


def _forward_window(model, ids: np.ndarray) -> np.ndarray:
    with no_grad():
        return _last_logits(model, ids, None)


def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
             seed: int = 0, repetition_penalty: float = 1.0, use_cache: bool = True,
             window_keep: int | None = None):
    """idx (B, T) -> (B, T + max_new_tokens) backend ints: the prompt and its continuation.

    See ``iter_tokens`` for the window rule and ``sample_next_token`` for the controls. With the
    same seed, ``use_cache=True`` and ``use_cache=False`` give the same tokens.
    """
    ids = _prompt_ids(model, idx)
    steps = iter_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                        use_cache, window_keep)
    new = [token[:, None] for token in steps]
    return backend.to_device(np.concatenate([ids, *new], axis=1))


def sample_documents(model, boundary: int, rows: int, max_len: int, temperature: float = 1.0, top_k=None,
                     top_p=None, seed: int = 0) -> list[list[int]]:
    """``rows`` whole documents (sentences) decoded together: each row starts at the ``boundary``
    token and ends at the next one (cut off) or after ``max_len`` tokens; lists of token ids.
    The loop stops as soon as every row has ended."""
    prompt = np.full((rows, 1), boundary, dtype=np.int64)
    out, done = [[] for _ in range(rows)], np.zeros(rows, dtype=bool)
    for token in iter_tokens(model, prompt, max_len, temperature, top_k, top_p, seed=seed):
        for b in np.flatnonzero(~done):
            if token[b] == boundary:
                done[b] = True
            else:
                out[b].append(int(token[b]))
        if done.all():
            break
    return out


# ====================================================================== 4. text and streaming

class _TextPieces:
    """Token ids in, complete text out.

    Tokenizers with ``decode_bytes`` (byte-level BPE): bytes go through an incremental UTF-8
    decoder (invalid bytes become U+FFFD), which holds back an incomplete character until its
    last byte arrives. Other tokenizers decode each token after the one before it (``context``:
    the prompt's ids) and emit what it added, so a word tokenizer's separating space, or a
    closing punctuation mark glued to the word before it, comes out as joined text would read.
    A document boundary its tokenizer decodes to nothing (a word tokenizer's <pad>) comes out as
    a newline, so a stop string "\\n" ends a document there, as it does for characters.
    """

    def __init__(self, tokenizer, context=()):
        from .tokenizers.base import boundary_id
        from .tokenizers.char import CharTokenizer
        self.tokenizer = tokenizer
        # a character's text does not depend on its neighbours: one lookup per token (a server's
        # per-token cost), which is what the rule for other tokenizers below gives too
        self.chars = tokenizer.chars if isinstance(tokenizer, CharTokenizer) else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") \
            if hasattr(tokenizer, "decode_bytes") else None
        self.previous = [int(context[-1])] if len(context) else []     # one token of context is enough
        self.silent_boundary = None
        if self.utf8 is None:
            try:
                b = boundary_id(tokenizer)
            except UserError:
                b = None
            if b is not None and tokenizer.decode([b]) == "":
                self.silent_boundary = b

    def push(self, token_id: int) -> str:
        if self.chars is not None and 0 <= token_id < len(self.chars):
            return self.chars[token_id]
        if self.utf8 is not None:
            return self.utf8.decode(self.tokenizer.decode_bytes([token_id]))
        if token_id == self.silent_boundary:
            self.previous = [token_id]
            return "\n"
        before = self.tokenizer.decode(self.previous)
        after = self.tokenizer.decode(self.previous + [token_id])
        self.previous = [token_id]
        return after[len(before):] if after.startswith(before) else self.tokenizer.decode([token_id])

    def flush(self) -> str:
        return "" if self.utf8 is None else self.utf8.decode(b"", final=True)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string:
    text that may yet become a stop string and so cannot be emitted now."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def encode_prompt(tokenizer, prompt, block_size: int | None = None) -> list[int]:
    """Token ids of ``prompt`` (a string, or already a list of ids). Each newline of a string is the
    document boundary (``tokenizers.base.boundary_id``): the newline's own token for characters and
    BPE, the <pad> that frames sentences for a word tokenizer (which drops whitespace), so "\\n" +
    text starts a document with text. An empty prompt starts from the boundary (token 0 if the
    tokenizer has none), as ``scratchlm sample``."""
    from .tokenizers.base import boundary_id
    try:
        boundary = boundary_id(tokenizer)
    except UserError:
        boundary = 0
    try:
        drops_newlines = not tokenizer.encode("\n")
    except UserError:                  # no newline in the vocabulary: encode says what it cannot read
        drops_newlines = False
    if not isinstance(prompt, str):
        ids = list(prompt)
    elif not drops_newlines:
        ids = tokenizer.encode(prompt) if prompt else []
    else:                              # each newline becomes the boundary token
        ids = []
        for k, line in enumerate(prompt.split("\n")):
            ids += ([boundary] if k else []) + (tokenizer.encode(line) if line else [])
    return [int(i) for i in (ids or [boundary])]


def stream_text(model, tokenizer, prompt, max_new_tokens: int = 200, temperature: float = 0.8, top_k=None,
                top_p=None, repetition_penalty: float = 1.0, stop=None, seed: int = 0, use_cache: bool = True,
                window_keep: int | None = None) -> Iterator[str]:
    """Yield the text ``model`` writes after ``prompt`` (str or token ids), piece by piece.

    Each piece is complete characters (never half of a UTF-8 character); the pieces joined are
    the decoded continuation, cut before the first stop string (``stop``: a string or a list;
    the stop string is not emitted, and generation ends there). Pieces come as soon as they are
    known not to start a stop string. Closing the generator early (or Ctrl-C) stops generation
    and restores the model's mode. The arguments are checked when it is called.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed,
                        window_keep, context_window(model))
    stops = [] if stop is None else ([stop] if isinstance(stop, str) else list(stop))
    ids = np.asarray([encode_prompt(tokenizer, prompt)], dtype=np.int64)           # (1, T)
    steps = iter_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                        use_cache, window_keep)
    return _text_pieces(steps, _TextPieces(tokenizer, ids[0]), stops)


def _text_pieces(steps, decoder, stops) -> Iterator[str]:
    pending = ""                                       # decoded, not yet emitted (may start a stop string)
    try:
        for token in steps:
            pending += decoder.push(int(token[0]))
            cut = _first_stop(pending, stops)
            if cut is not None:
                if pending[:cut]:
                    yield pending[:cut]
                return
            ready = len(pending) - _held_back(pending, stops)
            if ready:
                yield pending[:ready]
                pending = pending[ready:]
        pending += decoder.flush()
        cut = _first_stop(pending, stops)
        pending = pending if cut is None else pending[:cut]
        if pending:
            yield pending
    finally:
        steps.close()


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def generate_text(model, tokenizer, prompt, **controls) -> str:
    """The whole continuation of ``prompt`` as one string (``stream_text`` joined)."""
    return "".join(stream_text(model, tokenizer, prompt, **controls))


def until_interrupted(pieces: Iterator[str]) -> Iterator[str]:
    """Iterate ``pieces`` (a ``stream_text``) so that Ctrl-C stops it cleanly: the interrupt is
    turned into a flag, read between pieces; then the stream is closed (generation ends, the
    model's mode is restored) and KeyboardInterrupt is raised here, outside any kernel.

    Why not let KeyboardInterrupt fly: it can land while a Numba kernel runs, and then surfaces as
    a SystemError from the kernel's dispatcher. A piece comes every token or so, so the stop is
    prompt. Outside the main thread signals cannot be caught, and this is a plain iteration.
    """
    requested = False

    def handle(signum, frame):
        nonlocal requested
        requested = True

    try:
        previous = signal.signal(signal.SIGINT, handle)
    except ValueError:                                   # not the main thread
        previous = None
    try:
        for piece in pieces:
            yield piece
            if requested:
                break
    finally:
        pieces.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if requested:
        raise KeyboardInterrupt("stopped by Ctrl-C")
