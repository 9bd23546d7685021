"""Rows with their own positions: the batched decode step of a GPT.

``RowDecoder`` runs a GPT one token per row over B rows, each row in its own slot of one
``KVCache`` at its own position: the batched path of ``generate`` (every row at the same
position) and of the server (``scratchlm.serve.batching``: concurrent requests of different
lengths, joining and leaving between steps). The step itself is ``scratchlm.kernels.decode``:
a fused Numba kernel for a few rows (the decode step proper), the NumPy reference for many rows
(a prefill) or without Numba. This file holds what is around it: the weights gathered once, the
buffers, the prefill of a prompt into a slot, and the BLAS threads the reference runs on.

    >>> from scratchlm.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    >>> rows = RowDecoder(model, rows=2)
    >>> rows.prefill([1, 2, 3], slot=0).shape, rows.prefill([4], slot=1).shape
    ((5,), (5,))
    >>> rows.step([0, 1], positions=[3, 1]).shape      # row 0 continues at position 3, row 1 at 1
    (2, 5)
    >>> rows.prefill_rows([[1, 2], [3, 4, 0]], slots=[1, 0]).shape    # two prompts in one forward
    (2, 5)

Shapes: B rows in a step, S = rows slots, C channels, V vocabulary.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import backend
from .kernels import decode
from .tensor import no_grad


# A prompt is prefilled this many positions at a time (the fused kernel's largest step, so a
# prompt runs on the kernel where the kernel runs).
PREFILL_CHUNK = decode.KERNEL_MAX_ROWS


class RowDecoder:
    """The decode step of a GPT over B rows that each have their own position and cache slot.

    ``step(tokens, positions)`` runs one token per row, row b at position positions[b] (its
    slot must hold positions [0, positions[b]) of its sequence): the GPT forward of
    ``GPT._features`` + head for T = 1, on the arrays, without the autograd machinery (the math
    is in ``scratchlm.kernels.decode``). A row attends over its own prefix only, so rows of
    different lengths share a step. ``prefill(tokens, slot)`` fills a slot with a prompt.

    The model's arrays are gathered once, here: ``load_state_dict`` copies into them in place,
    so the decoder sees reloaded weights; a model whose parameters are replaced by new arrays
    needs a new decoder. Every buffer is allocated once for ``rows`` rows (a step with B <= rows
    uses the first B).
    """

    def __init__(self, model, rows: int):
        if not hasattr(model, "transformer") or not hasattr(model.transformer, "h"):
            raise TypeError(f"batched decoding needs a GPT (token and position embeddings, blocks with "
                            f"self-attention), got {type(model).__name__}")
        from .generate import KVCache          # generate imports this module for its loop
        xp = backend.xp
        config = model.config
        self.model, self.rows = model, rows
        dtype = model.transformer.wte.weight.dtype
        self.cache = KVCache(config, rows, dtype)                                 # n_layer x (S, H, block, D)
        self.weights = step_weights(model)
        # a prefill's positions are rows too: the buffers hold a step's rows or a prefill's chunk (of
        # several prompts, so maybe longer than the window, and ending several: as many logit rows)
        step_rows = max(rows, PREFILL_CHUNK)
        self.scratch = decode.Scratch(step_rows, step_rows, config.n_embd, config.n_head, config.n_layer,
                                      config.vocab_size, config.block_size, dtype, xp)
        self.keys = tuple(layer.keys for layer in self.cache.layers)
        self.values = tuple(layer.values for layer in self.cache.layers)

    def step(self, tokens, positions) -> np.ndarray:
        """tokens (B,), positions (B,) host ints -> the next-token logits (B, V), float64, on the host.
        Row b is slot b."""
        B = len(tokens)
        logits = self._forward(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64),
                               np.arange(B), slice(0, B))
        return backend.to_numpy(logits).astype(np.float64)                       # (B, V)

    def prefill(self, tokens, slot: int) -> np.ndarray:
        """A whole prompt tokens (T,) into ``slot`` (positions 0..T-1) -> the next-token logits (V,),
        float64, on the host (``prefill_rows`` of one prompt)."""
        return self.prefill_rows([tokens], [slot])[0]

    def prefill_rows(self, prompts, slots) -> np.ndarray:
        """N prompts (each a non-empty sequence of token ids) into their ``slots`` (N distinct ints),
        prompt n at positions 0..T_n-1 -> each prompt's next-token logits (N, V), float64, on the host.

        One forward for all: the step's code with every prompt's positions as rows, each row
        writing and reading its own prompt's slot, so row t of a prompt attends over its positions
        0..t (causal within the prompt, blind to the others), and only each prompt's last row goes
        through the head. The rows go in chunks of ``PREFILL_CHUNK``, each chunk attending over what
        the earlier chunks wrote (a chunk may end one prompt and start the next), so a step's scores
        are at most (PREFILL_CHUNK, H, 1, T): no T x T matrix, and chunks small enough for the fused
        kernel. Prompts that join a server in the same turn thus share the weight reads of a step."""
        prompts = [np.asarray(prompt, dtype=np.int64).reshape(-1) for prompt in prompts]
        lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int64)
        if len(prompts) != len(slots) or not len(prompts) or lengths.min() < 1:
            raise ValueError(f"prefill_rows: needs one slot per prompt and non-empty prompts, got "
                             f"{len(prompts)} prompts of lengths {lengths.tolist()} and {len(slots)} slots")
        tokens = np.concatenate(prompts)                                          # (R,) every prompt's rows
        positions = np.concatenate([np.arange(n) for n in lengths])               # (R,)
        row_slots = np.repeat(np.asarray(slots, dtype=np.int64), lengths)         # (R,)
        ends = np.cumsum(lengths) - 1                                             # (N,) each prompt's last row
        logits = np.empty((len(prompts), self.model.config.vocab_size))
        chunk = min(PREFILL_CHUNK, len(self.scratch.x))
        for start in range(0, len(tokens), chunk):
            stop = min(start + chunk, len(tokens))
            ending = np.flatnonzero((ends >= start) & (ends < stop))              # prompts whose last row is here
            chunk_slots = row_slots[start:stop]
            # rows of one slot read it as a slice: the reference then attends without gathering it per row
            read = slice(chunk_slots[0], chunk_slots[0] + 1) if chunk_slots[0] == chunk_slots[-1] else chunk_slots
            out = self._forward(tokens[start:stop], positions[start:stop], chunk_slots, read, ends[ending] - start)
            logits[ending] = backend.to_numpy(out)                                # (len(ending), V)
        return logits

    def _forward(self, tokens, positions, slots, read, head_rows=None):
        """Rows (B,) of tokens at positions, writing their keys and values into ``slots`` (B,) and
        attending over the slots ``read`` (B of them, or the one every row shares); the logits of
        the rows ``head_rows`` (None: every row)."""
        run = lambda: decode.step(self.weights, self.keys, self.values, tokens, positions, slots,  # noqa: E731
                                  read, self.scratch, head_rows)
        if decode.uses_kernel(self.scratch, len(tokens)):
            return run()
        with blas_threads_for(len(tokens), self.model.config.n_embd):
            return run()


def step_weights(model) -> decode.StepWeights:
    """The arrays of a GPT that a decode step reads (zeros for absent biases, the sinusoidal table
    computed once for a model without ``wpe``)."""
    t = model.transformer
    xp = backend.xp
    dtype = t.wte.weight.dtype

    def array(parameter, size):
        return parameter.data if parameter is not None else xp.zeros(size, dtype)

    blocks = []
    for block in t.h:
        C = block.ln_1.weight.shape[0]
        attn, mlp = block.attn, block.mlp
        blocks.append(decode.BlockWeights(
            array(block.ln_1.weight, C), array(block.ln_1.bias, C),
            attn.c_attn.weight.data, array(attn.c_attn.bias, 3 * C),
            attn.c_proj.weight.data, array(attn.c_proj.bias, C),
            array(block.ln_2.weight, C), array(block.ln_2.bias, C),
            mlp.c_fc.weight.data, array(mlp.c_fc.bias, mlp.c_fc.weight.shape[1]),
            mlp.c_proj.weight.data, array(mlp.c_proj.bias, C),
            float(block.ln_1.eps)))
    if "wpe" in t:
        table = t.wpe.weight.data
    else:
        with no_grad():
            table = t.sinusoidal(xp.arange(model.config.block_size)).data.astype(dtype)   # (T, C)
    C = t.wte.weight.shape[1]
    return decode.StepWeights(t.wte.weight.data, table, tuple(blocks), array(t.ln_f.weight, C),
                              array(t.ln_f.bias, C), float(t.ln_f.eps))


# ---------------------------------------------------------------- BLAS threads of the reference

# Matrix products smaller than this many multiply-adds run on one BLAS thread: a decode step's
# matrix-vector products read a few MB of weights, and a second thread adds a hand-off per call
# (on the shared 2-core machine, a 16-row step ran 15x slower with threads waiting for each other).
ONE_THREAD_BELOW = 1 << 24


class _BlasLimit:
    """A reusable context that caps the BLAS threads (threadpoolctl's controller, made once)."""
    controller = None

    def __init__(self, threads: int):
        self.threads, self.limit = threads, None

    def __enter__(self):
        if _BlasLimit.controller is None:
            from threadpoolctl import ThreadpoolController
            _BlasLimit.controller = ThreadpoolController()
        self.limit = _BlasLimit.controller.limit(limits=self.threads, user_api="blas")
        return self

    def __exit__(self, *exc):
        self.limit.restore_original_limits()


def blas_threads_for(rows: int, channels: int):
    """The context a reference step of ``rows`` rows of ``channels`` channels runs in: one BLAS
    thread when its largest product (rows x C x 4C multiply-adds) is small, else the library's
    default. Without threadpoolctl (optional; the core needs only NumPy) or on CuPy it changes nothing."""
    if rows * channels * 4 * channels >= ONE_THREAD_BELOW or backend.get_backend() != "numpy":
        return contextlib.nullcontext()
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return contextlib.nullcontext()
    return _BlasLimit(1)
