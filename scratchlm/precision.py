"""Mixed precision (``--set dtype=bfloat16``, GPU only): bf16 matmul inputs, fp32 everything else.

The split is llm.c's and PyTorch autocast's: the products that dominate the FLOPs take bfloat16
inputs (tensor cores run them at several times the float32/TF32 rate) and accumulate in float32
inside cuBLAS; the master weights, their gradients, the optimizer moments, layer norms, softmax,
the loss and the gradient norm stay float32. For one product Y = A B with A, B float32:

    Y = float32( bf16(A) @ bf16(B) )       dL/dA = float32( bf16(G) @ bf16(B)^T ),  dL/dB likewise

where the product of two bf16 arrays accumulates in float32 and (CuPy's, as under PyTorch's
autocast) is rounded once to bf16 on the way out, then widened (NumPy with ml_dtypes returns it in
float32 directly): each input and each result carries 8 significant
bits (relative error <= 2^-9 each), the sums are float32, and what reaches a float32 weight's
gradient buffer is widened to float32 before it is added there. What the backward keeps of a product's
input is the bf16 copy (half the memory of the activations that feed matmuls).

The bfloat16 dtype comes from ``ml_dtypes`` (the NumPy extension type JAX uses), which CuPy accepts
for bf16 arrays. UNTESTED ON A DEVICE: no GPU was available when this was written; the CPU tests
run the same code on NumPy with ml_dtypes (slow, but the same arithmetic) when it is installed.
"""
from __future__ import annotations

from . import backend
from .errors import UserError

_compute = None          # None: products in the arrays' own dtype; else the dtype their inputs are cast to


def use(dtype: str, allow_cpu: bool = False) -> None:
    """Set the precision of matrix products: "float32" (as is) or "bfloat16" (GPU; ``allow_cpu``
    for tests, where NumPy computes bf16 products slowly but exactly as described above)."""
    global _compute
    if dtype == "float32":
        _compute = None
        return
    if dtype != "bfloat16":
        raise UserError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if not backend.is_gpu() and not allow_cpu:
        raise UserError("bfloat16 is GPU-only; CPU trains in float32 (drop --set dtype=bfloat16, or train "
                        "on a GPU with --backend cupy)")
    try:
        import ml_dtypes
    except ImportError:
        raise UserError("dtype=bfloat16 needs ml_dtypes: pip install ml_dtypes") from None
    _compute = ml_dtypes.bfloat16


def compute_dtype():
    """The dtype products take their inputs in (None: their own)."""
    return _compute


def lowered(a):
    """``a`` as a product's input: cast to the compute dtype if that is set and ``a`` is float32."""
    if _compute is None or a.dtype != backend.xp.float32:
        return a
    return a.astype(_compute)


def matmul(a, b):
    """a @ b, with bf16 inputs and a float32 result under ``use("bfloat16")``; a @ b otherwise."""
    if _compute is None:
        return a @ b
    return (lowered(a) @ lowered(b)).astype(backend.xp.float32)
