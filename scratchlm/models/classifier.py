"""Text classifiers: a sentence of token ids -> one label. Three encoders, one head, one loss.

Every model takes a padded batch -- ids (B, T) and mask (B, T), True on real tokens -- and
returns ``(logits, loss)``; padding never changes a row's output (tests/test_classifier.py).

    BagOfEmbeddings:  e_t = E[x_t];  z = pool_t(e_t)            the articles' Embedding + pooling + Dense
    BiLSTM:           f_t = LSTM_fwd(e_1..e_t),  b_t = LSTM_bwd(e_n..e_t)  (n = the row's length)
                      z = pool_t([f_t; b_t])  or  z = [f_n; b_1]  (each direction's final state)
    TransformerClassifier:  h = Encoder([CLS]; e_1..e_n + p_t)  (padded keys masked out)
                      z = h_[CLS]  or  z = mean over real t of h_t

Pooling over real positions only (m_t = mask, n = sum_t m_t):

    mean:  z = sum_t m_t e_t / n            max:  z_c = max_{t: m_t} e_{t,c}

Head and loss (K classes, y the labels, w the class weights, default all 1):

    K = 2:  s = z w_out + b  (one logit),  p(y=1) = sigmoid(s)
            l_i = -y_i log sigmoid(s_i) - (1 - y_i) log(1 - sigmoid(s_i))          binary cross-entropy
    K > 2:  s = z W_out + b  (K logits),   p = softmax(s),  l_i = -log p_{y_i}     cross-entropy
    loss = sum_i w_{y_i} l_i / sum_i w_{y_i}       (PyTorch's weighted mean; class weights for imbalance)

The BiLSTM's backward direction must start at each row's last *real* token, not at the padding:
each row's first n tokens are reversed in place (padding stays at the end), run through a
forward LSTM, and reversed back -- so f_t and b_t are exactly what the unpadded row gives.

Shapes: B batch, T time, C = n_embd, H = n_hidden, K classes.

    >>> from scratchlm.models.classifier import BagOfEmbeddings, BagOfEmbeddingsConfig
    >>> model = BagOfEmbeddings(BagOfEmbeddingsConfig(vocab_size=10, num_classes=2, n_embd=8), seed=0)
    >>> logits, loss = model([[3, 4, 0]], [[True, True, False]], labels=[1])
    >>> logits.shape
    (1,)
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..tensor import Tensor, no_grad
from .gpt import ModelArgumentError, _index_array
from .rnn import _Config, _fill

NEG = -1e9                      # the value padding takes before a max: never the maximum of a real row


# ================================================================ configs

@dataclasses.dataclass
class _ClassifierConfig(_Config):
    """The fields every classifier has; each model's config adds its own and its pooling's default."""
    vocab_size: int = 1000
    num_classes: int = 2
    n_embd: int = 64            # C
    class_weights: str = ""     # "" = equal; else K comma-separated weights
    init_embeddings: str = ""   # a word2vec text file the embedding starts from (read by the task)
    init_embeddings_scale: str = "match"    # "match": vectors rescaled to the table's init std; "raw": as read
    freeze_embeddings: bool = False         # keep the (initialised) embedding table fixed
    _positive = ("vocab_size", "num_classes", "n_embd")
    _poolings = ()

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 2:
            raise ModelArgumentError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.pooling not in self._poolings:
            raise ModelArgumentError(f"pooling must be one of {', '.join(self._poolings)}, got {self.pooling!r}")
        self.weights()                                          # class_weights parses
        if self.init_embeddings_scale not in ("match", "raw"):
            raise ModelArgumentError(f"init_embeddings_scale must be match or raw, got {self.init_embeddings_scale!r}")

    def weights(self):
        """class_weights "w0,w1,..." as floats (K of them, > 0), or None for equal weights."""
        if not self.class_weights:
            return None
        try:
            values = [float(v) for v in str(self.class_weights).split(",")]
        except ValueError:
            values = []
        if len(values) != self.num_classes or not all(v > 0 for v in values):
            raise ModelArgumentError(f"class_weights must be {self.num_classes} positive numbers separated by "
                                     f"commas (or 'balanced' on the command line), got {self.class_weights!r}")
        return values


@dataclasses.dataclass
class BagOfEmbeddingsConfig(_ClassifierConfig):
    pooling: str = "mean"       # "mean" | "max" | "meanmax" (both, concatenated: 2C)
    dropout: float = 0.0        # on the pooled vector
    _poolings = ("mean", "max", "meanmax")


@dataclasses.dataclass
class BiLSTMConfig(_ClassifierConfig):
    n_hidden: int = 64          # H per direction
    n_layer: int = 1
    pooling: str = "max"        # "mean" | "max" | "final" (each direction's last state)
    dropout: float = 0.0        # on the embeddings and on the pooled vector
    _positive = ("vocab_size", "num_classes", "n_embd", "n_hidden", "n_layer")
    _poolings = ("mean", "max", "final")


@dataclasses.dataclass
class TransformerClassifierConfig(_ClassifierConfig):
    n_head: int = 4
    n_layer: int = 2
    dim_feedforward: int = 128
    block_size: int = 128       # the longest input (learned positions); longer inputs are cut
    pooling: str = "cls"        # "cls" | "mean"
    dropout: float = 0.1
    _positive = ("vocab_size", "num_classes", "n_embd", "n_head", "n_layer", "dim_feedforward", "block_size")
    _poolings = ("cls", "mean")

    def __post_init__(self):
        super().__post_init__()
        if self.n_embd % self.n_head:
            raise ModelArgumentError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


# ================================================================ masked pooling (composed ops)

def _mask_array(mask, shape) -> np.ndarray:
    """mask as a backend bool array (B, T); a row with no real token keeps its first position, so
    every pooling has something to pool (an empty text reads as one padding token)."""
    data = mask.data if isinstance(mask, Tensor) else mask
    data = backend.to_device(data if hasattr(data, "dtype") else np.asarray(data)).astype(bool)
    if tuple(data.shape) != tuple(shape):
        raise ModelArgumentError(f"mask must have the shape of ids {tuple(shape)}, got {tuple(data.shape)}")
    empty = ~data.any(axis=1)
    if bool(empty.any()):
        data = data.copy()
        data[:, 0] |= empty
    return data


def masked_mean(x: Tensor, mask) -> Tensor:
    """x (B, T, C), mask (B, T) -> (B, C): the mean over real positions."""
    m = mask[:, :, None].astype(x.dtype)                                   # (B, T, 1)
    return (x * m).sum(axis=1) / m.sum(axis=1)                             # (B, C)


def masked_max(x: Tensor, mask) -> Tensor:
    """x (B, T, C), mask (B, T) -> (B, C): the max over real positions (padding set to -1e9 first)."""
    return F.masked_fill(x, ~mask[:, :, None], NEG).max(axis=1)            # (B, C)


def pool(x: Tensor, mask, how: str) -> Tensor:
    if how == "mean":
        return masked_mean(x, mask)
    if how == "max":
        return masked_max(x, mask)
    return F.concatenate([masked_mean(x, mask), masked_max(x, mask)], axis=1)   # "meanmax": (B, 2C)


# ================================================================ what every classifier shares

class _Classifier(nn.Module):
    """The head and the loss (module docstring); a subclass encodes ids (B, T) into z (B, D)."""

    def _init_head(self, width: int, rng) -> None:
        c = self.config
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(width, 1 if c.num_classes == 2 else c.num_classes, rng=rng)

    def forward(self, ids, mask, labels=None):
        """ids (B, T) int, mask (B, T) bool -> (logits (B,) for two classes else (B, K), loss or None)."""
        ids = _index_array(ids, "ids")
        mask = _mask_array(mask, ids.shape)
        z = self.drop(self.encode(ids, mask))                                  # (B, D)
        logits = self.head(z)                                                  # (B, 1) or (B, K)
        if self.config.num_classes == 2:
            logits = logits.reshape(logits.shape[0])                           # (B,)
        loss = None if labels is None else self.loss(logits, labels)
        return logits, loss

    def loss(self, logits: Tensor, labels) -> Tensor:
        """sum_i w_{y_i} l_i / sum_i w_{y_i}: a sum over classes of (share of the weight) x (the
        class's mean loss), each mean one fused (binary) cross-entropy over that class's rows."""
        y = backend.to_device(np.asarray(labels) if not hasattr(labels, "dtype") else labels).astype(np.int64)
        if self.config.num_classes == 2:
            per_class = lambda rows: F.binary_cross_entropy_with_logits(logits[rows], y[rows].astype(logits.dtype))
        else:
            per_class = lambda rows: F.cross_entropy(logits[rows], y[rows])
        weights = self.config.weights()
        if weights is None:
            return per_class(slice(None))
        counts = backend.to_numpy(backend.xp.bincount(y, minlength=self.config.num_classes))
        total = sum(w * n for w, n in zip(weights, counts))
        loss = None
        for k, n in enumerate(counts):
            if n:
                term = per_class(backend.xp.flatnonzero(y == k)) * float(weights[k] * n / total)
                loss = term if loss is None else loss + term
        return loss

    def probabilities(self, ids, mask) -> np.ndarray:
        """(B, K) class probabilities on the host (eval mode, no tape)."""
        was_training = self.training
        self.eval()
        try:
            with no_grad():
                logits, _ = self(ids, mask)
        finally:
            self.train(was_training)
        s = backend.to_numpy(logits.data).astype(np.float64)
        if self.config.num_classes == 2:
            p = 1.0 / (1.0 + np.exp(-s))
            return np.stack([1.0 - p, p], axis=1)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def set_embeddings(self, table: np.ndarray) -> None:
        """Start the token embedding from ``table`` (V, C), e.g. word2vec vectors."""
        _fill(self.wte.weight, table)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay the matrices that multiply (Linear, recurrent, attention), not biases, norms or tables;
        with ``freeze_embeddings`` the token table is left out, so no step ever moves it."""
        tables = {id(self.wte.weight)} | {id(p) for p in getattr(self, "_extra_tables", lambda: [])()}
        frozen = {id(self.wte.weight)} if self.config.freeze_embeddings else set()
        params = [p for p in self.parameters() if id(p) not in frozen]
        decay = [p for p in params if p.ndim == 2 and id(p) not in tables]
        ids = {id(p) for p in decay}
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]


# ================================================================ the three encoders

class BagOfEmbeddings(_Classifier):
    """z = pool over real tokens of E[x_t]: word order ignored, a linear model on pooled embeddings."""

    def __init__(self, config: BagOfEmbeddingsConfig, seed: int = 0):
        self.config = config
        rng = np.random.default_rng(seed)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, rng=rng)
        _fill(self.wte.weight, rng.uniform(-0.1, 0.1, self.wte.weight.shape))
        self._init_head(config.n_embd * (2 if config.pooling == "meanmax" else 1), rng)

    def encode(self, ids, mask) -> Tensor:
        return pool(self.wte(ids), mask, self.config.pooling)                  # (B, C) or (B, 2C)


def reverse_index(mask) -> np.ndarray:
    """(B, T) positions that reverse each row's first n (real) tokens and leave the padding:
    row [a, b, c, pad] -> [c, b, a, pad]. It is its own inverse."""
    B, T = mask.shape
    lengths = mask.sum(axis=1)[:, None]                                        # (B, 1)
    t = backend.xp.arange(T)[None, :]                                          # (1, T)
    return backend.xp.where(t < lengths, lengths - 1 - t, t)                  # (B, T)


class BiLSTM(_Classifier):
    """A bidirectional LSTM stack over real tokens only, then pooled or final states (2H)."""

    def __init__(self, config: BiLSTMConfig, seed: int = 0):
        self.config = config
        rng = np.random.default_rng(seed)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, rng=rng)
        _fill(self.wte.weight, rng.uniform(-0.1, 0.1, self.wte.weight.shape))
        self.emb_drop = nn.Dropout(config.dropout)
        sizes = [config.n_embd] + [2 * config.n_hidden] * (config.n_layer - 1)
        self.forward_layers = nn.ModuleList([nn.LSTM(n, config.n_hidden, batch_first=True, rng=rng) for n in sizes])
        self.backward_layers = nn.ModuleList([nn.LSTM(n, config.n_hidden, batch_first=True, rng=rng) for n in sizes])
        self._init_head(2 * config.n_hidden, rng)

    def encode(self, ids, mask) -> Tensor:
        B, T = ids.shape
        rows = backend.xp.arange(B)[:, None]                                   # (B, 1)
        rev = reverse_index(mask)                                              # (B, T)
        x = self.emb_drop(self.wte(ids))                                       # (B, T, C)
        for fwd, bwd in zip(self.forward_layers, self.backward_layers):
            f, _ = fwd(x)                                                      # (B, T, H): f_t sees x_1..x_t
            b, _ = bwd(x[rows, rev])                                           # (B, T, H): reads x_n..x_1
            b = b[rows, rev]                                                   # (B, T, H): b_t sees x_t..x_n
            x = F.concatenate([f, b], axis=2)                                  # (B, T, 2H)
        if self.config.pooling != "final":
            return pool(x, mask, self.config.pooling)                          # (B, 2H)
        H, last = self.config.n_hidden, mask.sum(axis=1) - 1                   # (B,)
        return F.concatenate([x[backend.xp.arange(B), last, :H], x[:, 0, H:]], axis=1)   # [f_n; b_1] (B, 2H)


class TransformerClassifier(_Classifier):
    """A Transformer encoder (post-LN, PyTorch's layers) over [CLS] + tokens, padded keys masked."""

    def __init__(self, config: TransformerClassifierConfig, seed: int = 0):
        self.config = config
        rng = np.random.default_rng(seed)
        nn.seed_init(int(rng.integers(2**31)))                                 # the encoder layers' draws
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C, rng=rng)
        _fill(self.wte.weight, rng.normal(0.0, 0.02, self.wte.weight.shape))
        self.wpe = nn.Embedding(config.block_size + 1, C, rng=rng)             # +1: the [CLS] position
        _fill(self.wpe.weight, rng.normal(0.0, 0.02, self.wpe.weight.shape))
        self.cls = nn.Parameter(rng.normal(0.0, 0.02, (1, 1, C)))
        self.emb_drop = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(C, config.n_head, config.dim_feedforward, config.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_layer)
        self._init_head(C, rng)

    def _extra_tables(self):
        return [self.wpe.weight]

    def encode(self, ids, mask) -> Tensor:
        B, T = ids.shape
        if T > self.config.block_size:
            raise ModelArgumentError(f"input of {T} tokens is longer than block_size {self.config.block_size}")
        xp = backend.xp
        tokens = self.wte(ids)                                                 # (B, T, C)
        cls = self.cls + backend.xp.zeros((B, 1, 1), dtype=tokens.dtype)        # (B, 1, C)
        x = F.concatenate([cls, tokens], axis=1) + self.wpe(xp.arange(T + 1))   # (B, T+1, C)
        keep = xp.concatenate([xp.ones((B, 1), dtype=bool), mask], axis=1)     # (B, T+1): [CLS] is real
        h = self.encoder(self.emb_drop(x), src_key_padding_mask=~keep)         # (B, T+1, C)
        if self.config.pooling == "cls":
            return h[:, 0]                                                     # (B, C)
        return masked_mean(h[:, 1:], mask)                                     # (B, C)


MODELS = {"bow": (BagOfEmbeddings, BagOfEmbeddingsConfig), "bilstm": (BiLSTM, BiLSTMConfig),
          "transformer": (TransformerClassifier, TransformerClassifierConfig)}
