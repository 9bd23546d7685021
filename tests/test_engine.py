"""The tape and the ops' invariants: properties that must hold whatever the values.

- softmax rows sum to 1 and ignore a constant shift; log_softmax = log(softmax);
- layer_norm's output (before the affine part) has mean 0 and variance 1 per row;
- cross_entropy = -log softmax at the target, mean over non-ignored rows;
- causal attention at position t does not depend on inputs after t (value and gradient);
- each fused op equals its composition from small ops, forward and backward;
- gradients accumulate, backward frees the graph, errors name the problem.
"""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

import scratchlm as sl
import scratchlm.nn.functional as F
from scratchlm import backend
from scratchlm.tensor import Function

FLOATS = st.floats(-10, 10, allow_nan=False, width=64)


def host(x):
    return backend.to_numpy(x.data if isinstance(x, sl.Tensor) else x)


def rows(min_c=1):
    return hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(min_c, 8)), elements=FLOATS)


# ----------------------------------------------------------------- invariants

@pytest.mark.usefixtures("any_backend")
@given(rows(), st.floats(-50, 50))
def test_softmax_rows_sum_to_one_and_shift_invariant(x, shift):
    y = host(F.softmax(sl.tensor(x)))
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(host(F.softmax(sl.tensor(x + shift))), y, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(host(F.log_softmax(sl.tensor(x))), np.log(y), rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("any_backend")
@given(rows(min_c=2))
def test_layer_norm_normalises_rows(x):
    x = x + np.arange(x.shape[1])
    assume(np.ptp(x, axis=-1).min() > 1e-3)   # a constant row has no variance to normalise
    y = host(F.layer_norm(sl.tensor(x), eps=0.0))
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-9)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-9)


@pytest.mark.usefixtures("any_backend")
@given(rows(min_c=2), st.data())
def test_cross_entropy_is_minus_log_softmax_at_target(logits, data):
    n, v = logits.shape
    targets = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(-1, v - 1)))
    targets = np.where(targets < 0, -100, targets)
    loss = host(F.cross_entropy(sl.tensor(logits), targets))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    counted = targets != -100
    expected = -log_probs[counted, targets[counted]].mean() if counted.any() else 0.0
    np.testing.assert_allclose(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("any_backend")
@given(st.integers(2, 9), st.sampled_from([4, 8]), st.data())
def test_causal_attention_ignores_the_future(t, d, data):
    q, k, v = (data.draw(hnp.arrays(np.float64, (1, 2, t, d), elements=st.floats(-3, 3))) for _ in range(3))
    cut = data.draw(st.integers(0, t - 2))       # change everything after position `cut`
    k2, v2, q2 = k.copy(), v.copy(), q.copy()
    for arr in (k2, v2, q2):
        arr[:, :, cut + 1:] += 5.0
    out = host(F.scaled_dot_product_attention(sl.tensor(q), sl.tensor(k), sl.tensor(v)))
    out2 = host(F.scaled_dot_product_attention(sl.tensor(q2), sl.tensor(k2), sl.tensor(v2)))
    np.testing.assert_array_equal(out[:, :, :cut + 1], out2[:, :, :cut + 1])
    # and the gradient of an output at position <= cut w.r.t. later keys and values is exactly 0
    qt, kt, vt = (sl.tensor(a, requires_grad=True) for a in (q, k, v))
    F.scaled_dot_product_attention(qt, kt, vt)[:, :, :cut + 1].sum().backward()
    assert np.all(host(kt.grad)[:, :, cut + 1:] == 0.0)
    assert np.all(host(vt.grad)[:, :, cut + 1:] == 0.0)


# ----------------------------------------------------------------- fused == composition

def _compare_with_composition(fused, composed, *arrays):
    """Same values and same gradients for a fused op and its composition from small ops."""
    results = []
    for fn in (fused, composed):
        tensors = [sl.tensor(a, requires_grad=True) for a in arrays]
        out = fn(*tensors)
        out.backward(backend.to_device(np.random.default_rng(0).standard_normal(out.shape)))
        results.append((host(out), [host(t.grad) for t in tensors]))
    (y1, g1), (y2, g2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-9, atol=1e-11)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.usefixtures("any_backend")
@given(rows(min_c=2), st.data())
def test_fused_layer_norm_equals_composition(x, data):
    c = x.shape[1]
    x = x + np.arange(c)
    w, b = (data.draw(hnp.arrays(np.float64, (c,), elements=FLOATS)) for _ in range(2))

    def composed(t, w_, b_):
        mu = t.mean(axis=-1, keepdims=True)
        centred = t - mu
        var = (centred * centred).mean(axis=-1, keepdims=True)
        return centred / (var + 1e-5).sqrt() * w_ + b_
    _compare_with_composition(lambda t, w_, b_: F.layer_norm(t, w_, b_), composed, x, w, b)


@pytest.mark.usefixtures("any_backend")
@given(rows(min_c=2), st.data())
def test_fused_cross_entropy_equals_composition(logits, data):
    n, v = logits.shape
    targets = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, v - 1)))

    def composed(z):
        picked = F.log_softmax(z)[sl.tensor(np.arange(n)), sl.tensor(targets)]
        return -picked.mean()
    _compare_with_composition(lambda z: F.cross_entropy(z, targets), composed, logits)


@pytest.mark.usefixtures("any_backend")
@given(rows(), st.sampled_from(["none", "tanh"]))
def test_fused_gelu_equals_composition(x, approximate):
    if approximate == "tanh":
        composed = lambda t: 0.5 * t * (1.0 + ((2.0 / np.pi) ** 0.5 * (t + 0.044715 * t ** 3)).tanh())
        _compare_with_composition(lambda t: F.gelu(t, approximate="tanh"), composed, x)
        return
    # erf is not an op to compose from, so the exact GELU and its derivative come from the closed
    # forms in NumPy: y = x Phi(x), dy/dx = Phi(x) + x phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2
    from math import erf
    cdf = 0.5 * (1 + np.vectorize(erf)(x / np.sqrt(2)))
    upstream = np.random.default_rng(0).standard_normal(x.shape)
    t = sl.tensor(x, requires_grad=True)
    y = F.gelu(t, approximate="none")
    y.backward(backend.to_device(upstream))
    np.testing.assert_allclose(host(y), x * cdf, rtol=1e-12, atol=1e-12)
    slope = cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    np.testing.assert_allclose(host(t.grad), upstream * slope, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("any_backend")
@given(st.integers(1, 3), st.integers(1, 6), st.sampled_from([2, 4]), st.booleans(), st.data())
def test_fused_attention_equals_composition(b, t, d, causal, data):
    q, k, v = (data.draw(hnp.arrays(np.float64, (b, 2, t, d), elements=st.floats(-3, 3))) for _ in range(3))
    mask = np.triu(np.ones((t, t), dtype=bool), k=1)

    def composed(q_, k_, v_):
        scores = (q_ @ k_.transpose(-2, -1)) * (1.0 / np.sqrt(d))
        if causal:
            scores = F.masked_fill(scores, sl.tensor(mask), -np.inf)
        return F.softmax(scores) @ v_
    _compare_with_composition(lambda *x: F.scaled_dot_product_attention(*x, causal=causal), composed, q, k, v)


# ----------------------------------------------------------------- the tape

def test_gradients_accumulate_across_uses_and_calls(float64):
    x = sl.tensor([1.0, 2.0], requires_grad=True)
    y = x * x + x          # x used three times: dy/dx = 2x + 1
    y.sum().backward()
    np.testing.assert_allclose(host(x.grad), [3.0, 5.0])
    (x * 2.0).sum().backward()   # a second backward adds
    np.testing.assert_allclose(host(x.grad), [5.0, 7.0])


def test_backward_needs_scalar_or_gradient():
    x = sl.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="single-element"):
        (x * 2.0).backward()
    with pytest.raises(ValueError, match=r"gradient has shape \(3,\), tensor has shape \(2,\)"):
        (x * 2.0).backward(np.ones(3))


def test_backward_twice_through_freed_graph():
    x = sl.tensor([1.0, 2.0], requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()
    z = (x.exp() * x).sum()
    z.backward(retain_graph=True)
    z.backward()             # allowed: the first call kept the graph
    np.testing.assert_allclose(host(x.grad), 3 * host((x.exp() * (x + 1.0)).detach()), rtol=1e-6)


# A two-output op, defined here so the engine's multi-output path is tested apart from any real op.
class SinCosForTest(Function):
    """(sin x, cos x);  dL/dx = dL/dsin cos x - dL/dcos sin x (an unused output's term drops)."""

    outputs = 2
    calls = []   # the gradients each backward call received, to count calls and see the None

    @staticmethod
    def forward(x):
        return (backend.xp.sin(x), backend.xp.cos(x)), x

    @staticmethod
    def backward(grads, x):
        SinCosForTest.calls.append(tuple(g is not None for g in grads))
        d_sin, d_cos = grads
        dx = backend.xp.zeros_like(x)
        if d_sin is not None:
            dx = dx + d_sin * backend.xp.cos(x)
        if d_cos is not None:
            dx = dx - d_cos * backend.xp.sin(x)
        return (dx,)


@pytest.mark.parametrize("use, expected", [
    # both outputs, one of them also through a longer path: L = sum(sin x cos x + sin x)
    ("both", lambda x: np.cos(2 * x) + np.cos(x)),
    ("sin", lambda x: np.cos(x)),                      # L = sum(sin x): cos never reaches L
    ("cos", lambda x: -np.sin(x)),                     # L = sum(cos x)
    # L = sum(exp(2 sin x) cos x): sin deeper in the graph than cos
    ("deep", lambda x: 2 * np.cos(x) ** 2 * np.exp(2 * np.sin(x)) - np.sin(x) * np.exp(2 * np.sin(x))),
])
def test_two_output_node_runs_its_backward_once_with_each_outputs_gradient(float64, use, expected):
    values = np.array([0.3, -1.2, 2.0])
    x = sl.tensor(values, requires_grad=True)
    s, c = SinCosForTest.apply(x)
    loss = {"both": lambda: s * c + s, "sin": lambda: s * 1.0, "cos": lambda: c * 1.0,
            "deep": lambda: (s * 2.0).exp() * c}[use]().sum()
    SinCosForTest.calls.clear()
    loss.backward()
    np.testing.assert_allclose(host(x.grad), expected(values), rtol=1e-12)
    received = {"both": (True, True), "sin": (True, False), "cos": (False, True), "deep": (True, True)}[use]
    assert SinCosForTest.calls == [received]


def test_an_output_of_a_two_output_node_can_be_the_root(float64):
    x = sl.tensor([0.5, 1.0], requires_grad=True)
    s, c = SinCosForTest.apply(x)
    c.backward(np.array([1.0, 2.0]))
    np.testing.assert_allclose(host(x.grad), -np.array([1.0, 2.0]) * np.sin([0.5, 1.0]), rtol=1e-12)
    with sl.no_grad():
        s, c = SinCosForTest.apply(x)
    assert not s.requires_grad and s._node is None and c._node is None


def test_no_grad_records_nothing():
    x = sl.tensor([1.0], requires_grad=True)
    with sl.no_grad():
        y = x * 3.0
    assert not y.requires_grad and y._node is None


def test_shape_mismatch_names_both_shapes():
    a, b = sl.tensor(np.ones((2, 3))), sl.tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 3\) @ \(4, 5\)"):
        a @ b
    with pytest.raises(ValueError, match=r"targets have shape \(3,\), logits \(2, 5\)"):
        F.cross_entropy(sl.tensor(np.ones((2, 5))), np.zeros(3, dtype=np.int64))


def test_float32_default_and_int_preserved():
    assert sl.tensor([1.0, 2.0]).dtype == np.float32
    assert sl.tensor(np.ones(2)).dtype == np.float32
    assert sl.tensor([1, 2]).dtype.kind == "i"
    assert (sl.tensor([1.0]) * 2).dtype == np.float32


def test_public_surface_example():
    x = sl.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
    w = sl.tensor(np.random.default_rng(1).standard_normal((4, 2)), requires_grad=True)
    loss = ((x @ w).relu() ** 2).mean()
    loss.backward()
    expected_w = 2 * host(x).T @ (np.maximum(host(x) @ host(w), 0) / 6)
    np.testing.assert_allclose(host(w.grad), expected_w, rtol=1e-5)


def test_strict_backend_refuses_stray_numpy():
    sl.use_backend("strict")
    try:
        a = sl.tensor([1.0, 2.0]).data
        with pytest.raises(TypeError):
            np.asarray(a)
        with pytest.raises(TypeError):
            a + np.ones(2)
    finally:
        sl.use_backend("numpy")


def test_unknown_backend_and_missing_cupy_are_one_line_errors():
    with pytest.raises(backend.BackendUnavailable, match="unknown backend 'tpu'"):
        sl.use_backend("tpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(backend.BackendUnavailable, match="pip install"):
            sl.use_backend("cupy")
    assert sl.get_backend() == "numpy"


def test_profile_ops_counts_each_forward_and_backward():
    x = sl.tensor(np.ones((3, 4)), requires_grad=True)
    with sl.profile_ops() as table:
        y = ((x @ sl.tensor(np.ones((4, 2)))) * 2.0).sum()
        y.backward()
    assert table.calls["MatMul", "forward"] == 1 and table.calls["MatMul", "backward"] == 1
    assert table.calls["Mul", "forward"] == 1 and table.calls["Sum", "backward"] == 1
    assert all(seconds >= 0 for seconds in table.seconds.values())
    assert "MatMul" in str(table)
    z = (x * 3.0).sum()          # outside the block nothing is recorded
    assert table.calls["Mul", "forward"] == 1 and z.shape == ()
