"""Elementwise ops: arithmetic, exp/log, activations, where.

Every op below is y = f(a, b, ...) applied element by element (with NumPy broadcasting), so its
backward is the upstream gradient times the local partial derivative, element by element:
dL/da = dL/dy * df/da. Gradients come back at the broadcast shape; the tape sums them down.
"""
from __future__ import annotations

from .. import backend
from ..kernels import gelu as gelu_kernel
from ..tensor import Function


class Add(Function):
    """y = a + b.    dL/da = g,  dL/db = g."""
    tensor_method = "add"

    @staticmethod
    def forward(a, b):
        return a + b, None

    @staticmethod
    def backward(g, saved):
        return g, g


class Sub(Function):
    """y = a - b.    dL/da = g,  dL/db = -g."""
    tensor_method = "sub"

    @staticmethod
    def forward(a, b):
        return a - b, None

    @staticmethod
    def backward(g, saved):
        return g, -g


class Mul(Function):
    """y = a * b.    dL/da = g * b,  dL/db = g * a."""
    tensor_method = "mul"

    @staticmethod
    def forward(a, b):
        return a * b, (a, b)

    @staticmethod
    def backward(g, saved):
        a, b = saved
        return g * b, g * a


class Div(Function):
    """y = a / b.    dL/da = g / b,  dL/db = -g * a / b^2 = -g * y / b."""
    tensor_method = "div"

    @staticmethod
    def forward(a, b):
        y = a / b
        return y, (b, y)

    @staticmethod
    def backward(g, saved):
        b, y = saved
        grad_a = g / b
        return grad_a, -grad_a * y


class Neg(Function):
    """y = -x.    dL/dx = -g."""
    tensor_method = "neg"

    @staticmethod
    def forward(x):
        return -x, None

    @staticmethod
    def backward(g, saved):
        return (-g,)


class Pow(Function):
    """y = x^p for a scalar p.    dL/dx = g * p * x^(p-1)."""
    tensor_method = "pow"

    @staticmethod
    def forward(x, exponent):
        return x ** exponent, (x, exponent)

    @staticmethod
    def backward(g, saved):
        x, p = saved
        return (g * p * x ** (p - 1),)


class Exp(Function):
    """y = e^x.    dL/dx = g * y  (the output is all the backward needs)."""
    tensor_method = "exp"

    @staticmethod
    def forward(x):
        y = backend.xp.exp(x)
        return y, y

    @staticmethod
    def backward(g, y):
        return (g * y,)


class Log(Function):
    """y = ln x.    dL/dx = g / x."""
    tensor_method = "log"

    @staticmethod
    def forward(x):
        return backend.xp.log(x), x

    @staticmethod
    def backward(g, x):
        return (g / x,)


class Sqrt(Function):
    """y = sqrt(x).    dL/dx = g / (2 y)."""
    tensor_method = "sqrt"

    @staticmethod
    def forward(x):
        y = backend.xp.sqrt(x)
        return y, y

    @staticmethod
    def backward(g, y):
        return (g / (2 * y),)


class Tanh(Function):
    """y = tanh x.    dL/dx = g * (1 - y^2)."""
    tensor_method = "tanh"

    @staticmethod
    def forward(x):
        y = backend.xp.tanh(x)
        return y, y

    @staticmethod
    def backward(g, y):
        return (g * (1 - y * y),)


class Sigmoid(Function):
    """y = 1 / (1 + e^-x).    dL/dx = g * y * (1 - y).

    Computed as (1 + tanh(x/2)) / 2, the same function without overflow in e^-x for x << 0.
    """
    tensor_method = "sigmoid"

    @staticmethod
    def forward(x):
        y = 0.5 * (1 + backend.xp.tanh(0.5 * x))
        return y, y

    @staticmethod
    def backward(g, y):
        return (g * y * (1 - y),)


class Relu(Function):
    """y = max(x, 0).    dL/dx = g where x > 0, else 0 (the subgradient 0 at x = 0)."""
    tensor_method = "relu"

    @staticmethod
    def forward(x):
        positive = x > 0
        return x * positive, positive

    @staticmethod
    def backward(g, positive):
        return (g * positive,)


class Gelu(Function):
    """Gaussian error linear unit, fused (a hot op of the MLP block).

    exact:  y = x * Phi(x) = x/2 * (1 + erf(x / sqrt 2));
            dy/dx = Phi(x) + x * phi(x),  phi(x) = exp(-x^2/2) / sqrt(2 pi).
    tanh (GPT-2):  y = x/2 * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 x^3);
            dy/dx = (1 + tanh u)/2 + x/2 * (1 - tanh^2 u) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2).
    The arithmetic is in kernels/gelu.py (reference, Numba and CUDA rungs).
    """
    tensor_method = "gelu"

    @staticmethod
    def forward(x, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        return gelu_kernel.forward(x, approximate), (x, approximate)

    @staticmethod
    def backward(g, saved):
        x, approximate = saved
        return (gelu_kernel.backward(g, x, approximate),)


class Where(Function):
    """y = a where condition else b (condition is boolean, no gradient).

    dL/da = g where condition else 0;  dL/db = g where not condition else 0.
    ``masked_fill(x, mask, value)`` is where(mask, value, x).
    """

    @staticmethod
    def forward(condition, a, b):
        return backend.xp.where(condition, a, b), condition

    @staticmethod
    def backward(g, condition):
        zero = backend.xp.zeros((), dtype=g.dtype)
        return None, backend.xp.where(condition, g, zero), backend.xp.where(condition, zero, g)

