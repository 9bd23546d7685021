"""The op surface as functions, PyTorch style: ``import scratchlm.nn.functional as F``.

Each function is a thin call of one op in ``scratchlm/ops``, where its forward and backward are.
"""
from __future__ import annotations

from .. import backend
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


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale=None) -> Tensor:
    """softmax(q k^T * scale [+ causal -inf mask]) v for q, k, v of shape (B, H, T, D)."""
    return attention.ScaledDotProductAttention.apply(q, k, v, causal=causal, scale=scale)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return a @ b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight + bias with weight of shape (n_in, n_out) -- GPT-2's layout, the transpose of
    PyTorch's F.linear -- fused into one op."""
    return linalg.Linear.apply(x, weight, bias)


__all__ = ["softmax", "log_softmax", "gelu", "relu", "tanh", "sigmoid", "layer_norm", "cross_entropy",
           "embedding", "dropout", "where", "masked_fill", "mse_loss", "binary_cross_entropy_with_logits",
           "scaled_dot_product_attention", "matmul", "linear", "concatenate", "stack", "split", "tensor"]
