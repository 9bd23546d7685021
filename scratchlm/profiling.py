"""Per-op timing: how long each op's forward and backward took, summed by op.

    >>> import scratchlm as sl
    >>> with sl.profile_ops() as table:          # or SCRATCHLM_PROFILE=1 for a whole program
    ...     loss = model(x, y)[1]; loss.backward()
    >>> print(table)                              # doctest: +SKIP
    op                         calls  forward ms  backward ms  total ms   share
    MatMul                        17        7.1        15.2      22.3    38.4%
    ...

On a GPU the device work is asynchronous, so each timed call synchronises first and last:
the table then shows device time per op, at the price of a slower program.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from collections import defaultdict

from . import backend
from .tensor import set_op_timer


class OpTable:
    """Seconds and calls per (op, direction), filled while ``profile_ops`` is active."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def __call__(self, op, direction, fn, *args, **kwargs):
        backend.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        backend.synchronize()
        self.seconds[op.__name__, direction] += time.perf_counter() - start
        self.calls[op.__name__, direction] += 1
        return result

    def __str__(self):
        ops = sorted({op for op, _ in self.seconds},
                     key=lambda op: -(self.seconds[op, "forward"] + self.seconds[op, "backward"]))
        grand_total = sum(self.seconds.values()) or 1.0
        lines = [f"{'op':<28}{'calls':>7}{'forward ms':>12}{'backward ms':>13}{'total ms':>10}{'share':>8}"]
        for op in ops:
            fwd, bwd = self.seconds[op, "forward"] * 1e3, self.seconds[op, "backward"] * 1e3
            lines.append(f"{op:<28}{self.calls[op, 'forward']:>7}{fwd:>12.1f}{bwd:>13.1f}{fwd + bwd:>10.1f}"
                         f"{(fwd + bwd) / grand_total / 10:>7.1f}%")
        lines.append(f"{'all ops':<28}{'':>7}{'':>12}{'':>13}{grand_total * 1e3:>10.1f}")
        return "\n".join(lines)


@contextlib.contextmanager
def profile_ops():
    """Time every op's forward and backward inside the block; yields the table."""
    table = OpTable()
    previous = set_op_timer(table)
    try:
        yield table
    finally:
        set_op_timer(previous)


if os.environ.get("SCRATCHLM_PROFILE"):
    _program_table = OpTable()
    set_op_timer(_program_table)
    atexit.register(lambda: print(f"\nscratchlm per-op time (SCRATCHLM_PROFILE):\n{_program_table}", file=sys.stderr))
