"""The scheduling of batched decoding: many requests decoded together, one model step for all.

At batch 1 a decode step reads every weight to produce one token, so a server that runs
requests one after another is bound by memory traffic, not arithmetic. Decoding the active
requests *together* turns the per-token matrix-vector products into matrix-matrix products
over the batch: the weights are read once per step for B tokens, and throughput grows with
concurrency. The step itself is ``scratchlm.generate.RowDecoder`` (each row its own KV-cache
slot, position and sampling settings; the same path ``generate`` takes with several prompts),
and the sampler is ``scratchlm.generate.sample_rows``. This module decides who is in the batch:

- ``Row``: one sequence (one choice of one request) with its own sampling settings, seeded
  generator, stop strings and incremental text decoder, and a ``sink`` for its ``Event``s;
- ``BatchedDecoder``: a loop (its own thread, or driven by the caller) that admits waiting rows
  between steps (the rows joining in one turn prefilled together, each into its slot), runs one
  ``RowDecoder.step`` over the active rows, samples each row's token, and retires rows that
  finished or were cancelled. Active rows always occupy slots 0..B-1 (when one leaves, the last
  one moves into its slot), so a step reads the first B slots, with no gather.

A row's tokens are those of ``scratchlm.generate.stream_text`` for the same prompt, controls
and seed: the same sampler, the same generator draws in the same order, the same
prefill-then-decode schedule.

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
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from scratchlm.generate import RowDecoder, _first_stop, _held_back, _TextPieces, sample_rows, token_logprobs

END_OF_TEXT = "<|endoftext|>"          # always a stop string: byte-level BPE runs mark document ends with it


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
        self.stop_starts = {stop[0] for stop in self.stops}   # text without any of these holds no stop string,
        self.last = None                                      # and no start of one either

    def take(self, logits: np.ndarray, token: int) -> None:
        """Accept ``token``, sampled from this row's logits (V,) by ``sample_rows``; emit what it releases."""
        self.last = token
        self.generated += 1
        if self.repetition_penalty != 1:
            self.context = np.append(self.context, token)
        logprob, top = (None, None) if self.logprobs is None else token_logprobs(logits, token, self.logprobs)
        self.pending += self.decoder.push(token)
        release, finish = self._release()
        self.sink(Event("token", self.index, release, token, logprob, top))
        if finish:
            self.finish(finish)

    def _release(self):
        """(text now known not to start a stop string, finish reason or None)."""
        if self.stop_starts.isdisjoint(self.pending):               # most tokens: nothing to look for
            if self.generated >= self.max_new_tokens:
                return "", "length"
            release, self.pending = self.pending, ""
            return release, None
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
        self.decoder = RowDecoder(model, max_batch)                     # raises TypeError for a non-GPT
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
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
            self._join(joining)
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

    def _join(self, joining: list[Row]) -> None:
        """Prefill the joining rows in one forward (``RowDecoder.prefill_rows``: the prompts share
        the weight reads), each into the next free slot, then each takes its first token, in order."""
        rows = []
        for row in joining:
            if row.cancelled:
                self.counters["rows_cancelled"] += 1
            else:
                row.start(self.tokenizer)
                rows.append(row)
        if not rows:
            return
        first = len(self.active)
        logits = self.decoder.prefill_rows([row.prompt for row in rows], range(first, first + len(rows)))  # (N, V)
        for row, row_logits in zip(rows, logits):
            self.active.append(row)
            self.counters["prefills"] += 1
            self.counters["max_active"] = max(self.counters["max_active"], len(self.active))
            self.counters["tokens"] += 1
            row.take(row_logits, sample_rows([row], row_logits[None])[0])

    def _step(self) -> None:
        tokens = np.array([row.last for row in self.active], dtype=np.int64)              # (B,)
        positions = np.array([row.position for row in self.active], dtype=np.int64)      # (B,)
        logits = self.decoder.step(tokens, positions)                                  # (B, V)
        self.counters["steps"] += 1
        self.counters["tokens"] += len(self.active)
        for row in self.active:
            row.position += 1
        rows = [row for row in self.active if not row.cancelled]
        if len(rows) < len(self.active):
            logits = logits[[b for b, row in enumerate(self.active) if not row.cancelled]]
        for row, row_logits, token in zip(rows, logits, sample_rows(rows, logits)):
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
                    self.decoder.cache.copy_row(self.decoder.cache, len(self.active), slot, last.position)
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
