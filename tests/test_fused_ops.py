"""Fused ops (scratchlm.ops.fused) on the CPU: finite differences for the hand-written backward,
and the unfused pair (Add then Gelu; Add then LayerNorm) as the reference."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

import scratchlm as sl
import scratchlm.nn.functional as F
from gradcheck import check_gradients


@st.composite
def rows_and_bias(draw):
    shape = draw(st.sampled_from([(1, 1), (3, 4), (2, 3, 5)]))
    values = st.floats(-4, 4, width=64)
    return (draw(hnp.arrays(np.float64, shape, elements=values)),
            draw(hnp.arrays(np.float64, shape[-1:], elements=values)))


@given(rows_and_bias(), st.sampled_from(["none", "tanh"]))
def test_bias_gelu_gradients_match_finite_differences(xb, approximate):
    x, b = xb
    check_gradients(lambda t, c: F.bias_gelu(t, c, approximate=approximate), x, b)


@given(rows_and_bias(), st.sampled_from(["none", "tanh"]))
def test_bias_gelu_equals_add_then_gelu(xb, approximate):
    x, b = (sl.tensor(a, dtype=np.float64) for a in xb)
    np.testing.assert_allclose(F.bias_gelu(x, b, approximate).data, F.gelu(x + b, approximate).data,
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ residual add + layer norm

@st.composite
def stream_and_norm(draw):
    """x and r (..., C) with C >= 2 (a layer norm of one channel is constant), w and b (C,)."""
    shape = draw(st.sampled_from([(1, 2), (3, 4), (2, 3, 5)]))
    values = st.floats(-4, 4, width=64)
    x, r = (draw(hnp.arrays(np.float64, shape, elements=values)) for _ in range(2))
    w, b = (draw(hnp.arrays(np.float64, shape[-1:], elements=values)) for _ in range(2))
    # rows whose sum x + r is (nearly) constant have rstd ~ 1/sqrt(eps): the finite differences
    # of such a steep function are not an oracle; keep each row's spread visible
    assume(np.all(np.std(x + r, axis=-1) > 0.1))
    return x, r, w, b


@given(stream_and_norm(), st.sampled_from(["both", "y", "s"]))
def test_add_layer_norm_gradients_match_finite_differences(inputs, used):
    def fn(x, r, w, b):
        s, y = F.add_layer_norm(x, r, w, b)
        return {"both": lambda: F.stack([s, y]), "y": lambda: y, "s": lambda: s}[used]()
    # with only s used, w and b get no gradient (they do not reach the loss)
    check_gradients(fn, *inputs, wrt=[0, 1] if used == "s" else None)


@given(stream_and_norm())
def test_add_layer_norm_equals_add_then_layer_norm_forward_and_backward(inputs):
    """The unfused composition is the oracle: outputs and every input's gradient agree, with both
    outputs reaching the loss (s also through a second path, as the residual stream does)."""
    rng = np.random.default_rng(0)
    upstream_s, upstream_y = (rng.standard_normal(inputs[0].shape) for _ in range(2))

    def run(fused):
        x, r, w, b = (sl.tensor(a, requires_grad=True, dtype=np.float64) for a in inputs)
        if fused:
            s, y = F.add_layer_norm(x, r, w, b)
        else:
            s = x + r
            y = F.layer_norm(s, w, b)
        ((s * sl.tensor(upstream_s)).sum() + (y * sl.tensor(upstream_y)).sum()).backward()
        return [s.numpy(), y.numpy()] + [t.grad for t in (x, r, w, b)]

    for fused, unfused in zip(run(True), run(False)):
        np.testing.assert_allclose(fused, unfused, rtol=1e-10, atol=1e-12)


def test_add_layer_norm_refuses_a_residual_of_another_shape():
    x, r = sl.tensor(np.ones((2, 3))), sl.tensor(np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"residual has shape \(1, 3\), x has \(2, 3\)"):
        F.add_layer_norm(x, r, sl.tensor(np.ones(3)), None)
