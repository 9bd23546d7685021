"""The neural-network ops: softmax, log-softmax, layer norm, cross-entropy, embedding, dropout,
and two small losses. Layer norm, GELU (elementwise.py), cross-entropy and embedding's backward
are hot in a GPT, so their arithmetic sits in ``kernels/`` (a plain reference plus Numba and CUDA
rungs); the math is here, in each docstring.

Shapes: N rows, C features, V vocabulary entries.
"""
from __future__ import annotations

from .. import backend
from ..kernels import cross_entropy as cross_entropy_kernel
from ..kernels import embedding as embedding_kernel
from ..kernels import layer_norm as layer_norm_kernel
from ..tensor import Function


class Softmax(Function):
    """y_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j (same value, no overflow).

    dy_i/dx_k = y_i ([i = k] - y_k), so dL/dx_k = y_k (g_k - sum_i g_i y_i).
    Only the output is saved.
    """
    tensor_method = "softmax"

    @staticmethod
    def forward(x, axis=-1):
        shifted = x - x.max(axis=axis, keepdims=True)
        e = backend.xp.exp(shifted)
        y = e / e.sum(axis=axis, keepdims=True)
        return y, (y, axis)

    @staticmethod
    def backward(g, saved):
        y, axis = saved
        return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)


class LogSoftmax(Function):
    """y_i = x_i - log sum_j exp(x_j)  (computed as x_i - m - log sum_j exp(x_j - m)).

    dy_i/dx_k = [i = k] - softmax_k, so dL/dx_k = g_k - softmax_k sum_i g_i.
    """
    tensor_method = "log_softmax"

    @staticmethod
    def forward(x, axis=-1):
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - backend.xp.log(backend.xp.exp(shifted).sum(axis=axis, keepdims=True))
        return y, (y, axis)

    @staticmethod
    def backward(g, saved):
        y, axis = saved
        return (g - backend.xp.exp(y) * g.sum(axis=axis, keepdims=True),)


class LayerNorm(Function):
    """Normalise each row of x (..., C) to mean 0, variance 1, then scale and shift:

        mu = mean(x),  rstd = 1 / sqrt(var(x) + eps),  xhat = (x - mu) * rstd,  y = xhat * w + b.

    Backward, with gh = g * w (the gradient reaching xhat):
        dL/db = sum_rows g,   dL/dw = sum_rows g * xhat,
        dL/dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat))     (means over C),
    the three terms being the direct path and the paths through mu and through rstd.
    Saved: x, w, and per row only mu and rstd; xhat is recomputed in the backward.
    ``weight`` and ``bias`` may be None (no affine part / bias=False).
    """

    @staticmethod
    def forward(x, weight, bias, eps=1e-5):
        if weight is None and bias is not None:
            raise ValueError("layer_norm with a bias needs a weight too")
        if weight is not None and weight.shape != x.shape[-1:]:
            raise ValueError(f"layer_norm weight has shape {tuple(weight.shape)}, "
                             f"expected ({x.shape[-1]},) for input of shape {tuple(x.shape)}")
        rows = x.reshape(-1, x.shape[-1])
        y, mean, rstd = layer_norm_kernel.forward(rows, weight, bias, eps)
        return y.reshape(x.shape), (rows, weight, bias is not None, mean, rstd)

    @staticmethod
    def backward(g, saved):
        rows, weight, has_bias, mean, rstd = saved
        dx, dweight, dbias = layer_norm_kernel.backward(g.reshape(rows.shape), rows, weight, mean, rstd)
        return dx.reshape(g.shape), dweight, dbias if has_bias else None


class CrossEntropy(Function):
    """Mean negative log-likelihood of ``targets`` under softmax(logits), fused.

    With n = the number of rows whose target is not ``ignore_index``:
        L = (1/n) sum_rows (lse_r - z_{r, t_r}),   lse_r = log sum_v exp(z_rv);
        dL/dz_rv = (softmax(z_r)_v - [v = t_r]) / n for counted rows, 0 for ignored rows.
    Fusing log-softmax and NLL avoids storing the (N, V) probabilities: the backward recomputes
    them from the logits and the per-row lse. An all-ignored batch has loss 0 and zero gradient.
    """

    @staticmethod
    def forward(logits, targets, ignore_index=-100):
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: targets have shape {tuple(targets.shape)}, logits "
                             f"{tuple(logits.shape)}; targets must be logits' shape without the last axis")
        rows, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        loss, lse = cross_entropy_kernel.forward(rows, flat_targets, ignore_index)
        return loss, (rows, lse, flat_targets, ignore_index, logits.shape)

    @staticmethod
    def backward(g, saved):
        rows, lse, targets, ignore_index, shape = saved
        return cross_entropy_kernel.backward(g, rows, lse, targets, ignore_index).reshape(shape), None


class Embedding(Function):
    """y[..., :] = W[idx[...], :]   (a gather of rows of W (V, C)).

    dL/dW_v = sum over positions p with idx_p = v of g_p: a scatter-add of the gradient rows
    (a token seen twice collects both gradients). kernels/embedding.py does it without a Python
    loop, which matters for a vocabulary of 50k rows.
    """

    @staticmethod
    def forward(weight, idx):
        return weight[idx], (idx, weight.shape)

    @staticmethod
    def backward(g, saved):
        idx, (vocab_size, channels) = saved
        return (embedding_kernel.backward(g.reshape(-1, channels), idx.reshape(-1), vocab_size),)


class Dropout(Function):
    """y = x * m / (1 - p), m_i ~ Bernoulli(1 - p) drawn once per call.

    dL/dx = g * m / (1 - p): the same mask, so the scale keeps E[y] = x.
    """

    @staticmethod
    def forward(x, p, generator):
        keep = generator.random(x.shape, dtype=x.dtype) >= p
        scale = keep * x.dtype.type(1.0 / (1.0 - p))
        return x * scale, scale

    @staticmethod
    def backward(g, scale):
        return (g * scale,)


class MSELoss(Function):
    """L = (1/n) sum (a - b)^2.    dL/da = 2 (a - b) / n * g,  dL/db = -dL/da."""

    @staticmethod
    def forward(prediction, target):
        diff = prediction - target
        return (diff * diff).mean(), diff

    @staticmethod
    def backward(g, diff):
        grad = g * 2 * diff / diff.size
        return grad, -grad


class BinaryCrossEntropyWithLogits(Function):
    """L = (1/n) sum [ -t log s(x) - (1 - t) log(1 - s(x)) ],  s = sigmoid.

    Written stably as max(x, 0) - x t + log(1 + exp(-|x|)).
    dL/dx = (s(x) - t) / n * g;   dL/dt = -x / n * g.
    """

    @staticmethod
    def forward(logits, targets):
        xp = backend.xp
        logits, targets = xp.broadcast_arrays(logits, targets)
        losses = xp.maximum(logits, 0) - logits * targets + xp.log1p(xp.exp(-xp.abs(logits)))
        return losses.mean(), (logits, targets)

    @staticmethod
    def backward(g, saved):
        logits, targets = saved
        n = logits.size
        sigmoid = 0.5 * (1 + backend.xp.tanh(0.5 * logits))
        return g * (sigmoid - targets) / n, -g * logits / n
