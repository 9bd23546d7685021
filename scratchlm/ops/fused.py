"""Fused ops: two steps of a GPT block in one op (one tape node; one kernel launch on a GPU).

Only bias + GELU so far (the MLP's c_fc bias and activation). Its CUDA path is a CuPy
ElementwiseKernel (``kernels/cuda.py``: ``bias_gelu_forward``/``bias_gelu_backward``) that has NOT
been run on a device; the NumPy path reuses ``kernels/gelu.py`` and is checked by finite differences
(tests/test_fused_ops.py).
"""
from __future__ import annotations

from .. import backend
from ..kernels import gelu as gelu_kernel
from ..tensor import Function


class BiasGelu(Function):
    """y = gelu(x + b), x (..., C), b (C,): the bias add and the activation in one op.

    With h = x + b (b broadcast over the rows) and gelu' as in ``elementwise.Gelu``:
        dL/dx = g * gelu'(h),      dL/db = sum over the rows of g * gelu'(h).
    Saved: x and b (h is recomputed in the backward, one add, rather than kept: the same memory
    as the unfused pair, which keeps h for the GELU).
    """

    @staticmethod
    def forward(x, bias, approximate="none"):
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) "
                             f"for input of shape {tuple(x.shape)}")
        if backend.is_gpu():
            from ..kernels import cuda
            return cuda.bias_gelu_forward(x, bias, approximate), (x, bias, approximate)
        return gelu_kernel.forward(x + bias, approximate), (x, bias, approximate)

    @staticmethod
    def backward(g, saved):
        x, bias, approximate = saved
        if backend.is_gpu():
            from ..kernels import cuda
            dh = cuda.bias_gelu_backward(g, x, bias, approximate)
        else:
            dh = gelu_kernel.backward(g, x + bias, approximate)
        return dh, dh.reshape(-1, dh.shape[-1]).sum(axis=0)
