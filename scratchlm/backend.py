"""Which array module the engine computes with, and everything that depends on that choice.

scratchlm writes every op once, against an array namespace called ``xp``: NumPy on the CPU,
CuPy on an NVIDIA GPU. This module owns the choice and the few things that differ between the
two: moving arrays to and from the host, the default float dtype, random generators, and the
escape hatches the Array API standard does not have (scatter-add).

Always reach the namespace as ``backend.xp`` at call time (never ``from backend import xp``):
``use_backend`` swaps it.

    >>> import scratchlm as sl
    >>> sl.use_backend("numpy")          # or "cupy"; SCRATCHLM_BACKEND=cupy does the same
    >>> sl.backend.xp.__name__
    'numpy'
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

# name -> a function returning the array namespace; a backend is found by name.
_LOADERS: dict[str, Callable[[], Any]] = {}

xp: Any = np            # the current array namespace (numpy, cupy, or a test namespace)
name: str = "numpy"     # the current backend's name
_default_dtype = np.float32


class BackendUnavailable(RuntimeError):
    """Raised when a backend is asked for but cannot run here (a user error: one line)."""


def register_backend(backend_name: str, loader: Callable[[], Any]) -> None:
    """Make ``use_backend(backend_name)`` available; ``loader()`` returns the namespace."""
    _LOADERS[backend_name] = loader


def _load_numpy():
    return np


def _load_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(
            "the cupy backend needs CuPy: pip install 'scratchlm[cuda12]' (or [cuda13] for CUDA 13)"
        ) from exc
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendUnavailable("the cupy backend needs an NVIDIA GPU, and none is visible")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailable(f"the cupy backend cannot reach a GPU ({exc}); use the numpy backend") from exc
    return cupy


register_backend("numpy", _load_numpy)
register_backend("cupy", _load_cupy)


def use_backend(backend_name: str) -> None:
    """Compute with ``backend_name`` ("numpy" or "cupy") from now on."""
    global xp, name
    if backend_name not in _LOADERS:
        raise BackendUnavailable(f"unknown backend {backend_name!r}; choose one of {sorted(_LOADERS)}")
    global _default_generator
    xp = _LOADERS[backend_name]()
    name = backend_name
    _default_generator = None   # a generator belongs to one backend


def get_backend() -> str:
    return name


def is_gpu() -> bool:
    return name == "cupy"


# ---------------------------------------------------------------- dtype policy

def set_default_dtype(dtype) -> None:
    """Float dtype of new tensors made from Python or NumPy floats: float32 (default) or float64."""
    global _default_dtype
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64, np.float16):
        raise ValueError(f"default dtype must be a float dtype, got {dtype}")
    _default_dtype = dtype.type


def get_default_dtype():
    return _default_dtype


# ---------------------------------------------------------------- moving arrays

def to_device(data, dtype=None):
    """Host data (lists, scalars, NumPy arrays) or a backend array -> a backend array.

    Floats become the default dtype (float32 unless changed) unless ``dtype`` is given;
    integers and booleans keep theirs.
    """
    arr = xp.asarray(data)
    if dtype is None and arr.dtype.kind == "f":
        dtype = _default_dtype
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def to_numpy(array) -> np.ndarray:
    """A backend array (or anything array-like) -> a NumPy array on the host."""
    if hasattr(array, "get") and not isinstance(array, np.ndarray):
        return array.get()          # cupy -> host copy
    return np.asarray(array)


def synchronize() -> None:
    """Wait for queued device work (for timing); a no-op on the CPU."""
    if is_gpu():
        xp.cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------- host memory

_allocator_tuned = False


def keep_freed_host_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse rather than give them back to the OS.

    Every NumPy op allocates its output, and a training step frees and allocates the same
    megabyte-sized temporaries again and again. By default glibc serves blocks over 128 KiB with
    a fresh mmap and unmaps them on free, so each temporary's first write page-faults every
    4 KiB page (measured on the nano-cpu step: 99 -> 67 ms per iteration with this set). With a
    32 MiB mmap threshold and no trimming, freed blocks stay in the heap and are reused warm.
    The cost: the process keeps its peak memory. Called by the trainer; a no-op (False) where
    the C library is not glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    _allocator_tuned = bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and mallopt(M_TRIM_THRESHOLD, 2**30)
                            and mallopt(M_TOP_PAD, 64 * 2**20))
    return _allocator_tuned


# ---------------------------------------------------------------- randomness

def random_generator(seed: int):
    """A seeded generator of the current backend (``numpy.random.Generator`` or CuPy's)."""
    return xp.random.default_rng(seed)


_default_generator = None


def manual_seed(seed: int) -> None:
    """Seed the generator that ops such as dropout draw from when given none.

    CuPy's generator state cannot be saved, so a resumable run re-seeds from (seed, step) at
    every step instead of saving the state: ``manual_seed(step_seed(seed, step))``.
    """
    global _default_generator
    _default_generator = random_generator(seed)


def default_generator():
    if _default_generator is None:
        manual_seed(0)
    return _default_generator


def step_seed(seed: int, step: int) -> int:
    """A seed for step ``step`` of a run seeded ``seed``: distinct per step, same on every backend."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63)


# ---------------------------------------------------------------- escape hatches

def scatter_add(target, indices, values) -> None:
    """In place: ``target[indices] += values``, adding repeated indices up (not last-wins).

    NumPy spells it ``np.add.at``; CuPy ``cupyx.scatter_add``. Both sum duplicates. For a 2-D
    ``target`` and 1-D integer ``indices`` this is the embedding backward.
    """
    if is_gpu():
        import cupyx
        cupyx.scatter_add(target, indices, values)
    else:
        xp.add.at(target, indices, values)


def rows_scatter_add(target, row_ids, rows) -> None:
    """In place: ``target[row_ids[i]] += rows[i]`` for 2-D ``target`` (V, C) and ``rows`` (N, C).

    This is the embedding backward. On the CPU, ``np.add.at`` is slow for wide rows, so sort the
    ids once, sum each run of equal ids with one ``add.reduceat``, and add the sums to the
    distinct rows: no Python loop. CuPy's ``scatter_add`` uses atomics and is fast as it is.
    """
    if rows.shape[0] == 0:
        return
    if is_gpu():
        scatter_add(target, row_ids, rows)
        return
    order = xp.argsort(row_ids, kind="stable")
    sorted_ids = row_ids[order]
    is_run_start = xp.concatenate([xp.ones(1, dtype=bool), sorted_ids[1:] != sorted_ids[:-1]])
    starts = xp.flatnonzero(is_run_start)
    sums = xp.add.reduceat(rows[order], starts, axis=0)
    target[sorted_ids[starts]] += sums


_env_choice = os.environ.get("SCRATCHLM_BACKEND")
if _env_choice:
    use_backend(_env_choice)
