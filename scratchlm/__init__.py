"""scratchlm: GPT-style language models from scratch on NumPy and CuPy.

    >>> import scratchlm as sl
    >>> x = sl.tensor([[1.0, -2.0]], requires_grad=True)
    >>> w = sl.tensor([[0.5], [0.25]], requires_grad=True)
    >>> loss = ((x @ w).relu() ** 2).mean()
    >>> loss.backward()
"""
from . import backend
from .backend import get_backend, manual_seed, set_default_dtype, use_backend
from .tensor import Tensor, no_grad, tensor
from . import ops  # noqa: F401  (registers every op on Tensor)
from .ops.shape import concatenate, split, stack
from .profiling import profile_ops

__version__ = "0.1.0"


def __getattr__(name):
    # optim, nn, models, metrics ... load on first use, so `import scratchlm` stays quick
    if name in ("optim", "nn", "models", "tokenizers", "data", "checkpoint", "kernels", "metrics"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'scratchlm' has no attribute {name!r}")


__all__ = ["Tensor", "tensor", "no_grad", "use_backend", "get_backend", "set_default_dtype", "manual_seed",
           "concatenate", "stack", "split", "backend", "profile_ops"]
