"""SeqGAN (scratchlm/models/gan.py): the CNN discriminator against a NumPy reference and finite
differences, the policy-gradient loss against its formula in NumPy and finite differences, the
rewards' structure (Q of the last word = D(s), zero after the end, rollouts=0 = sequence reward),
the phases by iteration, and that each phase updates only its own network."""
import numpy as np
import pytest

import scratchlm as sl
from scratchlm.errors import UserError
from scratchlm.models.gan import GANConfig, SeqGAN, frame

V, B_ = 9, 0


def tiny_gan(seed=0, **options):
    config = GANConfig(**{**dict(vocab_size=V, block_size=7, n_embd=4, n_hidden=6, d_embd=3, d_widths="1,2,3",
                                 d_filters=4, d_dropout=0.0, rollouts=2), **options})
    model = SeqGAN(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():
        p.data[...] = sl.backend.to_device(rng.uniform(-0.8, 0.8, p.shape), p.dtype)
    return model


def finite_difference_check(model, loss_fn, params, seed=0, eps=1e-6):
    """<grad, u> from backward vs central differences along a random direction, per parameter."""
    rng = np.random.default_rng(seed)
    for p in params:
        p.grad = None
    loss_fn().backward()
    for p in params:
        u = rng.standard_normal(p.shape)
        predicted = float(np.sum(sl.backend.to_numpy(p.grad) * u))
        saved = p.data.copy()
        p.data[...] = saved + eps * u
        with sl.no_grad():
            plus = loss_fn().item()
        p.data[...] = saved - eps * u
        with sl.no_grad():
            minus = loss_fn().item()
        p.data[...] = saved
        numeric = (plus - minus) / (2 * eps)
        assert abs(numeric - predicted) <= 1e-6 + 1e-5 * max(abs(numeric), abs(predicted)), (numeric, predicted)


def discriminator_reference(model, tokens):
    d = model.discriminator
    E = d.wte.weight.numpy()[tokens]                                           # (B, T, C)
    B, T, _ = E.shape
    pooled = []
    for k, conv in zip(d.widths, d.convs):
        windows = np.stack([np.concatenate([E[:, t + j] for j in range(k)], axis=1) for t in range(T - k + 1)], 1)
        pooled.append(np.maximum(windows @ conv.weight.numpy() + conv.bias.numpy(), 0).max(axis=1))
    return (np.concatenate(pooled, axis=1) @ d.head.weight.numpy() + d.head.bias.numpy())[:, 0]


def test_discriminator_equals_numpy_reference(float64):
    model = tiny_gan()
    tokens = np.random.default_rng(2).integers(0, V, (3, 7))
    np.testing.assert_allclose(model.discriminator(tokens).numpy(), discriminator_reference(model, tokens), rtol=1e-10)


def test_discriminator_gradients_finite_differences(float64):
    model = tiny_gan()
    _, y_real = frame([[3, 4, 5], [6, 7]], B_, 7)
    _, y_fake = frame([[1, 2], [8, 8, 8, 8]], B_, 7)
    finite_difference_check(model, lambda: model.d_loss(y_real, y_fake, B_)[0],
                            list(model.discriminator.parameters()))


def test_policy_gradient_loss_formula_and_gradient(float64):
    model = tiny_gan()
    x, y = frame([[3, 4, 5, 6], [7, 2], [5]], B_, 7)
    Q = np.random.default_rng(3).uniform(0, 1, y.shape) * (y != -100)
    loss = model.pg_loss(x, y, Q).item()
    logits = model.generator(x)[0].numpy()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = y != -100
    baseline = (Q * real).sum(0) / np.maximum(real.sum(0), 1)
    picked = np.take_along_axis(logp, np.where(real, y, 0)[..., None], -1)[..., 0]
    expected = -(np.where(real, (Q - baseline) * picked, 0)).sum() / real.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-10)
    finite_difference_check(model, lambda: model.pg_loss(x, y, Q), list(model.generator.parameters()))


@pytest.mark.parametrize("rollouts", [0, 3])
def test_rewards_structure(float64, rollouts):
    model = tiny_gan(rollouts=rollouts)
    x, y = frame([[3, 4, 5, 6], [7, 2], [5]], B_, 7)
    Q = model.rewards(x, y, B_, seed=0)
    whole = model._real_prob(y, B_)
    real = y != -100
    lengths = real.sum(1)
    assert np.all(Q[~real] == 0) and np.all((Q[real] > 0) & (Q[real] < 1))
    for b, n in enumerate(lengths):
        assert Q[b, n - 1] == whole[b] and Q[b, n - 2] == whole[b]          # last word and boundary: D(s)
    if rollouts == 0:
        assert np.all(Q[real] == np.repeat(whole, lengths))
    else:
        assert Q[0, 0] != whole[0]                                       # a prefix is scored by its completions
        np.testing.assert_array_equal(Q, model.rewards(x, y, B_, seed=0))   # seeded


def test_phases_and_config_checks():
    c = GANConfig(vocab_size=V, g_pretrain_iters=3, d_pretrain_iters=2)
    assert [c.phase(i) for i in range(7)] == ["mle"] * 3 + ["discriminator"] * 2 + ["adversarial"] * 2
    for bad in (dict(d_widths="2,x"), dict(d_widths="50"), dict(rollouts=-1)):
        with pytest.raises(UserError):
            GANConfig(vocab_size=V, **bad)


def test_each_phase_updates_only_its_network(tmp_path):
    """Through the trainer on coco (tiny shapes): an MLE iteration moves the generator only, a
    discriminator iteration the discriminator only, an adversarial one both."""
    from scratchlm.config import TrainConfig
    from scratchlm.data import load_corpus
    from scratchlm.tasks import make_task
    from scratchlm.tokenizers import make_tokenizer
    from scratchlm.train import Trainer
    corpus = load_corpus("coco")
    tok = make_tokenizer("word:40", corpus.text)                    # a small vocabulary: a fast test
    task = make_task(corpus, tok)
    config = TrainConfig.from_dict(dict(batch_size=4, block_size=38, max_iters=3, eval_interval=100, eval_iters=1,
                                        learning_rate=1e-2, warmup_iters=0, seed=3))
    trainer = Trainer(config, tok, task, tmp_path / "run", progress=False, model="gan",
                      model_config=dict(n_embd=4, n_hidden=8, d_embd=4, d_filters=3, g_pretrain_iters=1,
                                        d_pretrain_iters=1, rollouts=1))
    model = trainer.model
    snap = lambda m: [p.data.copy() for p in m.parameters()]
    moved = lambda before, m: any(not np.array_equal(a, p.data) for a, p in zip(before, m.parameters()))
    for it, (g_moves, d_moves) in enumerate([(True, False), (False, True), (True, True)]):
        g, d = snap(model.generator), snap(model.discriminator)
        loss, _, _ = trainer.train_step(it)
        assert np.isfinite(float(loss))
        assert moved(g, model.generator) == g_moves and moved(d, model.discriminator) == d_moves, it
        assert trainer.step_terms["phase"] == it


def test_discriminator_learns_an_easy_distinction():
    """Real sentences use words 2..4, fake ones words 5..8: a few AdamW steps of D's loss make it
    tell them apart (the training signal reaches every layer the right way round)."""
    from scratchlm.optim import AdamW
    model = SeqGAN(GANConfig(vocab_size=V, block_size=7, d_embd=4, d_widths="1,2", d_filters=4, d_dropout=0.0), seed=0)
    rng = np.random.default_rng(0)
    batch = lambda low, high: frame([list(rng.integers(low, high, rng.integers(2, 6))) for _ in range(16)], B_, 7)[1]
    opt = AdamW(model.discriminator.parameters(), lr=3e-2, weight_decay=0.0)
    first = None
    for step in range(40):
        loss, accuracy = model.d_loss(batch(2, 5), batch(5, 9), B_)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(accuracy) == 1.0 and loss.item() < 0.1 * first


def test_config_parameter_count_matches_the_model():
    config = GANConfig(vocab_size=V, block_size=7, n_embd=4, n_hidden=6, d_embd=3, d_widths="1,2,3", d_filters=4)
    assert config.num_parameters() == sum(p.size for p in SeqGAN(config).parameters())
    parts = config.memory_estimate(batch_size=2)
    assert parts["parameters"] == 4 * config.num_parameters() and parts["activations"] > 0
