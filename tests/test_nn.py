"""scratchlm.nn: the Module machinery and each layer.

Oracles: NumPy re-computations of each layer's forward; central finite differences along a
random direction for the gradients (float64; the check is |analytic - numeric| <= 1e-6 *
max(1, |numeric|), with eps = 1e-6 the truncation error is ~1e-12 and the rounding error
~1e-10); hand-computed values (the sinusoidal table); and invariants (causality, dedup).
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import scratchlm as sl
import scratchlm.nn as nn
from scratchlm import backend
from scratchlm.errors import UserError

GRAD_TOL = 1e-6
FD_EPS = 1e-6


@pytest.fixture
def float64():
    previous = backend.get_default_dtype()
    sl.set_default_dtype(np.float64)
    nn.seed_init(0)
    yield
    sl.set_default_dtype(previous)


def check_gradients(loss_fn, tensors, seed=0):
    """Compare backward() with central differences of loss_fn along one random direction per tensor.

    loss_fn() -> a scalar Tensor; tensors: leaves (parameters or inputs) whose .data is perturbed.
    d/de L(p + e d) at 0 = <dL/dp, d>, the directional derivative that one backward gives for all p.
    """
    rng = np.random.default_rng(seed)
    for t in tensors:
        t.grad = None
    loss_fn().backward()
    for t in tensors:
        direction = rng.standard_normal(t.shape)
        analytic = float(np.sum(backend.to_numpy(t.grad) * direction))
        original = t.data.copy()
        t.data[...] = original + FD_EPS * direction
        plus = loss_fn().item()
        t.data[...] = original - FD_EPS * direction
        minus = loss_fn().item()
        t.data[...] = original
        numeric = (plus - minus) / (2 * FD_EPS)
        assert abs(analytic - numeric) <= GRAD_TOL * max(1.0, abs(numeric)), (t.shape, analytic, numeric)


def projected(module, x, seed=1):
    """A scalar loss from a layer's output: <module(x), R> for a fixed random R (every output counts)."""
    out_shape = module(x).shape
    weights = sl.tensor(np.random.default_rng(seed).standard_normal(out_shape))
    return lambda: (module(x) * weights).sum()


def random_input(*shape, seed=2):
    return sl.tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


# ---------------------------------------------------------------------- layers

@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       bias=st.booleans())
def test_linear_matches_numpy_and_its_gradients(n_in, n_out, lead, bias):
    previous = backend.get_default_dtype()
    sl.set_default_dtype(np.float64)
    try:
        layer = nn.Linear(n_in, n_out, bias=bias)
        assert layer.weight.shape == (n_in, n_out)
        assert (layer.bias is None) == (not bias)
        x = random_input(*lead, n_in)
        y = layer(x)
        expected = x.numpy() @ layer.weight.numpy() + (layer.bias.numpy() if bias else 0.0)
        assert y.shape == (*lead, n_out)
        np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)
        check_gradients(projected(layer, x), [x, *layer.parameters()])
    finally:
        sl.set_default_dtype(previous)


def test_layer_norm_matches_numpy_and_its_gradients(float64):
    layer = nn.LayerNorm(6)
    rng = np.random.default_rng(3)
    layer.weight.data[...] = rng.standard_normal(6)
    layer.bias.data[...] = rng.standard_normal(6)
    x = random_input(2, 3, 6)
    xn = x.numpy()
    normalised = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer(x).numpy(), normalised * layer.weight.numpy() + layer.bias.numpy(), atol=1e-12)
    check_gradients(projected(layer, x), [x, layer.weight, layer.bias])
    no_bias = nn.LayerNorm(6, bias=False)
    assert [name for name, _ in no_bias.named_parameters()] == ["weight"]
    np.testing.assert_allclose(no_bias(x).numpy(), normalised, atol=1e-12)


def test_embedding_gathers_rows_and_sums_gradients_of_repeated_ids(float64):
    table = nn.Embedding(5, 3)
    idx = np.array([[1, 4, 1], [0, 1, 2]])
    out = table(idx)
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out.numpy(), table.weight.numpy()[idx])
    out.sum().backward()
    counts = np.bincount(idx.ravel(), minlength=5)[:, None]       # id 1 appears three times
    np.testing.assert_array_equal(table.weight.grad, np.broadcast_to(counts, (5, 3)))


def test_dropout_is_identity_in_eval_and_masks_and_scales_in_training(float64):
    layer = nn.Dropout(0.25)
    x = sl.tensor(np.ones((200, 100)))
    assert layer.eval()(x) is x
    sl.manual_seed(0)
    y = layer.train()(x).numpy()
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    n = y.size                                  # zeros ~ Binomial(n, 0.25): within 5 standard deviations
    assert abs((~kept).sum() - 0.25 * n) < 5 * math.sqrt(n * 0.25 * 0.75)
    with pytest.raises(UserError):
        nn.Dropout(1.0)


def test_gelu_module_is_the_tanh_approximation(float64):
    x = np.linspace(-4, 4, 17)
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(nn.GELU()(sl.tensor(x)).numpy(), expected, atol=1e-12)


def randomise(module, seed=5):
    """Random values in every parameter (biases and LayerNorm gains too, which start at 0 and 1),
    so a reference that mixes up two parameters cannot agree by accident."""
    rng = np.random.default_rng(seed)
    for p in module.parameters():
        p.data[...] = backend.to_device(rng.standard_normal(p.shape))


def gelu_tanh_reference(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def mlp_reference(x, c_fc_w, c_fc_b, c_proj_w, c_proj_b):
    """GPT-2's feed-forward half in NumPy: (B, T, C) @ (C, 4C) -> tanh-GELU -> @ (4C, C)."""
    return gelu_tanh_reference(x @ c_fc_w + c_fc_b) @ c_proj_w + c_proj_b


def layer_norm_reference(x, weight, bias, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps) * weight + bias


def test_mlp_matches_numpy_and_its_gradients(float64):
    mlp = nn.MLP(4)
    assert mlp.c_fc.weight.shape == (4, 16) and mlp.c_proj.weight.shape == (16, 4)
    randomise(mlp)
    x = random_input(2, 3, 4)
    expected = mlp_reference(x.numpy(), mlp.c_fc.weight.numpy(), mlp.c_fc.bias.numpy(),
                             mlp.c_proj.weight.numpy(), mlp.c_proj.bias.numpy())
    np.testing.assert_allclose(mlp(x).numpy(), expected, rtol=1e-12, atol=1e-12)
    check_gradients(projected(mlp, x), [x, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias])


def test_mlp_matches_torch(float64):
    torch = pytest.importorskip("torch")
    mlp = nn.MLP(6)
    randomise(mlp)
    x = np.random.default_rng(3).standard_normal((2, 5, 6))
    fc, proj = torch.nn.Linear(6, 24).double(), torch.nn.Linear(24, 6).double()
    with torch.no_grad():            # torch stores (n_out, n_in): transpose the (n_in, n_out) matrices
        fc.weight.copy_(torch.from_numpy(mlp.c_fc.weight.numpy().T))
        fc.bias.copy_(torch.from_numpy(mlp.c_fc.bias.numpy()))
        proj.weight.copy_(torch.from_numpy(mlp.c_proj.weight.numpy().T))
        proj.bias.copy_(torch.from_numpy(mlp.c_proj.bias.numpy()))
        theirs = proj(torch.nn.functional.gelu(fc(torch.from_numpy(x)), approximate="tanh")).numpy()
    np.testing.assert_allclose(mlp(sl.tensor(x)).numpy(), theirs, rtol=1e-12, atol=1e-12)


def attention_reference(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """Multi-head causal self-attention written out in NumPy, head by head, row by row."""
    B, T, C = x.shape
    D = C // n_head
    q, k, v = np.split(x @ c_attn_w + c_attn_b, 3, axis=-1)
    out = np.zeros_like(x)
    for b in range(B):
        for h in range(n_head):
            cols = slice(h * D, (h + 1) * D)
            for t in range(T):
                scores = q[b, t, cols] @ k[b, : t + 1, cols].T / math.sqrt(D)      # keys 0..t only
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, t, cols] = p @ v[b, : t + 1, cols]
    return out @ c_proj_w + c_proj_b


def test_causal_self_attention_matches_numpy_and_its_gradients(float64):
    attn = nn.CausalSelfAttention(8, 2)
    assert attn.c_attn.weight.shape == (8, 24)
    x = random_input(2, 5, 8)
    expected = attention_reference(x.numpy(), *(p.numpy() for p in attn.parameters()), n_head=2)
    np.testing.assert_allclose(attn(x).numpy(), expected, atol=1e-12)
    check_gradients(projected(attn, x), [x, *attn.parameters()])


def test_causal_self_attention_does_not_read_the_future(float64):
    attn = nn.CausalSelfAttention(8, 4)
    x = np.random.default_rng(4).standard_normal((1, 6, 8))
    changed = x.copy()
    changed[0, 4:] += 10.0                                   # rewrite positions 4 and 5
    before, after = attn(sl.tensor(x)).numpy(), attn(sl.tensor(changed)).numpy()
    np.testing.assert_array_equal(before[0, :4], after[0, :4])
    assert not np.allclose(before[0, 4:], after[0, 4:])


def test_attention_rejects_indivisible_heads():
    with pytest.raises(UserError, match=r"n_embd \(10\).*n_head \(3\)"):
        nn.CausalSelfAttention(10, 3)


def test_block_is_two_pre_norm_residual_halves_and_its_gradients(float64):
    """Against NumPy written here (not the block's own submodules): x + attn(ln_1(x)), then
    h + mlp(ln_2(h)), with every parameter randomised so that no two can be confused."""
    block = nn.Block(8, 2)
    randomise(block)
    x = random_input(2, 4, 8)
    p = {name: value.numpy() for name, value in block.named_parameters()}
    half = x.numpy() + attention_reference(layer_norm_reference(x.numpy(), p["ln_1.weight"], p["ln_1.bias"]),
                                           p["attn.c_attn.weight"], p["attn.c_attn.bias"],
                                           p["attn.c_proj.weight"], p["attn.c_proj.bias"], n_head=2)
    expected = half + mlp_reference(layer_norm_reference(half, p["ln_2.weight"], p["ln_2.bias"]),
                                    p["mlp.c_fc.weight"], p["mlp.c_fc.bias"],
                                    p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    np.testing.assert_allclose(block(x).numpy(), expected, rtol=1e-11, atol=1e-11)
    check_gradients(projected(block, x), [x, *block.parameters()])


def test_sinusoidal_positions_are_the_classic_table(float64):
    C = 7                                       # odd: the last sine has no cosine partner
    pe = nn.SinusoidalPositionalEncoding(10, C)
    assert pe.parameters() == []
    table = pe(np.arange(10)).numpy()
    assert table.shape == (10, C)
    np.testing.assert_array_equal(table[0], [0, 1, 0, 1, 0, 1, 0])
    for pos in (1, 9):
        for i in range(0, C, 2):
            angle = pos / 10000 ** (i / C)
            assert table[pos, i] == pytest.approx(math.sin(angle), abs=1e-15)
            if i + 1 < C:
                assert table[pos, i + 1] == pytest.approx(math.cos(angle), abs=1e-15)
    np.testing.assert_array_equal(pe(np.array([[3, 1]])).numpy(), table[[[3, 1]]])


# ---------------------------------------------------------------------- Module machinery

class Tied(nn.Module):
    """Two layers sharing one weight matrix, as GPT's wte / lm_head."""

    def __init__(self):
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3, bias=False)
        self.second.weight = self.first.weight
        self.blocks = nn.ModuleList([nn.LayerNorm(3), nn.LayerNorm(3)])

    def forward(self, x):
        return self.blocks[1](self.second(self.blocks[0](self.first(x))))


def test_parameters_are_named_in_order_and_a_shared_one_counts_once():
    model = Tied()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["first.weight", "first.bias", "blocks.0.weight", "blocks.0.bias",
                     "blocks.1.weight", "blocks.1.bias"]
    assert len(model.parameters()) == 6
    assert model.num_parameters() == 9 + 3 + 4 * 3
    sd = model.state_dict()
    assert list(sd) == ["first.weight", "first.bias", "second.weight", "blocks.0.weight", "blocks.0.bias",
                        "blocks.1.weight", "blocks.1.bias"]
    assert sd["second.weight"] is sd["first.weight"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())


def test_load_state_dict_round_trip_is_exact_and_in_place():
    nn.seed_init(1)
    source, target = Tied(), Tied()
    arrays_before = [p.data for p in target.parameters()]
    missing, unexpected = target.load_state_dict({k: v.copy() for k, v in source.state_dict().items()})
    assert missing == [] and unexpected == []
    for (name, p), (_, q) in zip(source.named_parameters(), target.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    assert all(p.data is a for p, a in zip(target.parameters(), arrays_before))   # copied into place


def test_load_state_dict_converts_dtype_and_counts_a_tied_name_as_enough():
    target = Tied()
    sd = {k: np.asarray(v, dtype=np.float64) + 1 for k, v in Tied().state_dict().items()}
    del sd["second.weight"]                         # the tied alias of first.weight
    assert target.load_state_dict(sd) == ([], [])
    assert target.first.weight.dtype == np.float32
    np.testing.assert_allclose(target.second.weight.numpy(), sd["first.weight"].astype(np.float32))


def test_load_state_dict_errors_name_the_key_and_change_nothing():
    model = Tied()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    del sd["blocks.1.bias"]
    sd["extra.weight"] = np.zeros(2)
    with pytest.raises(UserError, match=r"missing key 'blocks.1.bias'.*unexpected key 'extra.weight'"):
        model.load_state_dict(sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert (missing, unexpected) == (["blocks.1.bias"], ["extra.weight"])
    np.testing.assert_array_equal(model.first.bias.data, before["first.bias"] + 1)
    np.testing.assert_array_equal(model.blocks[1].bias.data, before["blocks.1.bias"])
    wrong = dict(model.state_dict(), **{"blocks.0.weight": np.zeros(4)})
    snapshot = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"'blocks.0.weight'.*\(4,\).*\(3,\)"):
        model.load_state_dict(wrong, strict=False)
    for k, v in model.state_dict().items():        # the refused load copied nothing
        np.testing.assert_array_equal(v, snapshot[k])


def test_train_and_eval_reach_every_submodule():
    block = nn.Block(8, 2, dropout=0.1)
    assert all(m.training for m in block.modules())
    block.eval()
    assert not any(m.training for m in block.modules())
    block.train()
    assert block.mlp.dropout.training and block.attn.resid_dropout.training


def test_zero_grad_sets_gradients_to_none():
    layer = nn.Linear(2, 2)
    layer(sl.tensor([[1.0, 2.0]])).sum().backward()
    assert layer.weight.grad is not None
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_repr_is_nested_like_pytorch():
    text = repr(nn.Block(8, 2))
    assert text.startswith("Block(\n  (ln_1): LayerNorm((8,), eps=1e-05, bias=True)\n  (attn): CausalSelfAttention(\n")
    assert "    (c_attn): Linear(8, 24, bias=True)\n" in text
    assert "    (gelu): GELU(approximate='tanh')\n" in text and text.endswith("\n)")


def test_module_list_and_dict():
    layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 3)])
    assert len(layers) == 2 and layers[-1].n_out == 3 and [m.n_out for m in layers] == [2, 3]
    container = nn.ModuleDict(a=nn.LayerNorm(2), b=layers)
    assert "b" in container and "c" not in container and container["a"] is container.a
    assert [n for n, _ in container.named_parameters()][:3] == ["a.weight", "a.bias", "b.0.weight"]


def test_seed_init_makes_default_initialisation_reproducible():
    nn.seed_init(5)
    first = nn.Linear(4, 3).weight.numpy()
    nn.seed_init(5)
    np.testing.assert_array_equal(nn.Linear(4, 3).weight.numpy(), first)
    assert np.abs(first).max() <= 1 / math.sqrt(4)          # U(-1/sqrt(n_in), 1/sqrt(n_in))
