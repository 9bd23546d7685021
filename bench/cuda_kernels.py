"""Validate, then time, every CUDA kernel of scratchlm against PyTorch on the same GPU (llm.c dev/cuda style).

    PYTHONPATH=. python3 bench/cuda_kernels.py            # full ladder, GPT-2 124M sizes
    PYTHONPATH=. python3 bench/cuda_kernels.py --quick    # smaller sizes, fewer repeats

Step 1 (validate): each kernel runs on random float32 inputs and is compared with the NumPy reference
in scratchlm/kernels/<op>.py run in float64 on the same inputs: normalised max error
max|kernel - reference| / max|reference|. Any error above its bound, or a NaN, fails the run (exit 1)
before anything is timed.
Step 2 (time): CUDA events around each call, after warm-up, median of repeats; PyTorch's op on the same
data in the same process (float32, TF32 off) gives the ratio torch_ms / ours_ms (> 1: we are faster).

Prints a table; writes bench/results/cuda_kernels.json (and $OUT/cuda_kernels.json when OUT is set).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

import cupy as cp

from scratchlm.kernels import adamw, attention, cross_entropy, cuda, embedding, gelu, layer_norm

RESULTS = Path(__file__).resolve().parent / "results"
ERROR_FLOOR = 0.1       # denominator floor: exact answers of 0 (dq at T = 1) are judged on absolute error


# ------------------------------------------------------------------------------ helpers

def normalised_max_error(actual, expected) -> float:
    actual = cp.asnumpy(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected))) / max(float(np.max(np.abs(expected))), ERROR_FLOOR)


def time_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def time_torch_ms(torch, fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------------------ 1. validate

def validate(rng) -> list[dict]:
    rows = []

    def check(name, got, want, bound):
        err = normalised_max_error(got, want)
        rows.append({"kernel": name, "error": err, "bound": bound, "ok": err <= bound})

    for (B, H, T, D, causal) in [(2, 3, 1, 64, True), (2, 3, 200, 64, True), (1, 4, 129, 80, True),
                                 (2, 2, 257, 128, False), (1, 2, 100, 16, True), (1, 1, 70, 20, False)]:
        q, k, v, do = (f32(rng, (B, H, T, D)) for _ in range(4))
        f64 = [a.astype(np.float64) for a in (q, k, v)]
        o_ref, lse_ref = attention.forward_reference(*f64, causal, None)
        dq_ref, dk_ref, dv_ref = attention.backward_reference(do.astype(np.float64), *f64, o_ref, lse_ref,
                                                              causal, None)
        o, lse = cuda.attention_forward(*(cp.asarray(a) for a in (q, k, v)), causal, None)
        dq, dk, dv = cuda.attention_backward(cp.asarray(do), *(cp.asarray(a) for a in (q, k, v)), o, lse,
                                             causal, None)
        tag = f"attention T={T} D={D} {'causal' if causal else 'full'}"
        check(f"{tag} o", o, o_ref, 2e-5)
        check(f"{tag} lse", lse, lse_ref, 2e-5)
        for name, got, want in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
            check(f"{tag} {name}", got, want, 1e-4)

    N, C = 333, 768
    x, dy, w, b = f32(rng, (N, C), 2), f32(rng, (N, C)), f32(rng, C), f32(rng, C)
    y_ref, mean_ref, rstd_ref = layer_norm.forward_reference(*(a.astype(np.float64) for a in (x, w, b)), 1e-5)
    dx_ref, dw_ref, db_ref = layer_norm.backward_reference(dy.astype(np.float64), x.astype(np.float64),
                                                           w.astype(np.float64), mean_ref, rstd_ref)
    y, mean, rstd = cuda.layer_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-5)
    dx, dw, db = cuda.layer_norm_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), mean, rstd)
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dweight", dw, dw_ref), ("dbias", db, db_ref)):
        check(f"layer_norm {name}", got, want, 1e-4)

    x, dy = f32(rng, (257, 3072), 3), f32(rng, (257, 3072))
    for approx in ("none", "tanh"):
        check(f"gelu[{approx}] y", cuda.gelu_forward(cp.asarray(x), approx),
              gelu.forward_reference(x.astype(np.float64), approx), 2e-5)
        check(f"gelu[{approx}] dx", cuda.gelu_backward(cp.asarray(dy), cp.asarray(x), approx),
              gelu.backward_reference(dy.astype(np.float64), x.astype(np.float64), approx), 2e-5)

    N, V = 64, 50257
    logits = f32(rng, (N, V), 3)
    targets = rng.integers(0, V, N)
    targets[::7] = -100
    loss_ref, lse_ref = cross_entropy.forward_reference(logits.astype(np.float64), targets, -100)
    dl_ref = cross_entropy.backward_reference(np.float64(1.0), logits.astype(np.float64), lse_ref, targets, -100)
    loss, lse = cuda.cross_entropy_forward(cp.asarray(logits), cp.asarray(targets), -100)
    dl = cuda.cross_entropy_backward(cp.asarray(1.0, dtype=cp.float32), cp.asarray(logits), lse,
                                     cp.asarray(targets), -100)
    check("cross_entropy loss", loss.reshape(1), np.reshape(loss_ref, 1), 2e-5)
    check("cross_entropy lse", lse, lse_ref, 2e-5)
    check("cross_entropy dlogits", dl, dl_ref, 2e-5)

    dout, idx = f32(rng, (4096, 768)), rng.integers(0, 1000, 4096)
    check("embedding dweight", cuda.embedding_backward(cp.asarray(dout), cp.asarray(idx), 1000),
          embedding.backward_reference(dout.astype(np.float64), idx, 1000), 2e-5)

    p, g, m = f32(rng, 10_000), f32(rng, 10_000), f32(rng, 10_000)
    s = rng.random(10_000).astype(np.float32)
    hyper = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7)
    ref = [a.astype(np.float64) for a in (p, g, m, s)]
    adamw.step_reference(*ref, **hyper)
    arrays = [cp.asarray(a) for a in (p, g, m, s)]
    cuda.adamw_step(*arrays, **hyper)
    check("adamw param", arrays[0], ref[0], 2e-5)
    check("adamw exp_avg_sq", arrays[3], ref[3], 2e-5)
    return rows


# ------------------------------------------------------------------------------ 2. time

def bench_attention(torch, rng, shapes, repeats) -> list[dict]:
    import torch.nn.functional as F
    rows = []
    for (B, H, T, D) in shapes:
        q, k, v, do = (cp.asarray(f32(rng, (B, H, T, D))) for _ in range(4))
        o, lse = cuda.attention_forward(q, k, v, True, None)
        ours_f = time_ms(lambda: cuda.attention_forward(q, k, v, True, None), repeats)
        ours_b = time_ms(lambda: cuda.attention_backward(do, q, k, v, o, lse, True, None), repeats)

        def ours_fb():
            o2, lse2 = cuda.attention_forward(q, k, v, True, None)
            cuda.attention_backward(do, q, k, v, o2, lse2, True, None)
        ours_fb_ms = time_ms(ours_fb, repeats)

        tq, tk, tv, tdo = (torch.as_tensor(a, device="cuda") for a in (q, k, v, do))
        tq, tk, tv = (t.detach().requires_grad_(True) for t in (tq, tk, tv))
        with torch.no_grad():
            torch_f = time_torch_ms(torch, lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True),
                                    repeats)
        to = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        torch_b = time_torch_ms(torch, lambda: torch.autograd.grad(to, (tq, tk, tv), tdo, retain_graph=True),
                                repeats)

        def torch_fb():
            out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            torch.autograd.grad(out, (tq, tk, tv), tdo)
        torch_fb_ms = time_torch_ms(torch, torch_fb, repeats)
        flops_fwd = 4 * B * H * T * T * D / 2          # two matmuls, half the square under the mask
        for phase, ours, theirs, flops in (("fwd", ours_f, torch_f, flops_fwd),
                                           ("bwd", ours_b, torch_b, 2.5 * flops_fwd),
                                           ("fwd+bwd", ours_fb_ms, torch_fb_ms, 3.5 * flops_fwd)):
            rows.append({"op": f"attention {phase}", "shape": f"B{B} H{H} T{T} D{D} causal",
                         "ours_ms": ours, "torch_ms": theirs, "ratio": theirs / ours,
                         "ours_tflops": flops / ours / 1e9})
        del tq, tk, tv, to
    return rows


def bench_rowops(torch, rng, repeats, quick) -> list[dict]:
    import torch.nn.functional as F
    rows = []

    def add(op, shape, ours_fn, torch_fn, bytes_moved):
        ours = time_ms(ours_fn, repeats)
        theirs = time_torch_ms(torch, torch_fn, repeats)
        rows.append({"op": op, "shape": shape, "ours_ms": ours, "torch_ms": theirs, "ratio": theirs / ours,
                     "ours_gbps": bytes_moved / ours / 1e6})

    N, C = (4096, 768) if quick else (8192, 768)
    x, dy, w, b = cp.asarray(f32(rng, (N, C))), cp.asarray(f32(rng, (N, C))), cp.asarray(f32(rng, C)), \
        cp.asarray(f32(rng, C))
    y, mean, rstd = cuda.layer_norm_forward(x, w, b, 1e-5)
    tx, tdy, tw, tb = (torch.as_tensor(a, device="cuda") for a in (x, dy, w, b))
    tx_g, tw_g, tb_g = (t.detach().requires_grad_(True) for t in (tx, tw, tb))
    ty = F.layer_norm(tx_g, (C,), tw_g, tb_g, 1e-5)
    add("layer_norm fwd", f"N{N} C{C}", lambda: cuda.layer_norm_forward(x, w, b, 1e-5),
        lambda: F.layer_norm(tx, (C,), tw, tb, 1e-5), 8 * N * C)
    add("layer_norm bwd", f"N{N} C{C}", lambda: cuda.layer_norm_backward(dy, x, w, mean, rstd),
        lambda: torch.autograd.grad(ty, (tx_g, tw_g, tb_g), tdy, retain_graph=True), 12 * N * C)

    x4, dy4 = cp.asarray(f32(rng, (N, 4 * C))), cp.asarray(f32(rng, (N, 4 * C)))
    tx4, tdy4 = torch.as_tensor(x4, device="cuda"), torch.as_tensor(dy4, device="cuda")
    tx4_g = tx4.detach().requires_grad_(True)
    ty4 = F.gelu(tx4_g, approximate="tanh")
    add("gelu[tanh] fwd", f"N{N} C{4 * C}", lambda: cuda.gelu_forward(x4, "tanh"),
        lambda: F.gelu(tx4, approximate="tanh"), 8 * N * 4 * C)
    add("gelu[tanh] bwd", f"N{N} C{4 * C}", lambda: cuda.gelu_backward(dy4, x4, "tanh"),
        lambda: torch.autograd.grad(ty4, tx4_g, tdy4, retain_graph=True), 12 * N * 4 * C)

    NV, V = (2048, 50257) if quick else (8192, 50257)
    logits = cp.asarray(f32(rng, (NV, V)))
    targets = cp.asarray(rng.integers(0, V, NV))
    tl, tt = torch.as_tensor(logits, device="cuda"), torch.as_tensor(targets, device="cuda")
    tl_g = tl.detach().requires_grad_(True)

    def ours_ce():
        loss, lse = cuda.cross_entropy_forward(logits, targets, -100)
        cuda.cross_entropy_backward(cp.asarray(1.0, dtype=cp.float32), logits, lse, targets, -100)

    def torch_ce():
        loss = F.cross_entropy(tl_g, tt)
        torch.autograd.grad(loss, tl_g)
    add("cross_entropy fwd+bwd", f"N{NV} V{V}", ours_ce, torch_ce, 12 * NV * V)

    dout = cp.asarray(f32(rng, (NV, C)))
    idx = cp.asarray(rng.integers(0, V, NV))
    tdout, tidx = torch.as_tensor(dout, device="cuda"), torch.as_tensor(idx, device="cuda")
    add("embedding bwd", f"N{NV} C{C} V{V}", lambda: cuda.embedding_backward(dout, idx, V),
        lambda: torch.zeros((V, C), device="cuda").index_add_(0, tidx, tdout), 4 * (V * C + 2 * NV * C))

    P = 30_000_000 if quick else 124_000_000
    p, g, m = (cp.asarray(f32(rng, P)) for _ in range(3))
    s = cp.asarray(rng.random(P, dtype=np.float32))
    tp = torch.nn.Parameter(torch.as_tensor(p, device="cuda").clone())
    tp.grad = torch.as_tensor(g, device="cuda").clone()
    opt = torch.optim.AdamW([tp], lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    add("adamw step", f"P{P}", lambda: cuda.adamw_step(p, g, m, s, 6e-4, 0.9, 0.95, 1e-8, 0.1, 10),
        lambda: opt.step(), 28 * P)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--max-t", type=int, default=8192, help="largest attention T")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"device: {device}")
    checks = validate(rng)
    width = max(len(r["kernel"]) for r in checks)
    for r in checks:
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['kernel']:<{width}}  err {r['error']:.2e}  (bound {r['bound']:.0e})")
    failed = [r for r in checks if not r["ok"]]
    result = {"device": device, "validation": checks, "timings": []}
    if failed:
        print(f"{len(failed)} validation check(s) failed: nothing timed")
    else:
        try:
            import torch
        except ImportError:
            torch = None
            print("PyTorch not installed: no timings against it")
        if torch is not None:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            repeats = 10 if args.quick else 30
            ts = [t for t in (256, 1024, 2048, 4096, 8192) if t <= args.max_t]
            shapes = [(4, 12, t, 64) for t in ts] + [(4, 12, 1024, 128), (4, 12, 1024, 32)]
            result["timings"] = bench_attention(torch, rng, shapes, repeats) + bench_rowops(torch, rng, repeats,
                                                                                             args.quick)
            print(f"\n{'op':<22} {'shape':<26} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} {'ours':>12}")
            for r in result["timings"]:
                extra = (f"{r['ours_tflops']:.1f} TFLOP/s" if "ours_tflops" in r else f"{r['ours_gbps']:.0f} GB/s")
                print(f"{r['op']:<22} {r['shape']:<26} {r['ours_ms']:>9.3f} {r['torch_ms']:>9.3f} "
                      f"{r['ratio']:>10.2f} {extra:>12}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    (RESULTS / "cuda_kernels.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cuda_kernels.json").write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
