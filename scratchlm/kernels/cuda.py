"""CUDA rung of the kernel ladder: CuPy launch wrappers around the sources in ``kernels/*.cu``.

Each function here takes and returns CuPy arrays and has the signature of its dispatcher in
``scratchlm/kernels/<op>.py`` (see ``scratchlm/kernels/__init__.py``); the NumPy references beside
those dispatchers are what the tests compare these kernels with (tests/test_cuda_kernels.py), and
bench/cuda_kernels.py validates then times each one against PyTorch.

* attention.cu: FlashAttention-2 style forward (online softmax, only the per-row log-sum-exp kept)
  and backward (delta = rowsum(dO * O); one block per key tile accumulating dK, dV and adding dQ
  atomically), float32, head dim D <= 128 (padded to a multiple of 32 inside the kernel).
* rowops.cu: layer norm (a warp per row; optionally with the residual add before it and the
  residual's gradient added in its backward: the fused op, NEVER RUN ON A DEVICE), softmax + cross-entropy (a block per row, one read for
  the log-sum-exp, one pass writing dlogits), embedding backward (atomicAdd scatter); float32/64.
* elementwise.cu: GELU forward/backward (exact and tanh), 16-byte vector loads; float32/64.
* AdamW is one ``cupy.ElementwiseKernel`` pass over each parameter and its two moments.

Sources are compiled by NVRTC on first use (``cupy.RawModule``, ``-std=c++17``), one module per
source and template choice, cached here and on disk by CuPy. Importing this module never needs CuPy;
calling a function without it raises ``CudaUnavailable``.

Non-determinism: dQ of attention and embedding_backward add with atomics, so their last bits can
vary from run to run; every other kernel is deterministic.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from scratchlm.launches import Counted

try:
    import cupy as cp
except ImportError:   # CPU-only installs: the functions below raise CudaUnavailable when called
    cp = None

__all__ = [
    "CudaUnavailable", "available",
    "attention_forward", "attention_backward",
    "layer_norm_forward", "layer_norm_backward", "add_layer_norm_forward", "add_layer_norm_backward",
    "gelu_forward", "gelu_backward",
    "cross_entropy_forward", "cross_entropy_backward",
    "embedding_backward", "adamw_step", "bias_gelu_forward", "bias_gelu_backward",
]

SOURCE_DIR = Path(__file__).resolve().parent
COMPILE_OPTIONS = ("-std=c++17",)

# Attention tiling, mirrored from attention.cu (SLM_BR, SLM_BC, SLM_THREADS).
ATTENTION_TILE_Q = 64
ATTENTION_TILE_K = 64
ATTENTION_THREADS = 128
ATTENTION_MAX_HEAD_DIM = 128


class CudaUnavailable(RuntimeError):
    """The CUDA kernels were called where CuPy (or a GPU) is missing."""


def available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:   # CUDARuntimeError without a driver
        return False


def _require_cupy() -> None:
    if cp is None:
        raise CudaUnavailable("scratchlm's CUDA kernels need CuPy: pip install 'scratchlm[cuda12]' "
                              "(or [cuda13]), or use the numpy backend")


@functools.lru_cache(maxsize=None)
def _module(source: str, name_expressions: tuple[str, ...]):
    """The compiled RawModule for ``kernels/<source>`` with these template instantiations."""
    code = (SOURCE_DIR / source).read_text()
    return cp.RawModule(code=code, options=COMPILE_OPTIONS, name_expressions=name_expressions)


def _kernel(source: str, name: str):
    # counted as a "raw kernels" launch while scratchlm.launches.count_launches is active
    return Counted(_module(source, (name,)).get_function(name), "raw kernels")


def _ctype(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"CUDA kernels take float32 or float64 arrays, got {dtype}")


def _scalar(value, dtype):
    return np.dtype(dtype).type(value)


# ============================================================================ attention

def _padded_head_dim(D: int) -> int:
    return 32 * ((D + 31) // 32)


def attention_forward_smem(DP: int) -> int:
    """Dynamic shared memory of attention_forward_f32<DP>: Q, K, V tiles; the P tile reuses K's space."""
    k_region = max(ATTENTION_TILE_K * (DP + 4), ATTENTION_TILE_Q * (ATTENTION_TILE_K + 8))
    return 4 * (2 * ATTENTION_TILE_Q * (DP + 4) + k_region)


def attention_backward_smem(DP: int) -> int:
    """Dynamic shared memory of attention_backward_dkdv_f32<DP>: K, V, Q, dO tiles, P^T (later dS),
    dS^T, and the per-query lse and delta."""
    return 4 * (4 * ATTENTION_TILE_Q * (DP + 4) + 2 * ATTENTION_TILE_Q * (ATTENTION_TILE_K + 8)
                + 2 * ATTENTION_TILE_Q)


@functools.lru_cache(maxsize=None)
def _attention_kernel(name: str, DP: int, smem: int):
    kernel = _kernel("attention.cu", f"{name}<{DP}>")
    if smem > 48 * 1024:          # above 48 KiB a kernel must opt in to more shared memory
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


def _check_attention(q, k, v):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"attention {name} must be (B, H, T, D), got shape {a.shape}")
        if a.dtype != np.float32:
            raise TypeError(f"the CUDA attention kernel takes float32, got {name}.dtype={a.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
    D = q.shape[3]
    if not 1 <= D <= ATTENTION_MAX_HEAD_DIM:
        raise ValueError(f"the CUDA attention kernel supports head dim 1..{ATTENTION_MAX_HEAD_DIM}, got {D}")


def attention_forward(q, k, v, causal: bool, scale: float | None = None):
    """o = softmax(scale q k^T + mask) v and lse = per-row log-sum-exp, without the (T, T) matrix.

    q (B, H, Tq, D), k and v (B, H, Tk, D), float32 -> o (B, H, Tq, D), lse (B, H, Tq).
    Causal: query i sees keys j <= i + Tk - Tq; masked scores are -inf, fully masked tiles skipped.
    """
    _require_cupy()
    _check_attention(q, k, v)
    q, k, v = (cp.ascontiguousarray(a) for a in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = cp.empty_like(q)
    lse = cp.empty((B, H, Tq), dtype=cp.float32)
    if o.size == 0:
        return o, lse
    DP = _padded_head_dim(D)
    smem = attention_forward_smem(DP)
    kernel = _attention_kernel("attention_forward_f32", DP, smem)
    grid = ((Tq + ATTENTION_TILE_Q - 1) // ATTENTION_TILE_Q, B * H)
    kernel(grid, (ATTENTION_THREADS,),
           (q, k, v, o, lse, np.int32(Tq), np.int32(Tk), np.int32(D), np.float32(scale), np.int32(causal)),
           shared_mem=smem)
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal: bool, scale: float | None = None):
    """(dq, dk, dv) of attention from do = dL/do, recomputing P tile by tile from lse.

    dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q.
    """
    _require_cupy()
    _check_attention(q, k, v)
    if do.shape != q.shape or o.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"attention backward shapes do not match: do {do.shape}, o {o.shape}, "
                         f"lse {lse.shape}, q {q.shape}")
    q, k, v = (cp.ascontiguousarray(a) for a in (q, k, v))
    do, o, lse = (cp.ascontiguousarray(a, dtype=cp.float32) for a in (do, o, lse))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = cp.zeros_like(q)                   # accumulated atomically by the key-tile blocks
    dk = cp.empty_like(k)
    dv = cp.empty_like(v)
    if q.size == 0 or k.size == 0:
        return dq, cp.zeros_like(k), cp.zeros_like(v)

    rows = B * H * Tq
    delta = cp.empty((B, H, Tq), dtype=cp.float32)
    _kernel("attention.cu", "attention_backward_delta_f32")(
        ((rows + 7) // 8,), (256,), (do, o, delta, np.int64(rows), np.int32(D)))

    DP = _padded_head_dim(D)
    smem = attention_backward_smem(DP)
    kernel = _attention_kernel("attention_backward_dkdv_f32", DP, smem)
    grid = ((Tk + ATTENTION_TILE_K - 1) // ATTENTION_TILE_K, B * H)
    kernel(grid, (ATTENTION_THREADS,),
           (q, k, v, do, lse, delta, dq, dk, dv, np.int32(Tq), np.int32(Tk), np.int32(D),
            np.float32(scale), np.int32(causal)),
           shared_mem=smem)
    return dq, dk, dv


# ============================================================================ layer norm

_ROWS_PER_BLOCK = 8          # one warp per row, 256 threads


def _check_rows(a, what: str) -> None:
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, C); got shape {a.shape} (reshape to (-1, C) first)")


def layer_norm_forward(x, weight, bias, eps: float):
    """y = (x - mean) * rstd * weight + bias over the last axis; x (N, C) -> y, mean (N,), rstd (N,)."""
    return _layer_norm_rows(x, None, weight, bias, eps)[1:]


def add_layer_norm_forward(x, residual, weight, bias, eps: float):
    """s = x + residual, y = layer norm of s, in one row pass: x, residual (N, C) -> s, y, mean, rstd.
    NEVER RUN ON A DEVICE (written without one; kernels/layer_norm.py's add_forward is the reference)."""
    return _layer_norm_rows(x, residual, weight, bias, eps)


def _layer_norm_rows(x, residual, weight, bias, eps: float):
    """(s or None, y, mean, rstd): the layer-norm row kernel, on x or (residual given) on x + residual."""
    _require_cupy()
    _check_rows(x, "layer_norm x")
    x = cp.ascontiguousarray(x)
    N, C = x.shape
    t = _ctype(x.dtype)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_layer_norm: residual has shape {residual.shape}, x has {x.shape}")
        residual = cp.ascontiguousarray(residual, dtype=x.dtype)
    weight = None if weight is None else cp.ascontiguousarray(weight, dtype=x.dtype)
    bias = None if bias is None else cp.ascontiguousarray(bias, dtype=x.dtype)
    s = None if residual is None else cp.empty_like(x)
    y = cp.empty_like(x)
    mean = cp.empty((N,), dtype=x.dtype)
    rstd = cp.empty((N,), dtype=x.dtype)
    if N == 0:
        return s, y, mean, rstd
    null = np.uint64(0)   # a null pointer: no affine part / no residual
    _kernel("rowops.cu", f"layer_norm_forward<{t}>")(
        ((N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (32 * _ROWS_PER_BLOCK,),
        (x, null if residual is None else residual, null if weight is None else weight,
         null if bias is None else bias, null if s is None else s, y, mean, rstd,
         np.int64(N), np.int32(C), _scalar(eps, x.dtype)))
    return s, y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd):
    """(dx, dweight, dbias): dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy * weight;
    dweight = sum_n dy xhat, dbias = sum_n dy (both None when weight is None)."""
    return add_layer_norm_backward(None, dy, x, weight, mean, rstd)


def add_layer_norm_backward(ds, dy, s, weight, mean, rstd):
    """(dL/ds, dweight, dbias) of the fused residual add + layer norm: ``ds`` (N, C), the gradient
    reaching s directly (None: none), is added to the layer norm's dx inside the dx kernel.
    With ds None this is the plain layer norm's backward (``layer_norm_backward``).
    The ds path was NEVER RUN ON A DEVICE."""
    _require_cupy()
    x = s
    _check_rows(x, "layer_norm x")
    x = cp.ascontiguousarray(x)
    N, C = x.shape
    t = _ctype(x.dtype)
    dy = cp.ascontiguousarray(dy, dtype=x.dtype)
    ds = None if ds is None else cp.ascontiguousarray(ds, dtype=x.dtype)
    mean = cp.ascontiguousarray(mean, dtype=x.dtype)
    rstd = cp.ascontiguousarray(rstd, dtype=x.dtype)
    weight = None if weight is None else cp.ascontiguousarray(weight, dtype=x.dtype)
    dx = cp.empty_like(x)
    null = np.uint64(0)
    if N > 0:
        _kernel("rowops.cu", f"layer_norm_backward_dx<{t}>")(
            ((N + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK,), (32 * _ROWS_PER_BLOCK,),
            (dy, null if ds is None else ds, x, null if weight is None else weight, mean, rstd, dx,
             np.int64(N), np.int32(C)))
    if weight is None:
        return dx, None, None
    # Parameter gradients: per-chunk partial column sums, then one deterministic sum over chunks.
    rows_per_chunk = max(64, -(-N // 128))
    n_chunks = max(1, -(-N // rows_per_chunk))
    partial = cp.zeros((2, n_chunks, C), dtype=x.dtype)
    if N > 0:
        _kernel("rowops.cu", f"layer_norm_backward_params<{t}>")(
            ((C + 31) // 32, n_chunks), (32, 8),
            (dy, x, mean, rstd, partial, np.int64(N), np.int32(C), np.int32(rows_per_chunk)))
    sums = partial.sum(axis=1)
    return dx, sums[0], sums[1]


# ============================================================================ GELU

def _aligned_contiguous(a, dtype):
    """``a`` as a C-contiguous array of ``dtype`` whose data starts on a 16-byte boundary
    (the vectorised kernels load 16-byte packs; an offset view is copied)."""
    a = cp.ascontiguousarray(a, dtype=dtype)
    return a if a.data.ptr % 16 == 0 else a.copy()


def _elementwise_grid(n: int, dtype) -> tuple[int]:
    packs = max(1, n // (16 // np.dtype(dtype).itemsize))
    return (min((packs + 255) // 256, 1 << 20),)


def _check_approximate(approximate: str) -> int:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return int(approximate == "tanh")


def gelu_forward(x, approximate: str = "none"):
    """y = x Phi(x) (exact, erf) or its tanh approximation; one pass, 16-byte loads (elementwise.cu)."""
    _require_cupy()
    tanh_form = _check_approximate(approximate)
    t = _ctype(x.dtype)
    x = _aligned_contiguous(x, x.dtype)
    y = cp.empty_like(x)
    if x.size:
        _kernel("elementwise.cu", f"gelu_forward<{t}>")(
            _elementwise_grid(x.size, x.dtype), (256,), (x, y, np.int64(x.size), np.int32(tanh_form)))
    return y


def gelu_backward(dy, x, approximate: str = "none"):
    """dx = dy * dGELU/dx, recomputed from x (nothing else is saved)."""
    _require_cupy()
    tanh_form = _check_approximate(approximate)
    t = _ctype(x.dtype)
    if dy.shape != x.shape:
        raise ValueError(f"gelu backward: dy shape {dy.shape} differs from x shape {x.shape}")
    x = _aligned_contiguous(x, x.dtype)
    dy = _aligned_contiguous(dy, x.dtype)
    dx = cp.empty_like(x)
    if x.size:
        _kernel("elementwise.cu", f"gelu_backward<{t}>")(
            _elementwise_grid(x.size, x.dtype), (256,), (dy, x, dx, np.int64(x.size), np.int32(tanh_form)))
    return dx


# ============================================================================ cross-entropy

def cross_entropy_forward(logits, targets, ignore_index: int = -100):
    """(loss, lse): loss = mean over counted rows of lse[n] - logits[n, targets[n]], 0-d; lse (N,).

    A counted target outside [0, V) makes the loss NaN (checking on the host would cost a sync).
    """
    _require_cupy()
    _check_rows(logits, "cross_entropy logits")
    logits = cp.ascontiguousarray(logits)
    N, V = logits.shape
    t = _ctype(logits.dtype)
    targets = cp.ascontiguousarray(targets, dtype=cp.int64)
    lse = cp.empty((N,), dtype=logits.dtype)
    row_loss = cp.empty((N,), dtype=logits.dtype)
    if N > 0:
        _kernel("rowops.cu", f"cross_entropy_forward<{t}>")(
            (N,), (512,), (logits, targets, lse, row_loss, np.int32(V), np.int64(ignore_index)))
    n_counted = cp.count_nonzero(targets != ignore_index)
    loss = row_loss.sum() / cp.maximum(n_counted, 1).astype(logits.dtype)
    return loss.astype(logits.dtype), lse


def cross_entropy_backward(dloss, logits, lse, targets, ignore_index: int = -100):
    """dlogits = dloss / n_counted * (softmax(logits) - onehot(targets)); ignored rows are 0."""
    _require_cupy()
    _check_rows(logits, "cross_entropy logits")
    logits = cp.ascontiguousarray(logits)
    N, V = logits.shape
    t = _ctype(logits.dtype)
    targets = cp.ascontiguousarray(targets, dtype=cp.int64)
    lse = cp.ascontiguousarray(lse, dtype=logits.dtype)
    n_counted = cp.maximum(cp.count_nonzero(targets != ignore_index), 1)
    coef = (cp.asarray(dloss, dtype=logits.dtype) / n_counted.astype(logits.dtype)).reshape(1)
    dlogits = cp.empty_like(logits)
    if N > 0 and V > 0:
        threads = 256
        _kernel("rowops.cu", f"cross_entropy_backward<{t}>")(
            ((V + 4 * threads - 1) // (4 * threads), N), (threads,),
            (logits, lse, targets, coef, dlogits, np.int32(V), np.int64(ignore_index)))
    return dlogits


# ============================================================================ embedding

def embedding_backward(dout, idx, vocab_size: int):
    """dweight (V, C) with dweight[idx[n]] += dout[n] for every n (repeats add up)."""
    _require_cupy()
    _check_rows(dout, "embedding dout")
    dout = cp.ascontiguousarray(dout)
    N, C = dout.shape
    t = _ctype(dout.dtype)
    idx = cp.ascontiguousarray(idx, dtype=cp.int64).reshape(-1)
    if idx.shape[0] != N:
        raise ValueError(f"embedding backward: {idx.shape[0]} ids for {N} gradient rows")
    dweight = cp.zeros((vocab_size, C), dtype=dout.dtype)
    if N > 0 and C > 0:
        threads = min(256, 32 * ((C + 31) // 32))
        _kernel("rowops.cu", f"embedding_backward<{t}>")(
            (N, (C + threads - 1) // threads), (threads,), (dout, idx, dweight, np.int32(C)))
    return dweight


# ============================================================================ bias + GELU (fused)
# UNTESTED ON A DEVICE: written without a GPU; tests/test_cuda_kernels.py-style checks against the
# NumPy path (ops/fused.py) are what a GPU session should run first.

_GELU_OF_H = {
    # h = x + b; y = gelu(h); dgelu = dy/dh
    "none": ("T y_ = (T)0.5 * h * ((T)1 + erf(h * (T)0.70710678118654752));",
             "T cdf = (T)0.5 * ((T)1 + erf(h * (T)0.70710678118654752));"
             "T dgelu = cdf + h * exp((T)-0.5 * h * h) * (T)0.39894228040143268;"),
    "tanh": ("T t = tanh((T)0.79788456080286536 * (h + (T)0.044715 * h * h * h));"
             "T y_ = (T)0.5 * h * ((T)1 + t);",
             "T t = tanh((T)0.79788456080286536 * (h + (T)0.044715 * h * h * h));"
             "T dgelu = (T)0.5 * ((T)1 + t) + (T)0.5 * h * ((T)1 - t * t) * (T)0.79788456080286536"
             " * ((T)1 + (T)3 * (T)0.044715 * h * h);"),
}


@functools.lru_cache(maxsize=None)
def _bias_gelu_kernels(approximate: str):
    forward_body, backward_body = _GELU_OF_H[approximate]
    forward = cp.ElementwiseKernel("T x, T b", "T y", "T h = x + b;" + forward_body + "y = y_;",
                                   f"scratchlm_bias_gelu_forward_{approximate}")
    backward = cp.ElementwiseKernel("T g, T x, T b", "T dh", "T h = x + b;" + backward_body + "dh = g * dgelu;",
                                    f"scratchlm_bias_gelu_backward_{approximate}")
    return Counted(forward, "raw kernels"), Counted(backward, "raw kernels")


def bias_gelu_forward(x, bias, approximate: str = "none"):
    """y = gelu(x + bias) in one elementwise pass (bias (C,) broadcast over x (..., C))."""
    _require_cupy()
    _check_approximate(approximate)
    return _bias_gelu_kernels(approximate)[0](x, bias)


def bias_gelu_backward(g, x, bias, approximate: str = "none"):
    """dL/dh = g * gelu'(x + bias), h recomputed; the caller sums it over rows for dL/dbias."""
    _require_cupy()
    _check_approximate(approximate)
    return _bias_gelu_kernels(approximate)[1](g, x, bias)


# ============================================================================ AdamW

@functools.lru_cache(maxsize=None)
def _adamw_kernel():
    # PyTorch's AdamW, one pass: p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    # p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps). Host scalars arrive as float64.
    return Counted(cp.ElementwiseKernel(
        "T grad, float64 decay, float64 beta1, float64 one_minus_beta1, float64 beta2, "
        "float64 one_minus_beta2, float64 step_size, float64 bc2_sqrt, float64 eps",
        "T param, T exp_avg, T exp_avg_sq",
        "T g = grad;"
        "T m = (T)beta1 * exp_avg + (T)one_minus_beta1 * g;"
        "T v = (T)beta2 * exp_avg_sq + (T)one_minus_beta2 * g * g;"
        "exp_avg = m; exp_avg_sq = v;"
        "T denom = sqrt(v) / (T)bc2_sqrt + (T)eps;"
        "param = param * (T)decay - (T)step_size * (m / denom);",
        "scratchlm_adamw_step"), "raw kernels")


def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW update in place on param, exp_avg, exp_avg_sq (PyTorch's, with bias correction)."""
    _require_cupy()
    if step < 1:
        raise ValueError(f"adamw step counts from 1 (the update being made), got {step}")
    _ctype(param.dtype)
    for name, a in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if a.shape != param.shape:
            raise ValueError(f"adamw {name} shape {a.shape} differs from param shape {param.shape}")
    if not (param.flags.c_contiguous and exp_avg.flags.c_contiguous and exp_avg_sq.flags.c_contiguous):
        raise ValueError("adamw updates in place and needs C-contiguous param and moments")
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    _adamw_kernel()(grad.astype(param.dtype, copy=False), 1.0 - lr * weight_decay, beta1, 1.0 - beta1,
                    beta2, 1.0 - beta2, lr / bias_correction1, math.sqrt(bias_correction2), eps,
                    param, exp_avg, exp_avg_sq)
