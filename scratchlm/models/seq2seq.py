"""Seq2SeqTransformer: the encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et
al., 2017) as a translation model: source ids (B, S) and target ids (B, T) -> next-target logits.

    x_src = E_src[src] * sqrt(C) + P[0:S]           (B, S, C)   P: sinusoidal or learned positions
    x_tgt = E_tgt[tgt_in] * sqrt(C) + P[0:T]        (B, T, C)   tgt_in = <s> y_1 .. y_{n-1}
    memory = Encoder(x_src, src padding)            (B, S, C)
    h = Decoder(x_tgt, memory, causal, padding)     (B, T, C)
    logits = h E_tgt^T                              (B, T, V)   the head tied to the target embedding
    loss = (1 - eps) * NLL(y_t) + eps * mean_v(-log p_v)   over non-padding targets (label smoothing eps)

The sqrt(C) scale (section 3.4 of the paper) keeps embeddings, drawn N(0, 1/C) so that the tied
head's logits start small, as large as the unit-size positions. The Transformer is ``nn.Transformer``
(PyTorch's names, ``transformer.encoder.layers.0.self_attn.in_proj_weight`` ...). Ids: 0 = <pad>,
1 = <s>, 2 = </s>, 3 = <unk> (``scratchlm.pairs``).

    >>> from scratchlm.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
    >>> model = Seq2SeqTransformer(Seq2SeqConfig(vocab_size=11, d_model=16, nhead=2, num_encoder_layers=1,
    ...                                          num_decoder_layers=1, dim_feedforward=32), seed=0)
    >>> logits, loss = model([[5, 6, 2]], [[1, 7, 8]], [[7, 8, 2]])
    >>> logits.shape
    (1, 3, 11)

Decoding (greedy, beam search, the KV cache) lives in ``scratchlm.translate``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..tensor import Tensor
from .gpt import ModelArgumentError, TiedLMHead, _index_array

PAD, BOS, EOS, UNK = 0, 1, 2, 3
IGNORE_INDEX = -100


@dataclasses.dataclass
class Seq2SeqConfig:
    vocab_size: int = 128            # the target vocabulary V (and the source's when shared)
    src_vocab_size: int = 0          # 0: the source shares the target's vocabulary and embedding table
    max_len: int = 128               # the longest source or target sequence (positions)
    d_model: int = 128               # C
    nhead: int = 4                   # H; D = C / H
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    dim_feedforward: int = 512
    dropout: float = 0.1
    activation: str = "relu"
    norm_first: bool = False         # False: post-LN, the paper's; True: pre-LN
    positional: str = "sinusoidal"   # "sinusoidal" (the paper's) or "learned"
    label_smoothing: float = 0.0     # eps (the paper: 0.1)

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "d_model", "nhead", "num_encoder_layers", "num_decoder_layers",
                     "dim_feedforward"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ModelArgumentError(f"{name} must be a positive integer, got {value!r}")
        size = self.src_vocab_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ModelArgumentError(f"src_vocab_size must be 0 (shared) or a positive integer, got {size!r}")
        if self.d_model % self.nhead:
            raise ModelArgumentError(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        for name in ("dropout", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ModelArgumentError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.activation not in ("relu", "gelu"):
            raise ModelArgumentError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")
        if self.positional not in ("learned", "sinusoidal"):
            raise ModelArgumentError(f"positional must be 'learned' or 'sinusoidal', got {self.positional!r}")
        if not isinstance(self.norm_first, bool):
            raise ModelArgumentError(f"norm_first must be true or false, got {self.norm_first!r}")

    @property
    def shared_vocab(self) -> bool:
        return self.src_vocab_size == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Seq2SeqConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelArgumentError(f"unknown Seq2SeqConfig key(s) {', '.join(map(repr, unknown))}; "
                                     f"known keys: {', '.join(sorted(known))}")
        return cls(**values)


def label_smoothed_cross_entropy(logits: Tensor, targets, eps: float, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean over the n non-ignored rows of -sum_v q_v log p_v, q = (1 - eps) onehot(t) + eps / V
    (torch's ``cross_entropy(label_smoothing=eps)``), composed of two fused pieces:

        L = (1 - eps) * NLL + eps * (1/n) sum_rows (lse_r - mean_v z_rv)

    since -sum_v (eps/V) log p_v = eps (lse - mean_v z_v). The first is F.cross_entropy; the
    second is linear in the logits apart from lse, so its gradient (softmax - 1/V) * eps / n comes
    from the same tape. eps = 0 is plain cross-entropy."""
    nll = F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if eps == 0:
        return nll
    xp = backend.xp
    t = targets.data if isinstance(targets, Tensor) else backend.to_device(targets)
    keep = (t != ignore_index)                                                  # (B, T)
    n = max(int(keep.sum()), 1)
    log_p = F.log_softmax(logits, axis=-1)                                      # (B, T, V)
    weights = Tensor(keep.astype(logits.dtype)[..., None] / xp.asarray(n * logits.shape[-1], dtype=logits.dtype))
    uniform = -(log_p * weights).sum()                                          # (1/n) sum_rows mean_v -log p
    return nll * (1.0 - eps) + uniform * eps


class Seq2SeqTransformer(nn.Module):
    """Embeddings (scaled by sqrt(C)) + positions, ``nn.Transformer``, a head tied to the target embedding."""

    def __init__(self, config: Seq2SeqConfig, seed: int = 0):
        self.config = c = config
        C = c.d_model
        nn.seed_init(seed)                  # the layers' own draws (PyTorch's inits), then ours below
        self.tgt_embed = nn.Embedding(c.vocab_size, C)
        self.src_embed = self.tgt_embed if c.shared_vocab else nn.Embedding(c.src_vocab_size, C)
        if c.positional == "learned":
            self.src_pos = nn.Embedding(c.max_len, C)
            self.tgt_pos = nn.Embedding(c.max_len, C)
        else:
            self.positions = nn.SinusoidalPositionalEncoding(c.max_len, C)
        self.dropout = nn.Dropout(c.dropout)
        self.transformer = nn.Transformer(C, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                          c.dim_feedforward, c.dropout, c.activation, batch_first=True,
                                          norm_first=c.norm_first)
        rng = np.random.default_rng([seed, 1])
        for table in {id(m): m for m in (self.src_embed, self.tgt_embed)}.values():     # N(0, 1/C)
            table.weight.data[...] = backend.to_device(rng.standard_normal(table.weight.shape) / math.sqrt(C),
                                                       table.weight.dtype)
        self.head = TiedLMHead(self.tgt_embed)

    # ------------------------------------------------------------ the pieces decoding reuses
    def _embed(self, ids, table: nn.Embedding, side: str, start: int = 0) -> Tensor:
        """ids (B, T) at positions start.. -> dropout(E[ids] sqrt(C) + P) (B, T, C)."""
        T = ids.shape[1]
        if start + T > self.config.max_len:
            raise ModelArgumentError(f"a {side} of {start + T} tokens is longer than max_len {self.config.max_len}")
        pos = backend.xp.arange(start, start + T)                                 # (T,)
        p = self.positions(pos) if self.config.positional == "sinusoidal" else \
            (self.src_pos if side == "source" else self.tgt_pos)(pos)
        return self.dropout(table(ids) * math.sqrt(self.config.d_model) + p)

    def encode(self, src, src_pad_mask=None) -> tuple[Tensor, object]:
        """src (B, S) -> (memory (B, S, C), the source padding mask (B, S), True = <pad>)."""
        src = _ids(src, "src")
        if src_pad_mask is None:
            src_pad_mask = src == PAD
        x = self._embed(src, self.src_embed, "source")
        return self.transformer.encoder(x, src_key_padding_mask=src_pad_mask), src_pad_mask

    def decode(self, tgt_in, memory: Tensor, src_pad_mask, tgt_pad_mask=None, cache=None) -> Tensor:
        """tgt_in (B, T) -> logits (B, T, V). With a ``scratchlm.translate.DecoderCache`` the ids
        continue the ``cache.length`` positions it holds (inference only)."""
        tgt_in = _ids(tgt_in, "tgt_in")
        start = 0 if cache is None else cache.length
        x = self._embed(tgt_in, self.tgt_embed, "target", start)
        dec = self.transformer.decoder
        if cache is None:
            h = dec(x, memory, memory_key_padding_mask=src_pad_mask, tgt_key_padding_mask=tgt_pad_mask,
                    tgt_is_causal=True)
        else:
            for i, layer in enumerate(dec.layers):
                x = layer(x, memory, memory_key_padding_mask=src_pad_mask, cache=cache.layers[i])
            h = dec.norm(x)
        return self.head(h)

    def forward(self, src, tgt_in, tgt_out=None, src_pad_mask=None, tgt_pad_mask=None):
        """src (B, S), tgt_in (B, T) int ids, <pad> = 0 -> (logits (B, T, V), loss or None).

        The masks (True = padding) default to the ids equal to <pad>; targets tgt_out (B, T) equal
        to <pad> or -100 are ignored, and the loss is label-smoothed when config.label_smoothing > 0."""
        memory, src_pad_mask = self.encode(src, src_pad_mask)
        tgt_in = _ids(tgt_in, "tgt_in")
        if tgt_pad_mask is None:
            tgt_pad_mask = tgt_in == PAD
        logits = self.decode(tgt_in, memory, src_pad_mask, tgt_pad_mask)
        if tgt_out is None:
            return logits, None
        y = _ids(tgt_out, "tgt_out")
        y = backend.xp.where(y == PAD, IGNORE_INDEX, y)
        return logits, label_smoothed_cross_entropy(logits, y, self.config.label_smoothing)

    # ------------------------------------------------------------ accounting
    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))


def _ids(ids, name: str):
    """Integer ids (B, T) as a backend array (gpt.py's check)."""
    return _index_array(ids, name)
