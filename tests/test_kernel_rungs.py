"""Every kernel rung, forced through its public dispatcher, against formulas written here.

``kernels.force_rung(kernel, rung)`` pins a dispatcher to one rung, so each path runs at sizes the
dispatcher would never route to it: the tiled attention kernel at head sizes that leave a tail of
its four-at-a-time loops (D = 1, 3, 5, 7, 13, 33), T not a multiple of the 64-wide tile and T = 1;
the batched and strip paths at the same odd sizes (strips narrower than T, with a ragged last one);
and the per-row / elementwise kernels at widths that are not multiples of 4, 8 or 16.

The oracles here share no code with the kernels or their references: attention, its backward
(dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o O)), dQ = dS K s, dK = dS^T Q s), layer
norm's three-term backward, GELU and its derivative from math.erf / math.tanh, cross-entropy from
a log-sum-exp per row, the embedding scatter-add with np.add.at, and AdamW's update with its bias
corrections all written out below.

Tolerances: float64 rungs within 1e-9 relative to the size of the result (different summation
orders); float32 rungs (inputs rounded to float32, oracle in float64) within the bounds stated
in tests/test_kernels.py's docstring.
"""
import math

import numpy as np
import pytest

import scratchlm.kernels as kernels
from scratchlm.kernels import adamw, attention, attention_strips, cross_entropy, embedding, gelu, layer_norm

pytestmark = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")

ATTENTION_RUNGS = ["reference", "tiled", "batched", "strips"]
ROW_RUNGS = ["reference", "numba"]
ODD_HEAD_DIMS = [1, 3, 5, 7, 13, 33]                 # none a multiple of 4: the tiled kernel's d-tail
ODD_WIDTHS = [1, 3, 7, 13, 37, 133]                  # none a multiple of 4, 8 or 16


def uniform(seed, shape, low=-2.0, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape)


def close(actual, expected, dtype, rtol64=1e-9, rtol32=1e-4):
    """|a - e| <= rtol * (1 + max|e|): the float64 or float32 bound of the module docstring."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    rtol = rtol64 if dtype == np.float64 else rtol32
    bound = rtol * (1.0 + np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0))
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite)
    assert np.max(np.abs(actual[finite] - expected[finite]), initial=0.0) <= bound


# ============================================================== attention

def attention_by_formula(q, k, v, do, causal, scale):
    """o, lse, dq, dk, dv of softmax(Q K^T s + mask) V for one (T, D) head stack, in float64."""
    q, k, v, do = (np.asarray(a, np.float64) for a in (q, k, v, do))
    t_query, t_key = q.shape[-2], k.shape[-2]
    scores = np.einsum("...id,...jd->...ij", q, k) * scale
    if causal:                                   # query i sees keys j <= i + (Tk - Tq)
        hidden = np.arange(t_key)[None, :] > np.arange(t_query)[:, None] + (t_key - t_query)
        scores = np.where(hidden, -np.inf, scores)
    peak = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - peak)
    total = weights.sum(axis=-1, keepdims=True)
    probs = weights / total
    out = probs @ v
    lse = (peak + np.log(total))[..., 0]
    dv = np.swapaxes(probs, -1, -2) @ do
    dprobs = do @ np.swapaxes(v, -1, -2)
    dscores = probs * (dprobs - np.sum(do * out, axis=-1, keepdims=True))
    return out, lse, dscores @ k * scale, np.swapaxes(dscores, -1, -2) @ q * scale, dv


# (B, H, Tq, Tk): T = 1, T below the tile, T not a multiple of the 64-wide tile, Tq < Tk,
# and a key count whose last group of four keys is ragged (the tiled kernel's key tail).
ATTENTION_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 5), (1, 2, 67, 67), (1, 1, 3, 70), (2, 1, 65, 130)]


@pytest.mark.parametrize("rung", ATTENTION_RUNGS)
@pytest.mark.parametrize("head_dim", ODD_HEAD_DIMS)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_every_rung_at_odd_sizes(rung, head_dim, shape, dtype, monkeypatch):
    batch, heads, t_query, t_key = shape
    # narrow strips so that the strip path walks several strips with a ragged last one
    monkeypatch.setattr(attention_strips, "STRIP_Q", 16)
    seed = head_dim * 1000 + t_query
    q = uniform(seed, (batch, heads, t_query, head_dim)).astype(dtype)
    k = uniform(seed + 1, (batch, heads, t_key, head_dim)).astype(dtype)
    v = uniform(seed + 2, (batch, heads, t_key, head_dim)).astype(dtype)
    do = uniform(seed + 3, (batch, heads, t_query, head_dim)).astype(dtype)
    scale = 1.0 / math.sqrt(head_dim)
    for causal in (False, True):
        expected = attention_by_formula(q, k, v, do, causal, scale)
        with kernels.force_rung("attention", rung):
            out, lse = attention.forward(q, k, v, causal, scale)
            grads = attention.backward(do, q, k, v, out, lse, causal, scale)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        close(out, expected[0], dtype, rtol32=2e-5)
        close(lse, expected[1], dtype, rtol32=2e-5)
        for grad, want in zip(grads, expected[2:]):
            close(grad, want, dtype)


@pytest.mark.parametrize("rung", ATTENTION_RUNGS)
def test_attention_default_scale_is_one_over_sqrt_head_dim(rung):
    """scale=None means 1/sqrt(D) on every rung (the kernels and the reference share the helper
    that supplies it, so it is checked against the formula here)."""
    q, k, v, do = (uniform(40 + n, (1, 2, 5, 7)) for n in range(4))
    expected = attention_by_formula(q, k, v, do, True, 1.0 / math.sqrt(7))
    with kernels.force_rung("attention", rung):
        out, lse = attention.forward(q, k, v, True)
        grads = attention.backward(do, q, k, v, out, lse, True)
    for got, want in zip((out, lse, *grads), expected):
        close(got, want, np.float64)


def test_force_rung_routes_attention_to_the_forced_path(monkeypatch):
    """The dispatcher takes the forced path whatever the size (batched at T=1 would be its own pick)."""
    ran = []
    for name in ("forward_numba", "forward_batched_numba", "forward_strips_blas", "forward_reference"):
        original = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _n=name, _f=original, **kw: ran.append(_n) or _f(*a, **kw))
    q = uniform(0, (1, 1, 1, 3))
    for rung, name in [("tiled", "forward_numba"), ("batched", "forward_batched_numba"),
                       ("strips", "forward_strips_blas"), ("reference", "forward_reference")]:
        ran.clear()
        with kernels.force_rung("attention", rung):
            attention.forward(q, q, q, True, 1.0)
            attention.forward_keeping_probs(q, q, q, True, 1.0)
        assert ran and set(ran) == {name}, (rung, ran)
    ran.clear()
    attention.forward(q, q, q, True, 1.0)                  # outside the block: the dispatcher's pick
    assert ran == ["forward_batched_numba"]


def test_force_rung_refuses_unknown_names_and_restores_on_exit():
    with pytest.raises(ValueError, match="no rung"):
        with kernels.force_rung("attention", "warp"):
            pass
    with pytest.raises(ValueError, match="no rung"):
        with kernels.force_rung("gelu", "tiled"):
            pass
    x = uniform(0, (3,))
    with kernels.force_rung("gelu", "reference"):
        with kernels.force_rung("gelu", "numba"):
            assert kernels.pick(x, "gelu") == "numba"
        assert kernels.pick(x, "gelu") == "reference"
    assert kernels.pick(x, "gelu") == "numba"


# ============================================================== layer norm

def layer_norm_by_formula(x, weight, bias, dy, eps):
    """y, dx, dweight, dbias in float64: xhat = (x - mean) / sqrt(var + eps);
    dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy * weight."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * np.asarray(weight, np.float64)
    dx = rstd * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    if weight is None:
        return xhat, dx, None, None
    y = xhat * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    return y, dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


@pytest.mark.parametrize("rung", ROW_RUNGS)
@pytest.mark.parametrize("channels", ODD_WIDTHS)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layer_norm_every_rung_at_odd_widths(rung, channels, affine, dtype):
    rows = 5
    x = uniform(channels, (rows, channels), -3, 3).astype(dtype)
    dy = uniform(channels + 1, (rows, channels)).astype(dtype)
    weight = uniform(channels + 2, (channels,)).astype(dtype) if affine else None
    bias = uniform(channels + 3, (channels,)).astype(dtype) if affine else None
    y_want, dx_want, dw_want, db_want = layer_norm_by_formula(x, weight, bias, dy, 1e-5)
    with kernels.force_rung("layer_norm", rung):
        y, mean, rstd = layer_norm.forward(x, weight, bias, 1e-5)
        dx, dweight, dbias = layer_norm.backward(dy, x, weight, mean, rstd)
    # dx cancels three terms of size rstd |g| (rstd up to 1/sqrt(eps) on a one-column row)
    size = 1.0 + float(np.max(np.abs(rstd)))
    close(y, y_want, dtype, rtol32=1e-5)
    close(dx / size, dx_want / size, dtype, rtol32=1e-5)
    if affine:
        close(dweight, dw_want, dtype, rtol32=1e-5 * rows)
        close(dbias, db_want, dtype, rtol32=1e-5 * rows)
    else:
        assert dweight is None and dbias is None


# ============================================================== GELU

def gelu_by_formula(x, approximate):
    x = np.asarray(x, np.float64).ravel()
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        t = np.array([math.tanh(c * (v + 0.044715 * v ** 3)) for v in x])
        y = 0.5 * x * (1 + t)
        dy_dx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    else:
        cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
        y = x * cdf
        dy_dx = cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return y, dy_dx


@pytest.mark.parametrize("rung", ROW_RUNGS)
@pytest.mark.parametrize("size", ODD_WIDTHS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_every_rung_at_odd_sizes(rung, size, approximate, dtype):
    x = uniform(size, (size,), -8, 8).astype(dtype)
    dy = uniform(size + 1, (size,)).astype(dtype)
    y_want, slope = gelu_by_formula(x, approximate)
    with kernels.force_rung("gelu", rung):
        y = gelu.forward(x, approximate)
        dx = gelu.backward(dy, x, approximate)
    assert y.dtype == dtype and dx.dtype == dtype
    close(y, y_want, dtype, rtol64=1e-12, rtol32=1e-6)
    close(dx, dy.astype(np.float64) * slope, dtype, rtol64=1e-12, rtol32=1e-6)


# ============================================================== cross-entropy

@pytest.mark.parametrize("rung", ROW_RUNGS)
@pytest.mark.parametrize("vocab", ODD_WIDTHS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_every_rung_at_odd_widths(rung, vocab, dtype):
    rows = 7
    logits = uniform(vocab, (rows, vocab), -10, 10).astype(dtype)
    targets = np.random.default_rng(vocab).integers(0, vocab, rows)
    targets[2] = -100                                                 # one ignored row
    dloss = 0.75
    wide = logits.astype(np.float64)
    lse_want = np.array([math.log(sum(math.exp(v) for v in row)) for row in wide])
    counted = targets != -100
    loss_want = float(np.mean(lse_want[counted] - wide[counted, targets[counted]]))
    softmax = np.exp(wide - lse_want[:, None])
    dlogits_want = softmax.copy()
    dlogits_want[np.flatnonzero(counted), targets[counted]] -= 1.0
    dlogits_want[~counted] = 0.0
    dlogits_want *= dloss / counted.sum()
    with kernels.force_rung("cross_entropy", rung):
        loss, lse = cross_entropy.forward(logits, targets, -100)
        dlogits = cross_entropy.backward(np.asarray(dloss, dtype), logits, lse, targets, -100)
    close(loss, loss_want, dtype, rtol64=1e-12, rtol32=1e-6)
    close(lse, lse_want, dtype, rtol64=1e-12, rtol32=1e-6)
    close(dlogits, dlogits_want, dtype, rtol64=1e-12, rtol32=1e-6)


# ============================================================== embedding backward

@pytest.mark.parametrize("rung", ROW_RUNGS)
@pytest.mark.parametrize("channels", ODD_WIDTHS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_every_rung_at_odd_widths(rung, channels, dtype):
    vocab, rows = 5, 23                                   # more rows than ids: repeats are certain
    dout = uniform(channels, (rows, channels)).astype(dtype)
    idx = np.random.default_rng(channels).integers(0, vocab, rows)
    want = np.zeros((vocab, channels))
    np.add.at(want, idx, dout.astype(np.float64))
    with kernels.force_rung("embedding", rung):
        dweight = embedding.backward(dout, idx, vocab)
    assert dweight.shape == (vocab, channels) and dweight.dtype == dtype
    close(dweight, want, dtype, rtol64=1e-12, rtol32=1e-6)


# ============================================================== AdamW

def adamw_by_formula(p, g, m, v, lr, beta1, beta2, eps, wd, t):
    """PyTorch's AdamW update written from the paper, in float64, bias corrections computed here."""
    p, g, m, v = (np.asarray(a, np.float64) for a in (p, g, m, v))
    p = p * (1.0 - lr * wd)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1 ** t)
    v_hat = v / (1.0 - beta2 ** t)
    update = lr * m_hat / (np.sqrt(v_hat) + eps)
    return p - update, m, v, update


@pytest.mark.parametrize("rung", ROW_RUNGS)
@pytest.mark.parametrize("size", ODD_WIDTHS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_every_rung_follows_the_formula_over_steps(rung, size, dtype):
    """Five steps with the moments carried: each bias correction (1 - beta1^t, 1 - beta2^t) and the
    decoupled decay are checked at t = 1..5, where they differ most from 1."""
    lr, beta1, beta2, eps, wd = 0.01, 0.8, 0.95, 1e-8, 0.1
    p = uniform(size, (size,)).astype(dtype)
    m, v = np.zeros(size, dtype), np.zeros(size, dtype)
    want = [p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)]
    for t in range(1, 6):
        g = uniform(size + t, (size,)).astype(dtype)
        *want, update = adamw_by_formula(*want[:1], g, *want[1:], lr, beta1, beta2, eps, wd, t)
        with kernels.force_rung("adamw", rung):
            adamw.step(p, g, m, v, lr, beta1, beta2, eps, wd, t)
        size_of = 1.0 + np.max(np.abs(update))
        for got, expected in zip((p, m, v), want):
            assert got.dtype == dtype
            close(got / size_of, expected / size_of, dtype, rtol64=1e-12, rtol32=1e-6)
        want = [p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)]   # follow the rung


# ============================================================== the forced rung is the one that runs

# For each kernel: a call through its dispatcher, and the names of its reference and Numba functions.
ROUTED = {
    "layer_norm": (lambda: layer_norm.forward(uniform(0, (3, 5)), None, None, 1e-5),
                   layer_norm, "forward_reference", "forward_numba"),
    "gelu": (lambda: gelu.forward(uniform(0, (7,)), "none"), gelu, "forward_reference", "forward_numba"),
    "cross_entropy": (lambda: cross_entropy.forward(uniform(0, (3, 5)), np.array([0, 4, 2]), -100),
                      cross_entropy, "forward_reference", "forward_numba"),
    "embedding": (lambda: embedding.backward(uniform(0, (4, 3)), np.array([0, 1, 1, 2]), 3),
                  embedding, "backward_reference", "backward_numba"),
    "adamw": (lambda: adamw.step(*(uniform(n, (6,)) ** 2 for n in range(4)), 0.01, 0.9, 0.99, 1e-8, 0.1, 1),
              adamw, "step_reference", "step_numba"),
}


@pytest.mark.parametrize("kernel", sorted(ROUTED))
def test_force_rung_runs_that_rung_and_not_the_other(kernel, monkeypatch):
    call, module, reference_name, numba_name = ROUTED[kernel]
    ran = []
    for name in (reference_name, numba_name):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=original, **kw: ran.append(_n) or _f(*a, **kw))
    for rung, name in (("reference", reference_name), ("numba", numba_name)):
        ran.clear()
        with kernels.force_rung(kernel, rung):
            call()
        assert ran == [name], (rung, ran)


def test_adamw_numba_rung_runs_its_kernel_on_contiguous_float_arrays(monkeypatch):
    """step_numba falls back to the reference only where the kernel cannot run (a strided view)."""
    calls = []
    original = adamw.step_reference
    monkeypatch.setattr(adamw, "step_reference", lambda *a: calls.append("reference") or original(*a))
    for dtype in (np.float32, np.float64):
        arrays = [uniform(n, (5, 3)).astype(dtype) ** 2 for n in range(4)]
        adamw.step_numba(*arrays, 0.01, 0.9, 0.99, 1e-8, 0.1, 2)
    assert calls == []
    views = [np.abs(uniform(n, (5, 6)))[:, ::2] for n in range(4)]
    adamw.step_numba(*views, 0.01, 0.9, 0.99, 1e-8, 0.1, 2)
    assert calls == ["reference"]
