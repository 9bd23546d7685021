"""Recurrent layers: the fused ops' backward through time against finite differences (float64,
Hypothesis-drawn sizes, on NumPy and the strict backend), the Numba step kernels against the
reference, and the layers against torch.nn.RNN / LSTM / GRU with the same weights (outputs, h_n,
c_n and every gradient, float32 and float64).

Values are drawn from a seeded normal generator rather than by Hypothesis element by element, so
no pre-activation sits on relu's kink at 0 (Hypothesis loves exact zeros).
"""
import itertools

import numpy as np
import pytest
from hypothesis import given, strategies as st

import scratchlm as sl
import scratchlm.nn as nn
from scratchlm import backend, kernels
from scratchlm.kernels import rnn as rnn_kernels
from scratchlm.ops import rnn as rnn_ops
from gradcheck import check_gradients

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


@st.composite
def layer_cases(draw):
    return dict(T=draw(st.integers(1, 4)), B=draw(st.integers(1, 3)), C=draw(st.integers(1, 4)),
                H=draw(st.integers(1, 4)), reverse=draw(st.booleans()), initial=draw(st.booleans()),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _layer_arrays(cell, case):
    """x (T, B, C), h0, c0 (B, H) or None, W_ih, W_hh, b_ih, b_hh (or None), float64."""
    rng = np.random.default_rng(case["seed"])
    T, B, C, H, G = case["T"], case["B"], case["C"], case["H"], GATES[cell]
    state = lambda: rng.standard_normal((B, H)) if case["initial"] else None
    bias = lambda: rng.uniform(-1, 1, G * H) if case["bias"] else None
    return dict(x=rng.standard_normal((T, B, C)), h0=state(), c0=state() if cell == "lstm" else None,
                w_ih=rng.uniform(-1, 1, (C, G * H)), w_hh=rng.uniform(-1, 1, (H, G * H)), b_ih=bias(), b_hh=bias())


def _apply_layer(cell, reverse, **inputs):
    if cell == "lstm":
        return rnn_ops.LSTMLayer.apply(*inputs.values(), reverse=reverse)
    inputs.pop("c0")
    if cell == "gru":
        return rnn_ops.GRULayer.apply(*inputs.values(), reverse=reverse)
    return rnn_ops.RNNLayer.apply(*inputs.values(), nonlinearity=cell[4:], reverse=reverse)


def _check_layer_op(cell, case):
    named = {k: v for k, v in _layer_arrays(cell, case).items()}
    present = [k for k, v in named.items() if v is not None]

    def fn(*tensors):
        inputs = dict.fromkeys(named)
        inputs.update(zip(present, tensors))
        return _apply_layer(cell, case["reverse"], **inputs)

    check_gradients(fn, *[named[k] for k in present])


# ====================================================================== 1. ops vs finite differences

@pytest.mark.usefixtures("any_backend")
@pytest.mark.parametrize("cell", list(GATES))
@given(case=layer_cases())
def test_layer_op_backward_matches_finite_differences(cell, case):
    _check_layer_op(cell, case)


# ====================================================================== 2. layers vs finite differences

LAYERS = {"rnn_tanh": lambda *a, **k: nn.RNN(*a, **k), "rnn_relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k),
          "lstm": lambda *a, **k: nn.LSTM(*a, **k), "gru": lambda *a, **k: nn.GRU(*a, **k)}


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("num_layers, bidirectional, initial, T",
                         [(2, True, True, 3), (2, False, False, 1), (1, True, False, 1), (3, False, True, 2)])
def test_layer_stack_backward_matches_finite_differences(cell, num_layers, bidirectional, initial, T):
    """Whole modules: every input, initial state and parameter through out, h_n (and c_n)."""
    B, C, H = 2, 3, 4
    layer = LAYERS[cell](C, H, num_layers=num_layers, bidirectional=bidirectional, rng=np.random.default_rng(1))
    names = [name for name, _ in layer.named_parameters()]
    rng = np.random.default_rng(2)
    L = num_layers * (2 if bidirectional else 1)
    states = [rng.standard_normal((L, B, H)) for _ in range(2 if cell == "lstm" else 1)] if initial else []
    arrays = [rng.standard_normal((B, T, C)), *states, *[p.numpy() for p in layer.parameters()]]

    def fn(x, *rest):
        n_states = len(states)
        for name, value in zip(names, rest[n_states:]):
            setattr(layer, name, value)
        state = rest[:n_states]
        hx = (tuple(state) if cell == "lstm" else state[0]) if state else None
        out, h = layer(x, hx)
        pieces = [out] + (list(h) if cell == "lstm" else [h])
        return sl.concatenate([p.reshape(-1) for p in pieces])

    check_gradients(fn, *arrays)


# ====================================================================== 3. Numba step kernels vs reference

def _step_inputs(cell, B, H, dtype, seed):
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)
    gates = rng.uniform(0.05, 0.95, (B, G * H)).astype(dtype)
    if cell in ("rnn_tanh", "rnn_relu", "lstm"):
        gates[:, 2 * H:3 * H] = rng.uniform(-0.95, 0.95, (B, H)) if cell == "lstm" else gates[:, 2 * H:3 * H]
    if cell == "gru":
        gates[:, 2 * H:] = rng.uniform(-0.95, 0.95, (B, H))
    return draw, gates


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("B, H", [(1, 1), (3, 5), (2, 13), (5, 7)])
def test_numba_step_kernels_match_reference(cell, dtype, rtol, B, H):
    """Forward and backward of one step, every output array, odd sizes (H not a multiple of 4/8)."""
    if not kernels.numba_available():
        pytest.skip("numba not installed")
    G = GATES[cell]
    draw, gates = _step_inputs(cell, B, H, dtype, seed=B * 100 + H)
    xw, hw, prev, dout, rec, carry = draw(B, G * H), draw(B, G * H), draw(B, H), draw(B, H), draw(B, H), draw(B, H)
    tanh_c, hn, b_hn = np.tanh(draw(B, H)), draw(B, H), draw(H)
    results = []
    for impl in (rnn_kernels.REFERENCE, rnn_kernels.NUMBA):
        out = {}
        if cell.startswith("rnn"):
            relu = cell == "rnn_relu"
            out["h"] = np.empty((B, H), dtype)
            impl.rnn_forward_step(xw, hw, out["h"], relu)
            out["da"] = np.empty((B, H), dtype)
            impl.rnn_backward_step(dout, rec, out["h"], out["da"], relu)
        elif cell == "lstm":
            out["gates"], out["c"], out["h"] = np.empty((B, 4 * H), dtype), np.empty((B, H), dtype), np.empty((B, H), dtype)
            out["tanh_c"] = np.empty((B, H), dtype)
            impl.lstm_forward_step(xw, hw, prev, out["gates"], out["c"], out["tanh_c"], out["h"])
            out["dc"], out["da"] = carry.copy(), np.empty((B, 4 * H), dtype)
            impl.lstm_backward_step(dout, rec, out["dc"], gates, prev, tanh_c, out["da"])
        else:
            out["gates"], out["hn"], out["h"] = np.empty((B, 3 * H), dtype), np.empty((B, H), dtype), np.empty((B, H), dtype)
            impl.gru_forward_step(xw, hw, b_hn, prev, out["gates"], out["hn"], out["h"])
            out["direct"], out["dax"], out["dah"] = carry.copy(), np.empty((B, 3 * H), dtype), np.empty((B, 3 * H), dtype)
            impl.gru_backward_step(dout, rec, out["direct"], prev, gates, hn, out["dax"], out["dah"])
        results.append(out)
    reference, fast = results
    for key in reference:
        np.testing.assert_allclose(fast[key], reference[key], rtol=rtol, atol=rtol, err_msg=key)


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_layer_op_numba_rung_matches_reference_rung(cell, dtype, rtol):
    """The whole op (forward and every gradient) with the Numba rung and with use_reference."""
    if not kernels.numba_available():
        pytest.skip("numba not installed")
    case = dict(T=5, B=3, C=6, H=7, reverse=True, initial=True, bias=True, seed=3)
    arrays = {k: None if v is None else v.astype(dtype) for k, v in _layer_arrays(cell, case).items()}
    upstream = None
    results = []
    was_forced = kernels.reference_forced()
    try:
        for force in (True, False):
            kernels.use_reference(force)
            tensors = {k: None if v is None else sl.tensor(v, requires_grad=True, dtype=dtype) for k, v in arrays.items()}
            y = _apply_layer(cell, case["reverse"], **tensors)
            if upstream is None:
                upstream = np.random.default_rng(0).standard_normal(y.shape).astype(dtype)
            y.backward(upstream)
            results.append([y.numpy()] + [t.grad for t in tensors.values() if t is not None and t.grad is not None])
    finally:
        kernels.use_reference(was_forced)
    assert len(results[0]) == len(results[1])
    for ref, fast in zip(*results):
        np.testing.assert_allclose(fast, ref, rtol=rtol, atol=rtol)


def test_step_kernels_dispatch():
    x32 = np.zeros((2, 2), np.float32)
    was_forced = kernels.reference_forced()
    try:
        kernels.use_reference(True)
        assert rnn_kernels.step_kernels(x32) is rnn_kernels.REFERENCE
        kernels.use_reference(False)
        expected = rnn_kernels.NUMBA if kernels.numba_available() else rnn_kernels.REFERENCE
        assert rnn_kernels.step_kernels(x32) is expected
        assert rnn_kernels.step_kernels(np.zeros((2, 2), np.int64)) is rnn_kernels.REFERENCE
    finally:
        kernels.use_reference(was_forced)


# ====================================================================== 4. PyTorch oracle

TORCH_CASES = list(itertools.product(["rnn_tanh", "rnn_relu", "lstm", "gru"], [1, 2], [False, True], [True, False],
                                     [False, True], [True, False]))


def _torch_layer(torch, cell, **options):
    if cell.startswith("rnn"):
        return torch.nn.RNN(nonlinearity=cell[4:], **options)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](**options)


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float32, 1e-4, 1e-5), (np.float64, 1e-9, 1e-12)])
@pytest.mark.parametrize("cell, num_layers, bidirectional, bias, initial, batch_first", TORCH_CASES)
def test_layers_match_torch(cell, num_layers, bidirectional, bias, initial, batch_first, dtype, rtol, atol):
    torch = pytest.importorskip("torch")
    previous = backend.get_default_dtype()
    sl.set_default_dtype(dtype)                  # the parameters in the dtype under test
    try:
        _compare_with_torch(torch, cell, num_layers, bidirectional, bias, initial, batch_first, dtype, rtol, atol)
    finally:
        sl.set_default_dtype(previous)


def _compare_with_torch(torch, cell, num_layers, bidirectional, bias, initial, batch_first, dtype, rtol, atol):
    B, T, C, H = 3, 5, 4, 6
    options = dict(input_size=C, hidden_size=H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                   bidirectional=bidirectional)
    torch.manual_seed(num_layers + 2 * bidirectional + 4 * bias)
    theirs = _torch_layer(torch, cell, **options).to(torch.float64 if dtype == np.float64 else torch.float32)
    ours = LAYERS[cell](**options)
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    assert list(sd) == [name for name, _ in ours.named_parameters()]      # PyTorch's names, in its order
    ours.load_state_dict({k: v.T if v.ndim == 2 else v for k, v in sd.items()})

    rng = np.random.default_rng(5)
    L = num_layers * (2 if bidirectional else 1)
    x = rng.standard_normal((B, T, C) if batch_first else (T, B, C)).astype(dtype)
    states = [rng.standard_normal((L, B, H)).astype(dtype) for _ in range(2 if cell == "lstm" else 1)] if initial else []

    t_in = [torch.tensor(a, requires_grad=True) for a in [x, *states]]
    o_in = [sl.tensor(a, requires_grad=True, dtype=dtype) for a in [x, *states]]
    hx_t = (tuple(t_in[1:]) if cell == "lstm" else t_in[1]) if initial else None
    hx_o = (tuple(o_in[1:]) if cell == "lstm" else o_in[1]) if initial else None
    t_out, t_h = theirs(t_in[0], hx_t)
    o_out, o_h = ours(o_in[0], hx_o)
    t_outputs = [t_out] + (list(t_h) if cell == "lstm" else [t_h])
    o_outputs = [o_out] + (list(o_h) if cell == "lstm" else [o_h])
    upstream = [rng.standard_normal(tuple(t.shape)).astype(dtype) for t in t_outputs]
    sum(((t * torch.tensor(u)).sum() for t, u in zip(t_outputs, upstream))).backward()
    total = None
    for o, u in zip(o_outputs, upstream):
        term = (o * sl.tensor(u, dtype=dtype)).sum()
        total = term if total is None else total + term
    total.backward()

    for t, o in zip(t_outputs, o_outputs):
        np.testing.assert_allclose(o.numpy(), t.detach().numpy(), rtol=rtol, atol=atol)
    for t, o in zip(t_in, o_in):
        np.testing.assert_allclose(backend.to_numpy(o.grad), t.grad.numpy(), rtol=rtol, atol=atol)
    for name, p in theirs.named_parameters():
        grad = p.grad.numpy()
        np.testing.assert_allclose(backend.to_numpy(getattr(ours, name).grad), grad.T if grad.ndim == 2 else grad,
                                   rtol=rtol, atol=atol, err_msg=name)


# ====================================================================== 5. layer behaviour

def test_inter_layer_dropout_only_while_training():
    x = sl.tensor(np.random.default_rng(0).standard_normal((2, 4, 3)))
    dropped = nn.LSTM(3, 5, num_layers=2, dropout=0.5, rng=np.random.default_rng(0))
    plain = nn.LSTM(3, 5, num_layers=2, rng=np.random.default_rng(0))
    dropped.eval()
    np.testing.assert_array_equal(dropped(x)[0].numpy(), plain(x)[0].numpy())
    dropped.train()
    sl.manual_seed(0)
    assert not np.allclose(dropped(x)[0].numpy(), plain(x)[0].numpy())
    # the last layer's output is never dropped: a one-layer stack ignores dropout
    one = nn.GRU(3, 5, dropout=0.5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(one(x)[0].numpy(), nn.GRU(3, 5, rng=np.random.default_rng(0))(x)[0].numpy())


def test_init_is_seeded_and_pytorch_uniform():
    a, b = nn.GRU(3, 16, rng=np.random.default_rng(7)), nn.GRU(3, 16, rng=np.random.default_rng(7))
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
        assert np.abs(p.numpy()).max() <= 1 / np.sqrt(16), name
    assert a.weight_ih_l0.shape == (3, 48) and a.weight_hh_l0.shape == (16, 48) and a.bias_hh_l0.shape == (48,)


def test_bad_arguments_are_refused():
    from scratchlm.errors import UserError
    with pytest.raises(UserError, match="nonlinearity"):
        nn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(UserError, match="dropout"):
        nn.LSTM(3, 4, dropout=1.0)
    with pytest.raises(UserError, match="hidden_size"):
        nn.GRU(3, 0)
    lstm = nn.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input_size = 3"):
        lstm(sl.tensor(np.zeros((2, 5, 4))))
    with pytest.raises(ValueError, match="h0 has shape"):
        lstm(sl.tensor(np.zeros((2, 5, 3))), (sl.tensor(np.zeros((1, 2, 4))), sl.tensor(np.zeros((2, 2, 4)))))


def test_step_arrays_continues_the_sequence_like_forward():
    """Decoding one step at a time from a carried state gives forward's outputs and final state."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3))
    for cell in ("rnn_relu", "lstm", "gru"):
        layer = LAYERS[cell](3, 4, num_layers=2, rng=np.random.default_rng(1))
        out, state = layer(sl.tensor(x))
        h = np.zeros((2, 2, 4), np.float32)
        c = np.zeros((2, 2, 4), np.float32) if cell == "lstm" else None
        for t in range(5):
            step_out, h, c = layer.step_arrays(sl.tensor(x[:, t]).data, h, c)
            np.testing.assert_allclose(step_out, out.numpy()[:, t], rtol=1e-5, atol=1e-6)
        h_n = state[0] if cell == "lstm" else state
        np.testing.assert_allclose(h, h_n.numpy(), rtol=1e-5, atol=1e-6)
        if cell == "lstm":
            np.testing.assert_allclose(c, state[1].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bidirectional"):
        nn.GRU(3, 4, bidirectional=True).step_arrays(np.zeros((1, 3), np.float32), np.zeros((2, 1, 4), np.float32))
