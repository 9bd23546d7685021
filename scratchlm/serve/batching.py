"""Batched decoding: many requests decoded together, one model step for all of them.

At batch 1 a decode step reads every weight to produce one token, so a server that runs
requests one after another is bound by memory traffic, not arithmetic. Decoding the active
requests *together* turns the per-token matrix-vector products into matrix-matrix products
over the batch: the weights are read once per step for B tokens, and throughput grows with
concurrency. This module is that engine:

- ``SlotPool``: the KV cache of the whole server, per layer one (S, H, block_size, D) buffer for
  keys and one for values. A sequence being decoded owns a *slot* (a row of those buffers).
  Active sequences always occupy slots 0..B-1 (when one leaves, the last one moves into its
  slot), so a step attends over ``keys[:B]``, a view, with no gather.
- ``decode_rows``: one decode step over the batch, where every row has its own position. It is
  the GPT forward of ``GPT._features`` for one token per row, written out because the shared
  cache protocol (``LayerKVCache.append``) has one length for the whole batch: here each row
  writes its key and value at its own position and attends over its own prefix (a -inf mask
  beyond it), and takes its own position embedding.
- ``Row``: one sequence (one choice of one request) with its own sampling settings, seeded
  generator, stop strings and incremental text decoder; ``BatchedDecoder``: a thread that
  admits waiting rows between steps (a prefill each, with ``scratchlm.generate.prefill``, into
  a scratch cache copied into the row's slot), runs ``decode_rows`` over all active rows,
  samples each row's token with ``scratchlm.generate.sample_next_token`` (rows with the same
  controls in one call) and the row's own generator,
  and retires rows that finished or were cancelled, freeing their slots.

A row's tokens are those of ``scratchlm.generate.stream_text`` for the same prompt, controls
and seed: the same sampler, the same generator draws in the same order, the same
prefill-then-decode schedule (only the floating-point order inside a step differs).

    >>> from scratchlm.models import GPT, GPTConfig
    >>> from scratchlm.tokenizers import CharTokenizer
    >>> tok = CharTokenizer.from_text("abc ")
    >>> model = GPT(GPTConfig(vocab_size=4, block_size=16, n_layer=1, n_head=1, n_embd=8), seed=0).eval()
    >>> engine = BatchedDecoder(model, tok, max_batch=4)
    >>> pieces = []
    >>> row = Row(tok.encode("ab"), max_new_tokens=5, temperature=0, sink=pieces.append)
    >>> engine.run_until_idle([row])
    >>> pieces[-1].kind, pieces[-1].finish_reason
    ('done', 'length')

Shapes: B active rows, S slots, L attended positions, H heads, D head size, C channels, V vocabulary.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from scratchlm import backend
from scratchlm.generate import (KVCache, _first_stop, _held_back, _TextPieces, apply_repetition_penalty,
                                prefill, sample_next_token)
from scratchlm.tensor import Tensor, no_grad

END_OF_TEXT = "<|endoftext|>"          # always a stop string: byte-level BPE runs mark document ends with it


# ====================================================================== the slots and one batched step

class SlotPool:
    """Keys and values of every layer for S sequences: (S, H, block_size, D) each, preallocated."""

    def __init__(self, config, slots: int, dtype):
        xp = backend.xp
        shape = (slots, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]      # n_layer x (S, H, block, D)
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.slots = slots

    def load(self, slot: int, cache: KVCache) -> None:
        """Copy the positions a (batch-1) ``KVCache`` holds into ``slot``."""
        n = cache.length
        for keys, values, layer in zip(self.keys, self.values, cache.layers):
            keys[slot, :, :n] = layer.keys[0, :, :n]
            values[slot, :, :n] = layer.values[0, :, :n]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``source`` into slot ``target``."""
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]


def decode_rows(model, pool: SlotPool, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One new token per row at its own position, rows = slots 0..B-1: tokens (B,), positions (B,)
    host ints; slot b must hold positions [0, positions[b]) of its sequence. Writes each row's
    keys and values at its position and returns the next-token logits (B, V), float64, on the host.

    The GPT forward of ``GPT._features`` + head, for T = 1 with per-row positions:
        x = wte[token] + pos_emb[position];  per block: x += attn(ln_1(x)); x += mlp(ln_2(x))
    attn: q, k, v = split(ln_1(x) @ W_attn); k, v written at the row's position; scores over
    the row's cached positions 0..position (later ones, another row's length, get -inf).
    """
    xp = backend.xp
    transformer = model.transformer
    B = len(tokens)
    C, H = model.config.n_embd, model.config.n_head
    D = C // H
    L = int(positions.max()) + 1                                        # attended positions of the longest row
    rows = xp.arange(B)
    pos = backend.to_device(np.asarray(positions, dtype=np.int64))      # (B,)
    with no_grad():
        tok_emb = transformer.wte(backend.to_device(np.asarray(tokens, dtype=np.int64)[:, None]))  # (B, 1, C)
        pos_emb = transformer.wpe(pos) if "wpe" in transformer else transformer.sinusoidal(pos)  # (B, C)
        x = tok_emb + pos_emb.reshape(B, 1, C)                                                 # (B, 1, C)
        beyond = xp.arange(L)[None, :] > pos[:, None]                                          # (B, L) masked
        scale = 1.0 / math.sqrt(D)
        for block, keys, values in zip(transformer.h, pool.keys, pool.values):
            attn = block.attn
            qkv = attn.c_attn(block.ln_1(x)).data.reshape(B, 3, H, D)                         # q, k, v side by side
            keys[rows, :, pos] = qkv[:, 1]                                                     # (B, H, D) at each position
            values[rows, :, pos] = qkv[:, 2]
            q = qkv[:, 0, :, None, :]                                                          # (B, H, 1, D)
            scores = (q @ keys[:B, :, :L].swapaxes(-1, -2))[:, :, 0, :] * scale                # (B, H, L)
            scores = xp.where(beyond[:, None, :], -xp.inf, scores)
            probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)                                         # (B, H, L)
            y = (probs[:, :, None, :] @ values[:B, :, :L]).reshape(B, 1, C)                    # (B, 1, C)
            x = x + attn.c_proj(Tensor(y))
            x = x + block.mlp(block.ln_2(x))                                                   # (B, 1, C)
        logits = model.lm_head(transformer.ln_f(x))                                            # (B, 1, V)
    return backend.to_numpy(logits.data[:, 0, :]).astype(np.float64)                           # (B, V)


# ====================================================================== a sequence

@dataclass
class Event:
    """What the engine tells a request about one of its rows.

    kind "token": one sampled token (``token``; ``text``: the text it releases, maybe "" while a
    UTF-8 character or a possible stop string is incomplete; ``logprob`` and ``top``: its
    log-probability and the ``logprobs`` likeliest (token, logprob) pairs under the model, at
    temperature 1, before any sampling control, when the row asks for them). kind "done": the row ended (``finish_reason`` "stop" or "length";
    ``text``: the last held-back text). kind "error": the engine failed on this row (``message``).
    """
    kind: str
    index: int
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    message: str = ""


@dataclass(eq=False)
class Row:
    """One sequence to generate: prompt ids, controls, and where its events go (``sink``, called
    from the engine's thread). Its tokens are ``stream_text``'s for the same prompt and controls."""
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    stops: list[str] = field(default_factory=list)
    logprobs: int | None = None            # report each token's log-probability and this many alternatives
    index: int = 0                         # the choice index in its request
    sink: Callable[[Event], None] = print
    cancelled: bool = False                # set from any thread; the engine drops the row between steps

    def start(self, tokenizer) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.context = np.asarray(self.prompt, dtype=np.int64)
        self.position = len(self.prompt)           # where the last sampled token goes when fed back
        self.generated = 0
        self.finished = False
        self.decoder = _TextPieces(tokenizer)
        self.pending = ""                          # decoded, not yet released (may start a stop string)
        self.stops = list(self.stops) + ([END_OF_TEXT] if END_OF_TEXT not in self.stops else [])
        self.last = None

    def take(self, logits: np.ndarray, token: int) -> None:
        """Accept ``token``, sampled from this row's logits (V,) by ``sample_rows``; emit what it releases."""
        self.last = token
        self.generated += 1
        if self.repetition_penalty != 1:
            self.context = np.append(self.context, token)
        logprob, top = (None, None) if self.logprobs is None else _logprobs(logits, token, self.logprobs)
        self.pending += self.decoder.push(token)
        release, finish = self._release()
        self.sink(Event("token", self.index, release, token, logprob, top))
        if finish:
            self.finish(finish)

    def _release(self):
        """(text now known not to start a stop string, finish reason or None)."""
        cut = _first_stop(self.pending, self.stops)
        if cut is not None:
            release, self.pending = self.pending[:cut], ""
            return release, "stop"
        if self.generated >= self.max_new_tokens:
            return "", "length"
        ready = len(self.pending) - _held_back(self.pending, self.stops)
        release, self.pending = self.pending[:ready], self.pending[ready:]
        return release, None

    def finish(self, reason: str) -> None:
        rest = ""
        if reason == "length":
            rest = self.pending + self.decoder.flush()
            cut = _first_stop(rest, self.stops)
            rest, reason = (rest, reason) if cut is None else (rest[:cut], "stop")
        self.finished = True
        self.sink(Event("done", self.index, rest, finish_reason=reason, completion_tokens=self.generated))


class _RowDraws:
    """The generator ``sample_next_token`` draws from, for a group of rows sampled in one call:
    row b's uniform number comes from row b's own generator (``random()`` and ``random((1, 1))``
    take the same one double from a stream), so a row's tokens do not depend on its batch mates."""

    def __init__(self, rngs):
        self.rngs = rngs

    def random(self, shape):
        return np.array([rng.random() for rng in self.rngs]).reshape(shape)


def sample_rows(rows: list[Row], logits: np.ndarray) -> list[int]:
    """The next token of each row from logits (B, V): rows with the same controls are sampled in
    one ``sample_next_token`` call (each with its own generator); a repetition penalty, which
    depends on the row's context, is applied row by row."""
    tokens = [0] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for b, row in enumerate(rows):
        if row.repetition_penalty != 1:
            controlled = apply_repetition_penalty(logits[b:b + 1], row.context[None], row.repetition_penalty)
            tokens[b] = int(sample_next_token(controlled, row.temperature, row.top_k, row.top_p, row.rng)[0])
        else:
            groups.setdefault((row.temperature, row.top_k or None, row.top_p), []).append(b)
    for (temperature, top_k, top_p), members in groups.items():
        draws = _RowDraws([rows[b].rng for b in members])
        for b, token in zip(members, sample_next_token(logits[members], temperature, top_k, top_p, draws)):
            tokens[b] = int(token)
    return tokens


def _logprobs(logits: np.ndarray, token: int, n: int):
    """log p(token) and the n likeliest (token, log p) under softmax(logits), most likely first."""
    shifted = logits - logits.max()
    logp = shifted - math.log(np.exp(shifted).sum())                          # (V,)
    n = min(n, len(logp))
    if n == 0:
        return float(logp[token]), []
    top = np.argpartition(-logp, n - 1)[:n]
    top = top[np.argsort(-logp[top], kind="stable")]
    return float(logp[token]), [(int(t), float(logp[t])) for t in top]


# ====================================================================== the engine

class QueueFull(Exception):
    """The rows of a request do not fit in the waiting queue."""


class BatchedDecoder:
    """Decode the active rows together; admit waiting rows between steps (up to ``max_batch``
    active); at most ``max_queue`` rows wait for a slot (``submit`` refuses more: QueueFull).

    ``start()`` runs the loop in a daemon thread (the server); ``run_until_idle(rows)`` runs it in
    the caller's thread until every row has finished (tests, scripts). Counters in ``stats()``.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, max_queue: int = 64):
        if not hasattr(model, "transformer") or not hasattr(model.transformer, "h"):
            raise TypeError(f"batched decoding needs a GPT (token and position embeddings, blocks with "
                            f"self-attention), got {type(model).__name__}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        dtype = model.transformer.wte.weight.dtype
        self.pool = SlotPool(model.config, max_batch, dtype)
        self.scratch = KVCache(model.config, 1, dtype)                   # prefill target, copied into a slot
        self.active: list[Row] = []                                      # row b owns slot b
        self.waiting: list[Row] = []
        self.cond = threading.Condition()
        self.thread = None
        self.stopping = False
        self.on_work = None                    # called (in the submitting thread) when rows arrive or leave
        self.counters = {"steps": 0, "tokens": 0, "prefills": 0, "rows_done": 0, "rows_cancelled": 0,
                         "errors": 0, "max_active": 0}

    # ------------------------------------------------------------------ the public side
    def submit(self, rows: list[Row]) -> None:
        """Queue rows (any thread). Raises QueueFull if more than ``max_queue`` would wait."""
        with self.cond:
            free = self.max_batch - len(self.active)
            would_wait = len(self.waiting) + len(rows) - max(free, 0)
            if would_wait > self.max_queue:
                raise QueueFull(f"{len(self.active)} rows decoding and {len(self.waiting)} waiting "
                                f"(limit {self.max_queue})")
            self.waiting.extend(rows)
            self.cond.notify()
        if self.on_work is not None:
            self.on_work()

    def cancel(self, rows: list[Row]) -> None:
        """Stop these rows (any thread): they leave before the next step, freeing their slots."""
        for row in rows:
            row.cancelled = True
        with self.cond:
            self.cond.notify()
        if self.on_work is not None:
            self.on_work()

    def idle(self) -> bool:
        return not self.active and not self.waiting

    def turn(self) -> None:
        """Admit waiting rows, run one decode step over the active ones, retire the finished: the
        unit of work of a driver that runs the engine itself (the server's event loop)."""
        if not self.idle():
            self._turn(block=False)

    def stats(self) -> dict:
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, **self.counters}

    def start(self) -> "BatchedDecoder":
        self.model.eval()
        self.thread = threading.Thread(target=self._loop, name="scratchlm-decoder", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def run_until_idle(self, rows: list[Row] = ()) -> None:
        """Submit ``rows`` and run the loop here until nothing is active or waiting."""
        self.model.eval()
        self.submit(list(rows))
        while self._turn(block=False):
            pass

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while self._turn(block=True):
            pass

    def _turn(self, block: bool) -> bool:
        """Admit, step, retire once. Returns False when the loop should end."""
        with self.cond:
            while block and not self.stopping and not self.active and not self.waiting:
                self.cond.wait()
            if self.stopping or (not block and not self.active and not self.waiting):
                return False
            self.waiting = [row for row in self.waiting if not self._dropped(row)]
            joining = self.waiting[:max(self.max_batch - len(self.active), 0)]
            del self.waiting[:len(joining)]
        try:
            for row in joining:
                self._join(row)
            self._retire()
            if self.active:
                self._step()
            self._retire()
        except Exception as exc:  # a bug in a step: fail the rows it touched, keep serving the next ones
            self._fail_all(exc, joining)
        return True

    def _dropped(self, row: Row) -> bool:
        if row.cancelled:
            self.counters["rows_cancelled"] += 1
        return row.cancelled

    def _join(self, row: Row) -> None:
        if row.cancelled:
            self.counters["rows_cancelled"] += 1
            return
        row.start(self.tokenizer)
        slot = len(self.active)
        logits = prefill(self.model, np.asarray([row.prompt], dtype=np.int64), self.scratch)   # (1, V)
        self.pool.load(slot, self.scratch)
        self.active.append(row)
        self.counters["prefills"] += 1
        self.counters["max_active"] = max(self.counters["max_active"], len(self.active))
        self.counters["tokens"] += 1
        row.take(logits[0], sample_rows([row], logits)[0])

    def _step(self) -> None:
        tokens = np.array([row.last for row in self.active], dtype=np.int64)              # (B,)
        positions = np.array([row.position for row in self.active], dtype=np.int64)      # (B,)
        logits = decode_rows(self.model, self.pool, tokens, positions)                  # (B, V)
        self.counters["steps"] += 1
        self.counters["tokens"] += len(self.active)
        live = [b for b, row in enumerate(self.active) if not row.cancelled]
        for row in self.active:
            row.position += 1
        rows = [self.active[b] for b in live]
        for row, row_logits, token in zip(rows, logits[live], sample_rows(rows, logits[live])):
            row.take(row_logits, token)

    def _retire(self) -> None:
        """Drop finished and cancelled rows; the last active row moves into each freed slot."""
        slot = 0
        with self.cond:
            while slot < len(self.active):
                row = self.active[slot]
                if not (row.finished or row.cancelled):
                    slot += 1
                    continue
                self.counters["rows_cancelled" if row.cancelled and not row.finished else "rows_done"] += 1
                last = self.active.pop()
                if last is not row:
                    self.pool.move(len(self.active), slot, last.position)
                    self.active[slot] = last

    def _fail_all(self, exc: Exception, joining: list[Row]) -> None:
        self.counters["errors"] += 1
        message = f"generation failed: {type(exc).__name__}: {exc}"
        with self.cond:
            failed, self.active = self.active + [r for r in joining if r not in self.active], []
        for row in failed:
            if not getattr(row, "finished", False):
                row.finished = True
                row.sink(Event("error", row.index, message=message))


def wait_idle(engine: BatchedDecoder, timeout: float = 30.0) -> bool:
    """Poll until the engine has no active or waiting row (True), or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = engine.stats()
        if not stats["active"] and not stats["waiting"]:
            return True
        time.sleep(0.01)
    return False


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0, top_k=None,
                   top_p=None, repetition_penalty: float = 1.0, stop=None, seed: int = 0,
                   max_batch: int = 32) -> list[str]:
    """The continuation of each prompt, decoded together in one batch (in this thread): prompt i
    is sampled with seed + i, and its text is ``stream_text``'s for that prompt and seed. Each
    prompt plus ``max_new_tokens`` must fit in the model's context (no sliding window here)."""
    from scratchlm.generate import SamplingArgumentError, check_sampling_args
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
    stops = [] if stop is None else ([stop] if isinstance(stop, str) else list(stop))
    texts = [[] for _ in prompts]
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids or len(ids) + max_new_tokens > model.config.block_size:
            raise SamplingArgumentError(f"prompt {i} has {len(ids)} tokens; it needs 1 to "
                                        f"{model.config.block_size - max_new_tokens} to leave room for "
                                        f"{max_new_tokens} new ones in the {model.config.block_size}-token context")
        rows.append(Row(ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed + i, stops, None, i,
                        lambda event: texts[event.index].append(event.text)))
    if max_new_tokens:
        BatchedDecoder(model, tokenizer, max_batch=max_batch, max_queue=len(rows)).run_until_idle(rows)
    return ["".join(pieces) for pieces in texts]
