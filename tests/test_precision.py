"""dtype=bfloat16: GPU-only; on the CPU one clear line and exit 2, before anything is written."""
from scratchlm.cli import main
from scratchlm.datasets import dataset_path


def test_bfloat16_on_the_cpu_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", "--corpus", str(dataset_path("names.txt")), "--tokenizer", "char", "--preset", "nano-cpu",
                   "--set", "dtype=bfloat16", "--iters", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["scratchlm: error: bfloat16 is GPU-only; CPU trains in float32 (drop --set dtype=bfloat16, "
                   "or train on a GPU with --backend cupy)"]
    assert not out.exists()


def test_float32_is_the_default_and_other_dtypes_are_refused(tmp_path, capsys):
    from scratchlm.config import TrainConfig
    assert TrainConfig().dtype == "float32"
    status = main(["train", "--corpus", str(dataset_path("names.txt")), "--set", "dtype=float16",
                   "--out", str(tmp_path / "run")])
    assert status == 2
    assert "config key dtype must be 'float32' or 'bfloat16', got 'float16'" in capsys.readouterr().err


# ---------------------------------------------------------------- the bf16 arithmetic, on NumPy
# scratchlm.precision's GPU path, run here on NumPy with ml_dtypes (the same casts and products).
# Oracle: float64 products of the bf16-rounded inputs; bf16 keeps 8 significant bits, so results
# agree to 2^-8 relative (one rounding of the product's output at most).

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from scratchlm import precision  # noqa: E402
from scratchlm.errors import UserError  # noqa: E402


@pytest.fixture
def bf16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    precision.use("bfloat16", allow_cpu=True)
    yield ml_dtypes.bfloat16
    precision.use("float32")


def rounded(a, bfloat16):
    return a.astype(bfloat16).astype(np.float64)


def test_linear_under_bf16_multiplies_bf16_inputs_and_returns_float32(bf16):
    from scratchlm.ops.linalg import Linear
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 8), (8, 5), (5,)))
    g = rng.standard_normal((2, 3, 5)).astype(np.float32)
    y, saved = Linear.forward(x, w, b)
    assert y.dtype == np.float32 and saved[0].dtype == bf16            # the backward keeps the bf16 copy
    want = rounded(x, bf16).reshape(6, 8) @ rounded(w, bf16) + b
    np.testing.assert_allclose(y.reshape(6, 5), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
    dx, dw, db = Linear.backward(g, saved)
    assert dx.dtype == dw.dtype == np.float32
    g_rows = rounded(g, bf16).reshape(6, 5)
    np.testing.assert_allclose(dx.reshape(6, 8), g_rows @ rounded(w, bf16).T, rtol=2**-8, atol=1e-2)
    np.testing.assert_allclose(dw, rounded(x, bf16).reshape(6, 8).T @ g_rows, rtol=2**-8, atol=1e-2)
    np.testing.assert_allclose(db, g.reshape(6, 5).sum(0), rtol=1e-6)          # the bias stays float32


def test_a_gpt_step_under_bf16_stays_within_bf16_tolerance_of_float32(bf16):
    """Loss and gradients of a tiny GPT: bf16 matmul inputs vs float32, within bf16's precision."""
    from scratchlm.models.gpt import GPT, GPTConfig
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    results = []
    for dtype in ("bfloat16", "float32"):
        precision.use(dtype, allow_cpu=True)
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16), seed=0)
        loss = model(x, y)[1]
        loss.backward()
        results.append((float(loss.data), {n: p.grad for n, p in model.named_parameters()}))
    (loss16, grads16), (loss32, grads32) = results
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)     # bf16 took effect, and stays close
    for name, g in grads32.items():
        assert grads16[name].dtype == np.float32
        np.testing.assert_allclose(grads16[name], g, rtol=0, atol=0.05 * np.abs(g).max() + 1e-6, err_msg=name)


def test_bf16_without_a_gpu_is_refused_by_the_policy_too():
    with pytest.raises(UserError, match="bfloat16 is GPU-only; CPU trains in float32"):
        precision.use("bfloat16")
    assert precision.compute_dtype() is None
