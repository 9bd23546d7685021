"""Fused ops (scratchlm.ops.fused) on the CPU: finite differences for the hand-written backward,
and the unfused pair (Add then Gelu) as the forward's reference."""
import numpy as np
from hypothesis import given, strategies as st
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
