"""The rungs of the language-model ladder below the GPT: bigram, MLP, recurrent.

Each takes token ids (B, T) and returns (logits (B, T, V), loss) like the GPT, so one trainer,
evaluation and sampler serve them all; each also decodes one token at a time with a state that
costs O(1) per token (its "KV cache"):

    state = model.init_state(B)
    logits, state = model.step(token_ids, state)     # token_ids (B,) -> logits (B, V)

BigramLM:  logits_t = W[x_t]                        W (V, V): a table, what counting gives
MLPLM:     e_t = [E[x_{t-k+1}]; ...; E[x_t]]        the last k = block_size tokens' embeddings,
           h_t = tanh(e_t W_1 + b_1)                zero vectors before the sequence starts
           logits_t = h_t W_2 + b_2                 (Bengio et al. 2003; makemore's MLP)
RNNLM:     x_t = E[x_t];  h_t = cell(x_t, h_{t-1})  cell: RNN, LSTM or GRU, n_layer deep
           logits_t = h_t W_out + b_out             (W_out = E^T when tied: Press & Wolf 2017)

    >>> from scratchlm.models import RNNLM, RNNLMConfig
    >>> model = RNNLM(RNNLMConfig(vocab_size=27, n_embd=16, n_hidden=32), seed=0)
    >>> logits, loss = model([[1, 2, 3]], targets=[[2, 3, 4]])
    >>> logits.shape
    (1, 3, 27)

Shapes: B batch, T time, C = n_embd, H = n_hidden, V vocabulary, k = block_size (MLP context).
"""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..tensor import Tensor, is_grad_enabled
from .gpt import ModelArgumentError, TiedLMHead, _index_array

CELLS = {"rnn": (nn.RNN, 1), "lstm": (nn.LSTM, 4), "gru": (nn.GRU, 3)}   # layer class, gates G


def _fill(param, values) -> None:
    """Overwrite a parameter's values in place (host values drawn with NumPy, moved to the backend)."""
    param.data[...] = backend.to_device(np.broadcast_to(np.asarray(values, dtype=np.float64), param.shape), param.dtype)


class _Config:
    """to_dict / from_dict and the checks the ladder's configs share (as GPTConfig's)."""

    _positive = ("vocab_size", "block_size")

    def __post_init__(self):
        for name in self._positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ModelArgumentError(f"{name} must be a positive integer, got {value!r}")
        dropout = getattr(self, "dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ModelArgumentError(f"dropout must be a number in [0, 1), got {dropout!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelArgumentError(f"unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                                     f"known keys: {', '.join(sorted(known))}")
        return cls(**values)

    def _memory(self, n_params: int, activations: int, bytes_per_value: int) -> dict:
        """Bytes: parameters, their gradients, AdamW's two moments, and the activations (the
        training window T defaults to ``block_size``, as GPTConfig.memory_estimate)."""
        return {"parameters": n_params * bytes_per_value, "gradients": n_params * bytes_per_value,
                "optimizer": 2 * n_params * bytes_per_value, "activations": activations * bytes_per_value}


class _LanguageModel(nn.Module):
    """What every rung shares: (logits, loss) from token ids, accounting, the summary table."""

    def forward(self, idx, targets=None):
        """idx: int (B, T) -> (logits (B, T, V), mean cross-entropy against targets (B, T) or None).
        Targets equal to -100 are ignored (padding)."""
        logits = self._logits(_index_array(idx, "idx"))                         # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, _index_array(targets, "targets"))
        return logits, loss

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Distinct parameters (no position table to leave out, so ``non_embedding`` changes nothing)."""
        return sum(p.size for p in self.parameters())

    def _tables(self) -> list:
        """Parameters used as lookup tables only (rows are gathered, never multiplied)."""
        return []

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 per weight that multiplies (2 forward, 4 backward); a
        table that is only looked up costs nothing."""
        tables = {id(p) for p in self._tables()}
        return 6 * sum(p.size for p in self.parameters() if id(p) not in tables)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay the matrices that multiply (Linear and recurrent weights), not biases or tables."""
        tables = {id(p) for p in self._tables()}
        decay = [p for p in self.parameters() if p.ndim == 2 and id(p) not in tables]
        ids = {id(p) for p in decay}
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": [p for p in self.parameters() if id(p) not in ids], "weight_decay": 0.0}]

    def summary(self, batch_size: int = 1, seq_len: int | None = None, file=sys.stdout) -> str:
        """A per-layer table: each leaf layer in call order, its output shape for a
        (batch_size, seq_len or block_size) input, and its parameter count; then the total."""
        from .summary import layer_table
        ids = np.zeros((batch_size, seq_len or self.config.block_size), dtype=np.int64)
        text = layer_table(self, ids, [f"Total params: {self.num_parameters():,}"])
        if file is not None:
            print(text, file=file)
        return text

    def _token_column(self, token_ids):
        """(B,) ids -> a checked (B, 1) backend int array."""
        ids = token_ids.data if isinstance(token_ids, Tensor) else token_ids
        ids = backend.to_numpy(ids) if hasattr(ids, "dtype") else np.asarray(ids)
        return _index_array(np.asarray(ids).reshape(-1, 1), "token_ids")


# ====================================================================== bigram

@dataclasses.dataclass
class BigramLMConfig(_Config):
    vocab_size: int = 27
    block_size: int = 32        # the training window T; the model itself looks at one token

    def num_parameters(self) -> int:
        return self.vocab_size ** 2

    def memory_estimate(self, batch_size: int, block_size: int | None = None, bytes_per_value: int = 4) -> dict:
        """parameters = V^2; activations = 2 B T V (the logits, kept by the loss, and their gradient)."""
        T = block_size or self.block_size
        return self._memory(self.num_parameters(), 2 * batch_size * T * self.vocab_size, bytes_per_value)


class BigramLM(_LanguageModel):
    """logits_t = W[x_t]: the next token depends on this one only. Trained by cross-entropy the
    table reaches log P(next | this) of the counts (up to a constant per row), the MLE.
    Starts at zero: every next token equally likely, loss log V."""

    def __init__(self, config: BigramLMConfig, seed: int = 0):
        self.config = config
        self.logits_table = nn.Embedding(config.vocab_size, config.vocab_size, rng=np.random.default_rng(seed))
        _fill(self.logits_table.weight, 0)

    def _logits(self, idx):
        return self.logits_table(idx)                                           # (B, T, V)

    def _tables(self):
        return [self.logits_table.weight]

    def init_state(self, batch_size: int = 1):
        return None                                                             # nothing to remember

    def step(self, token_ids, state=None):
        return self._logits(self._token_column(token_ids))[:, 0], None          # (B, V)


# ====================================================================== MLP (Bengio et al. 2003)

@dataclasses.dataclass
class MLPLMConfig(_Config):
    vocab_size: int = 27
    block_size: int = 3         # k: how many previous tokens the MLP sees (makemore: 3)
    n_embd: int = 10            # C per token; the hidden layer sees k * C
    n_hidden: int = 200
    n_layer: int = 1            # tanh hidden layers
    dropout: float = 0.0
    _positive = ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layer")

    def num_parameters(self) -> int:
        V, C, k, H = self.vocab_size, self.n_embd, self.block_size, self.n_hidden
        return V * C + (k * C + 1) * H + (self.n_layer - 1) * (H + 1) * H + (H + 1) * V

    def memory_estimate(self, batch_size: int, block_size: int | None = None, bytes_per_value: int = 4) -> dict:
        """activations = B (T + k - 1) C (the padded embeddings) + B T k C (the windows)
        + 2 B T H n_layer (each hidden layer's pre-activation and tanh) + 2 B T V (logits, gradient),
        with T = ``block_size`` the training window."""
        B, T, k = batch_size, block_size or self.block_size, self.block_size
        activations = (B * (T + k - 1) * self.n_embd + B * T * k * self.n_embd
                       + 2 * B * T * self.n_hidden * self.n_layer + 2 * B * T * self.vocab_size)
        return self._memory(self.num_parameters(), activations, bytes_per_value)


class MLPLM(_LanguageModel):
    """Embeddings of the last k tokens side by side, tanh hidden layer(s), a linear head.

    Positions before the start of the sequence are zero vectors (token id -1 internally), so
    position t never sees beyond the sequence and the decode window is the same computation.
    Init as makemore's lecture 4: Kaiming for tanh (gain 5/3) on the hidden layers, a head
    scaled by 0.01 and a zero bias so the first loss is close to log V, not far above it.
    """

    def __init__(self, config: MLPLMConfig, seed: int = 0):
        self.config = config
        rng = np.random.default_rng(seed)
        C, H, k = config.n_embd, config.n_hidden, config.block_size
        self.wte = nn.Embedding(config.vocab_size, C, rng=rng)                  # N(0, 1)
        self.hidden = nn.ModuleList(nn.Linear(k * C if i == 0 else H, H, rng=rng) for i in range(config.n_layer))
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(H, config.vocab_size, rng=rng)
        for layer in self.hidden:
            fan_in = layer.weight.shape[0]
            _fill(layer.weight, rng.standard_normal(layer.weight.shape) * (5 / 3) / math.sqrt(fan_in))
            _fill(layer.bias, 0)
        _fill(self.lm_head.weight, 0.01 * rng.standard_normal(self.lm_head.weight.shape))
        _fill(self.lm_head.bias, 0)

    def _tables(self):
        return [self.wte.weight]

    def _embed(self, ids):
        """ids (B, N) with -1 for "before the start" -> (B, N, C), zero rows there."""
        xp = backend.xp
        present = ids >= 0
        emb = self.wte(xp.where(present, ids, 0))                               # (B, N, C)
        return emb * Tensor(present[..., None].astype(emb.dtype))

    def _head(self, windows):
        """windows (B, T, k*C) -> logits (B, T, V)."""
        x = windows
        for layer in self.hidden:
            x = self.drop(layer(x).tanh())                                      # (B, T, H)
        return self.lm_head(x)                                                  # (B, T, V)

    def _logits(self, idx):
        B, T = idx.shape
        k = self.config.block_size
        pad = backend.xp.full((B, k - 1), -1, dtype=idx.dtype)
        emb = self._embed(backend.xp.concatenate([pad, idx], axis=1))          # (B, T+k-1, C)
        windows = F.concatenate([emb[:, j:j + T] for j in range(k)], axis=2)  # (B, T, k*C), oldest first
        return self._head(windows)

    def init_state(self, batch_size: int = 1):
        """The decode window: the last k token ids, -1 where the sequence has not started."""
        return backend.xp.full((batch_size, self.config.block_size), -1, dtype=np.int64)

    def step(self, token_ids, state):
        column = self._token_column(token_ids)                                  # (B, 1)
        window = backend.xp.concatenate([state[:, 1:], column.astype(state.dtype)], axis=1)   # (B, k)
        B, k = window.shape
        logits = self._head(self._embed(window).reshape(B, 1, k * self.config.n_embd))  # (B, 1, V)
        return logits[:, 0], window


# ====================================================================== recurrent

@dataclasses.dataclass
class RNNLMConfig(_Config):
    vocab_size: int = 27
    block_size: int = 32        # the training window T (truncated BPTT length); decoding is unbounded
    n_embd: int = 64            # C
    n_hidden: int = 256         # H
    n_layer: int = 1
    dropout: float = 0.0        # on the embeddings, between layers and on the last layer's output
    cell: str = "lstm"          # "rnn" (tanh), "lstm" or "gru"
    tie_weights: bool = False   # head = embedding^T (needs n_embd == n_hidden)
    _positive = ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layer")

    def __post_init__(self):
        super().__post_init__()
        if self.cell not in CELLS:
            raise ModelArgumentError(f"cell must be one of {', '.join(map(repr, CELLS))}, got {self.cell!r}")
        if not isinstance(self.tie_weights, bool):
            raise ModelArgumentError(f"tie_weights must be true or false, got {self.tie_weights!r}")
        if self.tie_weights and self.n_embd != self.n_hidden:
            raise ModelArgumentError(f"tie_weights needs n_embd == n_hidden, got {self.n_embd} and "
                                     f"{self.n_hidden}; set them equal or tie_weights=false")

    def num_parameters(self) -> int:
        V, C, H, G = self.vocab_size, self.n_embd, self.n_hidden, CELLS[self.cell][1]
        recurrent = sum(G * H * ((C if layer == 0 else H) + H + 2) for layer in range(self.n_layer))
        return V * C + recurrent + (0 if self.tie_weights else H * V) + V

    def memory_estimate(self, batch_size: int, block_size: int | None = None, bytes_per_value: int = 4) -> dict:
        """What the fused layers save (ops/rnn.py), per layer with input width n_in (C, then H):
        the input rows B T n_in, the h buffer B (T+1) H, the activated gates B T G H, and for an
        LSTM the c buffer B (T+1) H and the (T+1, B, H) output, for a GRU hn B T H; plus the
        embeddings B T C and the logits and their gradient 2 B T V (T = ``block_size``)."""
        B, T, C, H, V = batch_size, block_size or self.block_size, self.n_embd, self.n_hidden, self.vocab_size
        G = CELLS[self.cell][1]
        extra = {"rnn": 0, "lstm": 2 * B * (T + 1) * H, "gru": B * T * H}[self.cell]
        per_layer = [B * T * (C if layer == 0 else H) + B * (T + 1) * H + B * T * G * H + extra
                     for layer in range(self.n_layer)]
        return self._memory(self.num_parameters(), B * T * C + sum(per_layer) + 2 * B * T * V, bytes_per_value)


class _TiedHead(TiedLMHead):
    """logits = h @ E^T + b: the GPT's tied head, plus the bias an RNN LM's decoder has."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__(embedding)
        self.bias = nn.Parameter(np.zeros(embedding.weight.shape[0]))

    def forward(self, x):
        return super().forward(x) + self.bias                                   # (B, T, V)

    def extra_repr(self):
        V, C = self.weight.shape
        return f"{C}, {V}, weight tied to wte"


class RNNLM(_LanguageModel):
    """Embedding -> a stack of RNN/LSTM/GRU layers (one fused op each, ops/rnn.py) -> linear head.

    Init as PyTorch's word-language-model example: embedding and head weights U(-0.1, 0.1), head
    bias zero, recurrent layers PyTorch's U(-1/sqrt(H), 1/sqrt(H)). Training windows start from a
    zero state; decoding carries the state across tokens, O(1) per token.
    """

    def __init__(self, config: RNNLMConfig, seed: int = 0):
        self.config = config
        rng = np.random.default_rng(seed)
        layer_class = CELLS[config.cell][0]
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, rng=rng)
        _fill(self.wte.weight, rng.uniform(-0.1, 0.1, self.wte.weight.shape))
        self.drop = nn.Dropout(config.dropout)
        self.rnn = layer_class(config.n_embd, config.n_hidden, num_layers=config.n_layer, dropout=config.dropout,
                               batch_first=True, rng=rng)
        if config.tie_weights:
            self.lm_head = _TiedHead(self.wte)
        else:
            self.lm_head = nn.Linear(config.n_hidden, config.vocab_size, rng=rng)
            _fill(self.lm_head.weight, rng.uniform(-0.1, 0.1, self.lm_head.weight.shape))
            _fill(self.lm_head.bias, 0)

    def _tables(self):
        return [] if self.config.tie_weights else [self.wte.weight]

    def run(self, idx, state=None):
        """idx (B, T) after ``state`` (None: zeros) -> (logits (B, T, V), the state after idx)."""
        x = self.drop(self.wte(idx))                                            # (B, T, C)
        out, state = self.rnn(x, state)                                         # (B, T, H); (L, B, H) [x2]
        return self.lm_head(self.drop(out)), state                              # (B, T, V)

    def _logits(self, idx):
        return self.run(idx)[0]

    def init_state(self, batch_size: int = 1):
        """Zeros, in the layer's format: h (L, B, H), or (h, c) for an LSTM."""
        zeros = lambda: Tensor(backend.xp.zeros((self.config.n_layer, batch_size, self.config.n_hidden),
                                                dtype=self.wte.weight.dtype))
        return (zeros(), zeros()) if self.config.cell == "lstm" else zeros()

    def step(self, token_ids, state):
        """token_ids (B,) after ``state`` -> (logits (B, V), the new state). Under ``no_grad`` (sampling)
        the layers run their ops directly on arrays (``step_arrays``): same numbers, no tape."""
        column = self._token_column(token_ids)                                  # (B, 1)
        if is_grad_enabled() or (self.training and self.config.dropout > 0):
            logits, state = self.run(column, state)                             # (B, 1, V)
            return logits[:, 0], state
        h, c = state if self.config.cell == "lstm" else (state, None)
        as_array = lambda s: s.data if isinstance(s, Tensor) else s
        out, h, c = self.rnn.step_arrays(self.wte.weight.data[column[:, 0]], as_array(h),
                                         None if c is None else as_array(c))   # (B, H)
        logits = self.lm_head(Tensor(out[:, None]))[:, 0]                      # (B, V)
        return logits, ((Tensor(h), Tensor(c)) if c is not None else Tensor(h))


__all__ = ["BigramLM", "BigramLMConfig", "MLPLM", "MLPLMConfig", "RNNLM", "RNNLMConfig"]
