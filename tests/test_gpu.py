"""GPU-only checks of issue 14 (skip without CuPy and a GPU; bench/gpu_check.sh runs them first).

Oracles: the fused GPT ops against the unfused model on the device (logits and every gradient);
a bf16 step against the float32 step from the same weights and batch (bf16 tolerance: 8
significant bits on the matmul inputs, a relative 2^-9 per rounding, a few dozen roundings
deep -> 2e-2 on the loss, 5e-2 on each gradient's norm); NCCL with one rank (the all-reduce of one rank is
the identity, the loss sum is the value itself) through NCCLGroup with the real cupy.cuda.nccl.
"""
import numpy as np
import pytest

from scratchlm import backend

cp = pytest.importorskip("cupy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no GPU visible", allow_module_level=True)
except Exception:                       # noqa: BLE001 -- no driver
    pytest.skip("no GPU visible", allow_module_level=True)

from scratchlm import precision  # noqa: E402
from scratchlm.models import GPT, GPTConfig  # noqa: E402

TINY = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(autouse=True)
def on_the_gpu():
    backend.use_backend("cupy")
    yield
    precision.use("float32")
    backend.use_backend("numpy")


def batch(seed=0, B=4, T=32, V=65):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def step(fused=True):
    model = GPT(GPTConfig(**TINY), seed=0).use_fused_ops(fused)
    logits, loss = model(*batch())
    loss.backward()
    return (backend.to_numpy(logits.data), float(loss.item()),
            {n: backend.to_numpy(p.grad) for n, p in model.named_parameters()})


def test_fused_gpt_ops_on_the_gpu_equal_the_unfused_model():
    (lf, loss_f, gf), (lu, loss_u, gu) = step(True), step(False)
    np.testing.assert_allclose(lf, lu, rtol=1e-4, atol=1e-5)
    assert loss_f == pytest.approx(loss_u, rel=1e-5)
    for name in gf:
        np.testing.assert_allclose(gf[name], gu[name], rtol=1e-3, atol=1e-5, err_msg=name)


def test_bf16_step_is_the_float32_step_within_bf16_tolerance():
    """Loss and gradients of one step from the same weights and batch; the gradients compared by
    relative norm per parameter (elementwise, a gradient near 0 has no relative precision)."""
    results = []
    for dtype in ("float32", "bfloat16"):
        precision.use(dtype)
        results.append(step())
    (_, loss32, g32), (_, loss16, g16) = results
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    for name in g32:
        assert g16[name].dtype == np.float32, name                    # fp32 master gradients
        error = np.linalg.norm(g16[name] - g32[name]) / max(np.linalg.norm(g32[name]), 1e-12)
        assert error < 5e-2, f"{name}: relative gradient error {error:.3g}"


def test_nccl_group_with_one_rank_reduces_on_the_device():
    pytest.importorskip("mpi4py")
    nccl = pytest.importorskip("cupy.cuda.nccl")
    if not getattr(nccl, "available", True):
        pytest.skip("this CuPy was built without NCCL (pip install nvidia-nccl-cu12)")
    from mpi4py import MPI
    from scratchlm import distributed
    group = distributed.NCCLGroup(MPI.COMM_WORLD)
    assert (group.rank, group.world) == (0, 1)
    model = GPT(GPTConfig(**TINY), seed=0)
    storage = model.flatten_()
    model(*batch())[1].backward()
    before = cp.asnumpy(storage.grad["float32"]).copy()
    group.reduce_gradients(storage)
    cp.cuda.get_current_stream().synchronize()
    np.testing.assert_array_equal(cp.asnumpy(storage.grad["float32"]), before)
    assert float(group.sum([2.5])[0]) == 2.5
