"""GPT: a decoder-only transformer language model, laid out as GPT-2.

Read top to bottom, the classes are the architecture: a config, the output head tied to the
token embedding, then the model. token ids (B, T) -> token + position embeddings (B, T, C)
-> n_layer Blocks (nn/modules.py) -> final LayerNorm -> logits (B, T, V) over the next token.

Parameter names are those of Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight``
...), and Linear weights are stored (n_in, n_out) as GPT-2's Conv1D, so a GPT-2 checkpoint
loads with no renaming table and no transposes:

    >>> from scratchlm.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    >>> logits, loss = model([[1, 2, 3]], targets=[[2, 3, 4]])
    >>> logits.shape
    (1, 3, 65)
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys

import numpy as np

from .. import backend
from .. import generate as generation
from .. import nn
from ..errors import UserError
from ..generate import sample_next_token  # noqa: F401  (re-exported: the one sampler lives in generate.py)
from ..nn import functional as F
from ..tensor import Tensor


class ModelArgumentError(UserError, ValueError):
    """A bad config value or model argument: a UserError for the CLI, a ValueError for Python."""


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50304     # GPT-2's 50257 padded up to a multiple of 64 (faster matmuls), as nanoGPT
    block_size: int = 1024      # the longest context T the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768           # C; each head has D = C / H channels
    dropout: float = 0.0
    bias: bool = True           # biases in Linear and LayerNorm layers (GPT-2: True)
    positional: str = "learned"  # "learned" (wpe, GPT-2) or "sinusoidal" (fixed, no parameters)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ModelArgumentError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ModelArgumentError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                                     f"choose n_embd as a multiple of n_head")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ModelArgumentError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ModelArgumentError(f"bias must be true or false, got {self.bias!r}")
        if self.positional not in ("learned", "sinusoidal"):
            raise ModelArgumentError(f"positional must be 'learned' or 'sinusoidal', got {self.positional!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelArgumentError(f"unknown GPTConfig key(s) {', '.join(map(repr, unknown))}; "
                                     f"known keys: {', '.join(sorted(known))}")
        return cls(**values)

    def num_parameters(self) -> int:
        """Distinct parameters of ``GPT(self)``, by formula (no allocation). Per block: ln_1 and
        ln_2 (2C each, C without bias), c_attn 3C^2 + 3C, attn c_proj C^2 + C, c_fc 4C^2 + 4C, mlp
        c_proj 4C^2 + C; then wte V C (the head is tied), wpe T C if learned, ln_f 2C."""
        C, L, bias = self.n_embd, self.n_layer, self.bias
        norm = 2 * C if bias else C
        block = 12 * C * C + (9 * C if bias else 0) + 2 * norm
        return L * block + self.vocab_size * C + (self.block_size * C if self.positional == "learned" else 0) + norm

    def memory_estimate(self, batch_size: int, block_size: int | None = None, bytes_per_value: int = 4) -> dict:
        """Bytes one training step needs, per component, without allocating anything:

            parameters   N values                       (N = ``num_parameters()``)
            gradients    N values                       (one per parameter)
            optimizer    2 N values                     (AdamW's exp_avg and exp_avg_sq)
            activations  B T (L (19 C + H T) + 4 C + V) values, what the tape holds after the forward:

        per block and token, ln_1's output (C), the fused q, k, v (3C), the attention output (C),
        its heads merged back (C), c_proj's output (C), the residual sum (C), ln_2's output (C),
        c_fc's output (4C), GELU's output (4C), the MLP's c_proj output (C) and the second residual
        sum (C) = 19 C, plus the attention probabilities (H T per query position; the strip path
        for long T keeps less, so this is an upper bound there); outside the blocks the token and
        position embeddings, their sum and ln_f's output (4C) and the logits (V). The q, k, v heads
        are views of the fused projection and cost nothing. tests/test_run_guard.py checks this
        against the bytes tracemalloc sees held after a forward of a small model.
        """
        B, T = int(batch_size), int(block_size or self.block_size)
        C, L, H, V = self.n_embd, self.n_layer, self.n_head, self.vocab_size
        n = self.num_parameters()
        per_token = L * (19 * C + H * T) + 4 * C + V
        return {"parameters": n * bytes_per_value, "gradients": n * bytes_per_value,
                "optimizer": 2 * n * bytes_per_value, "activations": B * T * per_token * bytes_per_value}


class TiedLMHead(nn.Module):
    """logits = x @ W_te^T: the output layer reuses the token embedding W_te (V, C).

    ``self.weight`` IS ``transformer.wte.weight`` (one Parameter), so the tape adds the gradient
    of this use to the gradient of the embedding lookup, and ``state_dict`` lists it under both
    names, as Hugging Face does.
    """

    def __init__(self, embedding: nn.Embedding):
        self.weight = embedding.weight                                   # (V, C), shared

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return (x.reshape(B * T, C) @ self.weight.T).reshape(B, T, -1)   # (B, T, V)

    def extra_repr(self):
        V, C = self.weight.shape
        return f"{C}, {V}, weight tied to transformer.wte"


class GPT(nn.Module):
    """GPT-2: embeddings, a stack of pre-LayerNorm Blocks, a final LayerNorm, the tied head.

    ``fused_ops`` (default True) runs each residual add with the layer norm after it
    (``F.add_layer_norm``) and, on a GPU, the MLP's bias with its GELU (``F.bias_gelu``);
    ``use_fused_ops(False)`` gives the plain chain of ops, the same function (tests and
    bench/train.py compare the two).
    """

    fused_ops = True

    def __init__(self, config: GPTConfig, seed: int = 0):
        self.config = config
        C = config.n_embd
        with nn.deferred_init():                      # allocate; _init_weights draws the values
            self.transformer = nn.ModuleDict(wte=nn.Embedding(config.vocab_size, C))
            if config.positional == "learned":
                self.transformer.wpe = nn.Embedding(config.block_size, C)
            else:
                self.transformer.sinusoidal = nn.SinusoidalPositionalEncoding(config.block_size, C)
            self.transformer.drop = nn.Dropout(config.dropout)
            self.transformer.h = nn.ModuleList(nn.Block(C, config.n_head, config.dropout, config.bias)
                                               for _ in range(config.n_layer))
            self.transformer.ln_f = nn.LayerNorm(C, bias=config.bias)
            self.lm_head = TiedLMHead(self.transformer.wte)
        self._init_weights(seed)

    def _init_weights(self, seed: int) -> None:
        """GPT-2's init: N(0, 0.02) for Linear and Embedding weights, zero biases, unit LayerNorm
        gains; the projections that write into the residual stream (``c_proj``) get
        N(0, 0.02 / sqrt(2 n_layer)) so the stream's variance does not grow with depth (2 per
        block). Drawn on the host with NumPy: the same seed gives the same model on every backend."""
        rng = np.random.default_rng(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)

        def fill(param, values):
            param.data[...] = backend.to_device(values, param.dtype)

        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith("c_proj") else 0.02
                # float32 draws (half the time of float64 for 124M weights), the same for every dtype
                fill(module.weight, std * rng.standard_normal(module.weight.shape, dtype=np.float32))
            if isinstance(module, nn.LayerNorm):
                fill(module.weight, np.ones(module.weight.shape))
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                fill(module.bias, np.zeros(module.bias.shape))

    def use_fused_ops(self, flag: bool = True) -> "GPT":
        """Fused residual + layer norm, and bias + GELU where it wins (``MLP.fuse_bias_gelu``:
        on a GPU), with True; the unfused ops with False."""
        self.fused_ops = bool(flag)
        for block in self.transformer.h:
            block.mlp.fuse_bias_gelu = "auto" if flag else False
        return self

    # ------------------------------------------------------------------ forward
    def _features(self, idx, cache=None) -> Tensor:
        """Token ids (B, T) -> the final LayerNorm's output (B, T, C), before the head.

        With a KV cache (``scratchlm.generate.KVCache``) the tokens come after the ``cache.length``
        positions it holds: they get absolute positions start_pos = cache.length onwards, and
        each block reads and extends its layer's cache."""
        B, T = idx.shape
        start_pos = 0 if cache is None else cache.length
        if start_pos + T > self.config.block_size:
            raise ModelArgumentError(f"sequence length {start_pos + T} is longer than block_size "
                                     f"{self.config.block_size}; crop the input to the last "
                                     f"{self.config.block_size} tokens")
        pos = backend.xp.arange(start_pos, start_pos + T)                # (T,) absolute positions
        tok_emb = self.transformer.wte(idx)                              # (B, T, C)
        if "wpe" in self.transformer:
            pos_emb = self.transformer.wpe(pos)                          # (T, C), learned
        else:
            pos_emb = self.transformer.sinusoidal(pos)                   # (T, C), fixed
        x = self.transformer.drop(tok_emb + pos_emb)                     # (B, T, C)
        blocks = self.transformer.h
        if not self.fused_ops:
            for i, block in enumerate(blocks):
                x = block(x, cache=None if cache is None else cache.layers[i])   # (B, T, C)
            return self.transformer.ln_f(x)                              # (B, T, C)
        # each residual add fused with the layer norm after it: h is always ln(x) for the next use
        h = blocks[0].ln_1(x)                                            # (B, T, C)
        for i, block in enumerate(blocks):
            next_norm = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            x, h = block.forward_chained(x, h, next_norm, cache=None if cache is None else cache.layers[i])
        return h                                                         # ln_f(x) (B, T, C)

    def forward(self, idx, targets=None, cache=None):
        """idx: int (B, T) -> (logits (B, T, V), mean cross-entropy against targets (B, T) or None).

        Targets equal to -100 are ignored (padding). Logits are computed at every position.
        ``cache``: a ``scratchlm.generate.KVCache`` for decoding (inference only): idx continues
        the positions it holds, and it is extended by them.
        """
        logits = self.lm_head(self._features(_index_array(idx, "idx"), cache))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, _index_array(targets, "targets"))
        return logits, loss

    # ------------------------------------------------------------------ sampling
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, top_p=None,
                 seed: int = 0, *, repetition_penalty: float = 1.0, use_cache: bool = True,
                 window_keep: int | None = None):
        """Continue each row of idx (B, T) by ``max_new_tokens`` sampled tokens: (B, T + new) ints.

        Each step takes the last position's logits, applies the repetition penalty (1 = off),
        divides by ``temperature`` (0 = greedy), keeps the ``top_k`` largest (None or 0 = all;
        1 = greedy), then the smallest set whose probability reaches ``top_p`` (None or 1 = all),
        and draws from what is left with NumPy's generator seeded ``seed`` (the same ids on every
        backend). Dropout is off while sampling. A KV cache makes each step one token's work; the
        model sees the last block_size tokens (``window_keep``: how many to keep when the window
        slides). All of it lives in ``scratchlm.generate`` (see ``iter_tokens``).
        """
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed,
                                   repetition_penalty=repetition_penalty, use_cache=use_cache,
                                   window_keep=window_keep)

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Load our own state dicts and GPT-2 ``model.safetensors`` files alike (see
        ``normalize_gpt2_keys``). Returns (missing, unexpected), as ``nn.Module.load_state_dict``."""
        return super().load_state_dict(normalize_gpt2_keys(state_dict), strict=strict)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self, non_embedding: bool = True) -> int:
        """Distinct parameters; with ``non_embedding`` the position table is not counted (as
        nanoGPT: the token table is, since the tied head uses it as a real weight)."""
        n = sum(p.size for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.size
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B and
        nanoGPT's estimate_mfu: 6 N for the weights, plus 12 L H D T for attention's two
        (T x T) products."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_parameters() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Param groups for AdamW, as nanoGPT: decay the 2-D weights of Linear layers (the
        matrices); no decay for biases, LayerNorm gains and the embeddings (wte = lm_head, wpe)."""
        decay_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = self.parameters()
        return [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]

    def summary(self, batch_size: int = 1, seq_len: int | None = None, file=sys.stdout) -> str:
        """A per-layer table (like Keras's): each leaf layer in call order with its output shape
        for a (batch_size, seq_len or block_size) input and its parameter count, then totals.
        Printed to ``file`` (None: not printed) and returned."""
        from .summary import layer_table
        ids = backend.xp.zeros((batch_size, seq_len or self.config.block_size), dtype=backend.xp.int64)
        text = layer_table(self, ids, [f"Total params: {self.num_parameters(non_embedding=False):,}",
                                       f"Non-embedding params: {self.num_parameters():,}"])
        if file is not None:
            print(text, file=file)
        return text


# ---------------------------------------------------------------------- helpers

def _index_array(values, what: str):
    """Token ids as a 2-D integer backend array, from a Tensor, backend/NumPy array or lists."""
    data = values.data if isinstance(values, Tensor) else values
    data = backend.to_device(data if hasattr(data, "dtype") else np.asarray(data))
    if data.dtype.kind not in "iu" or data.ndim != 2:
        raise ModelArgumentError(f"{what} must be a 2-D integer array (B, T), got dtype {data.dtype} "
                                 f"and shape {tuple(data.shape)}")
    return data


_GPT2_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def normalize_gpt2_keys(state_dict: dict) -> dict:
    """The one key normaliser: GPT-2 ``model.safetensors`` layout -> ours (= GPT2LMHeadModel's).

    Those files name weights without the ``transformer.`` prefix (``h.0.attn.c_attn.weight``),
    have no ``lm_head.weight`` (it is the tied ``wte``, which is enough for loading), and carry the
    causal-mask buffers ``attn.bias`` / ``attn.masked_bias``, which are not weights: dropped.
    Our own keys pass through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if _GPT2_BUFFER.search(key):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if name in out:
            raise UserError(f"state dict has both {key!r} and {name!r}; keep one of them")
        out[name] = value
    return out
