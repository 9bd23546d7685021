"""The trainer against oracles that do not come from the trainer.

1. The learning rate each optimizer step actually used (read from the optimizer's groups when
   ``step()`` runs) equals nanoGPT's schedule, written below from its formula: linear warmup
   lr (it + 1) / (warmup + 1), then min_lr + (lr - min_lr) (1 + cos(pi r)) / 2, then min_lr.
2. The micro-batches the model receives are the sampler's stated order, ``batch(it * accum + micro)``
   of a sampler built here with the run's seed; within a step (and across steps) they are distinct.
3. On a corpus that can be learnt (a repeating pattern: the next character is determined), the
   loss falls by a stated margin within 40 steps.
4. A plain loop written here -- forward through the model, backward, global-norm clipping and
   AdamW with its bias corrections in NumPy, weight decay on the Linear matrices only -- over the
   same batches reproduces the trainer's logged losses; in float64, to 1e-9 relative. A resumed
   run reproduces them too.

Only the public surface is used: ``Trainer(...)``, ``.fit()``, ``.model``, ``.optimizer`` (its
``param_groups`` and ``step``), the model's ``__call__`` / ``named_parameters`` and metrics.jsonl.
"""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from scratchlm import backend
from scratchlm.config import TrainConfig
from scratchlm.data import BatchSampler
from scratchlm.runs import read_metrics
from scratchlm.tokenizers import CharTokenizer
from scratchlm.train import Trainer


def tiny_config(**overrides) -> TrainConfig:
    values = dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                  learning_rate=3e-3, max_iters=10, lr_decay_iters=8, min_lr=3e-4, warmup_iters=3,
                  eval_interval=100, eval_iters=1, log_interval=1, seed=7, weight_decay=0.1,
                  beta1=0.9, beta2=0.95, grad_clip=1.0, gradient_accumulation_steps=3)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def random_words(n=800, seed=0) -> str:
    words = "the cat sat on a mat and the dog ran to the park while birds sang in old trees".split()
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n)) + "\n"


def make_trainer(config, text, run_dir, resume=False):
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    prepared = SimpleNamespace(train=ids, val=ids)
    return Trainer(config, tokenizer, prepared, run_dir, resume=resume, progress=False, log=lambda *a: None), ids


def train_losses(run_dir):
    return [m["train_loss"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"]


def schedule_by_formula(it, c):
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it > c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / (c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def record_training_batches(model):
    """Wrap the model instance's forward: every training call's (x, y) is appended to the list."""
    seen, original = [], model.forward

    def forward(idx, targets=None, *args, **kwargs):
        if model.training and targets is not None:
            seen.append((backend.to_numpy(idx).copy(), backend.to_numpy(targets).copy()))
        return original(idx, targets, *args, **kwargs)
    model.forward = forward
    return seen


# ---------------------------------------------------------------- 1. the lr each step used

def test_each_optimizer_step_uses_the_scheduled_learning_rate(tmp_path):
    config = tiny_config(max_iters=12, warmup_iters=3, lr_decay_iters=9, gradient_accumulation_steps=1)
    trainer, _ = make_trainer(config, random_words(), tmp_path / "run")
    used, had_grads, original = [], [], trainer.optimizer.step

    def step(*args, **kwargs):
        used.append([group["lr"] for group in trainer.optimizer.param_groups])
        had_grads.append(all(p.grad is not None for p in trainer.model.parameters()))
        return original(*args, **kwargs)
    trainer.optimizer.step = step
    trainer.fit()
    assert len(used) == config.max_iters                    # one optimizer step per iteration
    assert all(had_grads)                                   # it steps on this iteration's gradients
    for it, lrs in enumerate(used):
        want = schedule_by_formula(it, config)
        assert all(lr == pytest.approx(want, rel=1e-12) for lr in lrs), (it, lrs, want)
    # the schedule really varies over these steps (warmup, cosine, floor), so the check has teeth
    assert len({round(lrs[0], 12) for lrs in used}) >= 8
    logged = [m["lr"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert logged == pytest.approx([lrs[0] for lrs in used], rel=1e-12)


# ---------------------------------------------------------------- 2. which batches each step saw

def test_micro_batches_follow_the_samplers_order_and_are_distinct(tmp_path):
    config = tiny_config(max_iters=4, gradient_accumulation_steps=3)
    trainer, ids = make_trainer(config, random_words(), tmp_path / "run")
    seen = record_training_batches(trainer.model)
    trainer.fit()
    accum = config.gradient_accumulation_steps
    assert len(seen) == config.max_iters * accum
    sampler = BatchSampler(ids, config.batch_size, config.block_size, seed=config.seed)
    for it in range(config.max_iters):
        for micro in range(accum):
            x, y = seen[it * accum + micro]
            want_x, want_y = sampler.batch(it * accum + micro)
            np.testing.assert_array_equal(x, backend.to_numpy(want_x), err_msg=f"iteration {it}, micro {micro}")
            np.testing.assert_array_equal(y, backend.to_numpy(want_y))
            np.testing.assert_array_equal(x[:, 1:], y[:, :-1])     # targets are the inputs shifted by one
    # no batch is used twice: within a step the micro-batches differ, and steps do not share them
    assert len({x.tobytes() for x, _ in seen}) == len(seen)


# ---------------------------------------------------------------- 3. it learns

def test_loss_falls_on_a_learnable_corpus(tmp_path):
    """'abcdefghij' repeated: each next character is determined by the last, so a 1-layer model
    can drive the loss from ln(11) ~ 2.4 towards 0. Stated margin: the mean of the last five
    training losses of 40 steps is below half the first loss."""
    config = tiny_config(max_iters=40, warmup_iters=4, lr_decay_iters=40, learning_rate=1e-2, min_lr=1e-3,
                         gradient_accumulation_steps=1)
    trainer, _ = make_trainer(config, "abcdefghij" * 60 + "\n", tmp_path / "run")
    trainer.fit()
    losses = train_losses(tmp_path / "run")
    assert losses[0] == pytest.approx(math.log(11), abs=0.3)         # starts at chance
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


# ---------------------------------------------------------------- 4. a loop written by hand

def is_decayed(name, param):
    """The GPT's grouping, stated independently: the Linear matrices decay; biases, LayerNorm gains
    and the embeddings (wte, tied to lm_head, and wpe) do not."""
    return param.data.ndim == 2 and not any(part in ("wte", "wpe") for part in name.split("."))


def hand_loop_losses(model, ids, config, iterations):
    """Train ``model`` with a loop written here, on the sampler's batches; return the mean losses."""
    c, accum = config, config.gradient_accumulation_steps
    sampler = BatchSampler(ids, c.batch_size, c.block_size, seed=c.seed)
    params = list(model.named_parameters())
    m = {name: np.zeros(p.data.shape) for name, p in params}
    v = {name: np.zeros(p.data.shape) for name, p in params}
    losses = []
    for it in range(iterations):
        lr = schedule_by_formula(it, c)
        for _, p in params:
            p.grad = None
        total = 0.0
        for micro in range(accum):
            x, y = sampler.batch(it * accum + micro)
            _, loss = model(x, y)
            (loss / accum).backward()
            total += float(backend.to_numpy(loss.data))
        losses.append(total / accum)
        grads = {name: backend.to_numpy(p.grad).astype(np.float64) for name, p in params}
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        if c.grad_clip > 0 and norm > c.grad_clip:
            grads = {name: g * (c.grad_clip / (norm + 1e-6)) for name, g in grads.items()}
        t = it + 1
        for name, p in params:
            g, value = grads[name], backend.to_numpy(p.data).astype(np.float64)
            if is_decayed(name, p):
                value = value * (1.0 - lr * c.weight_decay)
            m[name] = c.beta1 * m[name] + (1.0 - c.beta1) * g
            v[name] = c.beta2 * v[name] + (1.0 - c.beta2) * g * g
            m_hat = m[name] / (1.0 - c.beta1 ** t)
            v_hat = v[name] / (1.0 - c.beta2 ** t)
            value = value - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
            p.data[...] = backend.to_device(value.astype(p.data.dtype))
    return losses


def test_trainer_losses_equal_a_hand_written_loop(tmp_path, float64):
    """float64 end to end, so the loop and the trainer agree to summation-order rounding (1e-9)
    while training moves the loss by far more than that; 10 steps cross warmup, cosine and the
    floor of the schedule, and clipping is active (norms above 1 at the start)."""
    config = tiny_config()
    text = random_words()
    trainer, ids = make_trainer(config, text, tmp_path / "run")
    fresh, _ = make_trainer(config, text, tmp_path / "hand")       # the same initial weights (seed)
    assert fresh.model.parameters()[0].data.dtype == np.float64
    trainer.fit()
    trained = train_losses(tmp_path / "run")
    by_hand = hand_loop_losses(fresh.model, ids, config, config.max_iters)
    np.testing.assert_allclose(trained, by_hand, rtol=1e-9)
    assert abs(by_hand[-1] - by_hand[0]) > 1e-3                   # the loss moved: steps were taken
    norms = [m["grad_norm"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert max(norms) > config.grad_clip                           # clipping was exercised
    for (name, mine), theirs in zip(fresh.model.named_parameters(), trainer.model.parameters()):
        np.testing.assert_allclose(backend.to_numpy(theirs.data), backend.to_numpy(mine.data),
                                   rtol=1e-8, atol=1e-11, err_msg=name)


def test_resumed_run_equals_the_uninterrupted_run_and_the_hand_loop(tmp_path, float64):
    """Stop after 4 of 10 iterations and resume: the logged losses equal an uninterrupted run's
    exactly and the hand-written loop's to 1e-9 (so a bug the trainer repeats in both runs fails too)."""
    config = tiny_config(max_iters=10, eval_interval=4)
    text = random_words()
    whole, ids = make_trainer(config, text, tmp_path / "whole")
    whole.fit()
    first, _ = make_trainer(tiny_config(max_iters=4, eval_interval=4), text, tmp_path / "split")
    first.fit()
    resumed, _ = make_trainer(config, text, tmp_path / "split", resume=True)
    assert resumed.iteration == 4
    resumed.fit()
    split = train_losses(tmp_path / "split")
    assert split == train_losses(tmp_path / "whole")
    fresh, _ = make_trainer(config, text, tmp_path / "hand")
    np.testing.assert_allclose(split, hand_loop_losses(fresh.model, ids, config, config.max_iters), rtol=1e-9)
