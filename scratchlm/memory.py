"""How much memory a training step needs, checked before anything is allocated.

    from scratchlm.memory import estimate_training_memory, check_fits_in_memory
    estimate = estimate_training_memory(model_config, batch_size=12, block_size=64)
    # {"parameters": ..., "gradients": ..., "optimizer": ..., "activations": ..., "total": ...} in bytes
    check_fits_in_memory(model_config, batch_size=12, block_size=64)     # UserError if it cannot fit

The per-family part is the model config's ``memory_estimate(batch_size, block_size)`` (a dict of
bytes per component; ``GPTConfig.memory_estimate`` states its formula), so a new model family
adds its own method and every command that trains it is guarded the same way.

Available memory is the device's: on the host, ``MemAvailable`` from /proc/meminfo (what Linux
can hand out without swapping), else the free physical pages from ``os.sysconf``; on a GPU,
CuPy's free device memory. Where none of these can be read, the check is skipped.
"""
from __future__ import annotations

import dataclasses
import os

from scratchlm.errors import UserError

COMPONENTS = ("parameters", "gradients", "optimizer", "activations")


def estimate_training_memory(model_config, batch_size: int, block_size: int | None = None,
                             bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes per component of one training step (see the model config's ``memory_estimate``),
    plus their ``total``."""
    parts = model_config.memory_estimate(batch_size, block_size, bytes_per_value=bytes_per_value)
    return {**parts, "total": sum(parts.values())}


def available_memory() -> int | None:
    """Bytes the current backend's device can still allocate, or None when it cannot be read."""
    from scratchlm import backend
    if backend.is_gpu():
        try:
            free, _ = backend.xp.cuda.runtime.memGetInfo()
            return int(free)
        except Exception:              # a driver that will not say: skip the check
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024          # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe(estimate: dict[str, int]) -> str:
    """``"1.2 GiB (parameters 10 MiB, gradients 10 MiB, optimizer 20 MiB, activations 1.1 GiB)"``"""
    parts = ", ".join(f"{k} {format_bytes(estimate[k])}" for k in estimate if k != "total")
    return f"{format_bytes(estimate['total'])} ({parts})"


def check_fits_in_memory(model_config, batch_size: int, block_size: int | None = None,
                         available: int | None = None, components=COMPONENTS) -> dict[str, int]:
    """Refuse (UserError) a step whose estimate exceeds the available memory, naming the estimate
    and the largest batch_size that fits (or, when even batch_size 1 does not, the largest n_embd).
    ``components`` chooses what counts (``summary`` allocates only parameters and a forward).
    Returns the estimate."""
    def total(config, B):
        parts = estimate_training_memory(config, B, block_size)
        return sum(parts[k] for k in components)

    estimate = estimate_training_memory(model_config, batch_size, block_size)
    available = available_memory() if available is None else available
    if available is None or total(model_config, batch_size) <= available:
        return estimate
    fixed = total(model_config, 0)                        # what does not grow with the batch
    per_row = total(model_config, 1) - fixed
    largest_batch = int((available - fixed) // per_row) if per_row > 0 and available > fixed else 0
    if largest_batch >= 1:
        hint = f"the largest batch_size that fits is {largest_batch} (--set batch_size={largest_batch})"
    else:
        n_embd = _largest_n_embd(model_config, available, lambda c: total(c, batch_size))
        hint = (f"the largest n_embd that fits at this batch_size is {n_embd} (--set n_embd={n_embd})" if n_embd
                else "even the smallest model does not fit; lower block_size or n_layer")
    raise UserError(f"this config needs about {describe(estimate)} for one training step, more than the "
                    f"{format_bytes(available)} available; {hint}")


def _largest_n_embd(config, available: int, need) -> int | None:
    """The largest multiple of n_head whose estimate fits (need() grows with n_embd), or None."""
    step = config.n_head
    low, high = 0, max(config.n_embd // step, 1)            # in units of n_head
    if need(dataclasses.replace(config, n_embd=step)) > available:
        return None
    low = 1
    while high - low > 1:
        mid = (low + high) // 2
        if need(dataclasses.replace(config, n_embd=mid * step)) <= available:
            low = mid
        else:
            high = mid
    return low * step
