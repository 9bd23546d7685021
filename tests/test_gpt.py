"""scratchlm.models.GPT: names, shapes, gradients, tying, loading, training, sampling.

Oracles: the Hugging Face GPT-2 key list written out by hand; float64 central differences
along random directions (|analytic - numeric| <= 1e-6 * max(1, |numeric|)); the tied gradient
equal to the sum of the two untied uses; the parameter-count formula of GPT-2; a plain
PyTorch GPT built from our state dict (when torch is installed); argmax chains for greedy
sampling; and a memorisation run that must reach near-zero loss.
"""
import json
import math

import numpy as np
import pytest

import scratchlm as sl
import scratchlm.nn as nn
from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.models import GPT, GPTConfig, sample_next_token

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
GRAD_TOL, FD_EPS = 1e-6, 1e-6


def tiny(seed=0, **overrides):
    return GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)


def batch(B=3, T=8, V=11, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def hf_gpt2_keys(n_layer, bias=True, learned=True):
    """GPT2LMHeadModel.state_dict() key order (Hugging Face naming), written out by hand."""
    keys = ["transformer.wte.weight"] + (["transformer.wpe.weight"] if learned else [])
    for i in range(n_layer):
        for layer in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys += [f"transformer.h.{i}.{layer}.weight"] + ([f"transformer.h.{i}.{layer}.bias"] if bias else [])
    keys += ["transformer.ln_f.weight"] + (["transformer.ln_f.bias"] if bias else [])
    return keys + ["lm_head.weight"]


def hf_gpt2_shape(key, V, T, C):
    table = {"wte.weight": (V, C), "wpe.weight": (T, C), "c_attn.weight": (C, 3 * C), "c_attn.bias": (3 * C,),
             "attn.c_proj.weight": (C, C), "c_fc.weight": (C, 4 * C), "c_fc.bias": (4 * C,),
             "mlp.c_proj.weight": (4 * C, C), "lm_head.weight": (V, C)}
    for suffix, shape in table.items():
        if key.endswith(suffix):
            return shape
    return (C,)                        # LayerNorm weights/biases and c_proj biases


# ---------------------------------------------------------------------- config

def test_config_rejects_indivisible_heads_naming_both_numbers():
    with pytest.raises(UserError, match=r"n_embd \(10\).*n_head \(4\)"):
        GPTConfig(n_embd=10, n_head=4)


@pytest.mark.parametrize("bad", [dict(n_layer=0), dict(vocab_size=-1), dict(block_size=2.5), dict(n_head=True),
                                 dict(dropout=1.0), dict(bias="yes"), dict(positional="rotary")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(UserError):
        GPTConfig(**{**TINY, **bad})


def test_config_json_round_trip_and_unknown_keys():
    config = GPTConfig(**TINY, positional="sinusoidal")
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="'n_embed'"):
        GPTConfig.from_dict({"n_embed": 8})


# ---------------------------------------------------------------------- structure

@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_and_shapes_are_hugging_face_gpt2s(bias):
    model = tiny(bias=bias)
    sd = model.state_dict()
    assert list(sd) == hf_gpt2_keys(2, bias=bias)
    for key, array in sd.items():
        assert tuple(array.shape) == hf_gpt2_shape(key, 11, 8, 8), key


def test_sinusoidal_variant_has_no_wpe_and_runs():
    model = tiny(positional="sinusoidal")
    assert list(model.state_dict()) == hf_gpt2_keys(2, learned=False)
    idx, targets = batch()
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 8, 11) and np.isfinite(loss.item())
    first_two, _ = model(idx[:, :2])      # positions are causal: a prefix gives the same logits
    np.testing.assert_allclose(first_two.numpy(), logits.numpy()[:, :2], rtol=1e-5, atol=1e-6)


def test_lm_head_is_the_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    sd = model.state_dict()
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and len(names) == len(hf_gpt2_keys(2)) - 1
    C, V, T, L = 8, 11, 8, 2
    assert model.num_parameters(non_embedding=False) == V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def test_tied_gradient_is_the_sum_of_both_uses(float64):
    idx, targets = batch()
    model = tiny()
    model(idx, targets)[1].backward()
    tied_grad = model.transformer.wte.weight.grad.copy()
    # untie: give the head its own copy; then each matrix gets the gradient of one use only
    model.zero_grad()
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.data.copy())
    model(idx, targets)[1].backward()
    embedding_use, head_use = model.transformer.wte.weight.grad, model.lm_head.weight.grad
    assert np.abs(embedding_use).max() > 0 and np.abs(head_use).max() > 0
    np.testing.assert_allclose(tied_grad, embedding_use + head_use, rtol=1e-12, atol=1e-15)


def test_initialisation_is_gpt2s_and_seeded():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=64), seed=0)
    block = model.transformer.h[1]
    for weight, std in [(block.attn.c_attn.weight, 0.02), (model.transformer.wte.weight, 0.02),
                        (block.mlp.c_proj.weight, 0.02 / math.sqrt(6)), (block.attn.c_proj.weight, 0.02 / math.sqrt(6))]:
        n = weight.size                    # the sample std of n normals is within 5 standard errors
        assert abs(weight.numpy().std() - std) < 5 * std / math.sqrt(2 * n)
        assert abs(weight.numpy().mean()) < 5 * std / math.sqrt(n)
    assert np.all(block.attn.c_attn.bias.numpy() == 0) and np.all(block.ln_1.weight.numpy() == 1)
    assert np.all(block.ln_1.bias.numpy() == 0) and np.all(model.transformer.ln_f.weight.numpy() == 1)
    again = GPT(model.config, seed=0).state_dict()
    other = GPT(model.config, seed=1).state_dict()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, again[key])
    assert not np.array_equal(model.state_dict()["transformer.h.0.attn.c_attn.weight"],
                              other["transformer.h.0.attn.c_attn.weight"])


# ---------------------------------------------------------------------- forward and gradients

def test_forward_shapes_and_loss_is_mean_cross_entropy():
    model = tiny()
    idx, targets = batch()
    targets[0, :3] = -100                                       # ignored positions
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 8, 11)
    z = logits.numpy().astype(np.float64)
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    counted = targets != -100
    expected = -log_probs[counted, targets[counted]].mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    logits_only, no_loss = model(sl.tensor(idx))
    assert no_loss is None
    np.testing.assert_array_equal(logits_only.numpy(), logits.numpy())


def test_too_long_input_is_refused_naming_both_lengths():
    with pytest.raises(ValueError, match=r"9.*block_size 8"):
        tiny()(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        tiny()(np.zeros((1, 4)))


@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_whole_gpt_gradients_match_finite_differences(float64, positional):
    model = tiny(positional=positional)
    idx, targets = batch(B=2, T=6)
    params = dict(model.named_parameters())
    chosen = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight"]
    if positional == "learned":
        chosen.append("transformer.wpe.weight")
    loss_fn = lambda: model(idx, targets)[1]
    model.zero_grad()
    loss_fn().backward()
    rng = np.random.default_rng(0)
    for name in chosen:
        p = params[name]
        direction = rng.standard_normal(p.shape)
        analytic = float(np.sum(p.grad * direction))
        original = p.data.copy()
        p.data[...] = original + FD_EPS * direction
        plus = loss_fn().item()
        p.data[...] = original - FD_EPS * direction
        minus = loss_fn().item()
        p.data[...] = original
        numeric = (plus - minus) / (2 * FD_EPS)
        assert abs(analytic - numeric) <= GRAD_TOL * max(1.0, abs(numeric)), (name, analytic, numeric)


def test_eval_mode_turns_dropout_off():
    idx, _ = batch()
    with_dropout, without = tiny(dropout=0.5), tiny(dropout=0.0)
    with_dropout.eval()
    np.testing.assert_array_equal(with_dropout(idx)[0].numpy(), without(idx)[0].numpy())
    with_dropout.train()
    assert not np.array_equal(with_dropout(idx)[0].numpy(), without(idx)[0].numpy())


# ---------------------------------------------------------------------- loading

def test_load_state_dict_round_trip_is_exact():
    source, target = tiny(seed=0), tiny(seed=1)
    idx, _ = batch()
    assert target.load_state_dict({k: np.array(v) for k, v in source.state_dict().items()}) == ([], [])
    np.testing.assert_array_equal(target(idx)[0].numpy(), source(idx)[0].numpy())
    assert target.lm_head.weight is target.transformer.wte.weight


@pytest.mark.parametrize("bias", [True, False])
def test_fused_ops_give_the_unfused_models_logits_loss_and_gradients(bias):
    """F.add_layer_norm and F.bias_gelu in the blocks (bias + GELU forced on: by default it is
    fused on a GPU only) against the plain chain of ops (Block.forward: add, then layer_norm;
    linear with bias, then gelu), float32."""
    idx, targets = batch()
    results = []
    for fused in (True, False):
        model = tiny(seed=3, bias=bias).use_fused_ops(fused)
        for block in model.transformer.h:
            block.mlp.fuse_bias_gelu = fused
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits.numpy(), loss.item(), {n: np.array(p.grad) for n, p in model.named_parameters()}))
    (logits_f, loss_f, grads_f), (logits_u, loss_u, grads_u) = results
    np.testing.assert_allclose(logits_f, logits_u, rtol=1e-5, atol=1e-6)
    assert loss_f == pytest.approx(loss_u, rel=1e-6)
    assert grads_f.keys() == grads_u.keys()
    for name in grads_f:
        np.testing.assert_allclose(grads_f[name], grads_u[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_checkpoint_of_the_unfused_model_loads_into_the_fused_one(tmp_path):
    """The fusion changes no parameter: a checkpoint written by the plain model (the layout of
    checkpoints made before the fusion) loads into the fused one and gives the same logits."""
    from scratchlm.checkpoint import load_safetensors, save_safetensors
    plain = tiny(seed=4).use_fused_ops(False)
    save_safetensors(tmp_path / "model.safetensors", {k: np.array(v) for k, v in plain.state_dict().items()})
    fused = tiny(seed=5)
    assert fused.fused_ops and fused.load_state_dict(load_safetensors(tmp_path / "model.safetensors")[0]) == ([], [])
    idx, _ = batch()
    np.testing.assert_allclose(fused(idx)[0].numpy(), plain(idx)[0].numpy(), rtol=1e-5, atol=1e-6)


def gpt2_file_layout(sd, block_size):
    """What a GPT-2 model.safetensors holds: no 'transformer.' prefix, no lm_head, mask buffers."""
    out = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            continue
        out[key.removeprefix("transformer.")] = np.array(value)
        if key.endswith("attn.c_attn.weight"):
            layer = key.removeprefix("transformer.").removesuffix(".c_attn.weight")
            out[f"{layer}.bias"] = np.tril(np.ones((block_size, block_size), dtype=np.float32))[None, None]
            out[f"{layer}.masked_bias"] = np.array(-1e4, dtype=np.float32)
    return out


def test_gpt2_file_layout_loads(tmp_path):
    source, target = tiny(seed=0), tiny(seed=1)
    layout = gpt2_file_layout(source.state_dict(), 8)
    assert "h.0.attn.bias" in layout and "wte.weight" in layout
    assert target.load_state_dict(layout) == ([], [])
    idx, _ = batch()
    np.testing.assert_array_equal(target(idx)[0].numpy(), source(idx)[0].numpy())
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(layout, str(path))
    third = tiny(seed=2)
    assert third.load_state_dict(safetensors_numpy.load_file(str(path))) == ([], [])
    np.testing.assert_array_equal(third(idx)[0].numpy(), source(idx)[0].numpy())


def test_load_errors_name_the_first_key_or_shape_that_does_not_fit():
    model = tiny()
    sd = dict(model.state_dict())
    del sd["transformer.h.1.ln_2.bias"]
    with pytest.raises(UserError, match=r"missing key 'transformer.h.1.ln_2.bias'"):
        model.load_state_dict(sd)
    assert model.load_state_dict(sd, strict=False) == (["transformer.h.1.ln_2.bias"], [])
    with pytest.raises(UserError, match=r"unexpected key 'transformer.h.2.ln_1.weight'"):
        model.load_state_dict(dict(model.state_dict(), **{"h.2.ln_1.weight": np.ones(8)}))
    bigger = GPT(GPTConfig(**{**TINY, "vocab_size": 13})).state_dict()
    with pytest.raises(UserError, match=r"'transformer.wte.weight'.*\(13, 8\).*\(11, 8\)"):
        model.load_state_dict(bigger)


# ---------------------------------------------------------------------- training

def test_tiny_gpt_memorises_a_repeated_text():
    text = "gpt learns!" * 12                       # 11 distinct characters: each one fixes the next
    vocab = sorted(set(text))
    ids = np.array([vocab.index(ch) for ch in text])
    T = 16
    starts = np.arange(11)                           # one window per phase of the period
    idx = np.stack([ids[s : s + T] for s in starts])
    targets = np.stack([ids[s + 1 : s + T + 1] for s in starts])
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=T, n_layer=2, n_head=2, n_embd=16), seed=0)
    params = model.parameters()
    m = [np.zeros_like(p.data) for p in params]
    v = [np.zeros_like(p.data) for p in params]
    lr, beta1, beta2, eps = 3e-2, 0.9, 0.99, 1e-8
    for step in range(1, 301):                       # plain Adam, written out
        model.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        for p, m_i, v_i in zip(params, m, v):
            m_i[...] = beta1 * m_i + (1 - beta1) * p.grad
            v_i[...] = beta2 * v_i + (1 - beta2) * p.grad ** 2
            p.data -= lr * (m_i / (1 - beta1 ** step)) / (np.sqrt(v_i / (1 - beta2 ** step)) + eps)
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1, loss.item()
    prompt = np.array([[vocab.index("g")]])
    out = model.generate(prompt, max_new_tokens=21, temperature=0)
    assert "".join(vocab[i] for i in backend.to_numpy(out)[0]) == text[:22]


# ---------------------------------------------------------------------- sampling

def argmax_chain(model, prompt, steps):
    ids = np.array(prompt)
    for _ in range(steps):
        logits, _ = model(ids[:, -model.config.block_size:])
        ids = np.concatenate([ids, logits.numpy()[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


def test_greedy_top_k_1_and_temperature_0_are_the_argmax_chain():
    model = tiny()
    prompt = [[1, 2, 3], [4, 5, 6]]
    expected = argmax_chain(model, prompt, 12)             # 15 tokens: the context is cropped to 8
    greedy = backend.to_numpy(model.generate(prompt, 12, temperature=0))
    top1 = backend.to_numpy(model.generate(prompt, 12, top_k=1, seed=3))
    tiny_nucleus = backend.to_numpy(model.generate(prompt, 12, top_p=1e-9, seed=4))
    assert greedy.shape == (2, 15)
    np.testing.assert_array_equal(greedy, expected)
    np.testing.assert_array_equal(top1, expected)
    np.testing.assert_array_equal(tiny_nucleus, expected)


def test_generate_is_seeded_and_restores_training_mode():
    model = tiny(dropout=0.2)
    model.train()
    a = model.generate([[1]], 20, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    b = model.generate([[1]], 20, temperature=1.0, top_k=5, top_p=0.9, seed=7)
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert model.training and model.transformer.drop.training
    assert backend.to_numpy(model.generate([[1]], 0)).tolist() == [[1]]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_generate_validates_its_arguments(kwargs):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(UserError):
        tiny().generate([[1, 2]], **args)
    with pytest.raises(ValueError):
        tiny().generate([[1, 2]], **args)


def test_generate_refuses_out_of_vocabulary_prompts():
    with pytest.raises(UserError, match=r"\[0, 11\)"):
        tiny().generate([[11]], 2)


def test_sampling_filters_and_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]]))
    rng = np.random.default_rng(0)
    n = 20000
    rows = np.repeat(logits, n, axis=0)
    draws = sample_next_token(rows, 1.0, None, None, rng)
    frequencies = np.bincount(draws, minlength=4) / n
    p = np.array([0.5, 0.25, 0.15, 0.1])
    assert np.all(np.abs(frequencies - p) < 5 * np.sqrt(p * (1 - p) / n))          # 5 standard errors
    assert set(sample_next_token(rows, 1.0, 2, None, rng)) == {0, 1}                  # top_k = 2
    assert set(sample_next_token(rows, 1.0, None, 0.7, rng)) == {0, 1}                # 0.5 < 0.7 <= 0.75
    assert set(sample_next_token(rows, 1.0, 0, 0.5, rng)) == {0}                      # top_k 0 = off
    top2 = np.bincount(sample_next_token(rows, 1.0, 2, None, rng), minlength=4) / n   # renormalised 2/3, 1/3
    assert abs(top2[0] - 2 / 3) < 5 * math.sqrt(2 / 9 / n)
    hot = np.bincount(sample_next_token(rows, 0.5, None, None, rng), minlength=4) / n  # p^2 renormalised
    assert abs(hot[0] - 0.25 / (p ** 2).sum()) < 5 * math.sqrt(0.5 / n)


# ---------------------------------------------------------------------- accounting

def test_summary_lists_layers_and_the_gpt2_parameter_total():
    model = tiny()
    text = model.summary(batch_size=2, file=None)
    V, T, C, L = 11, 8, 8, 2
    total = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert f"Total params: {total:,}" in text
    assert f"Non-embedding params: {total - T * C:,}" in text
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "(2, 8, 24)" in lines["transformer.h.0.attn.c_attn"] and lines["transformer.h.0.attn.c_attn"].endswith(f"{C * 3 * C + 3 * C:,}")
    assert "(2, 8, 11)" in lines["lm_head"] and "tied" in lines["lm_head"]
    assert "(2, 8, 32)" in lines["transformer.h.1.mlp.gelu"]


def test_optimizer_groups_decay_only_linear_weights():
    model = tiny()
    decay, no_decay = model.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        f"transformer.h.{i}.{layer}.weight" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.attn.c_attn.bias"} <= {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())


def test_flops_per_token_is_6n_plus_attention():
    model = tiny()
    N = model.num_parameters()                                     # non-embedding (wpe excluded)
    assert N == model.num_parameters(non_embedding=False) - 8 * 8
    assert model.flops_per_token() == 6 * N + 12 * 2 * 2 * 4 * 8
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


# ---------------------------------------------------------------------- PyTorch as a second oracle

def test_matches_a_plain_pytorch_gpt(float64):
    torch = pytest.importorskip("torch")
    TF = torch.nn.functional
    model = tiny()
    idx, targets = batch(B=2, T=8)
    logits, loss = model(idx, targets)
    loss.backward()
    C, H = 8, 2
    weights = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    w = lambda name: weights["transformer." + name]
    tidx, ttargets = torch.tensor(idx), torch.tensor(targets)
    B, T = idx.shape
    x = w("wte.weight")[tidx] + w("wpe.weight")[:T]
    for i in range(2):
        p = f"h.{i}."
        h = TF.layer_norm(x, (C,), w(p + "ln_1.weight"), w(p + "ln_1.bias"), 1e-5)
        q, k, v = (h @ w(p + "attn.c_attn.weight") + w(p + "attn.c_attn.bias")).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + y @ w(p + "attn.c_proj.weight") + w(p + "attn.c_proj.bias")
        h = TF.layer_norm(x, (C,), w(p + "ln_2.weight"), w(p + "ln_2.bias"), 1e-5)
        h = TF.gelu(h @ w(p + "mlp.c_fc.weight") + w(p + "mlp.c_fc.bias"), approximate="tanh")
        x = x + h @ w(p + "mlp.c_proj.weight") + w(p + "mlp.c_proj.bias")
    x = TF.layer_norm(x, (C,), w("ln_f.weight"), w("ln_f.bias"), 1e-5)
    torch_logits = x @ w("wte.weight").T
    torch_loss = TF.cross_entropy(torch_logits.view(-1, 11), ttargets.view(-1))
    torch_loss.backward()
    np.testing.assert_allclose(logits.numpy(), torch_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-12)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad, weights[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def test_loads_a_hugging_face_gpt2_and_gives_its_logits(float64):
    """The real GPT2LMHeadModel (random weights, no download): same keys and shapes, and its
    weights loaded into ours give its logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).double().eval()
    hf_sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = tiny(seed=3)
    weights = {k: v for k, v in hf_sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert list(weights) == list(ours.state_dict())
    assert all(weights[k].shape == tuple(v.shape) for k, v in ours.state_dict().items())
    assert ours.load_state_dict(hf_sd) == ([], [])
    idx, _ = batch(B=2, T=8)
    with torch.no_grad():
        expected = hf(torch.tensor(idx)).logits.numpy()
    np.testing.assert_allclose(ours(idx)[0].numpy(), expected, rtol=1e-9, atol=1e-12)
