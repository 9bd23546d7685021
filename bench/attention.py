"""Attention forward / backward time and peak memory: scratchlm's rungs side by side with PyTorch.

CPU (default): the NumPy reference (materialises the (T, T) scores), the Numba FlashAttention-style
kernel, the BLAS strip path (``numba_strips_blas``: what the dispatcher runs at long T, with the
(B*H) heads in chunks on threads and, for fwd+bwd, the training pair that keeps P when it fits
KEPT_PROBS_MAX_BYTES), and torch.nn.functional.scaled_dot_product_attention on the CPU when torch
is installed, at B=4, H in {4, 12}, D=64, causal, T in {128, ..., 2048}, float32, with the same
thread count.

GPU (--gpu, needs CuPy and a GPU): the CuPy kernels of scratchlm.kernels.cuda against torch SDPA
on CUDA, float32, T up to 8192, timed between device synchronisations.

Times are medians of --repeats runs after --warmup runs; "f+b cpu" is the median process CPU
time (user + sys of every thread) of one forward+backward, and "x f+b cpu" the ratio of those:
on a shared, loaded machine wall times are distorted and the CPU times are the fairer figure. "fwd+bwd" is timed as one unit (forward
then backward), so it is not the sum of two medians. Speed ratios are torch time / scratchlm time
from the same run: above 1 means scratchlm is faster.

Peak memory (CPU) is the growth of the process's peak resident set during one call: Linux
/proc/self/clear_refs resets the high-water mark (VmHWM) before the call, and the figure is
VmHWM after the call minus the resident set before it. It counts every allocation (NumPy, Numba's
own allocator, torch), which tracemalloc would not see for Numba and torch. Where /proc is not
writable the column says n/a. GPU memory: torch.cuda.max_memory_allocated and CuPy's memory pool.

    python bench/attention.py                     # full CPU table, writes bench/results/attention.json
    python bench/attention.py --quick             # T = 1024 and 2048 rows only (H = 4), about a minute
    python bench/attention.py --quick --threads 1 # the same with one thread for everyone
    python bench/attention.py --quick --serial    # plus the strips as before (one chunk, BLAS threads)
    python bench/attention.py --heads 4 --max-t 1024 --repeats 3
    python bench/attention.py --gpu               # CuPy kernels vs torch SDPA CUDA
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scratchlm import kernels  # noqa: E402
from scratchlm.kernels import attention, attention_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"


# ---------------------------------------------------------------- measuring

def median_seconds(run, repeats: int, warmup: int, sync=lambda: None, cpu_out=None) -> float:
    """Median wall seconds of ``run``; ``cpu_out`` (a list), if given, gets the median process
    CPU seconds (every thread's user + sys), the figure to trust when the machine is shared."""
    for _ in range(warmup):
        run()
    sync()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if cpu_out is not None:
        cpu_out.append(statistics.median(cpu_times))
    return statistics.median(times)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(run) -> float | None:
    """Growth of peak RSS during one call of ``run`` (MiB); None where Linux /proc is unavailable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)      # hand freed heap back, so the baseline is honest
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def ratio(torch_seconds, ours_seconds):
    if torch_seconds is None or ours_seconds is None:
        return None
    return torch_seconds / ours_seconds


# ---------------------------------------------------------------- CPU rungs

def cpu_inputs(batch, heads, seq_len, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, heads, seq_len, head_dim)).astype(np.float32) for _ in range(4)]


def measure_scratchlm(forward, backward, q, k, v, do, repeats, warmup, keeps_probs=False):
    """``keeps_probs``: the rung's forward takes keep_probs=True and its backward probs=, as a
    training step on the dispatcher's strip path runs them (the kept P is reused when it fits)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = forward(q, k, v, True, scale)
    fwd = median_seconds(lambda: forward(q, k, v, True, scale), repeats, warmup)
    bwd = median_seconds(lambda: backward(do, q, k, v, out, lse, True, scale), repeats, warmup)

    def both():
        if keeps_probs:
            o, l, probs = forward(q, k, v, True, scale, keep_probs=True)
            return backward(do, q, k, v, o, l, True, scale, probs=probs)
        o, l = forward(q, k, v, True, scale)
        return backward(do, q, k, v, o, l, True, scale)

    cpu = []
    total = median_seconds(both, repeats, warmup, cpu_out=cpu)
    return {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_bwd_ms": total * 1e3, "fwd_bwd_cpu_ms": cpu[0] * 1e3,
            "fwd_peak_mib": peak_memory_mib(lambda: forward(q, k, v, True, scale)),
            "fwd_bwd_peak_mib": peak_memory_mib(both)}


def measure_torch(torch, q, k, v, do, repeats, warmup, device="cpu", sync=lambda: None):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_numpy(a).to(device).requires_grad_() for a in (q, k, v))
    tdo = torch.from_numpy(do).to(device)

    def forward_only():
        with torch.no_grad():
            return sdpa(tq, tk, tv, is_causal=True)

    def forward_with_graph():
        return sdpa(tq, tk, tv, is_causal=True)

    def both():
        for t in (tq, tk, tv):
            t.grad = None
        out = sdpa(tq, tk, tv, is_causal=True)
        out.backward(tdo)
        return tq.grad

    fwd = median_seconds(forward_only, repeats, warmup, sync)
    fwd_graph = median_seconds(forward_with_graph, repeats, warmup, sync)
    cpu = []
    total = median_seconds(both, repeats, warmup, sync, cpu_out=cpu)
    row = {"fwd_ms": fwd * 1e3, "bwd_ms": max(0.0, total - fwd_graph) * 1e3, "fwd_bwd_ms": total * 1e3,
           "fwd_bwd_cpu_ms": cpu[0] * 1e3}
    if device == "cpu":
        row["fwd_peak_mib"] = peak_memory_mib(forward_only)
        row["fwd_bwd_peak_mib"] = peak_memory_mib(both)
    return row


def run_cpu(args, torch):
    rows = []
    for heads in args.heads:
        for seq_len in [t for t in args.seq_lens if t <= args.max_t]:
            q, k, v, do = cpu_inputs(args.batch, heads, seq_len, args.head_dim)
            row = {"B": args.batch, "H": heads, "T": seq_len, "D": args.head_dim}
            # The reference keeps several (B, H, T, T) float32 matrices alive at once.
            score_mib = args.batch * heads * seq_len * seq_len * 4 / 2**20
            if args.quick:
                pass                                    # --quick: the strip path and torch only
            elif score_mib <= args.reference_max_mib:
                row["numpy_reference"] = measure_scratchlm(attention.forward_reference, attention.backward_reference,
                                                           q, k, v, do, args.repeats, args.warmup)
            else:
                row["numpy_reference"] = {"skipped": f"one (B,H,T,T) score matrix is {score_mib:.0f} MiB "
                                                     f"> --reference-max-mib {args.reference_max_mib}"}
            if kernels.numba is not None and not args.quick:
                row["numba"] = measure_scratchlm(attention.forward_numba, attention.backward_numba,
                                                 q, k, v, do, args.repeats, args.warmup)
            if kernels.numba is not None:
                row["numba_strips_blas"] = measure_scratchlm(attention.forward_strips_blas,
                                                             attention.backward_strips_blas,
                                                             q, k, v, do, args.repeats, args.warmup, keeps_probs=True)
            if kernels.numba is not None and args.serial:
                chunk_bytes = attention_threads.CHUNK_BYTES   # the strips as before: one chunk, BLAS threads
                attention_threads.MAX_WORKERS, attention_threads.CHUNK_BYTES = 1, 1 << 62
                try:
                    row["strips_one_chunk"] = measure_scratchlm(attention.forward_strips_blas,
                                                                attention.backward_strips_blas,
                                                                q, k, v, do, args.repeats, args.warmup)
                finally:
                    attention_threads.MAX_WORKERS, attention_threads.CHUNK_BYTES = None, chunk_bytes
            if torch is not None:
                row["torch_sdpa_cpu"] = measure_torch(torch, q, k, v, do, args.repeats, args.warmup)
                for rung in ("numba", "numba_strips_blas", "strips_one_chunk", "numpy_reference"):
                    if "fwd_ms" in row.get(rung, {}):
                        row[rung]["speed_vs_torch_fwd"] = ratio(row["torch_sdpa_cpu"]["fwd_ms"], row[rung]["fwd_ms"])
                        row[rung]["speed_vs_torch_fwd_bwd"] = ratio(row["torch_sdpa_cpu"]["fwd_bwd_ms"],
                                                                    row[rung]["fwd_bwd_ms"])
                        row[rung]["cpu_vs_torch_fwd_bwd"] = ratio(row["torch_sdpa_cpu"]["fwd_bwd_cpu_ms"],
                                                                  row[rung]["fwd_bwd_cpu_ms"])
            rows.append(row)
            print_cpu_row(row)
    return rows


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


CPU_HEADER = (f"{'H':>3} {'T':>5} | {'rung':<17} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'f+b cpu':>9} "
              f"{'fwd MiB':>8} {'f+b MiB':>8} | {'x torch fwd':>11} {'x torch f+b':>11} {'x f+b cpu':>9}")


def print_cpu_row(row):
    for rung in ("numpy_reference", "numba", "numba_strips_blas", "strips_one_chunk", "torch_sdpa_cpu"):
        cell = row.get(rung)
        if cell is None:
            continue
        if "skipped" in cell:
            print(f"{row['H']:>3} {row['T']:>5} | {rung:<17} skipped: {cell['skipped']}")
            continue
        print(f"{row['H']:>3} {row['T']:>5} | {rung:<17} {fmt(cell['fwd_ms']):>9} {fmt(cell['bwd_ms']):>9} "
              f"{fmt(cell['fwd_bwd_ms']):>9} {fmt(cell.get('fwd_bwd_cpu_ms')):>9} {fmt(cell.get('fwd_peak_mib')):>8} "
              f"{fmt(cell.get('fwd_bwd_peak_mib')):>8} | {fmt(cell.get('speed_vs_torch_fwd'), 2):>11} "
              f"{fmt(cell.get('speed_vs_torch_fwd_bwd'), 2):>11} {fmt(cell.get('cpu_vs_torch_fwd_bwd'), 2):>9}")
    sys.stdout.flush()


# ---------------------------------------------------------------- GPU rungs

def run_gpu(args, torch):
    import cupy
    from scratchlm.kernels import cuda as cuda_kernels

    def sync():
        cupy.cuda.get_current_stream().synchronize()
        if torch is not None:
            torch.cuda.synchronize()

    rows = []
    print(f"{'H':>3} {'T':>5} | {'rung':<17} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'peak MiB':>9} | "
          f"{'x torch fwd':>11} {'x torch f+b':>11}")
    for heads in args.heads:
        for seq_len in args.gpu_seq_lens:
            q, k, v, do = (cupy.asarray(a) for a in cpu_inputs(args.batch, heads, seq_len, args.head_dim))
            scale = 1.0 / math.sqrt(args.head_dim)
            row = {"B": args.batch, "H": heads, "T": seq_len, "D": args.head_dim}
            pool = cupy.get_default_memory_pool()
            out, lse = cuda_kernels.attention_forward(q, k, v, True, scale)

            def both():
                o, l = cuda_kernels.attention_forward(q, k, v, True, scale)
                return cuda_kernels.attention_backward(do, q, k, v, o, l, True, scale)

            fwd = median_seconds(lambda: cuda_kernels.attention_forward(q, k, v, True, scale),
                                 args.repeats, args.warmup, sync)
            bwd = median_seconds(lambda: cuda_kernels.attention_backward(do, q, k, v, out, lse, True, scale),
                                 args.repeats, args.warmup, sync)
            total = median_seconds(both, args.repeats, args.warmup, sync)
            row["cupy_kernel"] = {"fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_bwd_ms": total * 1e3,
                                  "pool_total_mib": pool.total_bytes() / 2**20}
            if torch is not None:
                host = [cupy.asnumpy(a) for a in (q, k, v, do)]
                torch.cuda.reset_peak_memory_stats()
                row["torch_sdpa_cuda"] = measure_torch(torch, *host, args.repeats, args.warmup, "cuda", sync)
                row["torch_sdpa_cuda"]["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                row["cupy_kernel"]["speed_vs_torch_fwd"] = ratio(row["torch_sdpa_cuda"]["fwd_ms"], fwd * 1e3)
                row["cupy_kernel"]["speed_vs_torch_fwd_bwd"] = ratio(row["torch_sdpa_cuda"]["fwd_bwd_ms"], total * 1e3)
            for rung in ("cupy_kernel", "torch_sdpa_cuda"):
                cell = row.get(rung)
                if cell:
                    peak = cell.get("peak_mib", cell.get("pool_total_mib"))
                    print(f"{heads:>3} {seq_len:>5} | {rung:<17} {fmt(cell['fwd_ms'], 2):>9} {fmt(cell['bwd_ms'], 2):>9} "
                          f"{fmt(cell['fwd_bwd_ms'], 2):>9} {fmt(peak):>9} | {fmt(cell.get('speed_vs_torch_fwd'), 2):>11} "
                          f"{fmt(cell.get('speed_vs_torch_fwd_bwd'), 2):>11}")
            sys.stdout.flush()
            rows.append(row)
            del q, k, v, do, out, lse
            pool.free_all_blocks()
    return rows


# ---------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help="CPU sequence lengths (default 128 ... 2048; with --quick 1024 2048)")
    parser.add_argument("--max-t", type=int, default=2048, help="skip CPU sequence lengths above this")
    parser.add_argument("--reference-max-mib", type=float, default=256.0,
                        help="skip the NumPy reference where one (B,H,T,T) float32 matrix exceeds this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads for Numba and torch (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="H=4, T in {1024, 2048} unless --seq-lens, 3 repeats, the strip path and torch only "
                             "(about a minute)")
    parser.add_argument("--serial", action="store_true",
                        help="also time the strip path as it was before head chunks on threads (one chunk, "
                             "BLAS threading each matmul, no kept P): the 'strips_one_chunk' row")
    parser.add_argument("--gpu", action="store_true", help="CuPy kernels vs torch SDPA on CUDA instead of the CPU")
    parser.add_argument("--gpu-seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.heads, args.repeats, args.warmup = [4], 3, 1
    if args.seq_lens is None:
        args.seq_lens = [1024, 2048] if args.quick else [128, 256, 512, 1024, 2048]

    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: no PyTorch column, no ratios")
    threads = args.threads
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if torch is not None:
        torch.set_num_threads(threads)
    if kernels.numba is not None:
        kernels.numba.set_num_threads(min(threads, kernels.numba.config.NUMBA_NUM_THREADS))
    try:            # optional: give NumPy's BLAS the same thread count (the library never needs it)
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads, user_api="blas")
    except ImportError:
        if args.threads is not None:
            print("threadpoolctl is not installed: NumPy's BLAS keeps its own thread count")

    info = {"machine": platform.machine(), "processor": platform.processor() or platform.platform(),
            "threads": threads, "numpy": np.__version__,
            "numba": getattr(kernels.numba, "__version__", None),
            "torch": getattr(torch, "__version__", None), "dtype": "float32", "causal": True,
            "memory_method": "peak RSS growth during one call (Linux clear_refs + VmHWM)"}
    print(f"attention bench: B={args.batch} D={args.head_dim} causal float32, {threads} threads, "
          f"numba {info['numba']}, torch {info['torch']}")
    if args.gpu:
        rows = run_gpu(args, torch)
    else:
        print(CPU_HEADER)
        rows = run_cpu(args, torch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"info": info, "mode": "gpu" if args.gpu else "cpu", "rows": rows}
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
