"""Data parallelism on the CPU: 1 rank x 2 threads vs 2 ranks x 1 thread, and the all-reduce's cost.

    python bench/distributed.py --only throughput              # the quick one (about 2-3 minutes, quiet machine)
    python bench/distributed.py                                # + the all-reduce: bytes sweep, blocking vs buckets
    python bench/distributed.py --iters 100 --repeats 5

Part 1, throughput. ``scratchlm train`` on the nano-cpu recipe (tiny shakespeare, char), the same
global batch on both sides: batch_size 12 x gradient_accumulation_steps 2 x block 64 = 1,536
tokens a step. 1 rank does both micro-steps with 2 BLAS/Numba threads; 2 ranks (``--nproc 2``)
do one each with 1 thread and all-reduce the gradient (1 rank x 1 thread is shown as the base
for both). tokens/s is global tokens per step over the median ms/iter of the run (iterations
after the first 5, which absorb start-up), and the ratio is taken per repeat, the runs of a repeat
back to back (the machine may be shared), then the median. CPU s is the run's user+sys time
(all its processes, start-up included): on a loaded machine wall time is what others leave us.

Part 2, the all-reduce (skipped by ``--only throughput``). (a) Against the bytes: under
``mpiexec -n 2``, one in-place ``MPI.Allreduce`` (SUM) of float32 buffers from 1/4 to 4x the
nano-cpu model's flat gradient (median of 30), beside ``torch.distributed.all_reduce`` (gloo) of
the model's bytes as the peer. A ring all-reduce moves 2 (N-1)/N of the buffer in and out of each
rank; "bus GB/s" is that over the time. (b) In a training step, blocking vs buckets: 2-rank
nano-cpu training with ``ddp_bucket_mb`` 0 (one blocking Allreduce after the backward) and with
buckets started during the backward; "exposed all-reduce" is the time a step spends in
``reduce_gradients`` (blocking: the whole all-reduce; buckets: only what the backward did not hide).

Results: a table on stdout (with ``uptime``, since other work on the machine moves the figures)
and JSON in bench/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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


def train_args(iters: int, out: Path, extra=()) -> list[str]:
    return ["train", "--corpus", corpus(), "--tokenizer", "char", "--preset", "nano-cpu",
            "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1", "--set", f"eval_interval={10 * iters}",
            "--set", "log_interval=1", "--iters", str(iters), "--out", str(out), "--no-progress", *extra]


def train_run(nproc: int, threads: int, iters: int, out: Path, extra=()) -> dict:
    """One nano-cpu run: median ms/iter after 5 warm-up iterations, and the run's CPU seconds."""
    args = [sys.executable, "-m", "scratchlm", *train_args(iters, out, extra)]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, capture_output=True, text=True, env=thread_env(threads), cwd=REPO, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"training run failed:\n{done.stderr}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_iter"] for r in records if r["kind"] == "train" and r["iter"] >= 5]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"ms_per_iter": statistics.median(ms), "tokens_per_step": 12 * 2 * 64, "cpu_s": cpu}


def step_worker(bucket_mb: float, iters: int, out: str) -> None:
    """Under mpiexec -n 2: nano-cpu training in this process, timing ``reduce_gradients`` (the part
    of the all-reduce the step waits for); rank 0 prints the medians as JSON."""
    from scratchlm import distributed
    from scratchlm.cli import main as cli_main
    waits = []
    reduce = distributed.MPIGroup.reduce_gradients

    def timed(self, storage):
        start = time.perf_counter()
        reduce(self, storage)
        waits.append(time.perf_counter() - start)
    distributed.MPIGroup.reduce_gradients = timed
    status = cli_main(train_args(iters, Path(out), ["--set", f"ddp_bucket_mb={bucket_mb}"]))
    group = distributed.current()
    if group.rank == 0:
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        ms = [r["ms_per_iter"] for r in records if r["kind"] == "train" and r["iter"] >= 5]
        print("RESULT " + json.dumps({"bucket_mb": bucket_mb, "status": status, "ms_per_iter": statistics.median(ms),
                                      "exposed_ms": 1000 * statistics.median(waits[5:]),
                                      "buckets": len(group.buckets.plan) if group.buckets else 1}))


SIZES = (0.25, 1.0, 4.0)          # times the model's flat gradient


def allreduce_worker(n_params: int, repeats: int) -> None:
    """Run under mpiexec -n 2: time MPI's all-reduce of n_params float32 times each of SIZES, and
    torch gloo's of n_params."""
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()

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

    ours = {}
    for factor in SIZES:
        buffer = np.ones(int(n_params * factor), dtype=np.float32)
        ours[str(factor)] = timed(lambda: comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM))
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


def run_step_worker(bucket_mb: float, iters: int, out: Path) -> dict:
    from scratchlm.launcher import mpiexec_path
    done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, __file__, "--step-worker", str(bucket_mb),
                           "--iters", str(iters), "--worker-out", str(out)],
                          capture_output=True, text=True, env=thread_env(1), cwd=REPO, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"step worker failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["throughput", "allreduce"], help="one part (default: both)")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[0.25, 1.0],
                        help="bucket sizes for part 2 (b), beside 0 = blocking (default 0.25 1)")
    parser.add_argument("--allreduce-worker", type=int, metavar="N_PARAMS", help=argparse.SUPPRESS)
    parser.add_argument("--step-worker", type=float, metavar="BUCKET_MB", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker, repeats=30)
        return
    if args.step_worker is not None:
        step_worker(args.step_worker, args.iters, args.worker_out)
        return
    from scratchlm.launcher import mpiexec_path
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    tokens = 12 * 2 * 64
    results = {"uptime_before": uptime_before, "iters": args.iters}
    report = []

    if args.only in (None, "throughput"):
        names = ("1 rank x 1 thread", "1 rank x 2 threads", "2 ranks x 1 thread")
        rows, cpu, ratios = {n: [] for n in names}, {n: [] for n in names}, []
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(args.repeats):
                for name, (nproc, threads) in zip(names, ((1, 1), (1, 2), (2, 1))):
                    run = train_run(nproc, threads, args.iters, Path(tmp) / f"{nproc}x{threads}_{k}")
                    rows[name].append(run["ms_per_iter"])
                    cpu[name].append(run["cpu_s"])
                ratios.append(rows[names[1]][-1] / rows[names[2]][-1])
        report.append(f"Part 1: nano-cpu, global batch {tokens:,} tokens a step (12 x 2 micro-steps x 64), "
                      f"{args.iters} iterations a run, {args.repeats} interleaved repeats")
        report.append(f"{'configuration':<22} {'ms/iter (median)':>17} {'tokens/s':>10} {'CPU s a run':>12}")
        for name in names:
            ms = statistics.median(rows[name])
            report.append(f"{name:<22} {ms:>17.1f} {tokens / ms * 1000:>10,.0f} {statistics.median(cpu[name]):>12.1f}")
        ratio = statistics.median(ratios)
        report.append(f"2 ranks x 1 thread / 1 rank x 2 threads: {ratio:.2f}x tokens/s (median of per-repeat ratios "
                      f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.90)")
        results.update(ms_per_iter=rows, cpu_s=cpu, ratio_2ranks_over_1rank_2threads=ratios)

    if args.only in (None, "allreduce"):
        n_params = nano_cpu_params()
        done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, __file__, "--allreduce-worker", str(n_params)],
                              capture_output=True, text=True, env=thread_env(1), cwd=REPO, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"all-reduce worker failed:\n{done.stderr}")
        reduce = json.loads(done.stdout.strip().splitlines()[-1])
        report.append(f"\nPart 2 (a): MPI Allreduce vs bytes, 2 ranks (nano-cpu's flat gradient: {n_params:,} float32 "
                      f"= {4 * n_params / 1e6:.2f} MB)")
        report.append(f"{'implementation':<24} {'MB':>7} {'ms':>8} {'bus GB/s':>9}")
        table = [(f"MPI Allreduce x{float(factor):g}", float(factor) * n_params, seconds)
                 for factor, seconds in reduce["mpi_s"].items()]
        if isinstance(reduce["torch_gloo_s"], float):
            table.append(("torch gloo (peer) x1", n_params, reduce["torch_gloo_s"]))
        for name, count, seconds in table:
            nbytes = 4 * count
            moved = 2 * (reduce["world"] - 1) / reduce["world"] * nbytes
            report.append(f"{name:<24} {nbytes / 1e6:>7.2f} {1000 * seconds:>8.2f} {moved / seconds / 1e9:>9.2f}")
        if isinstance(reduce["torch_gloo_s"], float):
            report.append(f"ours / peer time at the model's size: {reduce['mpi_s']['1.0'] / reduce['torch_gloo_s']:.2f}x")
        else:
            report.append(f"torch gloo: {reduce['torch_gloo_s']}")
        steps = []
        with tempfile.TemporaryDirectory() as tmp:
            for bucket_mb in [0.0, *args.bucket_mb]:
                steps.append(run_step_worker(bucket_mb, args.iters, Path(tmp) / f"bucket{bucket_mb}"))
        report.append(f"\nPart 2 (b): the all-reduce inside a 2-rank nano-cpu step ({args.iters} iterations, medians)")
        report.append(f"{'ddp_bucket_mb':<24} {'buckets':>7} {'exposed all-reduce ms':>22} {'ms/iter':>8}")
        for step in steps:
            name = "0 (one blocking)" if step["bucket_mb"] == 0 else f"{step['bucket_mb']:g}"
            report.append(f"{name:<24} {step['buckets']:>7} {step['exposed_ms']:>22.2f} {step['ms_per_iter']:>8.1f}")
        results.update(allreduce=reduce, steps=steps)

    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime_before}\nuptime after:  {uptime_after}\n")
    print("\n".join(report))
    results["uptime_after"] = uptime_after
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
