"""Optimizers against updates computed by hand, the AdamW Numba kernel against its reference,
schedules at their key iterations, gradient clipping, and bit-exact resume from a state dict."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from scratchlm import optim
from scratchlm.checkpoint import load_safetensors, read_json, save_safetensors, write_json_atomic
from scratchlm.errors import UserError
from scratchlm.kernels import adamw as adamw_kernel
from scratchlm.kernels import numba_available


class P:
    """Stand-in parameter: what an optimizer needs of nn.Parameter."""

    def __init__(self, data):
        self.data = np.array(data, dtype=np.float64) if isinstance(data, (list, tuple)) else data
        self.grad = None


def toy_grad(p):
    """Gradient of the toy loss sum(1.5 p^2 - p): g = 3p - 1 (works on floats and arrays)."""
    return 3 * p - 1


def run(opt, params, steps):
    for _ in range(steps):
        for p in params:
            p.grad = toy_grad(p.data)
        opt.step()


START = [1.0, -2.0, 0.25]


# ---------------------------------------------------------------- hand-computed updates (float64)

def test_sgd_plain_two_steps():
    w = P(START)
    opt = optim.SGD([w], lr=0.1)
    run(opt, [w], 1)
    # p1 = p0 - 0.1 (3 p0 - 1) = 0.7 p0 + 0.1
    np.testing.assert_allclose(w.data, [0.8, -1.3, 0.275], rtol=1e-15)
    run(opt, [w], 1)
    np.testing.assert_allclose(w.data, [0.66, -0.81, 0.2925], rtol=1e-14)


def test_sgd_momentum_two_steps():
    w = P([1.0])
    opt = optim.SGD([w], lr=0.1, momentum=0.9)
    run(opt, [w], 1)                     # g = 2, b = 2, p = 1 - 0.2
    np.testing.assert_allclose(w.data, [0.8], rtol=1e-15)
    run(opt, [w], 1)                     # g = 1.4, b = 0.9*2 + 1.4 = 3.2, p = 0.8 - 0.32
    np.testing.assert_allclose(w.data, [0.48], rtol=1e-14)


def test_sgd_nesterov_two_steps():
    w = P([1.0])
    opt = optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    run(opt, [w], 1)                     # g = 2, b = 2, step g + 0.9 b = 3.8, p = 1 - 0.38
    np.testing.assert_allclose(w.data, [0.62], rtol=1e-15)
    run(opt, [w], 1)                     # g = 0.86, b = 1.8 + 0.86 = 2.66, step 0.86 + 2.394 = 3.254
    np.testing.assert_allclose(w.data, [0.62 - 0.3254], rtol=1e-14)


def test_sgd_weight_decay_two_steps():
    w = P([1.0])
    opt = optim.SGD([w], lr=0.1, weight_decay=0.5)
    run(opt, [w], 1)                     # g = 2 + 0.5 = 2.5, p = 0.75
    np.testing.assert_allclose(w.data, [0.75], rtol=1e-15)
    run(opt, [w], 1)                     # g = 1.25 + 0.375 = 1.625, p = 0.75 - 0.1625
    np.testing.assert_allclose(w.data, [0.5875], rtol=1e-14)


def adam_by_hand(p, steps, lr, beta1, beta2, eps, wd, decoupled):
    """Adam/AdamW on one float in the textbook form: p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    m = v = 0.0
    trajectory = []
    for t in range(1, steps + 1):
        g = toy_grad(p)
        if decoupled:
            p = p - lr * wd * p
        else:
            g = g + wd * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        p = p - lr * m_hat / (math.sqrt(v_hat) + eps)
        trajectory.append(p)
    return trajectory


@pytest.mark.parametrize("cls, wd", [(optim.Adam, 0.0), (optim.Adam, 0.3), (optim.AdamW, 0.0), (optim.AdamW, 0.3)])
def test_adam_and_adamw_two_steps(cls, wd):
    w = P(START)
    opt = cls([w], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    expected = [adam_by_hand(p0, 2, 0.1, 0.9, 0.999, 1e-8, wd, decoupled=cls is optim.AdamW) for p0 in START]
    for step in range(2):
        run(opt, [w], 1)
        np.testing.assert_allclose(w.data, [e[step] for e in expected], rtol=1e-13)


def test_adam_first_step_moves_every_coordinate_by_lr():
    """m_hat = g and v_hat = g^2 on step 1, so the first step is -lr * g / (|g| + eps)."""
    w = P(START)
    run(optim.Adam([w], lr=0.1), [w], 1)
    g = toy_grad(np.array(START))
    np.testing.assert_allclose(w.data, np.array(START) - 0.1 * g / (np.abs(g) + 1e-8), rtol=1e-15)
    # p0 = 1: g = 2 -> 1 - 0.1 * 2 / (2 + 1e-8)
    assert w.data[0] == pytest.approx(0.9000000005, rel=1e-12)


def rmsprop_by_hand(p, steps, lr, alpha, eps, momentum, wd):
    s = b = 0.0
    trajectory = []
    for _ in range(steps):
        g = toy_grad(p) + wd * p
        s = alpha * s + (1 - alpha) * g * g
        d = math.sqrt(s) + eps
        if momentum > 0:
            b = momentum * b + g / d
            p = p - lr * b
        else:
            p = p - lr * g / d
        trajectory.append(p)
    return trajectory


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.2)])
def test_rmsprop_two_steps(momentum, wd):
    w = P(START)
    opt = optim.RMSprop([w], lr=0.01, alpha=0.99, eps=1e-8, momentum=momentum, weight_decay=wd)
    expected = [rmsprop_by_hand(p0, 2, 0.01, 0.99, 1e-8, momentum, wd) for p0 in START]
    for step in range(2):
        run(opt, [w], 1)
        np.testing.assert_allclose(w.data, [e[step] for e in expected], rtol=1e-13)


def test_rmsprop_first_step_literal():
    # p0 = 1, g = 2: s = 0.01 * 4 = 0.04, d = 0.2 + 1e-8, p1 = 1 - 0.01 * 2 / d
    w = P([1.0])
    run(optim.RMSprop([w], lr=0.01), [w], 1)
    assert w.data[0] == pytest.approx(1 - 0.02 / (0.2 + 1e-8), rel=1e-15)
    assert w.data[0] == pytest.approx(0.9, rel=1e-7)


def test_updates_are_in_place_and_keep_dtype():
    for cls in (optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop):
        data = np.array(START, dtype=np.float32)
        w = P(data)
        run(cls([w], lr=0.01), [w], 2)
        assert w.data is data and data.dtype == np.float32
        assert not np.array_equal(data, np.array(START, dtype=np.float32))


def test_parameters_without_grad_are_skipped():
    a, b = P([1.0]), P([2.0])
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = np.array([1.0])
    opt.step()
    assert b.data[0] == 2.0 and 1 not in opt.state and opt.state[0]["step"] == 1


# ---------------------------------------------------------------- PyTorch (optional)

@pytest.mark.parametrize("name, kwargs", [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)),
    ("AdamW", dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, weight_decay=0.1)),
])
def test_trajectories_match_torch(name, kwargs):
    torch = pytest.importorskip("torch")
    w = P(START)
    ours = getattr(optim, name)([w], **kwargs)
    t = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    theirs = getattr(torch.optim, name)([t], **kwargs)
    for _ in range(6):
        run(ours, [w], 1)
        t.grad = toy_grad(t.detach().clone())
        theirs.step()
        np.testing.assert_allclose(w.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- AdamW kernel: Numba vs reference

_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([np.float32, np.float64]), shape=_shapes, seed=st.integers(0, 2**32 - 1),
       lr=st.floats(0.0, 0.1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.9, 0.9999),
       eps=st.floats(1e-10, 1e-6), weight_decay=st.floats(0.0, 0.2), step=st.integers(1, 2000))
def test_adamw_numba_matches_reference(dtype, shape, seed, lr, beta1, beta2, eps, weight_decay, step):
    """Both rungs against the update written here in float64 from the formula (bias corrections
    1 - beta1^t and 1 - beta2^t computed in the test, not by the module's helper), and against each
    other. Tolerance against the formula: 1e-12 (float64) or 1e-6 (float32) of the size of p and of
    the update; between the rungs float32 rtol 1e-6 (a few ulp), float64 rtol 1e-14 (the same
    operations in the same order and dtype, so in practice bit for bit)."""
    rng = np.random.default_rng(seed)
    arrays = [rng.uniform(-10, 10, shape), rng.uniform(-10, 10, shape), rng.uniform(-10, 10, shape),
              rng.uniform(0, 100, shape)]                       # param, grad, exp_avg, exp_avg_sq >= 0
    ref = [np.asarray(a, dtype=dtype) for a in arrays]
    fast = [a.copy() for a in ref]
    p, g, m, v = (a.astype(np.float64) for a in ref)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    update = lr * (m / (1 - beta1 ** step)) / (np.sqrt(v / (1 - beta2 ** step)) + eps)
    by_formula = [p * (1 - lr * weight_decay) - update, g, m, v]
    adamw_kernel.step_reference(*ref, lr, beta1, beta2, eps, weight_decay, step)
    adamw_kernel.step_numba(*fast, lr, beta1, beta2, eps, weight_decay, step)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-14)
    formula_rtol = 1e-6 if dtype == np.float32 else 1e-12
    for want, got, formula in zip(ref, fast, by_formula):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tol)
        for rung in (want, got):
            size = 1.0 + np.abs(formula) + np.abs(update)
            assert np.all(np.abs(rung.astype(np.float64) - formula) <= formula_rtol * size)


def test_adamw_dispatch_updates_non_contiguous_views_in_place():
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(4, 6)).astype(np.float32) for _ in range(3)] + [np.abs(rng.normal(size=(4, 6)))]
    base[3] = base[3].astype(np.float32)
    views = [b[:, ::2] for b in base]                         # strided: the kernel must not lose the write
    expected = [v.copy() for v in views]
    adamw_kernel.step_reference(*expected, 0.01, 0.9, 0.99, 1e-8, 0.1, 3)
    adamw_kernel.step(*views, 0.01, 0.9, 0.99, 1e-8, 0.1, 3)
    for want, got in zip(expected, views):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_adamw_kernel_rejects_step_zero():
    a = np.ones(2)
    with pytest.raises(ValueError):
        adamw_kernel.step_reference(a, a.copy(), a.copy(), a.copy(), 0.1, 0.9, 0.99, 1e-8, 0.0, 0)


# ---------------------------------------------------------------- param groups and weight decay

def test_weight_decay_groups():
    """Zero gradients leave m = v = 0, so AdamW's only move is the decay p *= 1 - lr * wd."""
    decayed, not_decayed = P([1.0, -3.0]), P([2.0])
    opt = optim.AdamW([{"params": [decayed]}, {"params": [not_decayed], "weight_decay": 0.0}],
                      lr=0.1, weight_decay=0.5)
    for _ in range(2):
        decayed.grad, not_decayed.grad = np.zeros(2), np.zeros(1)
        opt.step()
    np.testing.assert_allclose(decayed.data, np.array([1.0, -3.0]) * 0.95 ** 2, rtol=1e-15)
    assert not_decayed.data[0] == 2.0
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0


def test_group_overrides_and_scheduler_lr_changes():
    a, b = P([1.0]), P([1.0])
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1)
    a.grad = b.grad = np.array([1.0])
    opt.step()
    assert a.data[0] == pytest.approx(0.9) and b.data[0] == pytest.approx(0.8)
    for group in opt.param_groups:          # what a scheduler does each iteration
        group["lr"] = 0.5
    opt.step()
    assert a.data[0] == pytest.approx(0.4) and b.data[0] == pytest.approx(0.3)


def test_bad_construction():
    w = P([1.0])
    with pytest.raises(ValueError):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError):
        optim.SGD([w, w], lr=0.1)
    with pytest.raises(TypeError):
        optim.SGD([{"params": [w], "betas": (0.9, 0.9)}], lr=0.1)
    with pytest.raises(UserError):
        optim.AdamW([w], lr=-1.0)
    with pytest.raises(UserError):
        optim.SGD([w], lr=0.1, nesterov=True)
    for betas in ((0.9, 1.0), (1.5, 0.9), (0.9, 0.99, 0.5), (-0.1, 0.9)):
        with pytest.raises(UserError, match="betas"):
            optim.AdamW([w], lr=0.1, betas=betas)
    # the bounds are inclusive where the docs say >= 0: lr = 0, eps = 0 and wd = 0 are valid settings
    for cls in (optim.Adam, optim.AdamW):
        cls([w], lr=0.0, eps=0.0, weight_decay=0.0)


def test_zero_grad_sets_none():
    params = [P([1.0]), P([2.0, 3.0])]
    opt = optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------- schedules

def test_cosine_with_warmup_key_iterations():
    max_lr, min_lr, warmup, decay = 6e-4, 6e-5, 100, 1100
    lr = optim.cosine_with_warmup(max_lr, warmup, decay, min_lr)
    assert lr(0) == pytest.approx(max_lr / 101, rel=1e-15)                # (it + 1) / (warmup + 1)
    assert lr(99) == pytest.approx(max_lr * 100 / 101, rel=1e-15)
    assert lr(warmup) == pytest.approx(max_lr, rel=1e-15)                 # cos(0) = 1
    assert lr(600) == pytest.approx((max_lr + min_lr) / 2, rel=1e-15)     # cos(pi / 2) = 0
    assert lr(350) == pytest.approx(min_lr + 0.5 * (1 + math.cos(math.pi / 4)) * (max_lr - min_lr), rel=1e-15)
    assert lr(decay) == pytest.approx(min_lr, rel=1e-15)
    assert lr(decay + 1) == min_lr and lr(10**6) == min_lr
    values = [lr(it) for it in range(0, 1200)]
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup + 1]))            # rises
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))            # then falls


def test_cosine_edge_cases_and_constant():
    no_warmup = optim.cosine_with_warmup(1.0, 0, 10, 0.1)
    assert no_warmup(0) == 1.0 and no_warmup(10) == pytest.approx(0.1)
    step_down = optim.cosine_with_warmup(1.0, 5, 5, 0.1)                 # no decay phase: no 0 / 0
    assert step_down(4) == pytest.approx(5 / 6) and step_down(5) == 0.1
    with pytest.raises(UserError):
        optim.cosine_with_warmup(1.0, 10, 5, 0.1)
    constant = optim.constant_lr(3e-4)
    assert constant(0) == constant(10**6) == 3e-4


# ---------------------------------------------------------------- gradient clipping

def test_clip_grad_norm_scales_to_max_norm():
    a, b, c = P([0.0, 0.0]), P([[0.0]]), P([5.0])
    a.grad, b.grad = np.array([3.0, 0.0], dtype=np.float32), np.array([[4.0]], dtype=np.float32)
    norm = optim.clip_grad_norm_([a, b, c], max_norm=1.0)              # c has no grad: ignored
    assert isinstance(norm, float) and norm == pytest.approx(5.0, rel=1e-7)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3.0 * scale, 0.0], rtol=1e-6)
    np.testing.assert_allclose(b.grad, [[4.0 * scale]], rtol=1e-6)
    assert a.grad.dtype == np.float32
    new_norm = math.sqrt(float(np.sum(a.grad ** 2) + np.sum(b.grad ** 2)))
    assert new_norm == pytest.approx(1.0, rel=1e-5) and new_norm <= 1.0 + 1e-7


def test_clip_grad_norm_below_max_and_nonfinite_leave_grads_alone():
    a = P([0.0, 0.0])
    a.grad = np.array([0.3, 0.4])
    assert optim.clip_grad_norm_([a], max_norm=1.0) == pytest.approx(0.5)
    assert a.grad.tolist() == [0.3, 0.4]
    a.grad = np.array([np.nan, 1.0])
    assert math.isnan(optim.clip_grad_norm_([a], max_norm=1.0))
    assert a.grad[1] == 1.0
    a.grad = np.array([np.inf, 1.0])
    assert optim.clip_grad_norm_([a], max_norm=1.0) == math.inf and a.grad[1] == 1.0
    assert optim.clip_grad_norm_([P([1.0])], max_norm=1.0) == 0.0


# ---------------------------------------------------------------- state dict: bit-exact resume

def make_params():
    rng = np.random.default_rng(7)
    return [P(rng.normal(size=s).astype(np.float32)) for s in [(3, 4), (4,), (2, 2)]]


def wiggly_steps(opt, params, start, stop, schedule):
    """Steps start..stop-1 with a scheduled lr and the middle parameter skipped on odd steps
    (so per-parameter step counts differ)."""
    for it in range(start, stop):
        for group in opt.param_groups:
            group["lr"] = schedule(it)
        for k, p in enumerate(params):
            p.grad = None if (k == 1 and it % 2) else (np.sin(3 * p.data) + 0.1 * it).astype(np.float32)
        opt.step()


OPTIMIZERS = {
    "SGD": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adam": lambda ps: optim.Adam(ps, lr=0.1, weight_decay=0.01),
    "AdamW": lambda ps: optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
                                    lr=0.1, betas=(0.9, 0.95), weight_decay=0.1),
    "RMSprop": lambda ps: optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_for_bit(tmp_path, name):
    schedule = optim.cosine_with_warmup(0.1, 2, 6, 0.01)
    straight = make_params()
    opt = OPTIMIZERS[name](straight)
    wiggly_steps(opt, straight, 0, 6, schedule)

    first_half = make_params()
    opt = OPTIMIZERS[name](first_half)
    wiggly_steps(opt, first_half, 0, 3, schedule)
    scalars, arrays = opt.state_dict()
    # through the files a trainer writes, so JSON and safetensors are part of the round trip
    write_json_atomic(tmp_path / "optimizer.json", scalars)
    save_safetensors(tmp_path / "optimizer.safetensors", arrays)
    model = {f"p{k}": p.data for k, p in enumerate(first_half)}
    save_safetensors(tmp_path / "model.safetensors", model)

    loaded_model, _ = load_safetensors(tmp_path / "model.safetensors")
    resumed = [P(loaded_model[f"p{k}"]) for k in range(3)]
    opt2 = OPTIMIZERS[name](resumed)
    opt2.load_state_dict(read_json(tmp_path / "optimizer.json"), load_safetensors(tmp_path / "optimizer.safetensors")[0])
    wiggly_steps(opt2, resumed, 3, 6, schedule)

    for a, b in zip(straight, resumed):
        assert a.data.dtype == b.data.dtype and a.data.tobytes() == b.data.tobytes()


def test_state_dict_is_a_snapshot_and_documented_format():
    params = make_params()
    opt = optim.AdamW(params, lr=0.1)
    wiggly_steps(opt, params, 0, 1, optim.constant_lr(0.1))
    scalars, arrays = opt.state_dict()
    assert scalars["type"] == "AdamW" and scalars["format"] == optim.FORMAT
    assert scalars["param_groups"][0]["params"] == [0, 1, 2] and scalars["param_groups"][0]["betas"] == [0.9, 0.999]
    assert scalars["state"]["0"] == {"step": 1}
    assert sorted(arrays) == sorted(f"state.{i}.{n}" for i in range(3) for n in ("exp_avg", "exp_avg_sq"))
    before = arrays["state.0.exp_avg"].copy()
    wiggly_steps(opt, params, 1, 2, optim.constant_lr(0.1))
    assert np.array_equal(arrays["state.0.exp_avg"], before)      # later steps do not change it


def test_load_state_dict_refuses_mismatches():
    params = make_params()
    opt = optim.AdamW(params, lr=0.1)
    wiggly_steps(opt, params, 0, 1, optim.constant_lr(0.1))
    scalars, arrays = opt.state_dict()
    with pytest.raises(UserError, match="saved by AdamW"):
        optim.Adam(make_params()).load_state_dict(scalars, arrays)
    with pytest.raises(UserError, match="different model"):
        optim.AdamW(make_params()[:2]).load_state_dict(scalars, arrays)
    wrong_shape = dict(arrays, **{"state.0.exp_avg": np.zeros((4, 3), np.float32)})
    with pytest.raises(UserError, match="shape"):
        optim.AdamW(make_params()).load_state_dict(scalars, wrong_shape)
    missing = {k: v for k, v in arrays.items() if k != "state.1.exp_avg_sq"}
    with pytest.raises(UserError, match="lacks"):
        optim.AdamW(make_params()).load_state_dict(scalars, missing)
    with pytest.raises(UserError, match="damaged"):
        optim.AdamW(make_params()).load_state_dict({k: v for k, v in scalars.items() if k != "state"}, arrays)


# ---------------------------------------------------------------- other backends: strict (CuPy-like) and CuPy

@pytest.mark.parametrize("backend_name", ["strict", "cupy"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_other_backends_follow_the_numpy_trajectory(backend_name, name):
    """Optimizers, clipping and state dicts reach arrays only through backend.xp: the strict
    backend (refuses stray NumPy calls) and CuPy (when a GPU is here) give NumPy's numbers."""
    from scratchlm import backend
    try:
        backend.use_backend(backend_name)
    except Exception as exc:           # unregistered (no conftest) or no CuPy / GPU here
        pytest.skip(f"backend {backend_name} unavailable: {exc}")
    try:
        xp = backend.xp
        moved = [P(xp.asarray(p.data)) for p in make_params()]
        opt = OPTIMIZERS[name](moved)
        for it in range(4):
            for p in moved:
                p.grad = xp.sin(3 * p.data) + 0.1 * it
            optim.clip_grad_norm_(moved, 1.0)
            opt.step()
        scalars, arrays = opt.state_dict()
        assert all(isinstance(a, np.ndarray) for a in arrays.values())
        OPTIMIZERS[name](moved).load_state_dict(scalars, arrays)
        result = [backend.to_numpy(p.data) for p in moved]
    finally:
        backend.use_backend("numpy")
    host = make_params()
    opt = OPTIMIZERS[name](host)
    for it in range(4):
        for p in host:
            p.grad = np.sin(3 * p.data) + np.float32(0.1 * it)
        optim.clip_grad_norm_(host, 1.0)
        opt.step()
    for want, got in zip(host, result):
        np.testing.assert_allclose(got, want.data, rtol=1e-5, atol=1e-6)   # GPU sin differs in the last bits
