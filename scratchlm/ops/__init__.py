"""Every op of the engine, one family per file. Importing this package registers them all
(each ``Function`` subclass registers itself, and ``tensor_method`` makes it a Tensor method)."""
from . import attention, elementwise, fused, latent, linalg, nn, reduce, shape  # noqa: F401
from .shape import concatenate, split, stack  # noqa: F401
