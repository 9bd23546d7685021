"""Counting what a training step dispatches: tape ops, array-namespace calls, raw kernel launches.

    >>> from scratchlm.launches import count_launches
    >>> with count_launches() as count:
    ...     trainer.train_step(it)
    >>> count.per_kind                 # doctest: +SKIP
    {'tape ops': 412, 'xp calls': 1290, 'raw kernels': 0}

On a GPU each of these is (at least) one CUDA kernel launch, and launches are what make a small
step host-bound (~5-10 us of Python and driver work each, however little the kernel computes):

- ``tape ops``: forward and backward calls of ``Function``s on the autograd tape (``Tensor.apply``,
  ``Tensor.backward``), through the same hook as ``scratchlm.profiling``;
- ``xp calls``: calls of a function of the backend's array namespace (``backend.xp.exp``,
  ``xp.matmul``, ``xp.add.at``...), counted by putting a counting stand-in for the namespace in
  ``backend.xp`` for the duration (the library reaches it as ``backend.xp`` at call time);
- ``raw kernels``: launches of our own CUDA kernels (``kernels/cuda.py``: RawModule functions and
  the AdamW ElementwiseKernel), counted by the wrapper those are returned in.

What is *not* counted: array operators and methods (``a + b``, ``a.sum()``), which NumPy and CuPy
dispatch without passing through the namespace, and Numba kernels (they are host code). So on a
GPU the sum is a lower bound on kernel launches (CuPy's profiler or Nsight gives the exact figure);
on the CPU it counts dispatches, which is what the Python overhead per step scales with.
"""
from __future__ import annotations

import contextlib
import types
from collections import Counter

_active: "LaunchCount | None" = None


class LaunchCount:
    """Counts by kind, filled while ``count_launches`` is active."""

    def __init__(self):
        self.per_kind: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.per_kind.values())


def note(kind: str) -> None:
    """Count one dispatch of ``kind`` if a count is active (called by the kernel wrappers)."""
    if _active is not None:
        _active.per_kind[kind] += 1


class Counted:
    """A callable that counts its calls as ``kind`` and otherwise is ``target``: attributes are read
    from and written to it (a RawFunction's ``max_dynamic_shared_size_bytes``), and callable
    attributes are counted too (``xp.add.at``)."""

    __slots__ = ("_target", "_kind")

    def __init__(self, target, kind: str):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_kind", kind)

    def __call__(self, *args, **kwargs):
        note(self._kind)
        return self._target(*args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        return Counted(value, self._kind) if _counts_as_dispatch(value) else value

    def __setattr__(self, name, value):
        setattr(self._target, name, value)


def _counts_as_dispatch(value) -> bool:
    """Functions and ufuncs; not types (``xp.float32``, ``xp.ndarray``: isinstance must still work)
    and not modules (``xp.random``, reached for generators and constants)."""
    return callable(value) and not isinstance(value, (type, types.ModuleType))


class _CountingNamespace:
    """Stands in for ``backend.xp``: every function called through it counts as an ``xp call``."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        value = getattr(self._xp, name)
        return Counted(value, "xp calls") if _counts_as_dispatch(value) else value


@contextlib.contextmanager
def count_launches():
    """Count tape ops, xp calls and raw kernel launches inside the block; yields the LaunchCount."""
    global _active
    from scratchlm import backend
    from scratchlm.tensor import set_op_timer
    count, outer = LaunchCount(), _active
    xp = backend.xp
    previous_timer = set_op_timer(None)

    def timer(op, direction, fn, *args, **kwargs):                 # keep an enclosing profile_ops working
        count.per_kind["tape ops"] += 1
        if previous_timer is not None:
            return previous_timer(op, direction, fn, *args, **kwargs)
        return fn(*args, **kwargs)
    set_op_timer(timer)
    _active, backend.xp = count, _CountingNamespace(xp)
    try:
        yield count
    finally:
        _active, backend.xp = outer, xp
        set_op_timer(previous_timer)
