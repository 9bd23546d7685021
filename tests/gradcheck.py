"""Finite-difference gradient checks: the oracle for every hand-written backward.

For a function f of tensors with an output y, draw a random upstream gradient r and set
L(x) = sum(f(x) * r). The backward gives dL/dx for every input at once. For each input x_i and a
random direction u, central differences give the directional derivative

    (L(x_i + eps u) - L(x_i - eps u)) / (2 eps)  ~=  <dL/dx_i, u>,

with an error O(eps^2) from the Taylor series and O(1e-16 / eps) from rounding in float64. One
backward and two forward evaluations per input check the whole Jacobian-vector product (the
random-direction check of HIPS/autograd's check_vjp), so many Hypothesis-drawn shapes stay cheap.
"""
import numpy as np

import scratchlm as sl
from scratchlm import backend

EPS = 1e-6
RTOL = 1e-5     # relative to the size of the directional derivative
ATOL = 1e-8


def check_gradients(fn, *arrays, seed=0, eps=EPS, rtol=RTOL, atol=ATOL, wrt=None):
    """Assert the tape's gradients of ``fn(*tensors)`` agree with central differences.

    ``arrays`` are NumPy float64 arrays (inputs); ``wrt`` lists which of them to check (default
    all). Returns the analytic gradients as NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    wrt = range(len(arrays)) if wrt is None else wrt
    tensors = [sl.tensor(a, requires_grad=i in wrt, dtype=np.float64) for i, a in enumerate(arrays)]
    out = fn(*tensors)
    upstream = rng.standard_normal(out.shape)
    out.backward(backend.to_device(upstream))

    def loss_at(values):
        with sl.no_grad():
            y = fn(*[sl.tensor(v, dtype=np.float64) for v in values])
        return float(np.sum(y.numpy() * upstream))

    grads = []
    for i in wrt:
        analytic = tensors[i].grad
        assert analytic is not None, f"input {i} got no gradient"
        analytic = backend.to_numpy(analytic)
        assert analytic.shape == arrays[i].shape, f"input {i}: gradient shape {analytic.shape} != {arrays[i].shape}"
        direction = rng.standard_normal(arrays[i].shape)
        plus = [a.copy() for a in arrays]
        minus = [a.copy() for a in arrays]
        plus[i] = plus[i] + eps * direction
        minus[i] = minus[i] - eps * direction
        numeric = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        predicted = float(np.sum(analytic * direction))
        # relative to the derivative's size, plus float64 rounding of L itself divided by eps
        scale = max(abs(numeric), abs(predicted), 1e-2 * float(np.linalg.norm(analytic)))
        rounding = 1e-9 * (abs(loss_at(arrays)) + 1.0)
        assert abs(numeric - predicted) <= atol + rtol * scale + rounding, (
            f"input {i}: finite differences {numeric!r} vs backward {predicted!r}")
        grads.append(analytic)
    return grads
