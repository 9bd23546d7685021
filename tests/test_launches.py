"""scratchlm.launches: dispatch counts per step. Oracles: hand-counted calls on tiny programs."""
import numpy as np

from scratchlm import backend
from scratchlm.launches import Counted, count_launches
from scratchlm.profiling import profile_ops
from scratchlm.tensor import Tensor


def test_tape_ops_are_counted_forward_and_backward():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    with count_launches() as count:
        loss = (x * x).sum()            # forward: Mul, Sum
        loss.backward()                 # backward: Sum, Mul
    assert count.per_kind["tape ops"] == 4
    np.testing.assert_array_equal(x.grad, 2 * np.ones(3))


def test_namespace_calls_are_counted_and_the_namespace_is_restored():
    a = np.arange(4.0)
    with count_launches() as count:
        xp = backend.xp
        xp.exp(a)
        xp.add.at(a, [0, 0], 1.0)                       # a ufunc's method counts as a call too
        assert isinstance(a, xp.ndarray) and xp.float32 is np.float32     # types pass through untouched
        xp.random.default_rng(0)                        # (modules pass through; their functions are not counted)
    assert count.per_kind == {"xp calls": 2}
    assert a[0] == 2.0
    assert backend.xp is np


def test_raw_kernel_wrapper_counts_launches_and_forwards_attributes():
    class Kernel:
        max_dynamic_shared_size_bytes = 0

        def __call__(self, grid, block, args):
            args[0][...] += 1

    kernel, out = Kernel(), np.zeros(1)
    counted = Counted(kernel, "raw kernels")
    counted.max_dynamic_shared_size_bytes = 65536       # what kernels/cuda.py sets on a RawFunction
    assert kernel.max_dynamic_shared_size_bytes == 65536
    counted((1,), (1,), (out,))                         # outside a count: runs, counts nothing
    with count_launches() as count:
        for _ in range(3):
            counted((1,), (1,), (out,))
    assert count.per_kind == {"raw kernels": 3} and out[0] == 4


def test_an_enclosing_op_profile_still_sees_the_ops():
    x = Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    with profile_ops() as table, count_launches() as count:
        (x * 3.0).sum().backward()
    assert count.per_kind["tape ops"] == 4
    assert table.calls["Mul", "forward"] == 1 and table.calls["Mul", "backward"] == 1
