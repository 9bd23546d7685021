"""Tensor and the tape: reverse-mode automatic differentiation in one file.

A ``Tensor`` wraps a backend array (``.data``) and, when it was computed from tensors that need
gradients, the ``Node`` that made it: which ``Function`` ran, the inputs, and what the forward
saved for the backward. ``backward()`` walks those nodes in reverse topological order, calls each
function's hand-written backward, and *adds* each input's gradient into place (a tensor used twice,
like a residual stream or the tied embedding, gets the sum of both uses).

    >>> import scratchlm as sl
    >>> x = sl.tensor([1.0, 2.0, 3.0], requires_grad=True)
    >>> y = (x * x).sum()
    >>> y.backward()
    >>> x.grad.tolist()
    [2.0, 4.0, 6.0]

Ops live in ``scratchlm/ops/``: each is a ``Function`` subclass with a ``forward`` and a
``backward`` side by side. Subclassing registers it; ``tensor_method = "exp"`` also makes it a
method, ``x.exp()``. Broadcasting is undone once, here, in ``unbroadcast``: no op sums its own
gradient back to an input's shape.

An op may have several outputs (``outputs = 2``, e.g. the fused residual add + layer norm, which
returns the new residual stream and the normalised rows): each output tensor remembers its node
and its index, and the node itself takes a place in the topological order, after its inputs and
before its outputs, so its backward runs once, with one gradient per output (None for an output
that did not reach the loss).
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np

from . import backend

_grad_enabled = True
op_timer = None   # set by scratchlm.profiling.profile_ops(): times every forward and backward


# set by scratchlm.distributed's gradient buckets: called as hook(leaf) once a leaf's gradient of
# this backward is final (its one visit in the topological order), and as hook(None) after every
# op's backward (a point to let communication progress)
backward_hook = None


def set_backward_hook(hook):
    """Call ``hook(leaf)`` when a leaf's gradient is final and ``hook(None)`` after each op's backward
    (None: no hook); returns the previous hook."""
    global backward_hook
    previous, backward_hook = backward_hook, hook
    return previous


def set_op_timer(timer):
    """Route every op's forward and backward through ``timer`` (None: call them directly)."""
    global op_timer
    previous, op_timer = op_timer, timer
    return previous


@contextlib.contextmanager
def no_grad():
    """Within this block, ops record nothing on the tape (inference, optimizer steps)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class _Freed:
    """Marks a node whose saved arrays were released by a backward pass (retain_graph=False)."""


class Node:
    """One recorded op: ``fn`` was applied to ``inputs`` and saved ``saved`` for its backward."""

    __slots__ = ("fn", "inputs", "saved")

    def __init__(self, fn, inputs, saved):
        self.fn, self.inputs, self.saved = fn, inputs, saved

    def __repr__(self):
        return f"Node({self.fn.__name__})"


class Function:
    """Base of every op. Subclasses define, next to each other:

    ``forward(*arrays, **params) -> (out, saved)``: arrays in, one array out, plus whatever the
    backward needs (save the minimum);
    ``backward(grad_out, saved) -> tuple``: one gradient (or None) per array input, each with the
    shape of the *broadcast* input -- ``unbroadcast`` reduces it to the input's own shape.

    With ``outputs = n > 1`` the forward returns a tuple of n arrays (and saved), ``apply`` returns
    n tensors, and the backward receives a tuple of n gradients, None for an output that no path
    from the loss used.
    """

    registry: dict[str, type] = {}
    tensor_method: str | None = None   # also expose as Tensor.<name>
    outputs: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Function.registry[cls.__name__] = cls
        if cls.tensor_method:
            setattr(Tensor, cls.tensor_method,
                    lambda self, *args, _fn=cls, **params: _fn.apply(self, *args, **params))

    @staticmethod
    def forward(*arrays, **params):
        raise NotImplementedError

    @staticmethod
    def backward(grad_out, saved):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params) -> "Tensor":
        tensors = _as_tensors(inputs)
        arrays = (None if t is None else t.data for t in tensors)
        if op_timer is None:
            out, saved = cls.forward(*arrays, **params)
        else:
            out, saved = op_timer(cls, "forward", cls.forward, *arrays, **params)
        needs_grad = _grad_enabled and any(t is not None and t.requires_grad for t in tensors)
        node = Node(cls, tensors, saved) if needs_grad else None
        if cls.outputs == 1:
            result = Tensor(out, requires_grad=needs_grad)
            result._node = node
            return result
        results = tuple(Tensor(array, requires_grad=needs_grad) for array in out)
        for index, result in enumerate(results):
            result._node, result._output_index = node, index
        return results


def _as_tensors(inputs) -> tuple:
    """Tensors stay; Python/NumPy numbers become constant scalars of the first tensor's dtype.

    ``None`` stays ``None``: an optional input (a layer norm without bias) gets no gradient.
    """
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    converted = []
    for x in inputs:
        if x is None or isinstance(x, Tensor):
            converted.append(x)
        elif isinstance(x, (numbers.Number, np.generic)) and like is not None:
            number_is_float = isinstance(x, (float, np.floating))
            dtype = backend.get_default_dtype() if number_is_float and like.dtype.kind != "f" else like.dtype
            # a typed scalar, not a device array: NumPy and CuPy combine it with arrays directly,
            # and on a GPU no host->device copy is queued for every "x * 0.5"
            converted.append(Tensor(np.dtype(dtype).type(x)))
        else:
            converted.append(Tensor(backend.to_device(x)))
    return tuple(converted)


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the one place where broadcasting is undone.

    If y = f(x) broadcast x from ``shape`` to grad.shape, every copy of an element of x
    contributed to L, so dL/dx sums dL/dy over the broadcast axes (the leading ones that were
    added, and the ones where x had size 1).
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _accumulate_leaf_grad(tensor, grad) -> None:
    """``tensor.grad += grad``. A parameter in flat storage (``Module.flatten_``) has a slot, its view
    of the flat gradient buffer: the first gradient is copied into it (the backward's array may be
    shared with other nodes) and later ones are added in place, so ``.grad`` stays that view."""
    slot = tensor._grad_slot
    if tensor.grad is None:
        if slot is None:
            tensor.grad = grad
        else:
            slot[...] = grad
            tensor.grad = slot
    elif tensor.grad is slot:
        slot += grad
    else:
        tensor.grad = tensor.grad + grad


class Tensor:
    """An array on the current backend, with an optional gradient and the node that made it."""

    __array_priority__ = 1000  # so numpy_array * tensor calls Tensor.__rmul__
    _grad_slot = None          # where backward writes .grad: a view of a flat buffer, or None
    _output_index = None       # which output of a multi-output node this is (None: a single output)

    def __init__(self, data, requires_grad: bool = False):
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node: Node | None = None

    # ------------------------------------------------------------- basics
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(self.data.size))
    T = property(lambda self: self.transpose())

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({backend.to_numpy(self.data)!r}{grad})"

    def item(self):
        return backend.to_numpy(self.data).item()

    def numpy(self) -> np.ndarray:
        """A NumPy copy on the host (from any backend)."""
        return np.array(backend.to_numpy(self.data))

    def tolist(self):
        return backend.to_numpy(self.data).tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the tape."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = flag
        return self

    # ------------------------------------------------------------- backward
    def backward(self, gradient=None, retain_graph: bool = False) -> None:
        """Accumulate dL/dx into ``.grad`` of every leaf tensor that requires grad.

        ``gradient`` is dL/dself; it may be omitted only for a single-element tensor (then 1).
        The saved arrays of each node are released after use unless ``retain_graph=True``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: "
                               "no input of its computation had requires_grad=True")
        if gradient is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a single-element tensor, "
                                   f"this one has shape {self.shape}; pass gradient= of that shape")
            gradient = backend.xp.ones_like(self.data)
        else:
            gradient = gradient.data if isinstance(gradient, Tensor) else backend.to_device(gradient, self.dtype)
            if tuple(gradient.shape) != self.shape:
                raise ValueError(f"gradient has shape {tuple(gradient.shape)}, tensor has shape {self.shape}")

        grads = {id(self): gradient}
        for vertex in reversed(_topological_order(self)):
            if isinstance(vertex, Node):            # a multi-output op: all its outputs were visited
                node, grad = vertex, grads.pop(id(vertex), None)
                if grad is None:
                    continue
                grad = tuple(grad)                  # one gradient (or None) per output
            else:
                grad = grads.pop(id(vertex), None)
                if grad is None:
                    continue
                node = vertex._node
                if node is None:  # a leaf: accumulate, never overwrite
                    _accumulate_leaf_grad(vertex, grad)
                    if backward_hook is not None:       # its gradient of this backward is complete
                        backward_hook(vertex)
                    continue
                if vertex._output_index is not None:    # one output of several: wait for the node
                    grads.setdefault(id(node), [None] * node.fn.outputs)[vertex._output_index] = grad
                    continue
            if node.saved is _Freed:
                raise RuntimeError("backward() through a graph that was already freed by an earlier "
                                   "backward(); pass retain_graph=True to the first call to keep it")
            if op_timer is None:
                input_grads = node.fn.backward(grad, node.saved)
            else:
                input_grads = op_timer(node.fn, "backward", node.fn.backward, grad, node.saved)
            for inp, g in zip(node.inputs, input_grads):
                if g is None or inp is None or not inp.requires_grad:
                    continue
                g = unbroadcast(g, inp.shape)
                grads[id(inp)] = grads[id(inp)] + g if id(inp) in grads else g
            if not retain_graph:
                node.saved = _Freed
            if backward_hook is not None:
                backward_hook(None)

    # ------------------------------------------------------------- operators
    def __add__(self, other): return _op("Add")(self, other)
    def __radd__(self, other): return _op("Add")(other, self)
    def __sub__(self, other): return _op("Sub")(self, other)
    def __rsub__(self, other): return _op("Sub")(other, self)
    def __mul__(self, other): return _op("Mul")(self, other)
    def __rmul__(self, other): return _op("Mul")(other, self)
    def __truediv__(self, other): return _op("Div")(self, other)
    def __rtruediv__(self, other): return _op("Div")(other, self)
    def __matmul__(self, other): return _op("MatMul")(self, other)
    def __rmatmul__(self, other): return _op("MatMul")(other, self)
    def __neg__(self): return _op("Neg")(self)
    def __getitem__(self, index): return _op("GetItem")(self, index=_index_data(index))

    def __pow__(self, exponent):
        if not isinstance(exponent, numbers.Number):
            raise TypeError("only a scalar exponent is supported: x ** 2.0")
        return _op("Pow")(self, exponent=exponent)

    # comparisons give boolean tensors and record nothing
    def _compare(self, other, fn):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(fn(self.data, other))

    def __lt__(self, other): return self._compare(other, lambda a, b: a < b)
    def __le__(self, other): return self._compare(other, lambda a, b: a <= b)
    def __gt__(self, other): return self._compare(other, lambda a, b: a > b)
    def __ge__(self, other): return self._compare(other, lambda a, b: a >= b)
    def __eq__(self, other): return self._compare(other, lambda a, b: a == b)
    def __ne__(self, other): return self._compare(other, lambda a, b: a != b)
    __hash__ = object.__hash__  # tensors are dict keys by identity, as in PyTorch

    def transpose(self, dim0: int | None = None, dim1: int | None = None):
        """Reverse all axes (no argument, like ``.T``), or swap two: ``t.transpose(-2, -1)``."""
        order = list(range(self.ndim))[::-1]
        if dim0 is not None:
            order = list(range(self.ndim))
            order[dim0], order[dim1] = order[dim1], order[dim0]
        return _op("Permute")(self, axes=tuple(order))

    def permute(self, *axes):
        return _op("Permute")(self, axes=tuple(axes))

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _op("Reshape")(self, shape=tuple(shape))

    view = reshape


def _op(name):
    return Function.registry[name].apply


def _index_data(index):
    """Tensors inside an index become their arrays (integer indexing, masks)."""
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index.data if isinstance(index, Tensor) else index


def _topological_order(root: Tensor) -> list:
    """Tensors reachable from ``root`` through nodes, each after all of its inputs.

    A multi-output node is a vertex of the order too, between its inputs and its outputs (each
    output depends on the node only), so the backward reaches it after every one of its outputs.
    Iterative depth-first search, so deep graphs (many layers, long unrolls) do not hit
    Python's recursion limit.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        vertex, inputs_done = stack.pop()
        if inputs_done:
            order.append(vertex)
            continue
        if id(vertex) in visited:
            continue
        visited.add(id(vertex))
        stack.append((vertex, True))
        if isinstance(vertex, Node):
            depends_on = vertex.inputs
        elif vertex._node is None:
            continue
        elif vertex._output_index is not None:
            depends_on = (vertex._node,)
        else:
            depends_on = vertex._node.inputs
        for inp in depends_on:
            if inp is not None and (isinstance(inp, Node) or inp.requires_grad) and id(inp) not in visited:
                stack.append((inp, False))
    return order


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """A new leaf tensor on the current backend (floats are float32 unless ``dtype`` says)."""
    if isinstance(data, Tensor):
        data = data.data
    return Tensor(backend.to_device(data, dtype), requires_grad=requires_grad)
