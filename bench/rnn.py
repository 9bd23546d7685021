"""Recurrent layers: forward+backward time of nn.LSTM / nn.GRU against torch.nn.LSTM / GRU on the
CPU, and the sampling speed of an LSTM language model decoding one token at a time.

    python bench/rnn.py                      # B=32, T in {64, 256}, H in {128, 256, 512}, 1 and 2 layers
    python bench/rnn.py --quick              # T=64, H=256 only
    python bench/rnn.py --target --threads 1 # the issue's speed target alone: LSTM T=64 H=256, 1 layer
    python bench/rnn.py --threads 1          # BLAS, Numba and torch pinned to one thread (a busy machine)
    python bench/rnn.py --sampling-only      # only the sampling line

What is timed (float32, batch_first, input size = H, random weights and inputs):
- layers: one forward over (B, T, H) and one backward of out.sum() (gradients of the input and of
  every parameter), ``--repeats`` times after one warm-up; medians in ms. ``torch/ours`` > 1 means
  ours is faster. Both libraries run in the same process, one after the other per shape; torch
  with its default thread count unless ``--threads`` (stated in the header). Wall time and, beside
  it, process CPU time (the sum over threads: steadier than wall time on a shared machine).
- sampling: RNNLM(cell=lstm) with ``--lm`` sizes, batch 1, one thread: ``model.step`` per token
  plus drawing the token (temperature 1, NumPy generator), tokens/s over ``--tokens`` tokens,
  median of three runs, by wall time and per CPU second; and the same loop in torch (Embedding -> LSTM with carried (h, c) ->
  Linear, one thread) as the peer.

Writes bench/results/rnn.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results" / "rnn.json"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only T=64, H=256 (1 and 2 layers)")
    parser.add_argument("--target", action="store_true",
                        help="only the target row (LSTM, T=64, H=256, 1 layer), no sampling; --repeats 9")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS, Numba and torch (default: the libraries' own choice)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per sampling run")
    parser.add_argument("--lm", default="65,64,256,2",
                        help="sampling model: vocab_size,n_embd,n_hidden,n_layer (default 65,64,256,2)")
    parser.add_argument("--sampling-only", action="store_true", help="skip the layer table")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def median_times(fn, repeats):
    """(wall ms, cpu ms) medians of ``repeats`` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    wall.sort(), cpu.sort()
    return 1e3 * wall[len(wall) // 2], 1e3 * cpu[len(cpu) // 2]


def bench_layers(args, torch, np, sl, nn):
    grid = [(64, 256)] if args.quick or args.target else [(T, H) for T in (64, 256) for H in (128, 256, 512)]
    rows = []
    header = (f"{'layer':<5} {'T':>4} {'H':>4} {'L':>2}  {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10}"
              f"   {'ours cpu':>9} {'torch cpu':>9} {'cpu ratio':>9}")
    print(header)
    print("-" * len(header))
    for kind in ("LSTM",) if args.target else ("LSTM", "GRU"):
        for T, H in grid:
            for layers in (1,) if args.target else (1, 2):
                x = np.random.default_rng(0).standard_normal((args.batch, T, H)).astype(np.float32)
                ours_layer = getattr(nn, kind)(H, H, num_layers=layers)

                def ours():
                    xt = sl.tensor(x, requires_grad=True)
                    out, _ = ours_layer(xt)
                    out.sum().backward()

                ours_wall, ours_cpu = median_times(ours, args.repeats)
                row = dict(layer=kind, B=args.batch, T=T, H=H, num_layers=layers, ours_ms=ours_wall, ours_cpu_ms=ours_cpu)
                if torch is not None:
                    torch_layer = getattr(torch.nn, kind)(H, H, num_layers=layers, batch_first=True)

                    def theirs():
                        xt = torch.tensor(x, requires_grad=True)
                        out, _ = torch_layer(xt)
                        out.sum().backward()

                    torch_wall, torch_cpu = median_times(theirs, args.repeats)
                    row.update(torch_ms=torch_wall, torch_cpu_ms=torch_cpu, ratio=torch_wall / ours_wall,
                               cpu_ratio=torch_cpu / ours_cpu)
                rows.append(row)
                theirs_cols = (f"{row['torch_ms']:>9.1f} {row['ratio']:>9.2f}x   {ours_cpu:>9.1f} "
                               f"{row['torch_cpu_ms']:>9.1f} {row['cpu_ratio']:>8.2f}x") if torch is not None \
                    else f"{'-':>9} {'-':>10}   {ours_cpu:>9.1f}"
                print(f"{kind:<5} {T:>4} {H:>4} {layers:>2}  {ours_wall:>9.1f} {theirs_cols}", flush=True)
    return rows


def bench_sampling(args, torch, np, sl):
    """tokens/s of step-by-step LSTM decoding, batch 1, one thread; ours and torch's."""
    from threadpoolctl import threadpool_limits
    from scratchlm.generate import sample_next_token
    from scratchlm.models import RNNLM, RNNLMConfig
    V, C, H, L = (int(v) for v in args.lm.split(","))
    model = RNNLM(RNNLMConfig(vocab_size=V, n_embd=C, n_hidden=H, n_layer=L, cell="lstm")).eval()

    def rates(start_wall, start_cpu):
        """tokens/s by wall time and by process CPU time."""
        return (args.tokens / (time.perf_counter() - start_wall), args.tokens / (time.process_time() - start_cpu))

    def ours_run():
        rng = np.random.default_rng(0)
        state, token = model.init_state(1), np.array([0])
        start = time.perf_counter(), time.process_time()
        with sl.no_grad():
            for _ in range(args.tokens):
                logits, state = model.step(token, state)
                token = sample_next_token(sl.backend.to_numpy(logits.data).astype(np.float64), 1.0, None, None, rng)
        return rates(*start)

    def torch_run():
        rng = np.random.default_rng(0)
        emb, lstm, head = torch.nn.Embedding(V, C), torch.nn.LSTM(C, H, num_layers=L, batch_first=True), torch.nn.Linear(H, V)
        state, token = None, np.array([0])
        start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for _ in range(args.tokens):
                out, state = lstm(emb(torch.from_numpy(token)[:, None]), state)
                logits = head(out[:, 0]).numpy().astype(np.float64)
                token = sample_next_token(logits, 1.0, None, None, rng)
        return rates(*start)

    def medians(run):
        wall, cpu = zip(*(run() for _ in range(3)))
        return sorted(wall)[1], sorted(cpu)[1]

    result = dict(vocab_size=V, n_embd=C, n_hidden=H, n_layer=L, tokens=args.tokens)
    previous_torch_threads = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(1):
        if torch is not None:
            torch.set_num_threads(1)
        result["ours_tokens_per_s"], result["ours_tokens_per_cpu_s"] = medians(ours_run)
        if torch is not None:
            result["torch_tokens_per_s"], result["torch_tokens_per_cpu_s"] = medians(torch_run)
            torch.set_num_threads(previous_torch_threads)
    line = (f"sampling LSTM LM V={V} C={C} H={H} L={L}, batch 1, one thread: ours {result['ours_tokens_per_s']:,.0f} "
            f"tokens/s ({result['ours_tokens_per_cpu_s']:,.0f} per CPU second)")
    if torch is not None:
        line += (f", torch {result['torch_tokens_per_s']:,.0f} tokens/s "
                 f"({result['torch_tokens_per_cpu_s']:,.0f} per CPU second)")
    print(line)
    return result


def main() -> int:
    args = parse_args()
    if args.target:
        args.sampling_only = False
        args.repeats = max(args.repeats, 9)   # one row: afford more repeats for a steadier median
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np
    import scratchlm as sl
    import scratchlm.nn as nn
    try:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        print("torch not installed: no comparison columns")
    from scratchlm import kernels
    info = dict(threads=args.threads, torch_threads=torch.get_num_threads() if torch is not None else None,
                torch_version=getattr(torch, "__version__", None), cpu_count=os.cpu_count(),
                machine=platform.machine(), numpy=np.__version__, kernels="numba" if kernels.numba_available() else "reference",
                load_average=os.getloadavg())
    print(f"B={args.batch}, float32, input size = H; ours: BLAS threads {args.threads or 'default'}; "
          f"torch {info['torch_version']}: {info['torch_threads']} threads; {info['cpu_count']} CPUs, "
          f"load average {info['load_average'][0]:.1f}")
    rows = [] if args.sampling_only else bench_layers(args, torch, np, sl, nn)
    sampling = None if args.target else bench_sampling(args, torch, np, sl)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "rows": rows, "sampling": sampling}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
