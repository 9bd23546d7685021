"""What a kernel that runs in one parallel region needs: work shares claimed from atomic counters,
waits on them, and arrays rebuilt from their addresses.

Numba's parallel regions (workqueue threads) take ~20-100 us to start and join, so a kernel made of
many dependent steps (kernels/decode_numba.py: two per GPT block) runs them all in one region, its
threads meeting between steps on counters instead of at region ends:

    share = claim(counters, phase, shares)      # the next share of a phase, or -1: all taken
    ...work on it...; finish(counters, phase)   # count it done
    wait_all(counters, phase, shares)           # every share of the phase done (by anyone)

A thread waits only for shares another thread has claimed and is running, never for a thread
that has not started, so nothing deadlocks however many threads actually run.
"""
from __future__ import annotations

import platform

from scratchlm.kernels import intrinsic, llvm_ir, njit, numba, types

carray = numba.carray if numba is not None else None

# int64 counters 64 bytes apart: two threads' counters never share a cache line.
COUNTER_STRIDE = 8

# Counters of phase p: claimed at index 2p * COUNTER_STRIDE, done at (2p + 1) * COUNTER_STRIDE.
# The increments are atomic read-modify-writes (sequentially consistent: a share's partial is
# written before its "done" count is seen); the wait reads with acquire ordering.

@njit(cache=True)
def claim(counters, phase, shares):
    """The next unclaimed share of ``phase``, or -1 when all are taken."""
    share = _atomic_add(counters, 2 * phase * COUNTER_STRIDE, 1)
    return share if share < shares else -1


@njit(cache=True)
def finish(counters, phase):
    _atomic_add(counters, (2 * phase + 1) * COUNTER_STRIDE, 1)


# A thread that waits longer than this many spins (~10 us; a share's threads usually finish within
# a few us of each other) is likely waiting on a descheduled thread: it yields its core (sched_yield
# returns at once when nothing else wants it) instead of spinning through a time slice.
SPINS_BEFORE_YIELD = 500


@njit(cache=True)
def wait_all(counters, phase, shares):
    """Return once every share of ``phase`` is done. The shares are claimed by running threads and
    wait for nothing, so this ends."""
    spins = 0
    while _atomic_load(counters, (2 * phase + 1) * COUNTER_STRIDE) < shares:
        spins += 1
        if spins < SPINS_BEFORE_YIELD:
            _spin_pause()
        else:
            _yield_core()


def _element_pointer(context, builder, array_type, array, index):
    from numba.core import cgutils
    data = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, data, [index])


@intrinsic
def _atomic_add(typingctx, counters, index, value):
    """counters[index] += value as one atomic instruction; returns the value before."""
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")
    return types.int64(types.Array(types.int64, 1, "C"), types.intp, types.int64), codegen


@intrinsic
def _atomic_load(typingctx, counters, index):
    """counters[index], read atomically (acquire: later reads see what was written before it)."""
    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(types.Array(types.int64, 1, "C"), types.intp), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _spin_pause(typingctx):
    """The x86 ``pause`` hint inside a spin loop (the core backs off; nothing elsewhere)."""
    def codegen(context, builder, signature, args):
        if _X86:
            from numba.core import cgutils
            hint = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), []),
                                                  "llvm.x86.sse2.pause")
            builder.call(hint, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _yield_core(typingctx):
    """POSIX sched_yield(): let another runnable thread have this core."""
    def codegen(context, builder, signature, args):
        from numba.core import cgutils
        function = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(llvm_ir.IntType(32), []),
                                                  "sched_yield")
        builder.call(function, [])
        return context.get_dummy_value()
    return types.void(), codegen


# ---------------------------------------------------------------- arrays from addresses

# A Numba parallel region takes arrays and numbers, not tuples of arrays (a block's weights), and
# one region per block would pay the start and join per block. So the kernel gets a table of the
# blocks' arrays' addresses, (n_layer, 14) int64, and rebuilds each as a view inside (carray: no
# copy). Whoever makes the table keeps the arrays referenced while it is in use, and checks that
# each is C-contiguous with the expected shape and dtype: a view built from an address trusts both
# (decode_numba.py's ``KernelScratch.bind``).

@intrinsic
def _pointer(typingctx, like, address):
    """``address`` as a pointer to elements of ``like``'s dtype."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[1], context.get_value_type(signature.return_type))
    return types.CPointer(like.dtype)(like, types.int64), codegen


@njit(cache=True)
def view1(like, address, n):
    """The (n,) array of ``like``'s dtype at ``address``."""
    return carray(_pointer(like, address), (n,))


@njit(cache=True)
def view2(like, address, rows, cols):
    """The C-contiguous (rows, cols) array of ``like``'s dtype at ``address``."""
    return carray(_pointer(like, address), (rows, cols))


@njit(cache=True)
def view4(like, address, a, b, c, d):
    """The C-contiguous (a, b, c, d) array of ``like``'s dtype at ``address``."""
    return carray(_pointer(like, address), (a, b, c, d))
