"""Ops that move elements without changing them: reshape, permute, indexing, concatenate, stack.

Each one's backward moves the gradient back the way the forward moved the values: reshape back,
permute by the inverse permutation, scatter into the indexed positions (adding where an index
repeats), slice the concatenation apart.
"""
from __future__ import annotations

from .. import backend
from ..tensor import Function, Tensor


class Reshape(Function):
    """y = x viewed with a new shape (same elements, same order).    dL/dx = g reshaped back."""

    @staticmethod
    def forward(x, shape):
        return x.reshape(shape), x.shape

    @staticmethod
    def backward(g, in_shape):
        return (g.reshape(in_shape),)


class Permute(Function):
    """y[i_p0, i_p1, ...] = x[i_0, i_1, ...] (axes reordered by ``axes``).

    dL/dx = g permuted by the inverse permutation (argsort of ``axes``).
    """

    @staticmethod
    def forward(x, axes):
        return x.transpose(axes), axes

    @staticmethod
    def backward(g, axes):
        inverse = [0] * len(axes)
        for position, axis in enumerate(axes):
            inverse[axis] = position
        return (g.transpose(inverse),)


def _is_basic_index(index) -> bool:
    """Slices, integers, None and Ellipsis only: each element of x is picked at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


class GetItem(Function):
    """y = x[index] for slices, integers and integer/boolean arrays.

    dL/dx = zeros with g added at the indexed positions. With integer arrays an element can be
    picked twice (``x[[0, 0]]``): its gradient is the sum of both uses, so the backward is a
    scatter-*add*, not an assignment.
    """

    @staticmethod
    def forward(x, index):
        return x[index], (x.shape, index)

    @staticmethod
    def backward(g, saved):
        shape, index = saved
        grad = backend.xp.zeros(shape, dtype=g.dtype)
        if _is_basic_index(index):
            grad[index] = g
        else:
            backend.scatter_add(grad, index, g)
        return (grad,)


class Concatenate(Function):
    """y = [x_1 | x_2 | ... ] along ``axis``.    dL/dx_k = the slice of g that x_k filled."""

    @staticmethod
    def forward(*xs, axis=0):
        sizes = [x.shape[axis] for x in xs]
        return backend.xp.concatenate(xs, axis=axis), (sizes, axis)

    @staticmethod
    def backward(g, saved):
        sizes, axis = saved
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        axis = axis % g.ndim
        prefix = (slice(None),) * axis
        return tuple(g[prefix + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:]))


class Stack(Function):
    """y[..., k, ...] = x_k (a new ``axis``).    dL/dx_k = g taken at index k of that axis."""

    @staticmethod
    def forward(*xs, axis=0):
        return backend.xp.stack(xs, axis=axis), axis

    @staticmethod
    def backward(g, axis):
        return tuple(backend.xp.take(g, k, axis=axis) for k in range(g.shape[axis]))


def concatenate(tensors, axis=0) -> Tensor:
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis=0) -> Tensor:
    return Stack.apply(*tensors, axis=axis)


def split(x: Tensor, sections, axis=0) -> list:
    """Split into pieces of the given sizes (a list) or into ``sections`` equal parts (an int).

    Each piece is a slice, so its backward is GetItem's: the pieces' gradients land in
    disjoint parts of dL/dx and add up to the whole.
    """
    n = x.shape[axis]
    if isinstance(sections, int):
        if n % sections:
            raise ValueError(f"cannot split an axis of size {n} into {sections} equal parts")
        sections = [n // sections] * sections
    if sum(sections) != n:
        raise ValueError(f"split sizes {list(sections)} do not add up to the axis size {n}")
    axis = axis % x.ndim
    pieces, start = [], 0
    for size in sections:
        index = (slice(None),) * axis + (slice(start, start + size),)
        pieces.append(x[index])
        start += size
    return pieces
