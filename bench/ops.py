"""Forward+backward time of the main ops at GPT-like sizes, side by side with PyTorch (CPU).

    python bench/ops.py                 # B=12, T=64, C in {128, 768}
    python bench/ops.py --repeat 50 --channels 128

Prints a table of median milliseconds (scratchlm, torch, ratio = torch time / scratchlm time, so
above 1 means scratchlm is faster) and writes bench/results/ops.json. Kernels follow the default
dispatch (Numba when importable); --reference forces the plain NumPy references.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

import scratchlm as sl
import scratchlm.nn.functional as F
from scratchlm import kernels

try:
    import torch
    import torch.nn.functional as TF
except ImportError:
    torch = None


def median_ms(fn, repeat):
    fn()  # warm-up (Numba compiles here)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cases(B, T, C, V=65, H=4):
    """name -> (scratchlm fn of tensors, torch fn of tensors, input shapes). Loss = sum(out * r)."""
    D = C // H
    return {
        "matmul (BT,C)@(C,4C)": (lambda x, w: x @ w, lambda x, w: x @ w, [(B * T, C), (C, 4 * C)]),
        "add (broadcast bias)": (lambda x, b: x + b, lambda x, b: x + b, [(B, T, C), (C,)]),
        "gelu tanh": (lambda x: F.gelu(x, "tanh"), lambda x: TF.gelu(x, approximate="tanh"), [(B, T, 4 * C)]),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: TF.layer_norm(x, (C,), w, b),
                       [(B, T, C), (C,), (C,)]),
        "softmax": (lambda x: F.softmax(x), lambda x: torch.softmax(x, -1), [(B, H, T, T)]),
        "cross_entropy V=65": (lambda z: F.cross_entropy(z, TARGETS_SL),
                               lambda z: TF.cross_entropy(z.reshape(-1, V), TARGETS_T.reshape(-1)), [(B, T, V)]),
        "attention causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
                             [(B, H, T, D)] * 3),
        "embedding V=65": (lambda w: F.embedding(IDX_SL, w), lambda w: TF.embedding(IDX_T, w), [(V, C)]),
    }


TARGETS_SL = TARGETS_T = IDX_SL = IDX_T = None


def main():
    global TARGETS_SL, TARGETS_T, IDX_SL, IDX_T
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 768])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--reference", action="store_true", help="force the NumPy reference kernels")
    args = parser.parse_args()
    kernels.use_reference(args.reference)
    if torch is not None:
        torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    rng = np.random.default_rng(0)
    B, T = args.batch, args.block
    targets = rng.integers(0, 65, size=(B, T))
    TARGETS_SL, IDX_SL = targets, sl.tensor(targets)
    if torch is not None:
        TARGETS_T = IDX_T = torch.from_numpy(targets)
    rows = []
    for C in args.channels:
        for name, (ours, theirs, shapes) in cases(B, T, C).items():
            inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            upstream = None

            def run_ours():
                nonlocal upstream
                ts = [sl.tensor(a, requires_grad=True) for a in inputs]
                out = ours(*ts)
                if upstream is None:
                    upstream = np.ones(out.shape, dtype=np.float32)
                out.backward(upstream)

            ms_ours = median_ms(run_ours, args.repeat)
            ms_torch = None
            if torch is not None:
                def run_torch():
                    ts = [torch.tensor(a, requires_grad=True) for a in inputs]
                    out = theirs(*ts)
                    out.backward(torch.ones_like(out))
                ms_torch = median_ms(run_torch, args.repeat)
            rows.append({"op": name, "C": C, "scratchlm_ms": ms_ours, "torch_ms": ms_torch,
                         "ratio": (ms_torch / ms_ours) if ms_torch else None})
    print(f"forward+backward, B={B} T={T}, median of {args.repeat} (ratio = torch/scratchlm; >1: scratchlm faster)")
    print(f"{'op':<24}{'C':>5}{'scratchlm ms':>14}{'torch ms':>10}{'ratio':>8}")
    for r in rows:
        torch_ms = f"{r['torch_ms']:.3f}" if r["torch_ms"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        print(f"{r['op']:<24}{r['C']:>5}{r['scratchlm_ms']:>14.3f}{torch_ms:>10}{ratio:>8}")
    out = Path(__file__).parent / "results" / "ops.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"batch": B, "block": T, "reference": args.reference, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
