"""Scaled dot-product attention, rung 1: the NumPy/CuPy reference (``backend.xp``) -- the truth
that tests and readers trust; it materialises the (Tq, Tk) score matrix, so its memory grows as T^2.

Shapes: q (B, H, Tq, D); k, v (B, H, Tk, D); o (B, H, Tq, D); lse (B, H, Tq). Usually Tq == Tk == T.

Forward, for one (batch, head) and query row i:

    s_ij = scale * q_i . k_j                  for the keys j that row i may see
    lse_i = log sum_j exp(s_ij)               (log-sum-exp of the row)
    p_ij = exp(s_ij - lse_i)                  (softmax; rows sum to 1)
    o_i = sum_j p_ij v_j

Which keys a row may see: causal -- j <= i + (Tk - Tq) (bottom-right aligned, so a query block of
the last Tq positions against a KV cache of Tk keys is causal too; with Tq == Tk this is j <= i);
and ``blocked`` (B|1, Tq|1, Tk) bool, True where a key is masked (``blocked_keys`` builds it from
PyTorch's key padding mask (B, Tk) and boolean attention mask (Tq, Tk)). Masked scores are -inf,
never a finite constant, so masked keys get exactly zero weight; a row with no key left gets
o_i = 0 and lse_i = -inf (not NaN).

Backward, given dO = dL/do, with P recomputed from q, k and the saved lse:

    dV = P^T dO                                (o = P V)
    dP = dO V^T
    dS = P * (dP - delta),  delta_i = sum_j p_ij dP_ij = dO_i . o_i    (softmax backward)
    dQ = scale dS K,  dK = scale dS^T Q       (s = scale Q K^T)
"""
from __future__ import annotations

import math

from scratchlm import backend


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ============================================================== 1. reference (the truth)

def blocked_keys(key_padding_mask=None, attn_mask=None):
    """One boolean "blocked" mask from PyTorch's two (True = this key may not be seen), or None.

    key_padding_mask (B, Tk): True marks a padded key of that batch row;
    attn_mask (Tq, Tk): True forbids query i to see key j, for every batch row.
    -> (B or 1, Tq or 1, Tk), broadcast over heads: (B, 1, Tk), (1, Tq, Tk) or (B, Tq, Tk).
    """
    if key_padding_mask is None and attn_mask is None:
        return None
    if attn_mask is None:
        return key_padding_mask[:, None, :]
    if key_padding_mask is None:
        return attn_mask[None]
    return key_padding_mask[:, None, :] | attn_mask[None]


def _masked_scores(q, k, causal: bool, scale: float, blocked=None):
    """S = scale q k^T (B, H, Tq, Tk), exactly -inf where causality or ``blocked`` forbids a key."""
    xp = backend.xp
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    allowed = _causal_allowed(q.shape[-2], k.shape[-2]) if causal else None     # (Tq, Tk)
    if blocked is not None:
        free = ~blocked[:, None]                                          # (B|1, 1, Tq|1, Tk)
        allowed = free if allowed is None else allowed & free
    if allowed is not None:
        scores = xp.where(allowed, scores, xp.asarray(-xp.inf, dtype=scores.dtype))
    return scores


def _row_log_sum_exp(scores):
    """lse_i = log sum_j exp(s_ij) of each row (B, H, Tq); -inf for a row whose every score is -inf.

    The row max is shifted out first; a fully masked row has max -inf, so it is shifted by 0
    instead (exp(-inf) = 0, sum 0, lse -inf) rather than by -inf (which would give NaN).
    """
    xp = backend.xp
    row_max = xp.max(scores, axis=-1, keepdims=True)                      # (B, H, Tq, 1)
    seen = row_max > -xp.inf
    row_max = xp.where(seen, row_max, xp.zeros_like(row_max))
    total = xp.sum(xp.exp(scores - row_max), axis=-1, keepdims=True)      # 0 on a fully masked row
    lse = row_max + xp.log(xp.where(seen, total, xp.ones_like(total)))
    return xp.where(seen, lse, xp.asarray(-xp.inf, dtype=lse.dtype))[..., 0]


def _probs_from_lse(scores, lse):
    """P = exp(S - lse): masked keys (-inf) get exactly 0, and so does every key of a fully
    masked row (lse = -inf is replaced by 0 there, and its scores are all -inf)."""
    xp = backend.xp
    lse = xp.where(lse > -xp.inf, lse, xp.zeros_like(lse))
    return xp.exp(scores - lse[..., None])


def forward_reference(q, k, v, causal: bool, scale: float | None = None, blocked=None,
                      dropout_scale=None, keep_probs: bool = False):
    """o = softmax(scale q k^T + mask) v and lse = per-row log-sum-exp; materialises (Tq, Tk).

    q (B, H, Tq, D), k and v (B, H, Tk, D) -> o (B, H, Tq, D), lse (B, H, Tq).
    ``blocked`` (B|1, Tq|1, Tk) bool: keys a query may not see (``blocked_keys``). A query row
    that sees no key gets o = 0 and lse = -inf.
    ``dropout_scale`` (B, H, Tq, Tk): m / (1 - p) with m ~ Bernoulli(1 - p), multiplied into P
    before P V (dropout on the attention weights, as torch.nn.MultiheadAttention); only this
    rung takes it. ``keep_probs=True`` also returns P (before dropout).
    """
    xp = backend.xp
    scale = _default_scale(q, scale)
    scores = _masked_scores(q, k, causal, scale, blocked)               # (B, H, Tq, Tk)
    lse = _row_log_sum_exp(scores)                                       # (B, H, Tq)
    probs = _probs_from_lse(scores, lse)                                 # (B, H, Tq, Tk)
    out = xp.matmul(probs if dropout_scale is None else probs * dropout_scale, v)   # (B, H, Tq, D)
    if keep_probs:
        return out, lse, probs
    return out, lse


def backward_reference(do, q, k, v, o, lse, causal: bool, scale: float | None = None, blocked=None,
                       dropout_scale=None):
    """(dq, dk, dv) from do = dL/do, recomputing P = exp(scale q k^T + mask - lse).

    With dropout, o = (P * M) V for M = ``dropout_scale``: dV = (P * M)^T dO, dP = (dO V^T) * M,
    and delta_i = sum_j p_ij dP_ij (no longer dO_i . o_i, which holds only without dropout).
    """
    xp = backend.xp
    scale = _default_scale(q, scale)
    scores = _masked_scores(q, k, causal, scale, blocked)               # (B, H, Tq, Tk)
    probs = _probs_from_lse(scores, lse)                                 # P, masked -> exactly 0
    dprobs = xp.matmul(do, xp.swapaxes(v, -1, -2))                      # dO V^T   (B, H, Tq, Tk)
    if dropout_scale is None:
        dv = xp.matmul(xp.swapaxes(probs, -1, -2), do)                  # P^T dO   (B, H, Tk, D)
        delta = xp.sum(do * o, axis=-1, keepdims=True)                   # rowsum(dO * O) (B, H, Tq, 1)
    else:
        dv = xp.matmul(xp.swapaxes(probs * dropout_scale, -1, -2), do)  # (P M)^T dO
        dprobs = dprobs * dropout_scale                                  # dL/dP through P * M
        delta = xp.sum(dprobs * probs, axis=-1, keepdims=True)           # rowsum(dP * P)
    dscores = probs * (dprobs - delta)                                   # dS
    dq = xp.matmul(dscores, k) * scale                                   # (B, H, Tq, D)
    dk = xp.matmul(xp.swapaxes(dscores, -1, -2), q) * scale              # (B, H, Tk, D)
    return dq, dk, dv


def probs_reference(q, k, lse, causal: bool, scale: float | None = None, blocked=None):
    """P (B, H, Tq, Tk) = exp(scale q k^T + mask - lse): the attention weights, rebuilt from the
    saved lse (for need_weights on a rung that never materialised them)."""
    scale = _default_scale(q, scale)
    return _probs_from_lse(_masked_scores(q, k, causal, scale, blocked), lse)


def _causal_allowed(t_query: int, t_key: int):
    """(Tq, Tk) bool: query i may see key j iff j <= i + (Tk - Tq)."""
    xp = backend.xp
    offset = t_key - t_query
    return xp.arange(t_key)[None, :] <= xp.arange(t_query)[:, None] + offset
