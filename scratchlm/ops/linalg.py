"""Matrix multiplication, batched, with NumPy's broadcasting of the batch dimensions."""
from __future__ import annotations

from .. import backend, precision
from ..tensor import Function


class MatMul(Function):
    """Y = A @ B over the last two axes; leading (batch) axes broadcast.

    For one matrix product Y (M, N) = A (M, K) @ B (K, N), Y_mn = sum_k A_mk B_kn, so
        dL/dA = G @ B^T    (M, K),        dL/dB = A^T @ G    (K, N).
    Over broadcast batch axes these come out at the broadcast shape and the tape sums them back.
    A 1-D A is a row vector (1, K) and a 1-D B a column (K, 1); the added axis is dropped from Y,
    and put back on G before the products above.
    """
    tensor_method = "matmul"

    @staticmethod
    def forward(a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul needs arrays with at least one axis; use * for scalars")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"matmul shape mismatch: {tuple(a.shape)} @ {tuple(b.shape)} "
                             f"(the last axis of the first must equal the "
                             f"{'second-to-last' if b.ndim > 1 else 'only'} axis of the second)")
        if a.ndim > 2 and b.ndim == 2:
            # A Linear layer: (B, T, C) @ (C, N). Fold the batch axes into rows so this is one
            # matrix product (B*T, C) @ (C, N), not B smaller ones; the same in the backward,
            # where dL/dW = A^T G becomes one product instead of B products and a sum.
            rows = a.reshape(-1, a.shape[-1])
            return precision.matmul(rows, b).reshape(a.shape[:-1] + b.shape[-1:]), (a, b)
        return precision.matmul(a, b), (a, b)

    @staticmethod
    def backward(g, saved):
        a, b = saved
        xp = backend.xp
        if a.ndim > 2 and b.ndim == 2:
            rows, g_rows = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            return precision.matmul(g_rows, b.T).reshape(a.shape), precision.matmul(rows.T, g_rows)
        a2 = a[None, :] if a.ndim == 1 else a       # (1, K)
        b2 = b[:, None] if b.ndim == 1 else b       # (K, 1)
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = xp.expand_dims(g, -2)
        grad_a = precision.matmul(g, xp.swapaxes(b2, -1, -2))
        grad_b = precision.matmul(xp.swapaxes(a2, -1, -2), g)
        if a.ndim == 1:
            grad_a = grad_a[..., 0, :]              # leading batch axes are summed by the tape
        if b.ndim == 1:
            grad_b = grad_b[..., 0]
        return grad_a, grad_b


class Linear(Function):
    """Y = X W + b, fused: the layer of every projection in a GPT.

    X (..., n_in), W (n_in, n_out) -- GPT-2's orientation, so no transpose -- and b (n_out,) or
    None. With the batch axes folded into rows, X (N, n_in) and G = dL/dY (N, n_out):
        dL/dX = G W^T,    dL/dW = X^T G,    dL/db = sum over rows of G.
    Fused rather than MatMul + Add: the bias is added in place into the product's fresh output
    (no second (N, n_out) array) and its gradient is one row sum (no broadcast bookkeeping).
    """

    @staticmethod
    def forward(x, weight, bias):
        if x.shape[-1] != weight.shape[0]:
            raise ValueError(f"linear: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                             f"(the input's last axis must equal the weight's first)")
        rows = x.reshape(-1, x.shape[-1])                  # (N, n_in)
        y = precision.matmul(rows, weight)                 # (N, n_out), a new array
        if bias is not None:
            y += bias
        # under bf16 mixed precision the backward keeps the bf16 copy of the input (scratchlm.precision)
        return y.reshape(x.shape[:-1] + weight.shape[1:]), (precision.lowered(rows), weight, x.shape, bias is not None)

    @staticmethod
    def backward(g, saved):
        rows, weight, x_shape, has_bias = saved
        g_rows = g.reshape(-1, g.shape[-1])                # (N, n_out)
        grad_bias = g_rows.sum(axis=0) if has_bias else None
        return (precision.matmul(g_rows, weight.T).reshape(x_shape), precision.matmul(rows.T, g_rows),
                grad_bias)
