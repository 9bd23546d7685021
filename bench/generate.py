"""Generation speed: prefill and decode tokens/s, with and without the KV cache, and against
Hugging Face ``GPT2LMHeadModel.generate`` on the same weights when torch + transformers import.

    python bench/generate.py                      # nano-cpu shapes (block 64 and 256) and gpt2-124m
    python bench/generate.py --threads 1          # pin BLAS / Numba / torch to 1 thread (a busy machine)
    python bench/generate.py --models nano-cpu --new-tokens 64

What is timed (greedy decoding, random weights, batch 1, float32, on the current backend):
- prefill: the forward over the prompt up to the first new token's logits, prompt_len / seconds;
- decode: each following token, (new - 1) / seconds. Without the cache every token re-runs the
  whole window; with it, one token runs against the cached keys and values.
Windows: the default rule keeps the last block_size tokens; once prompt + new exceeds block_size,
every further token is a fresh prefill of block_size tokens, cache or not. The ``cache, keep 1/2``
rows use ``window_keep = block_size // 2`` instead (the cache is rebuilt every block_size / 2
tokens). Hugging Face cannot go past ``n_positions`` (= block_size), so it generates
min(new, block_size - prompt) tokens; where that is fewer than ``new``, a ``cache, HF length`` row
times ours at that length too. ``vs HF`` is our cached decode tokens/s over HF's at the same
prompt and length; ``same as HF`` counts the leading greedy tokens both produce (random weights
have near-ties, so float rounding may part them).
Where re-running the window for every token would take an hour (gpt2-124m), those runs decode
fewer tokens (``RECOMPUTE_POSITION_BUDGET``): the ``new`` column says how many. Fewer tokens
means shorter contexts, so such a ``no cache`` rate flatters the uncached path.

The bound table first (``--bound-only``: only it): at batch 1 every decoded token reads every
weight once, so tokens/s <= memory bandwidth / weight bytes. It measures this machine's
bandwidth (a large array copy on one thread: bytes read + written per second, best of 5), the
bytes of the weights one token reads (every matrix, bias and gain, the whole tied embedding for
the head, one position row) of the 6-layer, 6-head, 384-wide GPT with a 256-token context (nanoGPT's
shakespeare-char model, vocab 65), and prints the bound beside the measured rates: cached decoding
at the default threads, at 1 and at 2 BLAS/Numba threads, and uncached decoding (a full forward
per token). Targets: cached >= 60% of the bound, >= 5x uncached, 2 threads never slower than 1.
The ``cached, NumPy reference`` row forces the decode step's NumPy reference (kernels/decode.py;
what runs without Numba) in the same interleaved rounds. Then the ``RowDecoder.step`` table: one
step of the served nano-cpu model over 1 to 32 rows, reference against the kernel at 1 thread and at its default.

    python bench/generate.py --bound-only         # the bound table alone (about a minute on 2 quiet cores)

Writes bench/results/generate.json.
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
# bench/ itself must not be on the path: bench/tokenizers.py would shadow the `tokenizers` package
# that transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name -> (preset for the layer sizes, block_size override or None)
    "nano-cpu": ("nano-cpu", None),
    "nano-cpu@256": ("nano-cpu", 256),
    "gpt2-124m": ("gpt2-124m", None),
}
# Decoding that re-runs the window for every token (no cache; or the default window rule once the
# context is full) of a 124M model would take an hour here: such runs stop after this many
# positions in all (the ``new`` column says how many tokens that was).
RECOMPUTE_POSITION_BUDGET = {"gpt2-124m": 4096}


def capped_tokens(name: str, prompt_len: int, new: int, block: int, recomputes: bool) -> int:
    """new, or fewer when every token re-runs the window: the largest n whose windows sum to at
    most the model's position budget (at least 3, so that decode has two tokens to time)."""
    budget = RECOMPUTE_POSITION_BUDGET.get(name)
    if budget is None or not recomputes:
        return new
    n, positions = 0, 0
    while n < new and positions + min(prompt_len + n, block) <= budget:
        positions += min(prompt_len + n, block)
        n += 1
    return max(3, n)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for BLAS, Numba and torch (default: the libraries' own choice)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    parser.add_argument("--bound-only", action="store_true", help="only the memory-bandwidth bound table")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate.json"))
    return parser.parse_args()


def model_config(name: str):
    from scratchlm.config import read_preset
    from scratchlm.models import GPTConfig
    preset_name, block_size = SHAPES[name]
    preset = read_preset(preset_name)
    keys = ("n_layer", "n_head", "n_embd", "bias")
    return GPTConfig(vocab_size=preset["vocab_size"], block_size=block_size or preset["config"]["block_size"],
                     **{k: preset["config"][k] for k in keys})


def time_ours(model, prompt, new_tokens, use_cache, window_keep=None):
    """(prefill s, decode s, tokens): greedy, timed around the first token and the rest."""
    from scratchlm import backend
    from scratchlm import generate as G
    steps = G.iter_tokens(model, prompt, new_tokens, temperature=0, use_cache=use_cache, window_keep=window_keep)
    start = time.perf_counter()
    tokens = [next(steps)]
    backend.synchronize()
    first = time.perf_counter()
    tokens += list(steps)
    backend.synchronize()
    end = time.perf_counter()
    return first - start, end - first, [int(t[0]) for t in tokens]


BOUND_MODEL = dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=True)
UNCACHED_NEW = 9                           # a full forward per token: 8 timed tokens are plenty


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> tuple[float, float]:
    """Bytes read + written per second by one large float32 array copy, best of ``repeats``:
    (per wall second, per CPU second of this process)."""
    import numpy as np
    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        np.copyto(dst, src)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return 2 * src.nbytes / best_wall, 2 * src.nbytes / max(best_cpu, 1e-9)


def weight_bytes(model) -> int:
    """Bytes of the weights one decoded token reads: every parameter, but one row of the position table."""
    total = sum(p.data.nbytes for p in model.parameters())
    if "wpe" in model.transformer:
        wpe = model.transformer.wpe.weight.data
        total -= wpe.nbytes - wpe[0].nbytes
    return total


def decode_rate(model, prompt, new_tokens, use_cache, threads=None, rung=None) -> tuple[float, float]:
    """Batch-1 greedy decode tokens/s after the first token, at ``threads`` BLAS + Numba threads
    (None: as the process started), the decode step on ``rung`` (None: the dispatcher's choice):
    (per wall second, per CPU second)."""
    import contextlib
    from scratchlm import generate as G
    from scratchlm.kernels import force_rung
    with thread_limit(threads) if threads else contextlib.nullcontext(), \
            force_rung("decode", rung) if rung else contextlib.nullcontext():
        steps = G.iter_tokens(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
        next(steps)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in steps:
            pass
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (new_tokens - 1) / wall, (new_tokens - 1) / max(cpu, 1e-9)


@__import__("contextlib").contextmanager
def thread_limit(n: int):
    """BLAS (threadpoolctl) and Numba threads capped at n; restored after."""
    from threadpoolctl import threadpool_limits
    try:
        import numba
        before = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        numba = None
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        if numba is not None:
            numba.set_num_threads(before)


def bound_table(backend_name: str) -> dict:
    """Bandwidth, weight bytes, the bound, and the measured batch-1 rates (see the module docstring)."""
    import numpy as np
    from scratchlm.models import GPT, GPTConfig
    model = GPT(GPTConfig(**BOUND_MODEL), seed=0).eval()
    prompt = np.random.default_rng(0).integers(0, 65, (1, 64)).tolist()
    time_ours(model, prompt, 4, True)                                  # warm-up
    bandwidth, bandwidth_cpu = copy_bandwidth()
    weights = weight_bytes(model)
    bound, bound_cpu = bandwidth / weights, bandwidth_cpu / weights
    new = 128
    # the NumPy reference step (the path without Numba, and the whole path before the decode kernel)
    # interleaved with the rest: the same load touches both
    settings = {"cached, default threads": (new, True, None), "cached, 1 thread": (new, True, 1),
                "cached, 2 threads": (new, True, 2), "cached, NumPy reference": (new, True, None),
                "uncached, default threads": (UNCACHED_NEW, False, None), "uncached, 1 thread": (UNCACHED_NEW, False, 1)}
    rates = {mode: (0.0, 0.0) for mode in settings}
    for _ in range(3):                     # rounds interleaved: a change in the machine's load touches every mode
        for mode, (n, use_cache, threads) in settings.items():
            wall, cpu = decode_rate(model, prompt, n, use_cache, threads, "reference" if "NumPy" in mode else None)
            rates[mode] = (max(rates[mode][0], wall), max(rates[mode][1], cpu))
    load = os.getloadavg()
    print(f"batch-1 decoding of the 6-layer 384-wide GPT (block 256, vocab 65), prompt 64 tokens, {new} new "
          f"(uncached: {UNCACHED_NEW}), greedy, best of 3 interleaved rounds, {backend_name}, load average "
          f"{load[0]:.1f}")
    print(f"memory bandwidth (one-thread copy, read + write): {bandwidth / 1e9:.2f} GB/s per wall second, "
          f"{bandwidth_cpu / 1e9:.2f} per CPU second; weights read per token: {weights / 1e6:.2f} MB; "
          f"bound = bandwidth / weights = {bound:.0f} tokens/s ({bound_cpu:.0f} per CPU second)")
    print("(the CPU-second columns: rates per second of this process's CPU time, what a busy machine distorts least)")
    header = f"{'mode':<28}{'tokens/s':>10}{'of bound':>10}{'x uncached':>12}{'tok/CPU s':>11}{'of bound':>10}"
    print(header)
    print("-" * len(header))
    uncached = max(rates["uncached, default threads"][0], rates["uncached, 1 thread"][0])
    uncached_cpu = max(rates["uncached, default threads"][1], rates["uncached, 1 thread"][1])
    for mode, (rate, rate_cpu) in rates.items():
        print(f"{mode:<28}{rate:>10.1f}{rate / bound:>10.0%}{rate / uncached:>11.1f}x{rate_cpu:>11.1f}"
              f"{rate_cpu / bound_cpu:>10.0%}")
    cached, cached_cpu = rates["cached, default threads"]
    two, one = rates["cached, 2 threads"][0], rates["cached, 1 thread"][0]
    print(f"targets: cached {cached / bound:.0%} of the bound, {cached_cpu / bound_cpu:.0%} per CPU second (>= 60%: "
          f"{'met' if max(cached / bound, cached_cpu / bound_cpu) >= 0.6 else 'missed'}); {cached / uncached:.1f}x the "
          f"faster uncached (>= 5x: {'met' if cached >= 5 * uncached else 'missed'}); 2 threads {two / one:.2f}x 1 thread "
          f"(never slower: {'met' if two >= 0.95 * one else 'missed'}, 5% noise allowed)\n")
    return dict(bandwidth_bytes_per_s=bandwidth, bandwidth_bytes_per_cpu_s=bandwidth_cpu, weight_bytes=weights,
                bound_tokens_per_s=bound, bound_tokens_per_cpu_s=bound_cpu,
                rates={mode: {"tokens_per_s": r[0], "tokens_per_cpu_s": r[1]} for mode, r in rates.items()},
                load_average=load, model=BOUND_MODEL, prompt=64, new_tokens=new)


STEP_ROWS = (1, 4, 16, 32)                # a lone client, a few, and the server's 16 and 32 (its max batch)


def step_table(backend_name: str) -> dict:
    """One ``RowDecoder.step`` on the nano-cpu shapes (4 layers, 128 wide, block 64: the served
    model) over 1 and 16 rows at spread positions: the NumPy reference path against the Numba kernel at
    1 thread and at its own default, interleaved, median ms per step (wall and this process's CPU)."""
    import contextlib
    import numpy as np
    from scratchlm.kernels import decode, force_rung
    from scratchlm.models import GPT
    from scratchlm.rowdecode import RowDecoder
    model = GPT(model_config("nano-cpu"), seed=0).eval()
    modes = {"reference (NumPy)": ("reference", None), "kernel, 1 thread": ("numba", 1),
             "kernel, default": ("numba", None)}       # the kernel's own choice (PARALLEL_MIN_WEIGHT_BYTES)
    if not decode.uses_kernel(RowDecoder(model, 1).scratch, 1):
        modes = {"reference (NumPy)": ("reference", None)}
    results = {}
    for rows in STEP_ROWS:
        decoder = RowDecoder(model, rows)
        block = model.config.block_size
        positions = (np.arange(rows) * 7 + block // 2) % (block - 1)      # spread over the window
        tokens = np.arange(rows) % model.config.vocab_size
        times = {mode: [] for mode in modes}
        for _ in range(15):
            for mode, (rung, threads) in modes.items():
                with force_rung("decode", rung), (thread_limit(threads) if threads else contextlib.nullcontext()):
                    decoder.step(tokens, positions)
                    wall, cpu = time.perf_counter(), time.process_time()
                    for _ in range(20):
                        decoder.step(tokens, positions)
                    times[mode].append(((time.perf_counter() - wall) / 20, (time.process_time() - cpu) / 20))
        results[rows] = {mode: tuple(float(np.median([t[i] for t in v])) for i in range(2)) for mode, v in times.items()}
    load = os.getloadavg()
    print(f"RowDecoder.step on nano-cpu (4 layers, 128 wide, block 64, vocab 65), {backend_name}, median of 15 "
          f"interleaved rounds of 20 steps, load average {load[0]:.1f}")
    header = f"{'rows':>4}  {'path':<20}{'ms/step':>9}{'CPU ms':>8}{'rows/s':>9}{'vs reference':>14}"
    print(header)
    print("-" * len(header))
    for rows, by_mode in results.items():
        reference = by_mode["reference (NumPy)"][0]
        for mode, (wall, cpu) in by_mode.items():
            print(f"{rows:>4}  {mode:<20}{wall * 1e3:>9.3f}{cpu * 1e3:>8.3f}{rows / wall:>9.0f}{reference / wall:>13.2f}x")
    print()
    return dict(load_average=load, rows={rows: {mode: {"s_per_step": w, "cpu_s_per_step": c}
                                                 for mode, (w, c) in by_mode.items()} for rows, by_mode in results.items()})


def hf_model(model):
    """GPT2LMHeadModel with our weights (our state_dict keys are Hugging Face's: strict load)."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from scratchlm import backend
    c = model.config
    config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=None,
                        pad_token_id=0, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(config).eval()
    state = {k: torch.from_numpy(np.array(backend.to_numpy(v))) for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def time_hf(hf, prompt, new_tokens):
    """(prefill s, decode s, tokens): generate(1 token) is the prefill; generate(n) - that = decode."""
    import torch
    ids = torch.tensor(prompt)
    # an explicit mask: without one, generate() masks every prompt token equal to pad_token_id
    kwargs = dict(do_sample=False, use_cache=True, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return prefill, max(total - prefill, 1e-9), out[0, ids.shape[1]:].tolist()


def agreement(a, b) -> int:
    """How many leading tokens two greedy runs share (random weights: near-ties can differ)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    args = parse_args()
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np
    import scratchlm as sl
    from scratchlm.models import GPT
    sl.use_backend(args.backend)
    hf_ok = False
    if not args.no_hf and args.backend == "numpy":
        try:
            import torch
            import transformers  # noqa: F401
            if args.threads:
                torch.set_num_threads(args.threads)
            hf_ok = True
        except ImportError:
            print("torch / transformers not installed: no Hugging Face rows")

    bound = bound_table(args.backend)
    steps = step_table(args.backend)
    rows = []
    if args.bound_only:
        args.models = []
    header = (f"{'model':<13} {'block':>5} {'prompt':>6} {'new':>4}  {'mode':<16} {'prefill tok/s':>13} "
              f"{'decode tok/s':>12}  {'cache speedup':>13}  {'vs HF':>6}  {'same as HF':>10}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        config = model_config(name)
        model = GPT(config, seed=0)
        hf = hf_model(model) if hf_ok else None
        block = config.block_size
        rng = np.random.default_rng(0)
        # warm up every path once (Numba kernels, BLAS, torch)
        time_ours(model, [[1, 2]], 3, True)
        time_ours(model, [[1, 2]], 3, False)
        if hf is not None:
            time_hf(hf, [[1, 2]], 3)
        for prompt_len in sorted({1, min(64, block - 1), block - 1}):
            prompt = rng.integers(0, config.vocab_size, (1, prompt_len)).tolist()
            new = args.new_tokens
            results = {}
            modes = [("no cache", False, None), ("cache", True, None)]
            if prompt_len + new > block:
                modes.append(("cache, keep 1/2", True, block // 2))
            for mode, use_cache, keep in modes:
                recomputes = not use_cache or (keep is None and prompt_len + new > block)
                n = capped_tokens(name, prompt_len, new, block, recomputes)
                prefill_s, decode_s, tokens = time_ours(model, prompt, n, use_cache, keep)
                results[mode] = dict(new=n, prefill_tok_s=prompt_len / prefill_s,
                                     decode_tok_s=(n - 1) / decode_s if n > 1 else None, tokens=tokens)
            hf_new = min(new, block - prompt_len)          # HF stops at n_positions = block_size
            if hf is not None and hf_new >= 16:
                if hf_new < new:                           # ours again, at HF's length, for the ratio
                    prefill_s, decode_s, tokens = time_ours(model, prompt, hf_new, True)
                    results["cache, HF length"] = dict(new=hf_new, prefill_tok_s=prompt_len / prefill_s,
                                                       decode_tok_s=(hf_new - 1) / decode_s, tokens=tokens)
                prefill_s, decode_s, tokens = time_hf(hf, prompt, hf_new)
                results["HF transformers"] = dict(new=hf_new, prefill_tok_s=prompt_len / prefill_s,
                                                  decode_tok_s=(hf_new - 1) / decode_s, tokens=tokens)
            uncached = results["no cache"]["decode_tok_s"]
            hf_rate = results.get("HF transformers", {}).get("decode_tok_s")
            hf_peer = "cache, HF length" if "cache, HF length" in results else "cache"
            for mode, r in results.items():
                speedup = r["decode_tok_s"] / uncached if mode in ("cache", "cache, keep 1/2") and uncached else None
                vs_hf = r["decode_tok_s"] / hf_rate if hf_rate and mode == hf_peer else None
                same = None
                if "HF transformers" in results and mode == hf_peer:
                    hf_tokens = results["HF transformers"]["tokens"]
                    same = f"{agreement(r['tokens'], hf_tokens)}/{min(len(r['tokens']), len(hf_tokens))}"
                row = dict(model=name, block_size=block, n_layer=config.n_layer, n_embd=config.n_embd,
                           vocab_size=config.vocab_size, prompt=prompt_len, new=r["new"], mode=mode,
                           prefill_tok_s=r["prefill_tok_s"], decode_tok_s=r["decode_tok_s"],
                           cache_speedup=speedup, vs_hf=vs_hf, same_tokens_as_hf=same)
                rows.append(row)
                fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
                print(f"{name:<13} {block:>5} {prompt_len:>6} {r['new']:>4}  {mode:<16} "
                      f"{fmt(r['prefill_tok_s'], '13,.0f')} {fmt(r['decode_tok_s'], '12,.1f')}  "
                      f"{fmt(speedup, '12.1f') + ('x' if speedup else ''):>13}  "
                      f"{fmt(vs_hf, '5.2f') + ('x' if vs_hf else ''):>6}  {same or '-':>10}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(backend=args.backend, threads=args.threads, cpu_count=os.cpu_count(), machine=platform.machine(),
                python=platform.python_version(), numpy=np.__version__, load_average=os.getloadavg(),
                hf=hf_ok and {"torch": __import__("torch").__version__,
                              "transformers": __import__("transformers").__version__})
    out.write_text(json.dumps({"info": info, "bound": bound, "steps": steps, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
