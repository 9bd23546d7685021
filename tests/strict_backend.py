"""A test-only array backend that behaves like CuPy where it matters, without a GPU.

Its arrays (``StrictArray``) wrap NumPy arrays but refuse everything CuPy arrays refuse:
- being turned into a NumPy array implicitly (``np.asarray(a)``, ``np.exp(a)``, ``np.add.at(a, ...)``);
- arithmetic or assignment with a plain NumPy array (a host array meeting a device array).
Code that reaches arrays only through ``backend.xp`` (this namespace) and ``backend.to_numpy``
works; a stray ``np.`` call on tensor data raises TypeError. Running the op suite under this
backend is what shows that a CuPy run will not hit one.
"""
from __future__ import annotations

import operator
import types

import numpy as np


def _unwrap(value):
    if isinstance(value, StrictArray):
        return value._array
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return StrictArray(value)
    if isinstance(value, np.generic):
        return StrictArray(np.asarray(value))   # CuPy reductions give 0-d device arrays, not scalars
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return [_wrap(v) for v in value]
    if isinstance(value, np.random.Generator):
        return _Proxy(value)
    return value


def _refuse_host(value, what):
    if isinstance(value, np.ndarray):
        raise TypeError(f"a plain NumPy array met a device array in {what}: "
                        f"move it with backend.to_device (CuPy would refuse this)")


class StrictArray:
    """A NumPy array behind a wall: only ``backend.xp`` functions and array methods reach it."""

    __array_priority__ = 10_000

    def __init__(self, array: np.ndarray):
        self._array = array

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to NumPy: use backend.to_numpy "
                        "(CuPy would refuse this)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # CuPy arrays take part in plain ufunc calls with scalars (np.float64(2) * a), nothing more
        if method != "__call__" or kwargs or any(isinstance(x, np.ndarray) for x in inputs):
            raise TypeError(f"numpy.{ufunc.__name__}.{method} called directly on a device array: use backend.xp")
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs)))

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called directly on a device array: use backend.xp")

    def get(self):
        """Like ``cupy.ndarray.get``: a host copy."""
        return self._array.copy()

    def __getattr__(self, name):
        if name.startswith("__"):   # no __array_interface__ / __dlpack__ side doors to NumPy
            raise AttributeError(name)
        attr = getattr(self._array, name)
        if callable(attr):
            return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return _wrap(attr)

    def __getitem__(self, index):
        return _wrap(self._array[_unwrap(index)])

    def __setitem__(self, index, value):
        _refuse_host(value, "item assignment")
        self._array[_unwrap(index)] = _unwrap(value)

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (_wrap(row) for row in self._array)

    def __repr__(self):
        return f"StrictArray({self._array!r})"

    def __bool__(self):
        return bool(self._array)

    def __float__(self):
        return float(self._array)

    def __int__(self):
        return int(self._array)

    def __index__(self):
        return operator.index(self._array)

    @property
    def T(self):
        return StrictArray(self._array.T)


def _binary(op, reflected=False):
    def method(self, other):
        _refuse_host(other, op.__name__)
        a, b = self._array, _unwrap(other)
        return _wrap(op(b, a) if reflected else op(a, b))
    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow), ("matmul", operator.matmul), ("and", operator.and_),
                   ("or", operator.or_), ("xor", operator.xor)]:
    setattr(StrictArray, f"__{_name}__", _binary(_op))
    setattr(StrictArray, f"__r{_name}__", _binary(_op, reflected=True))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(StrictArray, f"__{_name}__", _binary(_op))
for _name, _op in [("iadd", operator.iadd), ("isub", operator.isub), ("imul", operator.imul),
                   ("itruediv", operator.itruediv)]:
    def _inplace(self, other, _op=_op, _name=_name):
        _refuse_host(other, _name)
        self._array = _op(self._array, _unwrap(other))
        return self
    setattr(StrictArray, f"__{_name}__", _inplace)
StrictArray.__neg__ = lambda self: StrictArray(-self._array)
StrictArray.__abs__ = lambda self: StrictArray(abs(self._array))
StrictArray.__invert__ = lambda self: StrictArray(~self._array)
StrictArray.__hash__ = None


class _Proxy:
    """NumPy (or one of its submodules, ufuncs, generators) seen through the wall."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if isinstance(attr, (types.ModuleType, np.ufunc)):
            return _Proxy(attr)
        if callable(attr) and not isinstance(attr, type):
            return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return attr

    def __call__(self, *args, **kwargs):
        return _wrap(self._target(*_unwrap(args), **_unwrap(kwargs)))


strict_numpy = _Proxy(np)
strict_numpy.__name__ = "strict_numpy"
