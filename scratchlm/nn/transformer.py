"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), layer by
layer as torch.nn names them, so a ``torch.nn.Transformer`` state_dict loads after transposing its
2-D matrices (scratchlm stores every matrix that multiplies an input as (n_in, n_out): y = x @ W + b).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + mask) V
    MultiHead(Q, K, V) = Concat(head_1, ..., head_H) W^O,   head_h = Attention(Q W^Q_h, K W^K_h, V W^V_h)
    encoder layer (post-LN, the paper):  x = LN(x + SelfAttn(x));  x = LN(x + FF(x))
    encoder layer (pre-LN, norm_first):  x = x + SelfAttn(LN(x));  x = x + FF(LN(x))
    decoder layer: self-attention (causal), then cross-attention to the encoder's output
    ("memory"), then FF, each with its residual and LayerNorm;  FF(x) = W_2 act(W_1 x + b_1) + b_2.

Shapes (batch_first=True): source (B, S, C), target (B, T, C), C = d_model = embed_dim = H * D.
Masks follow PyTorch: True = "may not attend"; ``*_key_padding_mask`` (B, S or T) marks padded
positions, ``*_mask`` (T, S or T) forbids query/key pairs; a float mask of 0 and -inf is accepted too.
"""
from __future__ import annotations

import copy
import math

import numpy as np

from ..errors import UserError
from ..tensor import Tensor
from . import functional as F
from .modules import Dropout, LayerNorm, Linear, Module, ModuleList, Parameter, _draw


class MultiheadAttention(Module):
    """torch.nn.MultiheadAttention with matrices stored (n_in, n_out).

    Parameters (PyTorch's names): ``in_proj_weight`` (C, 3C) = [W^Q | W^K | W^V] (PyTorch's
    (3C, C) transposed), ``in_proj_bias`` (3C,), ``out_proj.weight`` (C, C), ``out_proj.bias`` (C,).
    Init as PyTorch: Xavier-uniform in_proj_weight, zero biases, out_proj.weight U(+-1/sqrt(C)).
    ``dropout`` drops attention weights while training (as PyTorch's).

    ``out, weights = attn(query, key, value, key_padding_mask=None, attn_mask=None,
    need_weights=True, average_attn_weights=True, is_causal=False)``: query (B, Tq, C), key and
    value (B, Tk, C) -> out (B, Tq, C); weights (B, Tq, Tk) averaged over heads, (B, H, Tq, Tk)
    per head, or None when need_weights=False. The weights are a constant tensor (no gradient).
    ``is_causal=True`` applies the causal mask itself (attn_mask may then be None).

    For decoding with a cache the three steps are public: ``project_query(x)`` and
    ``project_key_value(key, value)`` give (B, H, T, D) heads and ``attend(q, k, v, ...)`` does the
    rest. Cross-attention keys/values of the encoder output are computed once with
    ``project_key_value(memory)`` and passed to ``attend`` at every step; self-attention appends
    each new step's ``project_key_value(x)`` to its cache and attends over all of it.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True):
        if embed_dim % num_heads:
            raise UserError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), batch_first
        self.in_proj_weight = _draw((embed_dim, 3 * embed_dim), bound=math.sqrt(6.0 / (4 * embed_dim)))
        self.in_proj_bias = Parameter(np.zeros(3 * embed_dim)) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        if bias:
            self.out_proj.bias = Parameter(np.zeros(embed_dim))

    # ------------------------------------------------------------- the three steps
    def _projection(self, x: Tensor, part: slice) -> Tensor:
        """x @ in_proj_weight[:, part] + in_proj_bias[part]: (B, T, C) -> (B, T, width of part)."""
        bias = None if self.in_proj_bias is None else self.in_proj_bias[part]
        return F.linear(x, self.in_proj_weight[:, part], bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)    # (B, H, T, D)

    def project_query(self, query: Tensor) -> Tensor:
        """(B, Tq, C) -> q (B, H, Tq, D) = heads of query @ W^Q + b^Q."""
        return self._heads(self._projection(query, slice(0, self.embed_dim)))

    def project_key_value(self, key: Tensor, value: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, Tk, C) -> k, v (B, H, Tk, D); one fused matmul when value is key (or None)."""
        C = self.embed_dim
        if value is None or value is key:
            k, v = F.split(self._projection(key, slice(C, 3 * C)), 2, axis=2)   # 2 x (B, Tk, C)
        else:
            k, v = self._projection(key, slice(C, 2 * C)), self._projection(value, slice(2 * C, 3 * C))
        return self._heads(k), self._heads(v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask=None, attn_mask=None,
               need_weights: bool = False, average_attn_weights: bool = True, is_causal: bool = False):
        """Heads q (B, H, Tq, D), k and v (B, H, Tk, D) -> (out (B, Tq, C), weights or None)."""
        B, _, Tq, _ = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v, causal=is_causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights)
        weights = None
        if need_weights:
            y, weights = y                                                  # weights (B, H, Tq, Tk)
            if average_attn_weights:
                weights = Tensor(weights.data.mean(axis=1))                 # (B, Tq, Tk)
        y = y.transpose(1, 2).reshape(B, Tq, self.embed_dim)               # heads side by side
        return self.out_proj(y), weights                                    # (B, Tq, C)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, attn_mask=None,
                need_weights: bool = True, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:                                            # (T, B, C) -> (B, T, C)
            query, key, value = (x if x is None else x.transpose(0, 1) for x in (query, key, value))
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.embed_dim:
            raise UserError(f"MultiheadAttention expects inputs of width embed_dim={self.embed_dim}, "
                            f"got query {tuple(query.shape)} and key {tuple(key.shape)}")
        if query is key and key is value:                                   # self-attention: one matmul
            q, k, v = (self._heads(x) for x in F.split(self._projection(query, slice(None)), 3, axis=2))
        else:
            q = self.project_query(query)
            k, v = self.project_key_value(key, value)
        out, weights = self.attend(q, k, v, key_padding_mask, attn_mask, need_weights,
                                   average_attn_weights, is_causal)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self):
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"


def _activation(activation):
    """"relu", "gelu" (exact, erf: PyTorch's F.gelu default) or a callable."""
    if callable(activation):
        return activation
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise UserError(f"activation must be 'relu' or 'gelu', got {activation!r}")


class _FeedForward:
    """FF(x) = linear2(dropout(act(linear1(x)))) then the block's own dropout; mixed into both layers."""

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self._act(self.linear1(x))))    # (B, T, C) -> (B, T, F) -> (B, T, C)


class TransformerEncoderLayer(Module, _FeedForward):
    """Self-attention and feed-forward, each with a residual connection and a LayerNorm,
    after the sum (post-LN, ``norm_first=False``, the paper) or before the sub-layer (pre-LN)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True):
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first, self.batch_first = norm_first, batch_first
        self.norm1 = LayerNorm(d_model, bias=bias, eps=layer_norm_eps)
        self.norm2 = LayerNorm(d_model, bias=bias, eps=layer_norm_eps)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self._act = _activation(activation)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                              need_weights=False, is_causal=is_causal)
        return self.dropout1(x)

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> Tensor:
        x = src if self.batch_first else src.transpose(0, 1)               # (B, S, C)
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self.dropout2(self._ff_block(self.norm2(x)))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self.dropout2(self._ff_block(x)))
        return x if self.batch_first else x.transpose(0, 1)


class TransformerDecoderLayer(Module, _FeedForward):
    """Causal self-attention over the target, cross-attention (``multihead_attn``) from the
    target to the memory (the encoder's output), feed-forward; residuals and LayerNorms as the
    encoder layer's (post-LN or pre-LN)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True):
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=True)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first, self.batch_first = norm_first, batch_first
        self.norm1 = LayerNorm(d_model, bias=bias, eps=layer_norm_eps)
        self.norm2 = LayerNorm(d_model, bias=bias, eps=layer_norm_eps)
        self.norm3 = LayerNorm(d_model, bias=bias, eps=layer_norm_eps)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self._act = _activation(activation)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal, cache=None):
        if cache is not None:           # decoding: the new positions' keys join the cached ones
            q = self.self_attn.project_query(x)
            k, v = cache.append(*self.self_attn.project_key_value(x))          # (B, H, past + T, D)
            x, _ = self.self_attn.attend(q, k, v, attn_mask=cache.causal_mask(q.shape[2]))
            return self.dropout1(x)
        x, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                              need_weights=False, is_causal=is_causal)
        return self.dropout1(x)

    def _mha_block(self, x, memory, attn_mask, key_padding_mask, is_causal, cache=None):
        if cache is not None:           # decoding: the memory's keys/values are projected once
            q = self.multihead_attn.project_query(x)
            k, v = cache.memory_key_value(self.multihead_attn, memory)        # (B, H, S, D)
            x, weights = self.multihead_attn.attend(q, k, v, key_padding_mask=key_padding_mask,
                                                    attn_mask=attn_mask, need_weights=cache.keep_weights,
                                                    average_attn_weights=False)
            cache.record_weights(weights)                                       # (B, H, T, S) or None
            return self.dropout2(x)
        x, _ = self.multihead_attn(x, memory, memory, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                   need_weights=False, is_causal=is_causal)
        return self.dropout2(x)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False,
                cache=None) -> Tensor:
        """``cache`` (inference only; e.g. ``scratchlm.translate.LayerCache``): tgt holds the positions
        after the ``cache.length`` ones cached; self-attention sees them all (``cache.append(k, v)``,
        ``cache.causal_mask(T)``), cross-attention takes ``cache.memory_key_value(attn, memory)``
        (projected once) and hands its per-head weights to ``cache.record_weights``."""
        if not self.batch_first:
            tgt, memory = tgt.transpose(0, 1), memory.transpose(0, 1)       # (B, T, C), (B, S, C)
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, cache)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal,
                                    cache)
            x = x + self.dropout3(self._ff_block(self.norm3(x)))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, cache))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal,
                                               cache))
            x = self.norm3(x + self.dropout3(self._ff_block(x)))
        return x if self.batch_first else x.transpose(0, 1)


class TransformerEncoder(Module):
    """``num_layers`` copies of ``encoder_layer`` in turn (``layers.0``, ``layers.1``, ...), then
    ``norm`` if given (a final LayerNorm, which pre-LN stacks need)."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: Module | None = None):
        self.layers = ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask=None, src_key_padding_mask=None, is_causal: bool | None = None) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return x if self.norm is None else self.norm(x)


class TransformerDecoder(Module):
    """``num_layers`` copies of ``decoder_layer``, each attending to the same memory, then ``norm``."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int, norm: Module | None = None):
        self.layers = ModuleList(copy.deepcopy(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return x if self.norm is None else self.norm(x)


class Transformer(Module):
    """torch.nn.Transformer: an encoder stack and a decoder stack, each ending in a LayerNorm
    (``encoder.norm``, ``decoder.norm``, built whether or not ``norm_first``, as PyTorch does).
    Every matrix is re-drawn Xavier-uniform, as PyTorch's ``_reset_parameters``.

    ``out = model(src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
    src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
    src_is_causal=None, tgt_is_causal=None)``: src (B, S, C), tgt (B, T, C) -> (B, T, C).
    The target usually takes ``tgt_mask=Transformer.generate_square_subsequent_mask(T)`` or
    ``tgt_is_causal=True`` (the same mask, applied inside the attention op).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation="relu", layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True):
        options = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                       layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias)
        self.encoder = TransformerEncoder(TransformerEncoderLayer(d_model, nhead, **options), num_encoder_layers,
                                          LayerNorm(d_model, bias=bias, eps=layer_norm_eps))
        self.decoder = TransformerDecoder(TransformerDecoderLayer(d_model, nhead, **options), num_decoder_layers,
                                          LayerNorm(d_model, bias=bias, eps=layer_norm_eps))
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():           # Xavier: U(+-sqrt(6 / (n_in + n_out))), symmetric in the two
            if p.ndim > 1:
                p.data[...] = _draw(p.shape, bound=math.sqrt(6.0 / (p.shape[0] + p.shape[1]))).data

    def forward(self, src: Tensor, tgt: Tensor, src_mask=None, tgt_mask=None, memory_mask=None,
                src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        batch_axis = 0 if self.batch_first else 1
        if src.shape[batch_axis] != tgt.shape[batch_axis]:
            raise UserError(f"the batch size of src ({src.shape[batch_axis]}) and tgt ({tgt.shape[batch_axis]}) "
                            f"must be equal")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise UserError(f"the feature size of src ({src.shape[-1]}) and tgt ({tgt.shape[-1]}) must equal "
                            f"d_model ({self.d_model})")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int):
        """(sz, sz) bool, True above the diagonal: position i may not attend to j > i. PyTorch
        returns the same mask as floats (-inf above the diagonal, 0 elsewhere); both are accepted."""
        return np.triu(np.ones((sz, sz), dtype=bool), k=1)
