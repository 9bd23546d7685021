"""Every GPU check of issue 14 in one run, one table at the end (about 8 minutes on one GPU).

    python bench/gpu_check.py                  # on a machine with CuPy, a GPU and PyTorch (CUDA)

Written without a device: NOTHING HERE HAS RUN ON A GPU YET. It runs, each under a time limit,

1. the GPU tests: tests/test_gpu.py (fused GPT ops == unfused on the device, bf16 step == fp32
   step within bf16 tolerance, NCCL through NCCLGroup with one rank) and tests/test_cuda_kernels.py
   (every CUDA kernel against its NumPy reference, the fused residual add + layer norm and
   bias + GELU included);
2. bench/train.py on gpt2-124m (B=8, T=1024), TF32 allowed on both sides (CUPY_TF32=1):
   scratchlm fused vs PyTorch eager; scratchlm unfused (no PyTorch); scratchlm bf16 (no PyTorch);

and prints: tokens/s TF32 vs PyTorch eager (target >= 1.0x), bf16 vs our TF32 (target >= 1.5x),
and dispatches per training step before/after the fusion (tape ops, xp calls, raw kernel
launches; a lower bound on CUDA launches, see scratchlm/launches.py). Raw outputs go to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command, limit_s, env=None, log=None):
    """(exit status or 'timeout', seconds, output tail) of one step, never longer than limit_s."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or ""
        status, output = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    if log is not None:
        log.write_text(output)
    return status, time.perf_counter() - start, output[-2000:]


def bench(out: Path, tag: str, extra: list[str], limit_s: int, device: str) -> dict | None:
    """One bench/train.py run (gpt2-124m on the GPU); its JSON record (the only one in its own file)."""
    path = out / f"train_{tag}.json"
    path.unlink(missing_ok=True)
    status, seconds, tail = run([sys.executable, "bench/train.py", "--device", device, "--out", str(path), *extra],
                                limit_s, env={"CUPY_TF32": "1"}, log=out / f"train_{tag}.log")
    print(f"[{tag}] exit {status} in {seconds:.0f} s", flush=True)
    if status != 0 or not path.exists():
        print(tail, flush=True)
        return None
    return next(iter(json.loads(path.read_text()).values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/scratchlm_gpu_check")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check this script without a GPU: nano-cpu on the CPU, 2 iterations (bf16 fails there)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu_dry_run else "gpu"
    if not args.cpu_dry_run:
        probe = run([sys.executable, "-c", "import cupy; n = cupy.cuda.runtime.getDeviceCount(); "
                     "print(cupy.__version__, n, cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"], 30)
        print(f"CuPy, GPUs, device 0: {probe[2].strip()}", flush=True)
        if probe[0] != 0:
            raise SystemExit("no CuPy or no GPU here: nothing to check")

    rows = []
    status, seconds, tail = run([sys.executable, "-m", "pytest", "-rs", "tests/test_gpu.py",
                                 "tests/test_cuda_kernels.py"], 150, log=out / "tests.log")
    summary = next((line for line in reversed(tail.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)), "no pytest summary (see tests.log)")
    print(f"[tests] exit {status} in {seconds:.0f} s: {summary}", flush=True)
    rows.append(("GPU tests (test_gpu, test_cuda_kernels)", summary.strip("= "), "all pass", status == 0))

    iters = ["--iters", "2", "--warmup", "1"] if args.cpu_dry_run else ["--iters", str(args.iters), "--warmup", "5"]
    # limits: 30 + 150 + 140 + 80 + 100 s = 500 s at most
    fused = bench(out, "tf32_fused", iters, 140, device)
    unfused = bench(out, "tf32_unfused", [*iters, "--fused", "off", "--no-torch"], 80, device)
    bf16 = bench(out, "bf16_fused", [*iters, "--dtype", "bfloat16", "--no-torch"], 100, device)

    ours = (fused or {}).get("scratchlm")
    torch = (fused or {}).get("torch")
    ours_unfused = (unfused or {}).get("scratchlm")
    ours_bf16 = (bf16 or {}).get("scratchlm")
    tps = lambda r: f"{r['tokens_per_s']:,.0f} tok/s ({r['ms_per_iter']:.1f} ms)" if r else "failed"   # noqa: E731
    rows.append(("scratchlm TF32, fused", tps(ours), "", None))
    rows.append(("PyTorch eager TF32", tps(torch), "", None))
    if ours and torch:
        ratio = ours["tokens_per_s"] / torch["tokens_per_s"]
        rows.append(("scratchlm / PyTorch eager (TF32)", f"{ratio:.2f}x", ">= 1.0x", ratio >= 1.0))
    rows.append(("scratchlm TF32, unfused", tps(ours_unfused), "", None))
    if ours and ours_unfused:
        rows.append(("fused / unfused speed", f"{ours['tokens_per_s'] / ours_unfused['tokens_per_s']:.2f}x", "> 1", None))
    rows.append(("scratchlm bf16, fused", tps(ours_bf16), "", None))
    if ours and ours_bf16:
        ratio = ours_bf16["tokens_per_s"] / ours["tokens_per_s"]
        rows.append(("bf16 / TF32 (ours)", f"{ratio:.2f}x", ">= 1.5x", ratio >= 1.5))
    for name, r in (("dispatches per step, unfused (before)", ours_unfused), ("dispatches per step, fused (after)", ours),
                    ("dispatches per step, bf16 fused", ours_bf16)):
        if r and r.get("dispatches_per_step"):
            kinds = r["dispatches_per_step"]
            rows.append((name, f"{sum(kinds.values()):,} = " + " + ".join(f"{n:,} {k}" for k, n in sorted(kinds.items())),
                         "fewer after", None))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':{width}}  {'figure':48}  {'target':12}  met")
    print("-" * (width + 70))
    for name, figure, target, met in rows:
        print(f"{name:{width}}  {figure:48}  {target:12}  {'' if met is None else ('yes' if met else 'NO')}")
    print(f"\nlogs and JSON in {out}; dispatches are a lower bound on CUDA kernel launches (scratchlm/launches.py)")
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
