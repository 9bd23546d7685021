"""Fused ops: two steps of a GPT block in one op (one tape node; one kernel launch on a GPU).

* ``BiasGelu``: the MLP's c_fc bias add and its activation.
* ``AddLayerNorm``: a residual add and the layer norm after it, with two outputs (the new
  residual stream and the normalised rows), between the attention and the MLP of a block and
  from one block into the next (or into ln_f).

Their CUDA paths (``kernels/cuda.py``: a CuPy ElementwiseKernel for bias + GELU; the residual
option of the layer-norm row kernels in ``kernels/rowops.cu``, reached through
``kernels/layer_norm.py``'s ``add_forward``/``add_backward``) have NOT been run on a device.
The NumPy paths reuse ``kernels/gelu.py`` and ``kernels/layer_norm.py`` and are checked by finite
differences and against the unfused ops (tests/test_fused_ops.py).
"""
from __future__ import annotations

from .. import backend
from ..kernels import gelu as gelu_kernel
from ..kernels import layer_norm as layer_norm_kernel
from ..tensor import Function


class BiasGelu(Function):
    """y = gelu(x + b), x (..., C), b (C,): the bias add and the activation in one op.

    With h = x + b (b broadcast over the rows) and gelu' as in ``elementwise.Gelu``:
        dL/dx = g * gelu'(h),      dL/db = sum over the rows of g * gelu'(h).
    Saved: on the GPU x and b (the kernel recomputes h in its backward, in the same pass); on the
    CPU h itself (recomputing it there costs a pass over (N, 4C)). Either is one (..., C) array,
    the memory of the unfused pair, which keeps h for the GELU (nothing else keeps x).
    """

    @staticmethod
    def forward(x, bias, approximate="none"):
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}, expected ({x.shape[-1]},) "
                             f"for input of shape {tuple(x.shape)}")
        if backend.is_gpu():
            from ..kernels import cuda
            return cuda.bias_gelu_forward(x, bias, approximate), (x, bias, approximate)
        h = x + bias                                             # (..., C)
        return gelu_kernel.forward(h, approximate), (h, None, approximate)

    @staticmethod
    def backward(g, saved):
        x_or_h, bias, approximate = saved
        if bias is not None:                                     # the GPU's saved (x, b)
            from ..kernels import cuda
            dh = cuda.bias_gelu_backward(g, x_or_h, bias, approximate)
        else:
            dh = gelu_kernel.backward(g, x_or_h, approximate)
        return dh, dh.reshape(-1, dh.shape[-1]).sum(axis=0)


class AddLayerNorm(Function):
    """s = x + r,  y = LN(s) * w + b  over the last axis C; both s and y are outputs.

    In a pre-LN transformer every residual add is followed by a layer norm of its sum (ln_2
    after the attention, the next block's ln_1 or ln_f after the MLP), so one row pass can do
    both: the sum s continues as the residual stream, y feeds the next sublayer.

    Backward: s reaches the loss directly (dL/ds|direct, from later residual adds) and through y.
    With LN's backward as in ``nn.LayerNorm`` (xhat = (s - mu) rstd, gh = dL/dy * w):
        dL/ds = dL/ds|direct + rstd (gh - mean_C(gh) - xhat mean_C(gh xhat)),
        dL/dx = dL/dr = dL/ds                (s = x + r: both inputs pass it through),
        dL/dw = sum_rows dL/dy xhat,   dL/db = sum_rows dL/dy.
    An output whose gradient is None (unused) contributes nothing: with y unused, dL/dx = dL/dr =
    dL/ds|direct and w, b get no gradient.
    Saved: the rows of s, w, and per row mu and rstd (xhat is recomputed): what the unfused
    pair saves (the layer norm keeps its input s; the add keeps nothing).
    x and r must have the same shape (the residual stream and a sublayer's output).
    """

    outputs = 2

    @staticmethod
    def forward(x, residual, weight, bias, eps=1e-5):
        if residual.shape != x.shape:
            raise ValueError(f"add_layer_norm: residual has shape {tuple(residual.shape)}, "
                             f"x has {tuple(x.shape)}; they must be equal")
        if weight is None and bias is not None:
            raise ValueError("add_layer_norm with a bias needs a weight too")
        if weight is not None and weight.shape != x.shape[-1:]:
            raise ValueError(f"add_layer_norm weight has shape {tuple(weight.shape)}, "
                             f"expected ({x.shape[-1]},) for input of shape {tuple(x.shape)}")
        C = x.shape[-1]
        rows, y, mean, rstd = layer_norm_kernel.add_forward(x.reshape(-1, C), residual.reshape(-1, C),
                                                            weight, bias, eps)       # s, y (N, C)
        return (rows.reshape(x.shape), y.reshape(x.shape)), (rows, weight, bias is not None, mean, rstd)

    @staticmethod
    def backward(grads, saved):
        ds, dy = grads                                   # dL/ds|direct, dL/dy (either may be None)
        rows, weight, has_bias, mean, rstd = saved
        if dy is None:                                   # only the stream reached the loss
            return ds, ds, None, None
        d_sum, dweight, dbias = layer_norm_kernel.add_backward(
            None if ds is None else ds.reshape(rows.shape), dy.reshape(rows.shape), rows, weight, mean, rstd)
        d_sum = d_sum.reshape(dy.shape)
        return d_sum, d_sum, dweight, dbias if has_bias else None
