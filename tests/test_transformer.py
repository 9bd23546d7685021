"""Masked attention and the encoder-decoder Transformer layers.

Oracles: float64 finite differences of the masked attention op and of MultiheadAttention
(tests/gradcheck.py); every kernel rung against the NumPy reference with masks; the invariant that
values at padded keys change nothing; and torch.nn (MultiheadAttention, TransformerEncoderLayer,
TransformerDecoderLayer, Transformer) with the same weights, when PyTorch is installed.

Tolerances: float64 rungs match the reference to 1e-10; float32 rungs within 2e-5 (outputs) and
1e-4 (gradients) of the float64 reference, relative to (1 + max|ref|), as tests/test_kernels.py.
Against torch in float32: outputs within 1e-5, gradients within rtol 1e-4 (+ 1e-5 * max|grad|).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import scratchlm as sl
import scratchlm.kernels as kernels
import scratchlm.nn as nn
import scratchlm.nn.functional as F
from scratchlm.errors import UserError
from scratchlm.kernels import attention, attention_strips
from gradcheck import check_gradients

# The float64 fixture holds for every example of a test (it is not meant to reset between them).
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")


def uniform(rng, shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, size=shape)


@st.composite
def masked_case(draw, max_t=9, head_dims=st.sampled_from([1, 3, 4, 5])):
    """q, k, v, do (float64), a key padding mask (maybe with a fully padded row), an attention
    mask (maybe), and causal (only when Tq == Tk)."""
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    t_query = draw(st.integers(1, max_t))
    t_key = draw(st.one_of(st.just(t_query), st.integers(1, max_t)))
    head_dim = draw(head_dims)
    causal = t_query == t_key and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, do = uniform(rng, (batch, heads, t_query, head_dim)), uniform(rng, (batch, heads, t_query, head_dim))
    k, v = uniform(rng, (batch, heads, t_key, head_dim)), uniform(rng, (batch, heads, t_key, head_dim))
    kpm = None
    if draw(st.booleans()):
        lengths = [draw(st.integers(0, t_key)) for _ in range(batch)]        # 0: a fully padded row
        kpm = np.arange(t_key)[None, :] >= np.array(lengths)[:, None]        # (B, Tk), True = padding
        if draw(st.booleans()):                                              # not only suffix padding
            kpm = rng.random((batch, t_key)) < 0.3
    attn_mask = rng.random((t_query, t_key)) < 0.3 if draw(st.booleans()) else None
    return q, k, v, do, kpm, attn_mask, causal


# ============================================================== the op: finite differences

@SETTINGS
@given(masked_case())
def test_masked_attention_gradients_match_finite_differences(float64, case):
    q, k, v, _, kpm, attn_mask, causal = case

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, causal=causal, key_padding_mask=kpm, attn_mask=attn_mask)

    check_gradients(fn, q, k, v)


@SETTINGS
@given(masked_case())
def test_masked_attention_reference_gradients_match_finite_differences(float64, case):
    """The same through the reference rung (what every other rung is compared with)."""
    q, k, v, _, kpm, attn_mask, causal = case
    previous = kernels.reference_forced()
    kernels.use_reference(True)
    try:
        check_gradients(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, causal=causal, key_padding_mask=kpm, attn_mask=attn_mask), q, k, v)
    finally:
        kernels.use_reference(previous)


def plain_masked_attention(q, k, v, allowed):
    """softmax over the allowed keys only, one (batch, head, query) at a time; rows with no key -> 0."""
    out = np.zeros_like(q)
    for b, h, i in np.ndindex(q.shape[:3]):
        keys = np.flatnonzero(allowed[b, i])
        if keys.size:
            s = k[b, h, keys] @ q[b, h, i] / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max())
            out[b, h, i] = (p / p.sum()) @ v[b, h, keys]
    return out


@SETTINGS
@given(masked_case())
def test_masked_reference_matches_a_plain_loop(case):
    q, k, v, _, kpm, attn_mask, causal = case
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    allowed = np.ones((B, Tq, Tk), dtype=bool)
    if kpm is not None:
        allowed &= ~kpm[:, None, :]
    if attn_mask is not None:
        allowed &= ~attn_mask[None]
    if causal:
        allowed &= np.tril(np.ones((Tq, Tk), dtype=bool))[None]
    out, lse = attention.forward_reference(q, k, v, causal, None, attention.blocked_keys(kpm, attn_mask))
    np.testing.assert_allclose(out, plain_masked_attention(q, k, v, allowed), rtol=1e-10, atol=1e-12)
    assert np.all(np.isneginf(lse) == ~allowed.any(axis=-1)[:, None, :])


def test_fully_masked_rows_give_zeros_and_zero_gradients(float64):
    rng = np.random.default_rng(0)
    q, k, v = (sl.tensor(uniform(rng, (2, 2, 3, 4)), requires_grad=True) for _ in range(3))
    kpm = np.array([[False, True, False], [True, True, True]])              # row 1: every key padded
    out = F.scaled_dot_product_attention(q, k, v, causal=False, key_padding_mask=kpm)
    out.sum().backward()
    assert np.all(np.isfinite(out.numpy())) and np.all(out.numpy()[1] == 0)
    for t in (q, k, v):
        grad = sl.backend.to_numpy(t.grad)
        assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0)
    assert np.all(sl.backend.to_numpy(k.grad)[0, :, 1] == 0)                 # a padded key: no gradient


# ============================================================== kernels vs the reference

RUNGS = {"batched": (attention.forward_batched_numba, attention.backward_batched_numba),
         "strips": (attention.forward_strips_blas, attention.backward_strips_blas),
         "tiled": (attention.forward_numba, attention.backward_numba),
         "dispatch": (attention.forward, attention.backward)}


def assert_close_float32(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.max(np.abs(actual - expected), initial=0.0) <= rtol * (1.0 + np.max(np.abs(expected), initial=0.0))


@needs_numba
@pytest.mark.parametrize("rung", sorted(RUNGS))
@SETTINGS
@given(case=masked_case(max_t=70, head_dims=st.sampled_from([1, 3, 17, 33])), strip=st.sampled_from([5, 64]))
def test_masked_kernels_match_reference(monkeypatch, rung, case, strip):
    """Odd head sizes, T across the 64-wide tiles and several strips (STRIP_Q 5: strips that end
    mid-row-block), padding masks with empty rows, attention masks; float64 and float32."""
    q, k, v, do, kpm, attn_mask, causal = case
    forward, backward = RUNGS[rung]
    blocked = attention.blocked_keys(kpm, attn_mask)
    with monkeypatch.context() as patch:
        patch.setattr(attention_strips, "STRIP_Q", strip)
        out, lse = attention.forward_reference(q, k, v, causal, None, blocked)
        expected = attention.backward_reference(do, q, k, v, out, lse, causal, None, blocked)
        fast_out, fast_lse = forward(q, k, v, causal, None, blocked)
        np.testing.assert_allclose(fast_out, out, rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(fast_lse), np.isneginf(lse))
        np.testing.assert_allclose(fast_lse[~np.isneginf(lse)], lse[~np.isneginf(lse)], rtol=1e-10, atol=1e-12)
        for got, want in zip(backward(do, q, k, v, out, lse, causal, None, blocked), expected):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
        narrow = [a.astype(np.float32) for a in (q, k, v, do)]
        wide = [a.astype(np.float64) for a in narrow]
        out, lse = attention.forward_reference(*wide[:3], causal, None, blocked)
        expected = attention.backward_reference(wide[3], *wide[:3], out, lse, causal, None, blocked)
        fast_out, fast_lse = forward(*narrow[:3], causal, None, blocked)
        assert fast_out.dtype == np.float32
        assert_close_float32(fast_out, out, 2e-5)
        for got, want in zip(backward(narrow[3], *narrow[:3], fast_out, fast_lse, causal, None, blocked), expected):
            assert_close_float32(got, want, 1e-4)


@needs_numba
@SETTINGS
@given(masked_case(max_t=20))
def test_kept_probs_backward_matches_reference_with_masks(case):
    q, k, v, do, kpm, attn_mask, causal = case
    blocked = attention.blocked_keys(kpm, attn_mask)
    out, lse, probs = attention.forward_keeping_probs(q, k, v, causal, None, blocked)
    ref_out, ref_lse, ref_probs = attention.forward_reference(q, k, v, causal, None, blocked, keep_probs=True)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    if probs is not None:
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-10, atol=1e-12)
        assert np.all(probs[np.broadcast_to(blocked[:, None], probs.shape)] == 0) if blocked is not None else True
    expected = attention.backward_reference(do, q, k, v, ref_out, ref_lse, causal, None, blocked)
    for got, want in zip(attention.backward_from_probs(do, q, k, v, out, lse, probs, causal, None, blocked), expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reference", [False, True])
def test_blocked_keys_get_exactly_zero_weight(dtype, reference):
    """Not a tiny positive number: exactly 0 (the float32 fast exp alone would give exp(-87))."""
    rng = np.random.default_rng(5)
    q, k, v = (sl.tensor(uniform(rng, (2, 3, 4, 5)).astype(dtype), dtype=dtype) for _ in range(3))
    kpm = np.array([[False, True, False, True], [True, True, True, True]])
    attn_mask = np.eye(4, dtype=bool)
    previous = kernels.reference_forced()
    kernels.use_reference(reference)
    try:
        out, weights = F.scaled_dot_product_attention(q, k, v, causal=False, key_padding_mask=kpm,
                                                      attn_mask=attn_mask, need_weights=True)
    finally:
        kernels.use_reference(previous)
    weights = weights.numpy()
    blocked = np.broadcast_to((kpm[:, None, :] | attn_mask[None])[:, None], weights.shape)
    assert weights.dtype == dtype and np.all(weights[blocked] == 0) and np.all(weights[~blocked] > 0)
    np.testing.assert_allclose(weights[0].sum(axis=-1), 1, rtol=1e-6)
    assert np.all(out.numpy()[1] == 0)


# ============================================================== invariant: padding is invisible

@pytest.mark.parametrize("reference", [False, True])
@SETTINGS
@given(case=masked_case(max_t=12), seed=st.integers(0, 2**31))
def test_values_at_padded_keys_change_nothing(float64, reference, case, seed):
    q, k, v, do, kpm, attn_mask, causal = case
    if kpm is None:
        kpm = np.zeros((q.shape[0], k.shape[2]), dtype=bool)
        kpm[:, -1] = True
    rng = np.random.default_rng(seed)
    padded = np.broadcast_to(kpm[:, None, :, None], k.shape)
    k2 = np.where(padded, rng.uniform(-50, 50, k.shape), k)
    v2 = np.where(padded, rng.uniform(-50, 50, v.shape), v)
    previous = kernels.reference_forced()
    kernels.use_reference(reference)
    try:
        results = []
        for keys, values in ((k, v), (k2, v2)):
            tq, tk, tv = (sl.tensor(a, requires_grad=True) for a in (q, keys, values))
            out = F.scaled_dot_product_attention(tq, tk, tv, causal=causal, key_padding_mask=kpm, attn_mask=attn_mask)
            out.backward(sl.backend.to_device(do))
            results.append([out.numpy()] + [sl.backend.to_numpy(t.grad) for t in (tq, tk, tv)])
    finally:
        kernels.use_reference(previous)
    (out, dq, dk, dv), (out2, dq2, dk2, dv2) = results
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dq2, dq, rtol=1e-12, atol=1e-12)
    for grad, grad2 in ((dk, dk2), (dv, dv2)):
        np.testing.assert_allclose(grad2[~padded], grad[~padded], rtol=1e-12, atol=1e-12)
        assert np.all(grad[padded] == 0) and np.all(grad2[padded] == 0)


# ============================================================== MultiheadAttention: finite differences

@SETTINGS
@given(case=masked_case(max_t=6, head_dims=st.just(2)), self_attention=st.booleans())
def test_multihead_attention_gradients_match_finite_differences(float64, case, self_attention):
    """Inputs and every parameter of a cross-attention (or self-attention) layer with masks."""
    q, k, _, _, kpm, attn_mask, causal = case
    B, H, Tq, D = q.shape
    C = H * D
    rng = np.random.default_rng(1)
    query = uniform(rng, (B, Tq, C))
    memory = query if self_attention else uniform(rng, (B, k.shape[2], C))
    if self_attention:
        kpm = None if kpm is None else np.resize(kpm, (B, Tq))
        attn_mask = None if attn_mask is None else np.resize(attn_mask, (Tq, Tq))
    attn = nn.MultiheadAttention(C, H)
    params = [uniform(rng, p.shape, -0.5, 0.5) for p in attn.parameters()]

    def fn(x, mem, w_in, b_in, w_out, b_out):
        attn.in_proj_weight, attn.in_proj_bias = w_in, b_in
        attn.out_proj.weight, attn.out_proj.bias = w_out, b_out
        out, _ = attn(x, x if self_attention else mem, x if self_attention else mem, key_padding_mask=kpm,
                      attn_mask=attn_mask, need_weights=False, is_causal=causal and self_attention)
        return out

    check_gradients(fn, query, memory, *params, wrt=[0, 2, 3, 4, 5] if self_attention else None)


def test_masked_multihead_attention_runs_on_the_strict_backend(any_backend):
    """The reference path and the layers reach arrays only through backend.xp (as CuPy needs)."""
    rng = np.random.default_rng(6)
    query, memory = uniform(rng, (2, 3, 4)), uniform(rng, (2, 5, 4))
    kpm = np.array([[False, False, True, True, True], [True] * 5])
    attn = nn.MultiheadAttention(4, 2)
    params = [sl.backend.to_numpy(p.data) for p in attn.parameters()]

    def fn(x, mem, w_in):
        attn.in_proj_weight = w_in
        return attn(x, mem, mem, key_padding_mask=kpm, attn_mask=np.eye(3, 5, dtype=bool))[0]

    check_gradients(fn, query, memory, params[0])
    layer = nn.TransformerDecoderLayer(4, 2, dim_feedforward=8, dropout=0.1, norm_first=True)
    out = layer(sl.tensor(query), sl.tensor(memory), tgt_is_causal=True, memory_key_padding_mask=kpm)
    assert np.all(np.isfinite(sl.backend.to_numpy(out.data)))


@pytest.mark.parametrize("layer_type", ["mha", "encoder", "decoder"])
def test_batch_first_false_is_the_transpose(layer_type):
    rng = np.random.default_rng(7)
    x, mem = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 5, 4)).astype(np.float32)
    kpm = np.array([[False] * 5, [False, False, True, True, True]])
    make = {"mha": lambda bf: nn.MultiheadAttention(4, 2, batch_first=bf),
            "encoder": lambda bf: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=bf),
            "decoder": lambda bf: nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, batch_first=bf)}[layer_type]
    first, second = make(True), make(False)
    second.load_state_dict(first.state_dict())
    run = {"mha": lambda m, a, b: m(a, b, b, key_padding_mask=kpm)[0],
           "encoder": lambda m, a, b: m(b, src_key_padding_mask=kpm),
           "decoder": lambda m, a, b: m(a, b, memory_key_padding_mask=kpm)}[layer_type]
    expected = run(first, sl.tensor(x), sl.tensor(mem)).numpy()
    got = run(second, sl.tensor(x.transpose(1, 0, 2)), sl.tensor(mem.transpose(1, 0, 2))).numpy()
    np.testing.assert_allclose(got.transpose(1, 0, 2), expected, rtol=1e-6, atol=1e-6)


def test_attention_dropout_gradients_match_finite_differences(float64):
    """Dropout on the weights: the same mask on every evaluation (a fresh generator of one seed)."""
    rng = np.random.default_rng(2)
    q, k, v = uniform(rng, (2, 2, 4, 3)), uniform(rng, (2, 2, 5, 3)), uniform(rng, (2, 2, 5, 3))
    kpm = np.array([[False] * 4 + [True], [False] * 5])

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, causal=False, key_padding_mask=kpm, dropout_p=0.3,
                                              generator=sl.backend.random_generator(7))

    check_gradients(fn, q, k, v)
    out, weights = F.scaled_dot_product_attention(sl.tensor(q), sl.tensor(k), sl.tensor(v), causal=False,
                                                  dropout_p=0.3, need_weights=True,
                                                  generator=sl.backend.random_generator(7))
    np.testing.assert_allclose(out.numpy(), weights.numpy() @ v, rtol=1e-12, atol=1e-12)   # O = (P M) V
    assert np.any(weights.numpy() == 0)


def test_mask_errors_are_user_errors():
    x = sl.tensor(np.zeros((1, 1, 3, 2)))
    with pytest.raises(UserError, match="key_padding_mask must have shape"):
        F.scaled_dot_product_attention(x, x, x, causal=False, key_padding_mask=np.zeros((1, 4), bool))
    with pytest.raises(UserError, match="additive float bias"):
        F.scaled_dot_product_attention(x, x, x, causal=False, attn_mask=np.full((3, 3), -1e4))
    with pytest.raises(UserError, match="must be boolean"):
        F.scaled_dot_product_attention(x, x, x, causal=False, attn_mask=np.zeros((3, 3), int))


def test_float_minus_inf_mask_equals_bool_mask_and_causal_flag():
    rng = np.random.default_rng(3)
    x = sl.tensor(uniform(rng, (2, 5, 8)))
    attn = nn.MultiheadAttention(8, 2)
    as_bool = nn.Transformer.generate_square_subsequent_mask(5)
    as_float = np.where(as_bool, -np.inf, 0.0)
    outs = [attn(x, x, x, attn_mask=mask, is_causal=causal)[0].numpy()
            for mask, causal in ((as_bool, False), (as_float, False), (None, True))]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5, atol=1e-6)


def test_state_dict_names_are_pytorchs():
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16)
    sd = model.state_dict()
    for name, shape in (("encoder.layers.0.self_attn.in_proj_weight", (8, 24)),
                        ("encoder.layers.1.self_attn.in_proj_bias", (24,)),
                        ("encoder.layers.0.self_attn.out_proj.weight", (8, 8)),
                        ("encoder.layers.0.linear1.weight", (8, 16)), ("encoder.layers.0.linear2.weight", (16, 8)),
                        ("encoder.layers.0.norm1.weight", (8,)), ("encoder.norm.bias", (8,)),
                        ("decoder.layers.0.multihead_attn.out_proj.bias", (8,)),
                        ("decoder.layers.0.norm3.weight", (8,)), ("decoder.norm.bias", (8,))):
        assert sd[name].shape == shape, name
    assert len(sd) == 2 * 12 + 2 + 1 * 18 + 2


# ============================================================== oracle: torch.nn

def _torch():
    return pytest.importorskip("torch")


def load_from_torch(ours, theirs):
    """torch's state_dict into ours, 2-D matrices transposed."""
    sd = {name: (t.detach().numpy().T if t.ndim == 2 else t.detach().numpy()) for name, t in theirs.state_dict().items()}
    ours.load_state_dict(sd)


def assert_grads_match(ours, theirs):
    torch_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        want = torch_params[name].grad.numpy()
        want = want.T if want.ndim == 2 else want
        got = sl.backend.to_numpy(p.grad)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=name)


def padding_mask(rng, batch, length, fully_padded_row=False):
    """(B, T) True = padded: each row keeps a random prefix of >= 1 position (torch's plain math
    gives NaN on a row with nothing to attend to, so only our side is checked there)."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    return np.arange(length)[None, :] >= lengths[:, None]


@pytest.mark.parametrize("mode", ["self", "cross", "cross-distinct-value"])
def test_multihead_attention_matches_torch(mode):
    """Self-attention (one fused projection), cross-attention (key is value: one fused K|V
    projection) and distinct key and value tensors (three projections)."""
    torch = _torch()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cross = mode != "self"
    B, Tq, Tk, C, H = 3, 5, 7 if cross else 5, 12, 3
    theirs = torch.nn.MultiheadAttention(C, H, dropout=0.0, batch_first=True)
    ours = nn.MultiheadAttention(C, H)
    load_from_torch(ours, theirs)
    query = rng.standard_normal((B, Tq, C)).astype(np.float32)
    memory = rng.standard_normal((B, Tk, C)).astype(np.float32) if cross else query
    value = rng.standard_normal((B, Tk, C)).astype(np.float32) if mode == "cross-distinct-value" else memory
    kpm = padding_mask(rng, B, Tk)
    attn_mask = rng.random((Tq, Tk)) < 0.2
    attn_mask[:, 0] = False                                         # every query keeps a key
    upstream = rng.standard_normal((B, Tq, C)).astype(np.float32)
    for average in (True, False):
        tq = torch.tensor(query, requires_grad=True)
        tm = torch.tensor(memory, requires_grad=True) if cross else tq
        tv = torch.tensor(value, requires_grad=True) if mode == "cross-distinct-value" else tm
        t_out, t_w = theirs(tq, tm, tv, key_padding_mask=torch.tensor(kpm), attn_mask=torch.tensor(attn_mask),
                            need_weights=True, average_attn_weights=average)
        (t_out * torch.tensor(upstream)).sum().backward()
        sq = sl.tensor(query, requires_grad=True)
        sm = sl.tensor(memory, requires_grad=True) if cross else sq
        sv = sl.tensor(value, requires_grad=True) if mode == "cross-distinct-value" else sm
        out, w = ours(sq, sm, sv, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True,
                      average_attn_weights=average)
        (out * sl.tensor(upstream)).sum().backward()
        np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(w.numpy(), t_w.detach().numpy(), rtol=1e-5, atol=1e-6)
        assert w.shape == ((B, Tq, Tk) if average else (B, H, Tq, Tk))
        for ours_input, their_input in {id(t): (t, u) for t, u in ((sq, tq), (sm, tm), (sv, tv))}.values():
            np.testing.assert_allclose(sl.backend.to_numpy(ours_input.grad), their_input.grad.numpy(),
                                       rtol=1e-4, atol=1e-5)
        assert_grads_match(ours, theirs)
        theirs.zero_grad()
        ours.zero_grad()
    _, none = ours(sq, sm, sv, need_weights=False)
    assert none is None


LAYER_OPTIONS = [dict(norm_first=False, activation="relu"), dict(norm_first=True, activation="gelu"),
                 dict(norm_first=True, activation="relu"), dict(norm_first=False, activation="gelu")]


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: f"{'pre' if o['norm_first'] else 'post'}-{o['activation']}")
def test_encoder_layer_matches_torch(options):
    torch = _torch()
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    B, S, C, H = 3, 6, 8, 2
    theirs = torch.nn.TransformerEncoderLayer(C, H, dim_feedforward=16, dropout=0.0, batch_first=True, **options)
    ours = nn.TransformerEncoderLayer(C, H, dim_feedforward=16, dropout=0.0, **options)
    load_from_torch(ours, theirs)
    theirs.train()                                                  # the plain math, not the fast path
    src = rng.standard_normal((B, S, C)).astype(np.float32)
    kpm = padding_mask(rng, B, S)
    upstream = rng.standard_normal((B, S, C)).astype(np.float32)
    t_src = torch.tensor(src, requires_grad=True)
    t_out = theirs(t_src, src_key_padding_mask=torch.tensor(kpm))
    (t_out * torch.tensor(upstream)).sum().backward()
    s_src = sl.tensor(src, requires_grad=True)
    out = ours(s_src, src_key_padding_mask=kpm)
    (out * sl.tensor(upstream)).sum().backward()
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sl.backend.to_numpy(s_src.grad), t_src.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert_grads_match(ours, theirs)


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=lambda o: f"{'pre' if o['norm_first'] else 'post'}-{o['activation']}")
@pytest.mark.parametrize("mask_kind", ["bool", "torch-float", "is_causal"])
def test_decoder_layer_matches_torch(options, mask_kind):
    torch = _torch()
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    B, T, S, C, H = 3, 5, 7, 8, 2
    theirs = torch.nn.TransformerDecoderLayer(C, H, dim_feedforward=16, dropout=0.0, batch_first=True, **options)
    ours = nn.TransformerDecoderLayer(C, H, dim_feedforward=16, dropout=0.0, **options)
    load_from_torch(ours, theirs)
    tgt = rng.standard_normal((B, T, C)).astype(np.float32)
    memory = rng.standard_normal((B, S, C)).astype(np.float32)
    tgt_kpm, mem_kpm = padding_mask(rng, B, T), padding_mask(rng, B, S)
    upstream = rng.standard_normal((B, T, C)).astype(np.float32)
    t_mask = torch.nn.Transformer.generate_square_subsequent_mask(T)              # float: 0 and -inf
    t_tgt, t_mem = torch.tensor(tgt, requires_grad=True), torch.tensor(memory, requires_grad=True)
    t_out = theirs(t_tgt, t_mem, tgt_mask=torch.isinf(t_mask), tgt_key_padding_mask=torch.tensor(tgt_kpm),
                   memory_key_padding_mask=torch.tensor(mem_kpm), tgt_is_causal=True)
    (t_out * torch.tensor(upstream)).sum().backward()
    our_mask = {"bool": nn.Transformer.generate_square_subsequent_mask(T), "torch-float": t_mask.numpy(),
                "is_causal": None}[mask_kind]
    s_tgt, s_mem = sl.tensor(tgt, requires_grad=True), sl.tensor(memory, requires_grad=True)
    out = ours(s_tgt, s_mem, tgt_mask=our_mask, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=mem_kpm,
               tgt_is_causal=mask_kind == "is_causal")
    (out * sl.tensor(upstream)).sum().backward()
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sl.backend.to_numpy(s_tgt.grad), t_tgt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sl.backend.to_numpy(s_mem.grad), t_mem.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert_grads_match(ours, theirs)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_matches_torch(norm_first):
    torch = _torch()
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    B, S, T, C, H = 2, 6, 5, 8, 2
    kwargs = dict(d_model=C, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=16,
                  dropout=0.0, activation="gelu" if norm_first else "relu", norm_first=norm_first)
    theirs = torch.nn.Transformer(batch_first=True, **kwargs)
    ours = nn.Transformer(**kwargs)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    load_from_torch(ours, theirs)
    src = rng.standard_normal((B, S, C)).astype(np.float32)
    tgt = rng.standard_normal((B, T, C)).astype(np.float32)
    src_kpm, tgt_kpm = padding_mask(rng, B, S), padding_mask(rng, B, T)
    upstream = rng.standard_normal((B, T, C)).astype(np.float32)
    t_src, t_tgt = torch.tensor(src, requires_grad=True), torch.tensor(tgt, requires_grad=True)
    t_out = theirs(t_src, t_tgt, tgt_mask=torch.isinf(torch.nn.Transformer.generate_square_subsequent_mask(T)),
                   src_key_padding_mask=torch.tensor(src_kpm), tgt_key_padding_mask=torch.tensor(tgt_kpm),
                   memory_key_padding_mask=torch.tensor(src_kpm))
    (t_out * torch.tensor(upstream)).sum().backward()
    s_src, s_tgt = sl.tensor(src, requires_grad=True), sl.tensor(tgt, requires_grad=True)
    out = ours(s_src, s_tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
               src_key_padding_mask=src_kpm, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm)
    (out * sl.tensor(upstream)).sum().backward()
    np.testing.assert_allclose(out.numpy(), t_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sl.backend.to_numpy(s_src.grad), t_src.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sl.backend.to_numpy(s_tgt.grad), t_tgt.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert_grads_match(ours, theirs)


def test_eval_mode_dropout_is_off_and_training_dropout_is_seeded():
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                           dropout=0.5)
    rng = np.random.default_rng(4)
    src, tgt = sl.tensor(rng.standard_normal((2, 4, 8))), sl.tensor(rng.standard_normal((2, 3, 8)))
    model.eval()
    np.testing.assert_array_equal(model(src, tgt).numpy(), model(src, tgt).numpy())
    model.train()
    sl.manual_seed(5)
    first = model(src, tgt).numpy()
    sl.manual_seed(5)
    np.testing.assert_array_equal(model(src, tgt).numpy(), first)
    assert not np.allclose(model(src, tgt).numpy(), first)
