"""The ladder's models (bigram, MLP, RNN/LSTM/GRU LMs): shapes, the loss against a NumPy
cross-entropy, step-by-step decoding equal to the full forward at every position (the "cache"
equivalence), the bigram's trained table against the counts' MLE, causality and windows,
gradients by finite differences, and the config arithmetic against the built models."""
import contextlib

import numpy as np
import pytest

import scratchlm as sl
from scratchlm.models import MLPLM, RNNLM, BigramLM, BigramLMConfig, MLPLMConfig, ModelArgumentError, RNNLMConfig
from gradcheck import check_gradients

V = 7


def tiny_models(**rnn_options):
    return {
        "bigram": BigramLM(BigramLMConfig(vocab_size=V)),
        "mlp": MLPLM(MLPLMConfig(vocab_size=V, block_size=3, n_embd=4, n_hidden=6, n_layer=2)),
        "rnn": RNNLM(RNNLMConfig(vocab_size=V, n_embd=5, n_hidden=6, n_layer=2, cell="rnn", **rnn_options)),
        "lstm": RNNLM(RNNLMConfig(vocab_size=V, n_embd=5, n_hidden=6, n_layer=2, cell="lstm", **rnn_options)),
        "gru": RNNLM(RNNLMConfig(vocab_size=V, n_embd=6, n_hidden=6, n_layer=1, cell="gru", tie_weights=True)),
    }


NAMES = list(tiny_models())


def _ids(B, T, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def _randomise(model, seed=1):
    """Non-trivial weights (the bigram starts at zero, the MLP head near zero)."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = sl.backend.to_device(rng.uniform(-0.8, 0.8, p.shape), p.dtype)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_loss_match_numpy_cross_entropy(name):
    model = _randomise(tiny_models()[name])
    idx, targets = _ids(3, 6), _ids(3, 6, seed=1)
    targets[0, 2] = -100                                                   # ignored, as in the GPT
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 6, V)
    z = logits.numpy().astype(np.float64).reshape(-1, V)
    t = targets.reshape(-1)
    keep = t != -100
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    expected = np.mean(lse[keep] - z[keep, t[keep]])
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    assert model(idx)[1] is None


@pytest.mark.parametrize("tape", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_step_decoding_equals_full_forward_at_every_position(name, tape, float64):
    """Sampling runs without the tape (RNNLM then takes its array path); with it, step is the
    module forward on one token. Both must give the full forward's logits."""
    model = _randomise(tiny_models()[name]).eval()
    idx = _ids(2, 8)
    full, _ = model(idx)
    state = model.init_state(2)
    with (contextlib.nullcontext() if tape else sl.no_grad()):
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            assert logits.shape == (2, V)
            np.testing.assert_allclose(logits.numpy(), full.numpy()[:, t], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "rnn", "lstm", "gru"])
def test_logits_are_causal(name):
    """Changing token s changes no logits before s; the MLP's reach is its k-token window."""
    model = _randomise(tiny_models()[name]).eval()
    idx = _ids(1, 8)
    changed = idx.copy()
    changed[0, 4] = (idx[0, 4] + 1) % V
    a, b = model(idx)[0].numpy(), model(changed)[0].numpy()
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4], b[:, 4])
    if name == "mlp":                                      # k = 3: positions 4, 5, 6 see token 4, 7 does not
        assert not np.allclose(a[:, 6], b[:, 6])
        np.testing.assert_array_equal(a[:, 7], b[:, 7])


def test_mlp_pads_the_start_with_zero_vectors():
    model = _randomise(tiny_models()["mlp"]).eval()
    idx = _ids(1, 5)
    logits = model(idx)[0].numpy()
    # by hand at position 1: window [pad, x0, x1] = [0, E[x0], E[x1]]
    E = model.wte.weight.numpy()
    e = np.concatenate([np.zeros(4), E[idx[0, 0]], E[idx[0, 1]]])
    h = np.tanh(e @ model.hidden[0].weight.numpy() + model.hidden[0].bias.numpy())
    h = np.tanh(h @ model.hidden[1].weight.numpy() + model.hidden[1].bias.numpy())
    expected = h @ model.lm_head.weight.numpy() + model.lm_head.bias.numpy()
    np.testing.assert_allclose(logits[0, 1], expected, rtol=1e-5, atol=1e-6)


def test_bigram_table_approaches_the_count_mle():
    """Cross-entropy training of the table converges to log of the bigram counts' frequencies."""
    rng = np.random.default_rng(0)
    vocab = 4
    transition = 0.5 * rng.dirichlet(np.ones(vocab), size=vocab) + 0.5 / vocab   # every bigram likely enough
    seq = [0]
    for _ in range(600):
        seq.append(rng.choice(vocab, p=transition[seq[-1]]))
    seq = np.array(seq)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (seq[:-1], seq[1:]), 1)
    assert counts.min() > 0                                   # every bigram seen: the MLE is interior
    mle = counts / counts.sum(1, keepdims=True)
    model = BigramLM(BigramLMConfig(vocab_size=vocab))
    opt = sl.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    idx, targets = seq[None, :-1], seq[None, 1:]

    def distance():
        table = model.logits_table.weight.numpy().astype(np.float64)
        p = np.exp(table - table.max(1, keepdims=True))
        return np.abs(p / p.sum(1, keepdims=True) - mle).max()

    start = distance()
    for _ in range(300):
        opt.zero_grad()
        model(idx, targets)[1].backward()
        opt.step()
    assert start > 0.1 and distance() < 2e-3


@pytest.mark.parametrize("name", NAMES)
def test_parameter_gradients_match_finite_differences(name, float64):
    model = tiny_models()[name]
    _randomise(model)
    named = list(model.named_parameters())
    idx = _ids(2, 5)

    def fn(*values):
        for (param_name, _), value in zip(named, values):
            module_path, attr = param_name.rsplit(".", 1)
            module = model
            for part in module_path.split("."):
                module = getattr(module, part)
            setattr(module, attr, value)
        if name == "gru":                                  # the tied head reads the embedding's weight
            model.lm_head.weight = model.wte.weight
        return model(idx)[0]

    check_gradients(fn, *[p.numpy() for _, p in named])


@pytest.mark.parametrize("config", [BigramLMConfig(vocab_size=11),
                                    MLPLMConfig(vocab_size=11, block_size=4, n_embd=3, n_hidden=9, n_layer=3),
                                    RNNLMConfig(vocab_size=11, n_embd=5, n_hidden=7, n_layer=3, cell="lstm"),
                                    RNNLMConfig(vocab_size=11, n_embd=7, n_hidden=7, n_layer=2, cell="gru", tie_weights=True),
                                    RNNLMConfig(vocab_size=11, n_embd=5, n_hidden=7, cell="rnn")])
def test_config_arithmetic_and_round_trip(config):
    model = {BigramLMConfig: BigramLM, MLPLMConfig: MLPLM, RNNLMConfig: RNNLM}[type(config)](config)
    assert config.num_parameters() == model.num_parameters()
    memory = config.memory_estimate(batch_size=4, block_size=16)
    assert set(memory) == {"parameters", "gradients", "optimizer", "activations"}
    assert memory["parameters"] == 4 * model.num_parameters() == memory["gradients"] == memory["optimizer"] // 2
    assert config.memory_estimate(8, 16)["activations"] > memory["activations"] > 0
    assert type(config).from_dict(config.to_dict()) == config


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ModelArgumentError, match="unknown RNNLMConfig key"):
        RNNLMConfig.from_dict({"n_head": 4})
    with pytest.raises(ModelArgumentError, match="tie_weights needs n_embd == n_hidden"):
        RNNLMConfig(n_embd=8, n_hidden=16, tie_weights=True)
    with pytest.raises(ModelArgumentError, match="cell must be one of"):
        RNNLMConfig(cell="transformer")
    with pytest.raises(ModelArgumentError, match="block_size must be a positive integer"):
        MLPLMConfig(block_size=0)


def test_state_dict_names_follow_pytorch():
    model = RNNLM(RNNLMConfig(vocab_size=V, n_embd=4, n_hidden=5, n_layer=2, cell="lstm"))
    assert list(model.state_dict()) == ["wte.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                                        "rnn.bias_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1", "rnn.bias_ih_l1",
                                        "rnn.bias_hh_l1", "lm_head.weight", "lm_head.bias"]
    assert model.state_dict()["rnn.weight_ih_l0"].shape == (4, 20)


def test_models_are_seeded():
    a = RNNLM(RNNLMConfig(vocab_size=V, cell="gru"), seed=3)
    b = RNNLM(RNNLMConfig(vocab_size=V, cell="gru"), seed=3)
    c = RNNLM(RNNLMConfig(vocab_size=V, cell="gru"), seed=4)
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        np.testing.assert_array_equal(x, y)
        if name != "lm_head.bias":
            assert not np.array_equal(x, z), name


def test_docstring_examples_run():
    import doctest

    import scratchlm.models.rnn
    import scratchlm.nn.rnn
    for module in (scratchlm.models.rnn, scratchlm.nn.rnn):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
