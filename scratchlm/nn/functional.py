"""The op surface as functions, PyTorch style: ``import scratchlm.nn.functional as F``.

Each function is a thin call of one op in ``scratchlm/ops``, where its forward and backward are.
"""
from __future__ import annotations

from .. import backend
from ..errors import UserError
from ..kernels import attention as attention_kernel
from ..ops import attention, elementwise, linalg, nn, reduce  # noqa: F401  (registers the ops)
from ..ops.shape import concatenate, split, stack  # noqa: F401
from ..tensor import Tensor, tensor


def _array(x):
    return x.data if isinstance(x, Tensor) else backend.to_device(x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return nn.Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return nn.LogSoftmax.apply(x, axis=axis)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return elementwise.Gelu.apply(x, approximate=approximate)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias) as one op (scratchlm.ops.fused.BiasGelu)."""
    from scratchlm.ops.fused import BiasGelu
    return BiasGelu.apply(x, bias, approximate=approximate)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(s, layer_norm(s)) with s = x + residual, as one op with two outputs
    (scratchlm.ops.fused.AddLayerNorm)."""
    from scratchlm.ops.fused import AddLayerNorm
    return AddLayerNorm.apply(x, residual, weight, bias, eps=eps)


def relu(x: Tensor) -> Tensor:
    return elementwise.Relu.apply(x)


def tanh(x: Tensor) -> Tensor:
    return elementwise.Tanh.apply(x)


def sigmoid(x: Tensor) -> Tensor:
    return elementwise.Sigmoid.apply(x)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    return nn.LayerNorm.apply(x, weight, bias, eps=eps)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of integer ``targets`` (logits' shape without the last axis)."""
    return nn.CrossEntropy.apply(logits, _array(targets), ignore_index=ignore_index)


def embedding(idx, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (V, C) picked by integer ``idx`` (...): shape (..., C)."""
    return nn.Embedding.apply(weight, idx=_array(idx))


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p); identity when not
    training or p == 0. Draws from ``generator`` or the backend's default (``sl.manual_seed``)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return nn.Dropout.apply(x, p=p, generator=generator or backend.default_generator())


def where(condition, a, b) -> Tensor:
    return elementwise.Where.apply(_array(condition), a, b)


def masked_fill(x: Tensor, mask, value: float) -> Tensor:
    """x with ``value`` wherever ``mask`` is true (no gradient reaches those positions)."""
    return elementwise.Where.apply(_array(mask), value, x)


def mse_loss(prediction: Tensor, target) -> Tensor:
    return nn.MSELoss.apply(prediction, target)


def binary_cross_entropy_with_logits(logits: Tensor, targets) -> Tensor:
    return nn.BinaryCrossEntropyWithLogits.apply(logits, targets)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale=None,
                                 key_padding_mask=None, attn_mask=None, dropout_p: float = 0.0,
                                 need_weights: bool = False, generator=None):
    """softmax(q k^T * scale + masks) v for q (B, H, Tq, D) and k, v (B, H, Tk, D) -> (B, H, Tq, D).

    Masks, True = "may not attend" (PyTorch's boolean meaning), combined with ``causal``:
    ``key_padding_mask`` (B, Tk): padded keys of each batch row; ``attn_mask`` (Tq, Tk): keys
    each query may not see. A float mask of 0 and -inf (``torch.nn.Transformer
    .generate_square_subsequent_mask``'s) is read as -inf = True; other finite values are refused.
    Masked keys get exactly zero weight; a query with no key left gives zeros (never NaN).
    ``dropout_p``: dropout on the attention weights (pass 0 when not training).
    ``need_weights=True`` returns (out, weights), weights (B, H, Tq, Tk) the attention
    probabilities (after dropout) as a constant tensor (no gradient flows through it).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout_p}")
    batch, t_query, t_key = q.shape[0], q.shape[2], k.shape[2]
    blocked = attention_kernel.blocked_keys(_mask_flags(key_padding_mask, "key_padding_mask", (batch, t_key)),
                                            _mask_flags(attn_mask, "attn_mask", (t_query, t_key)))
    weights = [] if need_weights else None
    out = attention.ScaledDotProductAttention.apply(
        q, k, v, causal=causal, scale=scale, blocked=blocked, dropout_p=float(dropout_p),
        generator=generator, weights_out=weights)
    return (out, Tensor(weights[0])) if need_weights else out


def _mask_flags(mask, name: str, shape: tuple):
    """A boolean mask (True = blocked) of exactly ``shape`` as a backend array, or None.

    Accepts booleans, or floats that are 0 (allowed) or -inf (blocked) as PyTorch's additive
    masks made by generate_square_subsequent_mask; an additive bias of other values is refused.
    """
    if mask is None:
        return None
    xp = backend.xp
    flags = _array(mask)
    if flags.dtype.kind == "f":
        blocked = flags == -xp.inf
        if not bool(xp.all(blocked | (flags == 0))):
            raise UserError(f"{name} must be boolean (True = may not attend) or hold only 0 and -inf; "
                            f"an additive float bias is not supported")
        flags = blocked
    elif flags.dtype.kind != "b":
        raise UserError(f"{name} must be boolean (True = may not attend), got dtype {flags.dtype}")
    if tuple(flags.shape) != tuple(shape):
        raise UserError(f"{name} must have shape {tuple(shape)}, got {tuple(flags.shape)}")
    return flags


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return a @ b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias with weight of shape (n_in, n_out) -- GPT-2's layout, the transpose of
    PyTorch's F.linear -- fused into one op."""
    return linalg.Linear.apply(x, weight, bias)


__all__ = ["softmax", "log_softmax", "gelu", "bias_gelu", "add_layer_norm", "relu", "tanh", "sigmoid", "layer_norm", "cross_entropy",
           "embedding", "dropout", "where", "masked_fill", "mse_loss", "binary_cross_entropy_with_logits",
           "scaled_dot_product_attention", "matmul", "linear", "concatenate", "stack", "split", "tensor"]
