"""Finite-difference gradient checks: the oracle for every hand-written backward.

For a function f of tensors with an output y, draw a random upstream gradient r and set
L(x) = sum(f(x) * r). The backward gives dL/dx for every input at once. For each input x_i and a
random direction u, central differences give the directional derivative

    (L(x_i + eps u) - L(x_i - eps u)) / (2 eps)  ~=  <dL/dx_i, u>,

with an error O(eps^2) from the Taylor series and (rounding error of L) / eps from rounding. One
backward and a few forward evaluations per input check the whole Jacobian-vector product (the
random-direction check of HIPS/autograd's check_vjp), so many Hypothesis-drawn shapes stay cheap.

The rounding error of L is not 1e-16 |L|. L is a sum of terms y_k r_k that may cancel (|L| much
smaller than sum |y_k r_k|), and each y_k may itself come out of a cancellation inside the op
(layer norm's x - mean on a row like [9, 10]: y is off by ulp(|x|) * rstd * |w|, not ulp(|y|)).
When the derivative along u is tiny (layer norm of two channels barely depends on x), that
rounding divided by eps is the whole difference. So the allowance has two parts, fixed here for
every check:
  - the size of the terms that cancel: 1e-15 * (sum_k |y_k r_k| + 1) / eps;
  - the noise of L measured where the check looks: L at x + j eps u for j = -2..2; for a smooth L
    the 3rd and 4th differences of those five values are O(eps^3) and so are rounding noise
    alone (Moré & Wild's ECnoise): sigma = max(|D3| / sqrt(20), |D4| / sqrt(70)), allowance
    8 sigma / eps (the central difference's noise has standard deviation sigma / (sqrt(2) eps)).
A wrong term in a backward is off by O(1) relative, far beyond either part.
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

    def loss_and_size_at(values):
        """(L, sum |y_k r_k|): the loss and the size of the terms that cancel in it."""
        with sl.no_grad():
            y = fn(*[sl.tensor(v, dtype=np.float64) for v in values])
        terms = y.numpy() * upstream
        return float(np.sum(terms)), float(np.sum(np.abs(terms)))

    grads = []
    for i in wrt:
        analytic = tensors[i].grad
        assert analytic is not None, f"input {i} got no gradient"
        analytic = backend.to_numpy(analytic)
        assert analytic.shape == arrays[i].shape, f"input {i}: gradient shape {analytic.shape} != {arrays[i].shape}"
        direction = rng.standard_normal(arrays[i].shape)

        def shifted(j):
            values = list(arrays)
            values[i] = arrays[i] + j * eps * direction
            return loss_and_size_at(values)
        losses, sizes = zip(*(shifted(j) for j in (-2, -1, 0, 1, 2)))
        numeric = (losses[3] - losses[1]) / (2 * eps)
        predicted = float(np.sum(analytic * direction))
        # relative to the derivative's size, plus L's rounding divided by eps (module docstring)
        scale = max(abs(numeric), abs(predicted), 1e-2 * float(np.linalg.norm(analytic)))
        third = max(abs(np.diff(losses[:4], 3)[0]), abs(np.diff(losses[1:], 3)[0]))
        noise = max(third / np.sqrt(20.0), abs(np.diff(losses, 4)[0]) / np.sqrt(70.0))
        rounding = (1e-15 * (max(sizes) + 1.0) + 8.0 * noise) / eps
        assert abs(numeric - predicted) <= atol + rtol * scale + rounding, (
            f"input {i}: finite differences {numeric!r} vs backward {predicted!r} "
            f"(allowance {atol + rtol * scale + rounding:.3g}, of which rounding {rounding:.3g})")
        grads.append(analytic)
    return grads
