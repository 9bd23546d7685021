"""Scaled dot-product attention, fused: softmax(Q K^T * scale + mask) V with its own backward."""
from __future__ import annotations

import math

from ..kernels import attention as attention_kernel
from ..tensor import Function


class ScaledDotProductAttention(Function):
    """O = softmax(S) V,   S = scale * Q K^T  (+ -inf above the diagonal when causal).

    q, k, v, o: (B, H, T, D).  With P = softmax(S) row by row:
        dV = P^T dO,    dP = dO V^T,
        dS = P * (dP - rowsum(dO * O))     (softmax backward; rowsum(dP * P) = rowsum(dO * O)),
        dQ = scale * dS K,    dK = scale * dS^T Q.
    Masked positions are exactly -inf, so their probability is exactly 0 and no gradient flows to
    the future. The forward saves O and the per-row log-sum-exp of S; the backward recomputes
    P = exp(S - lse) from Q, K and lse instead of storing the (T x T) matrix -- except at short T
    on the CPU, where the batched-BLAS path has P in hand anyway and it is small, so it is saved
    and reused. The arithmetic runs in kernels/attention.py: a plain reference that materialises
    P (readable), a tiled Numba kernel and a batched-BLAS path (CPU) and a CUDA kernel (GPU),
    chosen by the arrays' backend.
    """

    @staticmethod
    def forward(q, k, v, causal=True, scale=None):
        if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"attention expects q, k, v of shape (B, H, T, D) with matching B, H, D "
                             f"and k, v alike; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} and "
                             f"{k.shape[2]}; for one new query over a cache use causal=False")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        o, lse, probs = attention_kernel.forward_keeping_probs(q, k, v, causal, scale)
        return o, (q, k, v, o, lse, probs, causal, scale)

    @staticmethod
    def backward(g, saved):
        q, k, v, o, lse, probs, causal, scale = saved
        return attention_kernel.backward_from_probs(g, q, k, v, o, lse, probs, causal, scale)
