"""Matrix multiplication, batched, with NumPy's broadcasting of the batch dimensions."""
from __future__ import annotations

from .. import backend
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
            return (rows @ b).reshape(a.shape[:-1] + b.shape[-1:]), (a, b)
        return a @ b, (a, b)

    @staticmethod
    def backward(g, saved):
        a, b = saved
        xp = backend.xp
        if a.ndim > 2 and b.ndim == 2:
            rows, g_rows = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            return (g_rows @ b.T).reshape(a.shape), rows.T @ g_rows
        a2 = a[None, :] if a.ndim == 1 else a       # (1, K)
        b2 = b[:, None] if b.ndim == 1 else b       # (K, 1)
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = xp.expand_dims(g, -2)
        grad_a = g @ xp.swapaxes(b2, -1, -2)
        grad_b = xp.swapaxes(a2, -1, -2) @ g
        if a.ndim == 1:
            grad_a = grad_a[..., 0, :]              # leading batch axes are summed by the tape
        if b.ndim == 1:
            grad_b = grad_b[..., 0]
        return grad_a, grad_b
