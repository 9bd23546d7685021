"""Fast paths for the hot ops, each beside the plain reference it must match.

Layout (a numbered ladder, as in llm.c's dev/cuda): every module here holds

1. ``*_reference``: plain array code on ``backend.xp`` -- the truth that tests and readers trust;
2. ``*_numba``: a Numba ``njit`` kernel for NumPy arrays on the CPU;
3. a CUDA version (``kernels/cuda.py`` + ``kernels/*.cu``) for CuPy arrays;

and one dispatching entry point per direction (e.g. ``attention.forward`` / ``attention.backward``)
that picks: CuPy arrays -> CUDA, NumPy arrays with Numba importable -> Numba, otherwise the
reference. ``use_reference(True)`` or the environment variable ``SCRATCHLM_KERNELS=reference``
forces the references everywhere (for teaching and debugging). ``force_rung("attention", "tiled")``
(a context manager) pins one kernel to one rung, so a test can run every rung, including paths the
dispatcher would not choose at that size, and the dispatcher cannot route around it.

Signatures (arrays are backend arrays; shapes use B, H, T, D, N, C, V):

attention.forward(q, k, v, causal: bool, scale: float) -> (o, lse)
    q, k, v, o: (B, H, T, D); lse: (B, H, T), log-sum-exp of each query row's scaled scores.
attention.backward(do, q, k, v, o, lse, causal, scale) -> (dq, dk, dv)
layer_norm.forward(x, weight, bias, eps) -> (y, mean, rstd)       x, y: (N, C); mean, rstd: (N,)
    weight/bias may be None (no affine part).
layer_norm.backward(dy, x, weight, mean, rstd) -> (dx, dweight, dbias)   dweight/dbias None if weight is None
gelu.forward(x, approximate: str) -> y                 approximate in {"none", "tanh"}
gelu.backward(dy, x, approximate) -> dx
cross_entropy.forward(logits, targets, ignore_index) -> (loss, lse)
    logits: (N, V); targets: (N,) int; loss: 0-d mean over non-ignored rows (0.0 if none); lse: (N,)
cross_entropy.backward(dloss, logits, lse, targets, ignore_index) -> dlogits     dloss: 0-d
embedding.backward(dout, idx, vocab_size) -> dweight   dout: (N, C); idx: (N,) int; dweight: (V, C)
adamw.step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None
    in place on param, exp_avg, exp_avg_sq; PyTorch's AdamW update with bias correction.
decode.step(weights, keys, values, tokens, positions, slots, read, scratch, head_rows) -> logits (B or N, V)
    one GPT decode step over B rows, each at its own position in its own KV-cache slot (rowdecode.py's
    RowDecoder); keys/values: one (S, H, T, D) buffer per block, written in place. Numba rung: float32,
    B <= decode.KERNEL_MAX_ROWS; no CUDA rung (CuPy runs the reference).
"""
import os
from contextlib import contextmanager

try:  # Numba is optional: without it the package imports and every NumPy array takes the reference.
    import numba
    from llvmlite import ir as llvm_ir          # for ``intrinsic`` code generators
    from numba.core import types
    from numba.extending import intrinsic
    njit = numba.njit
    prange = numba.prange
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = llvm_ir = types = None
    prange = range

    def intrinsic(function):
        """Stand-in decorator (never called without Numba)."""
        return function

    def njit(*args, **kwargs):
        """Stand-in decorator: the function stays plain Python (never called: pick() says reference)."""
        return lambda function: function

_force_reference = os.environ.get("SCRATCHLM_KERNELS", "").lower() in ("reference", "0", "off", "none")


def use_reference(force: bool = True) -> None:
    """Force the plain reference implementations (True) or let fast kernels run (False)."""
    global _force_reference
    _force_reference = bool(force)


def reference_forced() -> bool:
    return _force_reference


def _prefer_workqueue_threads() -> None:
    """Run Numba's parallel loops on its 'workqueue' thread pool unless the user chose a layer.

    The default on Linux is OpenMP, whose idle threads spin between parallel regions; next to
    OpenBLAS's own spinning threads on a 2-core machine they take turns starving each other
    (measured here: a nano-cpu training step went from ~100 ms to ~370 ms). Workqueue threads
    sleep when idle, so the Numba kernels and the BLAS matmuls share the cores politely.
    """
    if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"


_prefer_workqueue_threads()


# Rungs every dispatcher knows, and the Numba rung's sub-paths of those kernels that have several
# (attention: the tiled online-softmax kernel, batched BLAS for short T, BLAS strips for long T).
RUNGS = ("reference", "numba", "cuda")
NUMBA_PATHS = {"attention": ("tiled", "batched", "strips")}
KERNELS = ("attention", "layer_norm", "gelu", "cross_entropy", "embedding", "adamw", "decode")
_forced: dict[str, str] = {}


@contextmanager
def force_rung(kernel: str, rung: str):
    """Within the block, ``kernel``'s dispatcher runs ``rung`` whatever the array or size.

    ``rung`` is one of RUNGS, or for attention one of NUMBA_PATHS["attention"] (a Numba sub-path).
    Forcing a Numba rung without Numba raises instead of falling back to the reference.
    """
    allowed = RUNGS + NUMBA_PATHS.get(kernel, ())
    if kernel not in KERNELS or rung not in allowed:
        raise ValueError(f"force_rung: kernel {kernel!r} has no rung {rung!r} (kernels {KERNELS}, rungs {allowed})")
    if rung != "reference" and rung != "cuda" and not numba_available():
        raise RuntimeError(f"force_rung({kernel!r}, {rung!r}) needs Numba, which is not importable")
    previous = _forced.get(kernel)
    _forced[kernel] = rung
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(kernel, None)
        else:
            _forced[kernel] = previous


def numba_path(kernel: str, default: str) -> str:
    """The Numba sub-path ``kernel`` takes: the forced one, else the dispatcher's ``default``."""
    forced = _forced.get(kernel)
    return forced if forced in NUMBA_PATHS.get(kernel, ()) else default


def numba_available() -> bool:
    return numba is not None


def num_threads() -> int:
    """Threads a Numba parallel loop may use (1 without Numba): kernels size their chunks by it."""
    return numba.get_num_threads() if numba is not None else 1


def cuda_kernel(name: str):
    """The CUDA rung ``kernels.cuda.<name>``, or None where CuPy or the CUDA module is absent."""
    try:
        from scratchlm.kernels import cuda as cuda_module
    except Exception:   # no CuPy, no GPU: the dispatcher falls back to the reference
        return None
    return getattr(cuda_module, name, None)


def pick(array, kernel: str | None = None) -> str:
    """Which ladder rung runs for ``array``: "cuda", "numba" or "reference" (``force_rung`` first)."""
    forced = _forced.get(kernel) if kernel is not None else None
    if forced is not None:
        return "numba" if forced in NUMBA_PATHS.get(kernel, ()) else forced
    if _force_reference:
        return "reference"
    module = type(array).__module__
    if module.startswith("cupy"):
        return "cuda"
    if module == "numpy" and type(array).__name__ == "ndarray" and numba_available():
        return "numba"
    return "reference"
