"""Scaled dot-product attention, fused: softmax(Q K^T * scale + mask) V with its own backward."""
from __future__ import annotations

import math

from .. import backend
from ..kernels import attention as attention_kernel
from ..tensor import Function


class ScaledDotProductAttention(Function):
    """O = softmax(S) V,   S = scale * Q K^T  (+ -inf where a key is masked).

    q (B, H, Tq, D); k, v (B, H, Tk, D); o (B, H, Tq, D). With P = softmax(S) row by row:
        dV = P^T dO,    dP = dO V^T,
        dS = P * (dP - rowsum(dO * O))     (softmax backward; rowsum(dP * P) = rowsum(dO * O)),
        dQ = scale * dS K,    dK = scale * dS^T Q.
    Masks: ``causal`` (query i sees keys j <= i + Tk - Tq; needs Tq <= Tk) and ``blocked`` (B|1, Tq|1, Tk)
    bool, True where a key may not be seen (``kernels.attention.blocked_keys`` builds it from a
    key padding mask and an attention mask). Masked scores are exactly -inf, so their probability
    is exactly 0 and no gradient reaches a masked key. The causal mask is bottom-right aligned:
    the Tq queries are the last Tq of the Tk positions (query i sits at position Tk - Tq + i), so
    a chunk of new tokens over a filled KV cache is causal too (PyTorch's
    ``torch.nn.attention.bias.causal_lower_right``; SDPA's ``is_causal=True`` aligns top-left
    instead when Tq != Tk). With Tq == Tk it is the usual j <= i. A query row with no key left gets O = 0
    (lse = -inf): its output no longer depends on anything, so all its gradients are 0, not NaN.

    Dropout on the attention weights (``dropout_p`` > 0, as torch.nn.MultiheadAttention's):
    O = (P * M) V with M = m / (1 - p), m ~ Bernoulli(1 - p); then dV = (P * M)^T dO,
    dP = (dO V^T) * M, and delta = rowsum(dP * P). M is (B, H, Tq, Tk) and saved, so this runs
    on the reference, which materialises P anyway.

    The forward saves O and the per-row log-sum-exp of S; the backward recomputes
    P = exp(S - lse) from Q, K and lse instead of storing the (T x T) matrix -- except on the
    CPU where P is small: the batched-BLAS path (short T) has it in hand anyway, and the strip
    path (long T) keeps its strips up to ``kernels.attention.KEPT_PROBS_MAX_BYTES`` (64 MiB:
    T = 1024 at B*H = 16); then it is saved and reused. The arithmetic runs in kernels/attention.py: a plain reference that materialises
    P (readable), a tiled Numba kernel and batched-BLAS paths (CPU) and a CUDA kernel (GPU),
    chosen by the arrays' backend (masked calls on the GPU take the reference).

    ``weights_out``: a list; if given, P (B, H, Tq, Tk) (times M under dropout) is appended to
    it -- the attention weights, a side output without gradient (need_weights).
    """

    @staticmethod
    def forward(q, k, v, causal=True, scale=None, blocked=None, dropout_p=0.0, generator=None,
                weights_out=None):
        if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"attention expects q, k, v of shape (B, H, T, D) with matching B, H, D "
                             f"and k, v alike; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        batch, _, t_query, _ = q.shape
        t_key = k.shape[2]
        if causal and t_query > t_key:
            raise ValueError(f"causal attention needs at most as many queries as keys, got {t_query} "
                             f"queries and {t_key} keys (the queries are the last {t_query} positions)")
        if blocked is not None and (blocked.ndim != 3 or blocked.shape[0] not in (1, batch)
                                    or blocked.shape[1] not in (1, t_query) or blocked.shape[2] != t_key):
            raise ValueError(f"attention mask 'blocked' must be (B or 1, Tq or 1, Tk) = ({batch}, {t_query}, "
                             f"{t_key}) at most, got {tuple(blocked.shape)}")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        dropout_scale = None
        if dropout_p > 0.0:
            generator = generator or backend.default_generator()
            keep = generator.random(q.shape[:3] + (t_key,), dtype=q.dtype) >= dropout_p
            dropout_scale = keep * q.dtype.type(1.0 / (1.0 - dropout_p))        # M (B, H, Tq, Tk)
            o, lse, probs = attention_kernel.forward_reference(q, k, v, causal, scale, blocked,
                                                               dropout_scale, keep_probs=True)
        else:
            o, lse, probs = attention_kernel.forward_keeping_probs(q, k, v, causal, scale, blocked)
        if weights_out is not None:
            weights = attention_kernel.attention_weights(q, k, lse, probs, causal, scale, blocked)
            weights_out.append(weights * dropout_scale if dropout_scale is not None else weights)
        return o, (q, k, v, o, lse, probs, causal, scale, blocked, dropout_scale)

    @staticmethod
    def backward(g, saved):
        q, k, v, o, lse, probs, causal, scale, blocked, dropout_scale = saved
        if dropout_scale is not None:
            return attention_kernel.backward_reference(g, q, k, v, o, lse, causal, scale, blocked, dropout_scale)
        return attention_kernel.backward_from_probs(g, q, k, v, o, lse, probs, causal, scale, blocked)
