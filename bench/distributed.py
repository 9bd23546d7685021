"""Data parallelism on the CPU: 1 rank x 2 threads vs 2 ranks x 1 thread, and the all-reduce's cost.

    python bench/distributed.py                    # nano-cpu recipe, 40 iterations a run, 3 interleaved repeats
    python bench/distributed.py --iters 100 --repeats 5

Part 1, throughput. ``scratchlm train`` on the nano-cpu recipe (tiny shakespeare, char), the same
global batch on both sides: batch_size 12 x gradient_accumulation_steps 2 x block 64 = 1,536
tokens a step. 1 rank does both micro-steps with 2 BLAS/Numba threads; 2 ranks (``--nproc 2``)
do one each with 1 thread and all-reduce the gradient (1 rank x 1 thread is shown as the base
for both). tokens/s is global tokens per step over the
median ms/iter of the run (iterations after the first 5, which absorb start-up), and the ratio is
taken per repeat, the runs of a repeat back to back (the machine may be shared), then the median.

Part 2, the all-reduce. Under ``mpiexec -n 2``: one in-place ``MPI.Allreduce`` (SUM) of a float32
buffer the size of the model's flat gradient buffer -- exactly what a step does -- timed (median of
50) beside ``torch.distributed.all_reduce`` (gloo) of the same bytes as the peer. A ring
all-reduce moves 2 (N-1)/N of the buffer in and out of each rank; "bus GB/s" is that over the time.

Results: a table on stdout (with ``uptime``, since other work on the machine moves the figures)
and JSON in bench/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS_CANDIDATES = [REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt",
                     REPO.parent.parent / "shared" / "corpora" / "tinyshakespeare.txt"]


def corpus() -> str:
    found = next((p for p in CORPUS_CANDIDATES if p.exists()), None)
    return str(found) if found else "tinyshakespeare"


def thread_env(threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    return env


def train_run(nproc: int, threads: int, iters: int, out: Path) -> dict:
    """One nano-cpu run; (median ms/iter after 5 warm-up iterations, tokens per step)."""
    args = [sys.executable, "-m", "scratchlm", "train", "--corpus", corpus(), "--tokenizer", "char",
            "--preset", "nano-cpu", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
            "--set", f"eval_interval={10 * iters}", "--set", "log_interval=1", "--iters", str(iters),
            "--out", str(out), "--no-progress"]
    if nproc > 1:
        args[4:4] = ["--nproc", str(nproc)]
    done = subprocess.run(args, capture_output=True, text=True, env=thread_env(threads), cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"training run failed:\n{done.stderr}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_iter"] for r in records if r["kind"] == "train" and r["iter"] >= 5]
    return {"ms_per_iter": statistics.median(ms), "tokens_per_step": 12 * 2 * 64}


def allreduce_worker(n_params: int, repeats: int) -> None:
    """Run under mpiexec -n 2: time MPI's and torch gloo's all-reduce of n_params float32."""
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    buffer = np.ones(n_params, dtype=np.float32)

    def timed(fn):
        for _ in range(5):
            fn()
        samples = []
        for _ in range(repeats):
            comm.Barrier()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    ours = timed(lambda: comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM))
    peer = None
    try:
        import torch
        import torch.distributed as dist
        store = comm.bcast(tempfile.mktemp(prefix="gloo-") if rank == 0 else None)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        tensor = torch.ones(n_params, dtype=torch.float32)
        peer = timed(lambda: dist.all_reduce(tensor))
        dist.destroy_process_group()
    except Exception as exc:                     # noqa: BLE001 -- the peer is optional
        peer = f"unavailable: {exc}"
    if rank == 0:
        print(json.dumps({"n_params": n_params, "world": world, "mpi_s": ours, "torch_gloo_s": peer}))


def nano_cpu_params() -> int:
    from scratchlm.config import load_preset
    from scratchlm.models import GPT
    config = load_preset("nano-cpu")
    return GPT(config.model_config(65), seed=0).num_parameters(non_embedding=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allreduce-worker", type=int, metavar="N_PARAMS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker, repeats=50)
        return
    from scratchlm.distributed import mpiexec_path
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    ratios, rows = [], {"1 rank x 1 thread": [], "1 rank x 2 threads": [], "2 ranks x 1 thread": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            rows["1 rank x 1 thread"].append(train_run(1, 1, args.iters, Path(tmp) / f"single{k}")["ms_per_iter"])
            one = train_run(1, 2, args.iters, Path(tmp) / f"one{k}")
            two = train_run(2, 1, args.iters, Path(tmp) / f"two{k}")
            rows["1 rank x 2 threads"].append(one["ms_per_iter"])
            rows["2 ranks x 1 thread"].append(two["ms_per_iter"])
            ratios.append(one["ms_per_iter"] / two["ms_per_iter"])

    n_params = nano_cpu_params()
    done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, __file__, "--allreduce-worker", str(n_params)],
                          capture_output=True, text=True, env=thread_env(1), cwd=REPO, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"all-reduce worker failed:\n{done.stderr}")
    reduce = json.loads(done.stdout.strip().splitlines()[-1])
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    tokens = 12 * 2 * 64
    print(f"nano-cpu, global batch {tokens:,} tokens a step (12 x 2 micro-steps x 64), {args.iters} iterations a run, "
          f"{args.repeats} interleaved repeats")
    print(f"uptime before: {uptime_before}\nuptime after:  {uptime_after}\n")
    print(f"{'configuration':<22} {'ms/iter (median)':>17} {'tokens/s':>10}")
    for name, values in rows.items():
        ms = statistics.median(values)
        print(f"{name:<22} {ms:>17.1f} {tokens / ms * 1000:>10,.0f}")
    ratio = statistics.median(ratios)
    print(f"2 ranks x 1 thread / 1 rank x 2 threads: {ratio:.2f}x tokens/s (median of per-repeat ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.90)\n")

    nbytes = 4 * reduce["n_params"]
    moved = 2 * (reduce["world"] - 1) / reduce["world"] * nbytes
    two_ms = statistics.median(rows["2 ranks x 1 thread"])
    print(f"all-reduce of the flat gradient ({reduce['n_params']:,} float32 = {nbytes / 1e6:.2f} MB; "
          f"ring moves {moved / 1e6:.2f} MB per rank)")
    print(f"{'implementation':<22} {'ms':>8} {'bus GB/s':>9} {'% of a 2-rank step':>19}")
    table = [("MPI Allreduce (ours)", reduce["mpi_s"])]
    if isinstance(reduce["torch_gloo_s"], float):
        table.append(("torch gloo (peer)", reduce["torch_gloo_s"]))
    for name, seconds in table:
        print(f"{name:<22} {1000 * seconds:>8.2f} {moved / seconds / 1e9:>9.2f} {100 * 1000 * seconds / two_ms:>18.1f}%")
    if isinstance(reduce["torch_gloo_s"], float):
        print(f"ours / peer time: {reduce['mpi_s'] / reduce['torch_gloo_s']:.2f}x")
    else:
        print(f"torch gloo: {reduce['torch_gloo_s']}")

    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / "distributed.json").write_text(json.dumps({
        "uptime_before": uptime_before, "uptime_after": uptime_after, "iters": args.iters,
        "ms_per_iter": rows, "ratio_2ranks_over_1rank": ratios, "allreduce": reduce}, indent=2) + "\n")


if __name__ == "__main__":
    main()
