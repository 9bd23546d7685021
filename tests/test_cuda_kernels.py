"""The CUDA rung (scratchlm/kernels/cuda.py + kernels/*.cu) against the NumPy references.

Oracle: each kernel runs on float32 (and float64 where it supports it) CuPy arrays; the reference
twin in scratchlm/kernels/<op>.py runs on the same inputs upcast to float64 NumPy. Errors are
measured as max|kernel - reference| / max(max|reference|, 0.1) ("normalised max error"). The floor
matters only where the exact answer is 0 or tiny: at T = 1, dq = dk = 0 exactly, while the kernel's
dP - delta is a difference of two D-term float32 dot products of O(1) inputs (~1e-6 absolute);
judging that against 0 would be a relative error of infinity, against 0.1 it is ~1e-5. Bounds:

* attention (float32 kernel): 2e-5 forward, 1e-4 backward (dQ sums dS K over up to T keys);
* row and elementwise kernels: 2e-5 in float32, 1e-12 in float64.

The GPU tests skip cleanly without CuPy or a GPU (CI). test_cuda_sources_compile needs only nvcc:
it compiles every .cu file the package ships for sm_80 and sm_90, so a syntax error cannot land
unseen even where no GPU exists.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from scratchlm.kernels import adamw, attention, cross_entropy, embedding, gelu, layer_norm

KERNEL_DIR = Path(__file__).resolve().parents[1] / "scratchlm" / "kernels"
CUDA_SOURCES = sorted(KERNEL_DIR.glob("*.cu"))


# ------------------------------------------------------------------------ compile check (CPU)

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(arch, tmp_path):
    assert CUDA_SOURCES, "the package ships no .cu sources"
    # Compile all sources for this arch in parallel; SCRATCHLM_INSTANTIATE_ALL instantiates every
    # template, so errors in template bodies show too (NVRTC instantiates them only on demand).
    jobs = [(source, subprocess.Popen(
        ["nvcc", "-std=c++17", f"-arch={arch}", "-ptx", "-DSCRATCHLM_INSTANTIATE_ALL", str(source),
         "-o", str(tmp_path / f"{source.stem}.ptx")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for source in CUDA_SOURCES]
    failures = []
    for source, proc in jobs:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{source.name}:\n{output}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------ GPU tests

try:                # not pytest.importorskip: the compile check above must still run without CuPy
    import cupy as cp
except ImportError:
    cp = None
try:
    _HAS_GPU = cp is not None and cp.cuda.runtime.getDeviceCount() > 0
except Exception:   # CUDARuntimeError where the driver is missing
    _HAS_GPU = False
gpu = pytest.mark.skipif(not _HAS_GPU, reason="needs CuPy and a CUDA GPU")

if _HAS_GPU:
    from scratchlm.kernels import cuda

HEAD_DIMS = [16, 32, 64, 80, 128, 13, 6, 1]   # 13, 6, 1: not multiples of 4 (the scalar load path)
ATTENTION_FWD_TOL = 2e-5
ATTENTION_BWD_TOL = 1e-4
F32_TOL = 2e-5
F64_TOL = 1e-12
ERROR_FLOOR = 0.1
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def normalised_max_error(actual, expected) -> float:
    actual = cp.asnumpy(actual).astype(np.float64) if not isinstance(actual, np.ndarray) else actual
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), "kernel output has NaN/inf"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), ERROR_FLOOR)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def assert_close(actual, expected, tol, what=""):
    err = normalised_max_error(actual, expected)
    assert err <= tol, f"{what}: normalised max error {err:.3g} > {tol:.1g}"


def on_gpu(array, dtype):
    return cp.asarray(np.asarray(array, dtype=dtype))


# ------------------------------------------------------------------------ attention

@gpu
@SETTINGS
@given(bh=st.sampled_from([(1, 1), (2, 3), (4, 4), (1, 16)]),
       T=st.one_of(st.sampled_from([1, 2, 63, 64, 65, 128, 130]), st.integers(1, 300)),
       D=st.sampled_from(HEAD_DIMS), causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_attention_matches_reference(bh, T, D, causal, seed):
    B, H = bh
    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    o_ref, lse_ref = attention.forward_reference(*(a.astype(np.float64) for a in (q, k, v)), causal, scale)
    o, lse = cuda.attention_forward(on_gpu(q, np.float32), on_gpu(k, np.float32), on_gpu(v, np.float32),
                                    causal, scale)
    assert_close(o, o_ref, ATTENTION_FWD_TOL, "o")
    assert_close(lse, lse_ref, ATTENTION_FWD_TOL, "lse")

    grads_ref = attention.backward_reference(do.astype(np.float64), q.astype(np.float64),
                                             k.astype(np.float64), v.astype(np.float64),
                                             o_ref, lse_ref, causal, scale)
    grads = cuda.attention_backward(on_gpu(do, np.float32), on_gpu(q, np.float32), on_gpu(k, np.float32),
                                    on_gpu(v, np.float32), o, lse, causal, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(got, want, ATTENTION_BWD_TOL, name)


@gpu
@pytest.mark.parametrize("Tq,Tk", [(1, 77), (5, 64), (64, 200)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_query_shorter_than_keys(Tq, Tk, causal):
    """KV-cache shapes: causal query i sees keys j <= i + Tk - Tq, as in the reference."""
    rng = np.random.default_rng(Tq * 1000 + Tk)
    B, H, D = 2, 3, 64
    q, do = (rng.standard_normal((B, H, Tq, D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, H, Tk, D)).astype(np.float32) for _ in range(2))
    f64 = [a.astype(np.float64) for a in (q, k, v)]
    o_ref, lse_ref = attention.forward_reference(*f64, causal, None)
    o, lse = cuda.attention_forward(*(on_gpu(a, np.float32) for a in (q, k, v)), causal, None)
    assert_close(o, o_ref, ATTENTION_FWD_TOL, "o")
    assert_close(lse, lse_ref, ATTENTION_FWD_TOL, "lse")
    grads_ref = attention.backward_reference(do.astype(np.float64), *f64, o_ref, lse_ref, causal, None)
    grads = cuda.attention_backward(on_gpu(do, np.float32), *(on_gpu(a, np.float32) for a in (q, k, v)),
                                    o, lse, causal, None)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(got, want, ATTENTION_BWD_TOL, name)


@gpu
def test_attention_causal_mask_hides_the_future():
    """Changing keys/values after position t must not change outputs at positions <= t."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 150, 32)).astype(np.float32) for _ in range(3))
    o1, _ = cuda.attention_forward(*(on_gpu(a, np.float32) for a in (q, k, v)), True, None)
    k[:, :, 100:] = 1e4       # huge future scores: any leak through a finite mask would show
    v[:, :, 100:] = -1e4
    o2, _ = cuda.attention_forward(*(on_gpu(a, np.float32) for a in (q, k, v)), True, None)
    np.testing.assert_array_equal(cp.asnumpy(o1)[:, :, :100], cp.asnumpy(o2)[:, :, :100])


@gpu
def test_attention_rejects_unsupported_inputs():
    x = cp.zeros((1, 1, 4, 8), dtype=cp.float64)
    with pytest.raises(TypeError, match="float32"):
        cuda.attention_forward(x, x, x, True, None)
    y = cp.zeros((1, 1, 4, 130), dtype=cp.float32)
    with pytest.raises(ValueError, match="head dim"):
        cuda.attention_forward(y, y, y, True, None)


# ------------------------------------------------------------------------ layer norm

@gpu
@SETTINGS
@given(N=st.integers(1, 70), C=st.sampled_from([1, 2, 7, 32, 100, 768, 1031]), affine=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1))
def test_layer_norm_matches_reference(N, C, affine, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C)) * 3 + 1
    dy = rng.standard_normal((N, C))
    weight = rng.standard_normal(C) if affine else None
    bias = rng.standard_normal(C) if affine else None
    eps = 1e-5
    # Reference on the kernel's (rounded) inputs, in float64.
    x, dy = (np.asarray(a, dtype=dtype).astype(np.float64) for a in (x, dy))
    if affine:
        weight, bias = (np.asarray(a, dtype=dtype).astype(np.float64) for a in (weight, bias))
    y_ref, mean_ref, rstd_ref = layer_norm.forward_reference(x, weight, bias, eps)
    grads_ref = layer_norm.backward_reference(dy, x, weight, mean_ref, rstd_ref)

    g = lambda a: None if a is None else on_gpu(a, dtype)   # noqa: E731
    y, mean, rstd = cuda.layer_norm_forward(g(x), g(weight), g(bias), eps)
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    assert y.dtype == dtype
    assert_close(y, y_ref, tol, "y")
    assert_close(mean, mean_ref, tol, "mean")
    assert_close(rstd, rstd_ref, tol, "rstd")
    grads = cuda.layer_norm_backward(g(dy), g(x), g(weight), mean, rstd)
    # dx = rstd * (g - mean(g) - xhat mean(g xhat)): compare the bracket, whose natural scale is |g|.
    # (At C = 2 it is ~0 and rstd can be large, so dx itself is rstd times pure rounding noise.)
    assert_close(grads[0] / rstd[:, None], grads_ref[0] / rstd_ref[:, None], tol, "dx / rstd")
    for name, got, want in zip(("dweight", "dbias"), grads[1:], grads_ref[1:]):
        if want is None:
            assert got is None, name
        else:
            # dweight/dbias sum N rows: allow for the float32 summation of N terms.
            assert_close(got, want, 4 * tol, name)


@gpu
@SETTINGS
@given(N=st.integers(1, 70), C=st.sampled_from([2, 7, 100, 768]), affine=st.booleans(), with_ds=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1))
def test_add_layer_norm_matches_reference(N, C, affine, with_ds, dtype, seed):
    """The fused residual add + layer norm (the residual option of the row kernels) against the
    NumPy composition: s = x + r, layer norm of s; dL/ds = ds + the layer norm's dx."""
    rng = np.random.default_rng(seed)
    x, r, dy, ds = (np.asarray(rng.standard_normal((N, C)) * 2, dtype=dtype).astype(np.float64) for _ in range(4))
    weight, bias = ((np.asarray(rng.standard_normal(C), dtype=dtype).astype(np.float64) for _ in range(2))
                    if affine else (None, None))
    s_ref = x + r
    y_ref, mean_ref, rstd_ref = layer_norm.forward_reference(s_ref, weight, bias, 1e-5)
    dx_ref, dw_ref, db_ref = layer_norm.backward_reference(dy, s_ref, weight, mean_ref, rstd_ref)
    g = lambda a: None if a is None else on_gpu(a, dtype)   # noqa: E731
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    s, y, mean, rstd = cuda.add_layer_norm_forward(g(x), g(r), g(weight), g(bias), 1e-5)
    assert_close(s, s_ref, tol, "s")
    assert_close(y, y_ref, tol, "y")
    assert_close(rstd, rstd_ref, tol, "rstd")
    d_sum, dweight, dbias = cuda.add_layer_norm_backward(g(ds) if with_ds else None, g(dy), s, g(weight), mean, rstd)
    # the layer norm's part compared as in test_layer_norm_matches_reference (scaled by rstd)
    ln_part = d_sum - (g(ds) if with_ds else 0)
    assert_close(ln_part / rstd[:, None], dx_ref / rstd_ref[:, None], 4 * tol, "dL/ds - ds")
    if with_ds:
        assert_close(d_sum, dx_ref + ds, 4 * tol * max(1.0, float(np.max(rstd_ref))), "dL/ds")
    for name, got, want in (("dweight", dweight, dw_ref), ("dbias", dbias, db_ref)):
        if want is None:
            assert got is None, name
        else:
            assert_close(got, want, 4 * tol, name)


@gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_kernels_match_reference(approximate):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((37, 96)), rng.standard_normal((37, 96))
    b = rng.standard_normal(96)
    h = x + b
    assert_close(cuda.bias_gelu_forward(on_gpu(x, np.float64), on_gpu(b, np.float64), approximate),
                 gelu.forward_reference(h, approximate), F64_TOL, "y")
    assert_close(cuda.bias_gelu_backward(on_gpu(dy, np.float64), on_gpu(x, np.float64), on_gpu(b, np.float64), approximate),
                 gelu.backward_reference(dy, h, approximate), F64_TOL, "dh")


# ------------------------------------------------------------------------ GELU

@gpu
@SETTINGS
@given(shape=st.sampled_from([(1,), (7, 5), (3, 4, 129)]), approximate=st.sampled_from(["none", "tanh"]),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1))
def test_gelu_matches_reference(shape, approximate, dtype, seed):
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.uniform(-8, 8, shape), dtype=dtype).astype(np.float64)
    dy = np.asarray(rng.standard_normal(shape), dtype=dtype).astype(np.float64)
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    y = cuda.gelu_forward(on_gpu(x, dtype), approximate)
    assert y.dtype == dtype
    assert_close(y, gelu.forward_reference(x, approximate), tol, "y")
    dx = cuda.gelu_backward(on_gpu(dy, dtype), on_gpu(x, dtype), approximate)
    assert_close(dx, gelu.backward_reference(dy, x, approximate), tol, "dx")


@gpu
def test_gelu_on_an_unaligned_view():
    """A view starting mid-allocation cannot be read in 16-byte packs: the wrapper copies it."""
    base = np.random.default_rng(3).uniform(-4, 4, 1031).astype(np.float32)
    view = cp.asarray(base)[1:]                 # data pointer 4 bytes past a 16-byte boundary
    want = gelu.forward_reference(base[1:].astype(np.float64), "tanh")
    assert_close(cuda.gelu_forward(view, "tanh"), want, F32_TOL, "y")


# ------------------------------------------------------------------------ cross-entropy

@gpu
@SETTINGS
@given(N=st.integers(1, 40), V=st.sampled_from([1, 2, 65, 1000, 50257]),
       ignored=st.floats(0.0, 1.0), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_cross_entropy_matches_reference(N, V, ignored, dtype, seed):
    rng = np.random.default_rng(seed)
    logits = np.asarray(rng.standard_normal((N, V)) * 4, dtype=dtype).astype(np.float64)
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < ignored] = -100
    dloss = 0.75
    loss_ref, lse_ref = cross_entropy.forward_reference(logits, targets, -100)
    dlogits_ref = cross_entropy.backward_reference(np.float64(dloss), logits, lse_ref, targets, -100)

    tol = F32_TOL if dtype == np.float32 else F64_TOL
    loss, lse = cuda.cross_entropy_forward(on_gpu(logits, dtype), cp.asarray(targets), -100)
    assert loss.shape == () and loss.dtype == dtype
    assert_close(loss.reshape(1), np.reshape(loss_ref, 1), tol, "loss")
    assert_close(lse, lse_ref, tol, "lse")
    dlogits = cuda.cross_entropy_backward(cp.asarray(dloss, dtype=dtype), on_gpu(logits, dtype), lse,
                                          cp.asarray(targets), -100)
    assert_close(dlogits, dlogits_ref, tol, "dlogits") if np.any(dlogits_ref) else \
        np.testing.assert_array_equal(cp.asnumpy(dlogits), 0)


@gpu
def test_cross_entropy_all_rows_ignored_is_zero():
    logits = cp.asarray(np.random.default_rng(1).standard_normal((3, 10)), dtype=cp.float32)
    targets = cp.full((3,), -100, dtype=cp.int64)
    loss, lse = cuda.cross_entropy_forward(logits, targets, -100)
    assert float(loss) == 0.0
    dlogits = cuda.cross_entropy_backward(cp.asarray(1.0, dtype=cp.float32), logits, lse, targets, -100)
    assert not cp.any(dlogits)


# ------------------------------------------------------------------------ embedding

@gpu
@SETTINGS
@given(N=st.integers(1, 200), C=st.sampled_from([1, 3, 64, 300]), V=st.integers(1, 50),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1))
def test_embedding_backward_matches_reference(N, C, V, dtype, seed):
    rng = np.random.default_rng(seed)
    dout = np.asarray(rng.standard_normal((N, C)), dtype=dtype).astype(np.float64)
    idx = rng.integers(0, V, N)         # small V: many repeated ids, so the adds must accumulate
    want = embedding.backward_reference(dout, idx, V)
    got = cuda.embedding_backward(on_gpu(dout, dtype), cp.asarray(idx), V)
    assert got.shape == (V, C) and got.dtype == dtype
    assert_close(got, want, F32_TOL if dtype == np.float32 else F64_TOL, "dweight")


# ------------------------------------------------------------------------ AdamW

@gpu
@SETTINGS
@given(shape=st.sampled_from([(1,), (17,), (64, 33)]), step=st.integers(1, 1000),
       weight_decay=st.sampled_from([0.0, 0.1]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_adamw_step_matches_reference(shape, step, weight_decay, dtype, seed):
    rng = np.random.default_rng(seed)
    param, grad, exp_avg = (np.asarray(rng.standard_normal(shape), dtype=dtype) for _ in range(3))
    exp_avg_sq = np.asarray(rng.random(shape), dtype=dtype)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, step=step)
    ref = [a.astype(np.float64) for a in (param, grad, exp_avg, exp_avg_sq)]
    adamw.step_reference(*ref, **hyper)
    gpu_arrays = [cp.asarray(a) for a in (param, grad, exp_avg, exp_avg_sq)]
    cuda.adamw_step(*gpu_arrays, **hyper)
    tol = F32_TOL if dtype == np.float32 else F64_TOL
    for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), gpu_arrays[:1] + gpu_arrays[2:],
                               ref[:1] + ref[2:]):
        assert got.dtype == dtype
        assert_close(got, want, tol, name)
