"""AdamW's parameter update: the reference, a fused Numba kernel, and dispatch.

Shapes: param, grad, exp_avg, exp_avg_sq all the same shape (any; a weight is (C, 4C), a bias
(C,)). Updated in place: param, exp_avg (m), exp_avg_sq (v). ``step`` is t, the 1-based count
of updates this parameter has had *including* this one.

PyTorch's AdamW (Loshchilov & Hutter, decoupled weight decay), in the order it computes:

    p  <- p * (1 - lr * wd)                       decay first, and not through the moments
    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g * g
    p  <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The last line is p - lr * m_hat / (sqrt(v_hat) + eps) with the bias corrections
m_hat = m / (1 - beta1^t) and v_hat = v / (1 - beta2^t), rearranged as PyTorch does so that eps
is added to sqrt(v_hat) (not to sqrt(v)) and no array is divided twice.

The reference makes five temporaries per call; the Numba kernel reads each element of the four
arrays once and writes three, which is what makes it worth having (the update is memory-bound).
Both do every per-element operation in the array's dtype, in the same order, with the scalars
(lr * wd, bias corrections, ...) computed once in Python float64 and rounded to that dtype, so
the two agree to the last bit or so in float32 and float64 alike.
"""
from __future__ import annotations

import math

import numpy as np

from scratchlm import backend
from scratchlm.kernels import njit, numba_available, pick


def _scalars(lr, beta1, beta2, eps, weight_decay, step):
    """The per-call constants, in Python float64: (decay, beta1, 1-beta1, beta2, 1-beta2,
    step_size, sqrt of the second bias correction, eps)."""
    if step < 1:
        raise ValueError(f"adamw step counts from 1 (the update being made), got {step}")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
            lr / bias_correction1, math.sqrt(bias_correction2), eps)


# ============================================================== 1. reference (the truth)

def step_reference(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update in place, written with whole-array ``backend.xp`` operations."""
    xp = backend.xp
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps = _scalars(
        lr, beta1, beta2, eps, weight_decay, step)
    # Python floats mixed with float32 arrays stay float32 (NumPy 2 / CuPy "weak" scalars).
    if weight_decay != 0:
        param *= decay                                    # p <- p (1 - lr wd)
    exp_avg *= beta1                                      # m <- beta1 m + (1 - beta1) g
    exp_avg += one_minus_beta1 * grad
    exp_avg_sq *= beta2                                   # v <- beta2 v + (1 - beta2) g g
    exp_avg_sq += (one_minus_beta2 * grad) * grad
    denom = xp.sqrt(exp_avg_sq) / bc2_sqrt + eps          # sqrt(v_hat) + eps
    param -= step_size * (exp_avg / denom)                # p <- p - lr m_hat / (sqrt(v_hat) + eps)


# ============================================================== 2. Numba (CPU)

# error_model="numpy": IEEE division without a per-element zero check, so the loop vectorises
@njit(cache=True, error_model="numpy")
def _adamw_kernel(param, grad, exp_avg, exp_avg_sq, decay, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, step_size, bc2_sqrt, eps):
    """One pass over flat (N,) arrays; the scalars arrive already in the arrays' dtype, so every
    operation below is float32 for float32 arrays (as in the reference), float64 for float64."""
    for i in range(param.shape[0]):
        g = grad[i]
        p = param[i] * decay                              # exact when decay == 1 (wd == 0)
        m = exp_avg[i] * beta1 + one_minus_beta1 * g
        v = exp_avg_sq[i] * beta2 + (one_minus_beta2 * g) * g
        denom = np.sqrt(v) / bc2_sqrt + eps
        param[i] = p - step_size * (m / denom)
        exp_avg[i] = m
        exp_avg_sq[i] = v


def _numba_can_run(param, grad, exp_avg, exp_avg_sq) -> bool:
    """The kernel writes through flat views, so the three updated arrays must be C-contiguous
    (reshape(-1) of anything else would be a copy and the update would be lost)."""
    return (numba_available() and param.dtype in (np.float32, np.float64)
            and exp_avg.dtype == param.dtype and exp_avg_sq.dtype == param.dtype
            and all(a.flags.c_contiguous for a in (param, exp_avg, exp_avg_sq))
            and grad.shape == param.shape)


def step_numba(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """Same contract as ``step_reference``, one fused pass; falls back to it for arrays the
    kernel cannot update in place (non-contiguous, mixed or non-float dtypes)."""
    if not _numba_can_run(param, grad, exp_avg, exp_avg_sq):
        step_reference(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
        return
    dtype = param.dtype.type
    scalars = [dtype(s) for s in _scalars(lr, beta1, beta2, eps, weight_decay, step)]
    flat_grad = np.asarray(grad, dtype=param.dtype, order="C").reshape(-1)
    _adamw_kernel(param.reshape(-1), flat_grad, exp_avg.reshape(-1), exp_avg_sq.reshape(-1), *scalars)


# ============================================================== 3. CUDA

# The CUDA rung is ``kernels/cuda.py``'s ``adamw_step``: one ElementwiseKernel launch per
# parameter that reads p, g, m, v once and writes p, m, v once.


# ============================================================== dispatch

def step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update in place on the fastest rung for ``param`` (CUDA, Numba, reference)."""
    rung = pick(param, "adamw")
    if rung == "cuda":
        from . import cuda   # one ElementwiseKernel pass (kernels/cuda.py)
        cuda.adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
    elif rung == "numba":
        step_numba(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
    else:
        step_reference(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
