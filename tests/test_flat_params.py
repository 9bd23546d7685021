"""Flat parameter and gradient storage (Module.flatten_): parameters are views of one array per
dtype and gradients views of another; names, shapes, ties, state_dict and loading are unchanged,
and training on flat storage (one optimizer update per group, one clipping pass) gives the same
bits as the per-parameter path -- which tests/test_optim.py ties to hand-computed updates and to
PyTorch's trajectories."""
import numpy as np
import pytest

import scratchlm as sl
from scratchlm import optim
from scratchlm.kernels import adamw as adamw_kernel
from scratchlm.models import GPT
from scratchlm.models.gpt import GPTConfig

CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def tiny_gpt():
    return GPT(CONFIG, seed=3)


def batches(n, B=3, T=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CONFIG.vocab_size, (B, T)), rng.integers(0, CONFIG.vocab_size, (B, T)))
            for _ in range(n)]


def make_optimizer(name, model):
    groups = model.configure_optimizer_groups(0.1)
    return {"AdamW": lambda: optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
            "Adam": lambda: optim.Adam(groups, lr=1e-2),
            "SGD": lambda: optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
            "RMSprop": lambda: optim.RMSprop(groups, lr=1e-3, momentum=0.5)}[name]()


def train(model, opt, data, accum=2, clip=0.5):
    for step in range(0, len(data), accum):
        for x, y in data[step:step + accum]:
            _, loss = model(sl.tensor(x), sl.tensor(y))
            (loss / accum).backward()
        optim.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def test_parameters_become_views_with_the_same_values_names_and_ties():
    plain, flat = tiny_gpt(), tiny_gpt()
    groups = flat.configure_optimizer_groups(0.1)
    storage = flat.flatten_([g["params"] for g in groups])
    before, after = plain.state_dict(), flat.state_dict()
    assert list(before) == list(after)
    for name in before:
        assert after[name].shape == before[name].shape and np.array_equal(after[name], before[name]), name
    buffer = storage.data["float32"]
    assert buffer.size == flat.num_parameters(non_embedding=False) == sum(p.size for p in flat.parameters())
    assert all(np.shares_memory(p.data, buffer) for p in flat.parameters())
    assert flat.lm_head.weight is flat.transformer.wte.weight          # the tie is one parameter, one view
    # each optimizer group is one consecutive run, in the group's order
    runs = [storage.segment(g["params"]) for g in groups]
    assert runs[0] == ("float32", 0, runs[1][1]) and runs[1][2] == buffer.size


def test_backward_writes_the_gradient_slots_and_accumulates():
    model = tiny_gpt()
    storage = model.flatten_()
    (x, y), = batches(1)
    _, loss = model(sl.tensor(x), sl.tensor(y))
    loss.backward()
    first = {id(p): p.grad.copy() for p in model.parameters()}
    assert storage.all_grads_in_slots()
    assert all(np.shares_memory(p.grad, storage.grad["float32"]) for p in model.parameters())
    _, loss = model(sl.tensor(x), sl.tensor(y))
    loss.backward()                                          # the same batch again: exactly twice
    for p in model.parameters():
        np.testing.assert_array_equal(p.grad, 2 * first[id(p)])
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD", "RMSprop"])
def test_training_on_flat_storage_gives_the_same_bits(name):
    """Oracle: the per-parameter path (tests/test_optim.py checks it against PyTorch). Every update
    is elementwise and the clipping norm is summed per parameter as before, so bits agree."""
    data = batches(6)
    plain, flat = tiny_gpt(), tiny_gpt()
    opt_plain = make_optimizer(name, plain)
    opt_flat = make_optimizer(name, flat)
    flat.flatten_([g["params"] for g in opt_flat.param_groups])
    train(plain, opt_plain, data)
    train(flat, opt_flat, data)
    for (key, a), b in zip(plain.state_dict().items(), flat.state_dict().values()):
        assert a.tobytes() == b.tobytes(), key
    scalars_plain, arrays_plain = opt_plain.state_dict()
    scalars_flat, arrays_flat = opt_flat.state_dict()
    assert scalars_plain == scalars_flat and list(arrays_plain) == list(arrays_flat)
    for key in arrays_plain:
        assert arrays_plain[key].tobytes() == arrays_flat[key].tobytes(), key


def test_adamw_makes_one_kernel_call_per_group(monkeypatch):
    model = tiny_gpt()
    opt = make_optimizer("AdamW", model)
    model.flatten_([g["params"] for g in opt.param_groups])
    calls = []
    real = adamw_kernel.step
    monkeypatch.setattr(adamw_kernel, "step", lambda *a, **k: (calls.append(a[0].shape), real(*a, **k)))
    train(model, opt, batches(4))
    sizes = [sum(p.size for p in g["params"]) for g in opt.param_groups]
    assert calls == [(n,) for n in sizes] * 2


def test_state_dict_round_trip_between_flat_and_plain_continues_bit_for_bit():
    data = batches(8)
    straight = tiny_gpt()
    opt = make_optimizer("AdamW", straight)
    straight.flatten_([g["params"] for g in opt.param_groups])
    train(straight, opt, data)

    half = tiny_gpt()
    opt_half = make_optimizer("AdamW", half)
    half.flatten_([g["params"] for g in opt_half.param_groups])
    train(half, opt_half, data[:4])
    scalars, arrays = opt_half.state_dict()
    for flatten in (True, False):                # resume into flat storage, and into plain parameters
        resumed = tiny_gpt()
        resumed.load_state_dict({k: v.copy() for k, v in half.state_dict().items()})
        opt_resumed = make_optimizer("AdamW", resumed)
        if flatten:
            resumed.flatten_([g["params"] for g in opt_resumed.param_groups])
        opt_resumed.load_state_dict(scalars, arrays)
        train(resumed, opt_resumed, data[4:])
        for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert a.tobytes() == b.tobytes(), (flatten, key)


def test_a_parameter_without_gradient_falls_back_to_the_per_parameter_step():
    """As in PyTorch, a parameter whose grad is None is skipped: the group cannot step as one run."""
    plain, flat = tiny_gpt(), tiny_gpt()
    opts = [make_optimizer("Adam", m) for m in (plain, flat)]
    flat.flatten_([g["params"] for g in opts[1].param_groups])
    for model, opt in zip((plain, flat), opts):
        train(model, opt, batches(2))
        (x, y), = batches(1, seed=5)
        _, loss = model(sl.tensor(x), sl.tensor(y))
        loss.backward()
        model.transformer.wpe.weight.grad = None
        opt.step()
        opt.zero_grad()
        train(model, opt, batches(2, seed=6))
    wpe = [id(p) for p in opts[1]._params].index(id(flat.transformer.wpe.weight))
    assert opts[1].state[wpe]["step"] == opts[1].state[0]["step"] - 1 == 2
    for a, b in zip(plain.state_dict().values(), flat.state_dict().values()):
        assert a.tobytes() == b.tobytes()


def test_loading_weights_keeps_the_views():
    """load_state_dict (and so the GPT-2 loader and resume) copies into the views in place."""
    source, model = tiny_gpt(), GPT(CONFIG, seed=9)
    storage = model.flatten_()
    model.load_state_dict({k: v.copy() for k, v in source.state_dict().items()})
    assert all(np.shares_memory(p.data, storage.data["float32"]) for p in model.parameters())
    assert np.array_equal(storage.data["float32"],
                          np.concatenate([p.data.ravel() for p in source.parameters()]))


def test_fill_missing_grads_defines_the_whole_buffer():
    model = tiny_gpt()
    storage = model.flatten_()
    storage.grad["float32"][...] = np.nan                    # stale contents must not leak
    params = model.parameters()
    params[0].grad = np.ones(params[0].shape, dtype=np.float32)   # a grad set by hand, not in its slot
    storage.fill_missing_grads()
    assert storage.all_grads_in_slots()
    assert np.array_equal(params[0].grad, np.ones(params[0].shape)) and not np.isnan(storage.grad["float32"]).any()
    assert all(not p.grad.any() for p in params[1:])
