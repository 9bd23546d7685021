"""Classifiers (scratchlm/models/classifier.py): padding invariance, the BiLSTM's final states at each
row's true length (vs torch's packed sequences), the weighted loss vs NumPy, finite differences of
the masked pooling, and a tiny problem every model learns."""
import numpy as np
import pytest

import scratchlm as sl
from scratchlm.models.classifier import MODELS, BiLSTM, BiLSTMConfig, masked_max, masked_mean, reverse_index
from scratchlm.optim import AdamW

from gradcheck import check_gradients

CASES = [(name, pooling) for name, (_, config) in MODELS.items() for pooling in config._poolings]


def build(name, pooling="mean", num_classes=2, seed=0, **extra):
    model_class, config_class = MODELS[name]
    keys = {"n_head": 2, "dim_feedforward": 16, "block_size": 16, "dropout": 0.0} if name == "transformer" else {}
    return model_class(config_class(vocab_size=12, num_classes=num_classes, n_embd=8, pooling=pooling,
                                    **keys, **extra), seed=seed)


def padded(rows, width):
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
    return ids, ids > 0


ROWS = [[3, 4, 5, 6], [7, 2], [9]]


@pytest.mark.parametrize("name,pooling", CASES)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_padding_changes_nothing(name, pooling, num_classes):
    model = build(name, pooling, num_classes)
    model.eval()
    short, _ = model(*padded(ROWS, 4))
    long, _ = model(*padded(ROWS, 9))                  # five more padding columns
    np.testing.assert_allclose(long.numpy(), short.numpy(), rtol=1e-5, atol=1e-6)
    alone, _ = model(*padded(ROWS[1:2], 2))            # a row by itself, no padding at all
    np.testing.assert_allclose(alone.numpy()[0], short.numpy()[1], rtol=1e-5, atol=1e-6)


def test_reverse_index_reverses_real_tokens_only():
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(reverse_index(mask), [[2, 1, 0, 3], [0, 1, 2, 3]])


@pytest.mark.parametrize("n_layer", [1, 2])
def test_bilstm_final_states_equal_torch_packed_sequences(n_layer):
    torch = pytest.importorskip("torch")
    sl.set_default_dtype(np.float64)
    try:
        model = BiLSTM(BiLSTMConfig(vocab_size=12, num_classes=2, n_embd=5, n_hidden=4, n_layer=n_layer,
                                    pooling="final"), seed=1)
        ids, mask = padded(ROWS, 6)
        z = model.encode(sl.backend.to_device(ids), mask).numpy()                     # (B, 2H) = [f_n; b_1]
        peer = torch.nn.LSTM(5, 4, num_layers=n_layer, bidirectional=True, batch_first=True).double()
        with torch.no_grad():
            for layer in range(n_layer):
                for suffix, stack in (("", model.forward_layers), ("_reverse", model.backward_layers)):
                    ours = stack[layer].state_dict()
                    for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        value = np.asarray(ours[f"{key}_l0"])
                        getattr(peer, f"{key}_l{layer}{suffix}").copy_(torch.tensor(value.T if value.ndim == 2 else value))
            emb = torch.tensor(model.wte.weight.numpy()[ids])
            lengths = torch.tensor(mask.sum(1))
            packed = torch.nn.utils.rnn.pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
            _, (h_n, _) = peer(packed)                                                # (L*2, B, H)
        expected = torch.cat([h_n[-2], h_n[-1]], dim=1).numpy()
        np.testing.assert_allclose(z, expected, rtol=1e-9, atol=1e-12)
    finally:
        sl.set_default_dtype(np.float32)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("weights", [None, "balanced"])
def test_loss_equals_numpy_weighted_cross_entropy(num_classes, weights):
    labels = np.array([0, 1, 1, 1, 0, 1]) if num_classes == 2 else np.array([0, 2, 2, 1, 2, 2])
    class_weights = ""
    if weights:
        counts = np.bincount(labels, minlength=num_classes)
        class_weights = ",".join(str(len(labels) / (num_classes * c)) for c in counts)
    model = build("bow", "mean", num_classes, class_weights=class_weights)
    ids, mask = padded([[3, 4], [5], [6, 7, 8], [9], [10, 11], [2, 3]], 3)
    logits, loss = model(ids, mask, labels=labels)
    s = logits.numpy().astype(np.float64)
    if num_classes == 2:
        p = 1 / (1 + np.exp(-s))
        per_example = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    else:
        log_p = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
        per_example = -log_p[np.arange(len(labels)), labels]
    w = np.ones(num_classes) if not weights else np.array([float(v) for v in class_weights.split(",")])
    expected = (w[labels] * per_example).sum() / w[labels].sum()
    assert float(loss.numpy()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("pool", [masked_mean, masked_max])
def test_masked_pooling_finite_differences(pool):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4))
    mask = sl.backend.to_device(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=bool))
    grad, = check_gradients(lambda t: pool(t, mask), x)
    assert np.all(grad[~sl.backend.to_numpy(mask)] == 0)            # padding gets no gradient


def test_bad_class_weights_are_refused():
    with pytest.raises(sl.models.ModelArgumentError, match="class_weights"):
        build("bow", class_weights="1,2,3")


@pytest.mark.parametrize("name,pooling", [("bow", "mean"), ("bow", "max"), ("bilstm", "final"),
                                          ("bilstm", "max"), ("transformer", "cls"), ("transformer", "mean")])
def test_each_model_learns_a_tiny_problem(name, pooling):
    """Label = whether token 3 ("not") occurs anywhere: bag models see it, sequence models must carry it."""
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(4, 12, size=rng.integers(1, 7))) for _ in range(32)]
    labels = np.array([k % 2 for k in range(32)])
    for row, y in zip(rows, labels):
        if y:
            row.insert(int(rng.integers(len(row) + 1)), 3)
    ids, mask = padded(rows, 8)
    model = build(name, pooling)
    optimizer = AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    for _ in range(40):
        _, loss = model(ids, mask, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    predicted = model.probabilities(ids, mask).argmax(1)
    assert (predicted == labels).mean() == 1.0
