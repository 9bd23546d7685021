"""Where a training step's time goes: cProfile over the nanoGPT CPU recipe's iterations.

    python bench/profile_train.py                    # kernels as dispatched (Numba when importable)
    python bench/profile_train.py --kernels off      # the plain NumPy references
    python bench/profile_train.py --backend cupy     # on a GPU (host-side view: launch overhead)
    python bench/profile_train.py --ops              # per-op forward/backward table (sl.profile_ops)

Prints ms/iter and the functions with the most time of their own. This is the profile that
decided which ops got fused kernels (kernels/); rerun it after changing one.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import scratchlm as sl  # noqa: E402
from scratchlm import backend, kernels, optim  # noqa: E402
from scratchlm.models import GPT, GPTConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=["on", "off"], default="on")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--ops", action="store_true", help="a per-op forward/backward table instead of cProfile")
    args = parser.parse_args()
    sl.use_backend(args.backend)
    kernels.use_reference(args.kernels == "off")
    backend.keep_freed_host_memory()     # as the trainer does
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    model = GPT(config, seed=0)
    opt = optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(0)
    batches = [(backend.to_device(t[:, :-1]), backend.to_device(t[:, 1:]))
               for t in rng.integers(0, 65, size=(args.iters + 3, 12, 65))]

    def step(x, y):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        backend.synchronize()

    for x, y in batches[:3]:      # warm-up: Numba compiles, caches fill
        step(x, y)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    if args.ops:
        with sl.profile_ops() as table:
            for x, y in batches[3:]:
                step(x, y)
    else:
        profiler.enable()
        for x, y in batches[3:]:
            step(x, y)
        profiler.disable()
    ms = (time.perf_counter() - start) / args.iters * 1e3
    print(f"nano-cpu recipe step, backend {args.backend}, kernels {args.kernels}: {ms:.1f} ms/iter "
          f"(under the profiler), {12 * 64 / ms * 1e3:,.0f} tokens/s")
    if args.ops:
        print(f"per-op time over {args.iters} iterations (optimizer and clipping are not ops):")
        print(table)
    else:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
