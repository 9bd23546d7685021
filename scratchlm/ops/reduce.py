"""Reductions: sum, mean, max over an axis (or all axes), with or without keepdims.

A reduction's backward spreads the upstream gradient back over the reduced axes. The upstream
gradient has the reduced shape, so first put the reduced axes back as size-1 axes
(``_expand_to``), then broadcast.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Function


def _normalise_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in axes)) if ndim else ()


def _expand_to(g, axes, keepdims):
    """Re-insert the reduced ``axes`` as size-1 axes so ``g`` broadcasts against the input."""
    if keepdims:
        return g
    for a in axes:
        g = backend.xp.expand_dims(g, a)
    return g


class Sum(Function):
    """y = sum_i x_i over ``axis``.    dL/dx_i = g (every summand moves y one for one)."""
    tensor_method = "sum"

    @staticmethod
    def forward(x, axis=None, keepdims=False):
        axes = _normalise_axes(axis, x.ndim)
        return x.sum(axis=axes, keepdims=keepdims), (x.shape, axes, keepdims)

    @staticmethod
    def backward(g, saved):
        shape, axes, keepdims = saved
        return (backend.xp.broadcast_to(_expand_to(g, axes, keepdims), shape),)


class Mean(Function):
    """y = (1/n) sum_i x_i over ``axis`` (n elements reduced).    dL/dx_i = g / n."""
    tensor_method = "mean"

    @staticmethod
    def forward(x, axis=None, keepdims=False):
        axes = _normalise_axes(axis, x.ndim)
        count = 1
        for a in axes:
            count *= x.shape[a]
        return x.mean(axis=axes, keepdims=keepdims), (x.shape, axes, keepdims, count)

    @staticmethod
    def backward(g, saved):
        shape, axes, keepdims, count = saved
        return (backend.xp.broadcast_to(_expand_to(g, axes, keepdims) / count, shape),)


class Max(Function):
    """y = max_i x_i over ``axis``.

    dL/dx_i = g * [x_i == y] / (number of maxima): a tie shares the gradient equally, which is
    the average of the one-hot subgradients (and what finite differences see for a tie).
    """
    tensor_method = "max"

    @staticmethod
    def forward(x, axis=None, keepdims=False):
        axes = _normalise_axes(axis, x.ndim)
        y = x.max(axis=axes, keepdims=True)
        is_max = x == y
        share = is_max / is_max.sum(axis=axes, keepdims=True)
        out = y if keepdims else y.reshape([n for i, n in enumerate(y.shape) if i not in axes])
        return out, (share, axes, keepdims)

    @staticmethod
    def backward(g, saved):
        share, axes, keepdims = saved
        return (_expand_to(g, axes, keepdims) * share,)
