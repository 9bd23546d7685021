"""Training speed: scratchlm's trainer step vs the same GPT written in plain PyTorch, side by side.

    python bench/train.py                                  # nano-cpu recipe, CPU, 2 threads
    python bench/train.py --kernels off                    # scratchlm with the NumPy reference kernels
    CUPY_TF32=1 python bench/train.py --device gpu --backend cupy     # gpt2-124m, B=8, T=1024, GPU
    python bench/train.py --device gpu --dtype bfloat16               # bf16 mixed precision (GPU only)
    python bench/train.py --fused off --no-torch           # the GPT without its fused ops
    python bench/train.py --fused ab --no-torch            # fused / unfused alternately, step by step

What is timed: one optimizer iteration -- forward, loss, backward, gradient clipping, AdamW step,
zero_grad -- on the same shapes, batch, initialisation scale, optimizer and parameter groups on both
sides. scratchlm runs ``Trainer.train_step`` itself (the function the trainer calls), so this is the
speed a user gets. ms/iter is the median over the timed iterations after the warm-up ones (which
also absorb Numba's compilation and CUDA's first-call costs); tokens/s = B * T / median.

Each side runs in its own child process so that peak memory is that side's alone and neither
inherits the other's threads: CPU peak memory is the child's peak resident set size (ru_maxrss:
the interpreter and libraries included, so compare the two, not the absolute figure); GPU peak is
the framework's own count (CuPy memory pool bytes, ``torch.cuda.max_memory_allocated``).
PyTorch runs eager (no compile), float32; on the GPU TF32 is allowed on both sides (CuPy through
``CUPY_TF32=1`` in the environment). Results: a table on stdout, JSON in bench/results/train.json.
One extra step after the timed ones is counted (``scratchlm.launches``): tape ops, array-namespace
calls and our raw CUDA kernel launches per training step -- the dispatches that make a small GPU
step host-bound. ``--fused off`` runs the GPT with its plain chain of ops instead of the fused
residual + layer norm and bias + GELU (``GPT.use_fused_ops``), for the before/after comparison;
``--fused ab`` alternates the two every iteration in one process (the same function, so the run
continues) and reports each one's median: an interleaved A/B that a shared machine's load
drifts affect equally; the table's row is then all iterations, and both are counted.
Per-iteration CPU time of the child (time.process_time) is reported beside wall time: on a shared
machine it is the steadier of the two.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def batches(vocab_size: int, B: int, T: int, n: int, seed: int = 0):
    """n fixed (x, y) int64 host batches of random tokens (speed does not depend on the text)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(n, B, T + 1))
    return [(t[:, :-1].copy(), t[:, 1:].copy()) for t in tokens]


# ================================================================ scratchlm side

def run_scratchlm(args, config, vocab_size) -> dict:
    from scratchlm import backend, kernels
    from scratchlm.runlog import peak_flops
    from scratchlm.runsetup import random_tokens_trainer
    kernels.use_reference(args.kernels == "off")
    backend.use_backend(args.backend)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = random_tokens_trainer(config, vocab_size, run_dir)
        trainer.model.use_fused_ops(args.fused != "off")
        times, cpu_times = [], []
        for it in range(args.warmup + args.iters):
            if args.fused == "ab":
                trainer.model.use_fused_ops(it % 2 == 0)           # even: fused, odd: unfused
            backend.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _, _ = trainer.train_step(it)
            backend.synchronize()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        flops_per_token = trainer.model.flops_per_token()
        n_params = trainer.model.num_parameters(non_embedding=False)
        # one more step, counted (scratchlm.launches): tape ops, xp calls, our raw kernel launches
        from scratchlm.launches import count_launches
        counts = {}
        for fused in ([True, False] if args.fused == "ab" else [args.fused == "on"]):
            trainer.model.use_fused_ops(fused)
            with count_launches() as count:
                trainer.train_step(args.warmup + args.iters)
                backend.synchronize()
            counts["fused" if fused else "unfused"] = dict(count.per_kind)
    memory = _peak_memory(args, "cupy")
    ab = {}
    if args.fused == "ab":
        timed = list(range(args.warmup, args.warmup + args.iters))
        for name, parity in (("fused", 0), ("unfused", 1)):
            ab[name] = {"ms_per_iter": 1000 * statistics.median(times[i] for i in timed if i % 2 == parity),
                        "cpu_ms_per_iter": 1000 * statistics.median(cpu_times[i] for i in timed if i % 2 == parity),
                        "dispatches_per_step": counts[name]}
    return {"times": times[args.warmup:], "cpu_ms_per_iter": 1000 * statistics.median(cpu_times[args.warmup:]),
            "loss": float(backend.to_numpy(loss)), "flops_per_token": flops_per_token, "params": n_params,
            "peak_flops": peak_flops(), "dispatches_per_step": next(iter(counts.values())), "ab": ab, **memory}


# ================================================================ PyTorch side: the same GPT, written plainly

def torch_gpt(config, vocab_size, gelu: str = "tanh"):
    """scratchlm's GPT, written in plain PyTorch: same layers, same order, same init scale."""
    import math
    import torch
    import torch.nn as tnn
    import torch.nn.functional as TF
    C, H, L, T = config.n_embd, config.n_head, config.n_layer, config.block_size

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(C, bias=config.bias), tnn.LayerNorm(C, bias=config.bias)
            self.c_attn, self.attn_proj = tnn.Linear(C, 3 * C, bias=config.bias), tnn.Linear(C, C, bias=config.bias)
            self.c_fc, self.c_proj = tnn.Linear(C, 4 * C, bias=config.bias), tnn.Linear(4 * C, C, bias=config.bias)

        def forward(self, x):                                             # x: (B, T, C)
            B_, T_, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B_, T_, H, C // H).transpose(1, 2) for t in (q, k, v))   # (B, H, T, D)
            y = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B_, T_, C))
            return x + self.c_proj(TF.gelu(self.c_fc(self.ln_2(x)), approximate=gelu))

    class TorchGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(vocab_size, C), tnn.Embedding(T, C)
            self.h = tnn.ModuleList(Block() for _ in range(L))
            self.ln_f = tnn.LayerNorm(C, bias=config.bias)
            for name, p in self.named_parameters():                      # GPT-2 init, as scratchlm
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("attn_proj.weight", "c_proj.weight")) else 0.02
                    tnn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    tnn.init.zeros_(p)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T                     # tied head: (B, T, V)
            return TF.cross_entropy(logits.view(-1, vocab_size), targets.view(-1))

    return TorchGPT()


def torch_adamw(model, config, decay_embeddings: bool = False):
    """AdamW with scratchlm's groups: decay the Linear weights only (not embeddings, biases, norms).
    ``decay_embeddings``: nanoGPT's groups instead, which decay every 2-D parameter, wte and wpe too."""
    import torch
    decayed = lambda n, p: p.dim() == 2 and (decay_embeddings or not n.startswith(("wte", "wpe")))
    decay = [p for n, p in model.named_parameters() if decayed(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decayed(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=1e-8)


def run_torch(args, config, vocab_size) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = os.environ.get("CUPY_TF32") == "1"
        torch.backends.cudnn.allow_tf32 = os.environ.get("CUPY_TF32") == "1"
    torch.manual_seed(0)
    T = config.block_size
    model = torch_gpt(config, vocab_size).to(device)
    optimizer = torch_adamw(model, config)
    data = [(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
            for x, y in batches(vocab_size, config.batch_size, T, 8)]
    from scratchlm.optim import cosine_with_warmup
    schedule = cosine_with_warmup(config.learning_rate, config.warmup_iters, config.lr_decay_iters, config.min_lr)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for it in range(args.warmup + args.iters):
        x, y = data[it % len(data)]
        sync()
        t0 = time.perf_counter()
        for group in optimizer.param_groups:          # the trainer's schedule, set the same way
            group["lr"] = schedule(it)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()                       # the trainer syncs on the loss too
        sync()
        times.append(time.perf_counter() - t0)
    memory = _peak_memory(args, "torch")
    return {"times": times[args.warmup:], "loss": loss_value, "torch": torch.__version__, **memory}


def _peak_memory(args, framework) -> dict:
    if args.device == "gpu":
        if framework == "torch":
            import torch
            return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "memory_kind": "GPU, allocated"}
        import cupy
        return {"peak_memory_mb": cupy.get_default_memory_pool().total_bytes() / 2**20, "memory_kind": "GPU, pool"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "memory_kind": "CPU, peak RSS (ru_maxrss)"}


# ================================================================ quality: the PyTorch twin on real text

def torch_name(key: str) -> str | None:
    """scratchlm (Hugging Face GPT-2) parameter name -> the twin's; None for the tied lm_head."""
    if key == "lm_head.weight":
        return None
    key = key.removeprefix("transformer.")
    return key.replace("attn.c_proj", "attn_proj").replace("attn.c_attn", "c_attn").replace("mlp.", "")


def torch_layout(name: str, array):
    """Linear weights are (n_in, n_out) in scratchlm (y = x @ W), (n_out, n_in) in torch; embeddings agree."""
    is_linear_weight = array.ndim == 2 and not name.startswith(("wte", "wpe"))
    return array.T.copy() if is_linear_weight else array


def run_torch_quality(args, config) -> dict:
    """Train the PyTorch twin on ``args.quality`` with scratchlm's own initial weights, batches,
    schedule and eval batches: an oracle for the val loss scratchlm's trainer reaches."""
    import math
    import numpy as np
    import torch
    from scratchlm.data import BatchSampler, load_corpus, prepare
    from scratchlm.models import GPT
    from scratchlm.optim import cosine_with_warmup
    from scratchlm.tokenizers import make_tokenizer
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.quality)
    tokenizer = make_tokenizer("char", corpus.text)
    prepared = prepare(corpus, tokenizer)
    V = tokenizer.vocab_size
    nanogpt = args.twin == "nanogpt"
    if nanogpt:                                        # nanoGPT's defaults where the recipe is silent
        config = dataclasses.replace(config, bias=False)
    model = torch_gpt(config, V, gelu="none" if nanogpt else "tanh")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in GPT(config.model_config(V), seed=config.seed).state_dict().items():
            name = torch_name(key)
            if name is not None:
                params[name].copy_(torch.from_numpy(torch_layout(name, np.asarray(value))))
    optimizer = torch_adamw(model, config, decay_embeddings=nanogpt)
    schedule = cosine_with_warmup(config.learning_rate, config.warmup_iters, config.lr_decay_iters, config.min_lr)
    B, T = config.batch_size, config.block_size
    sampler = BatchSampler(prepared.train, B, T, seed=config.seed)
    eval_samplers = {split: BatchSampler(tokens, B, T, seed=config.seed + 1_000_000 + k)
                     for k, (split, tokens) in enumerate((("train", prepared.train), ("val", prepared.val)))}
    as_torch = lambda xy: (torch.from_numpy(np.asarray(xy[0])), torch.from_numpy(np.asarray(xy[1])))
    evals, start = [], time.perf_counter()
    for it in range(config.max_iters + 1):
        if it % config.eval_interval == 0 or it == config.max_iters:
            model.eval()
            with torch.no_grad():
                losses = {split: float(np.mean([model(*as_torch(s.batch(k))).item() for k in range(config.eval_iters)]))
                          for split, s in eval_samplers.items()}
            model.train()
            evals.append({"iter": it, **losses})
            print(f"torch twin ({args.twin}) iter {it:>5}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
        if it == config.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule(it)
        loss = model(*as_torch(sampler.batch(it)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"torch twin diverged at iteration {it}")
    return {"evals": evals, "val_loss": evals[-1]["val"], "wall_s": time.perf_counter() - start,
            "torch": torch.__version__, "times": [0.0]}


# ================================================================ driver

def child(args) -> None:
    """Run one side and print its measurements as one JSON line."""
    from scratchlm.config import apply_overrides, load_preset, read_preset
    config = apply_overrides(load_preset(args.preset), args.set)
    vocab_size = read_preset(args.preset).get("vocab_size", 65)
    if args.quality:
        print("RESULT " + json.dumps(run_torch_quality(args, config)))
        return
    runner = run_scratchlm if args.side == "scratchlm" else run_torch
    result = runner(args, config, vocab_size)
    ms = sorted(1000 * t for t in result["times"])
    tokens = config.batch_size * config.block_size * config.gradient_accumulation_steps
    result.update(ms_per_iter=statistics.median(ms), tokens_per_s=tokens / (statistics.median(ms) / 1000),
                  ms_min=ms[0], ms_max=ms[-1], B=config.batch_size, T=config.block_size, vocab_size=vocab_size)
    print("RESULT " + json.dumps(result))


def spawn(args, side) -> dict | None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if args.device == "cpu":
        for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(args.threads)
    command = [sys.executable, __file__, "--side", side, "--preset", args.preset, "--device", args.device,
               "--backend", args.backend, "--kernels", args.kernels, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--fused", args.fused]
    for pair in args.set:
        command += ["--set", pair]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"[{side} failed]\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None, help="default: numpy on cpu, cupy on gpu")
    parser.add_argument("--preset", default=None, help="default: nano-cpu on cpu, gpt2-124m on gpu")
    parser.add_argument("--kernels", choices=["on", "off"], default="on", help="off: scratchlm's NumPy references")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 50 cpu, 20 gpu)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="scratchlm's compute dtype (bfloat16: GPU only; the same as --set dtype=...)")
    parser.add_argument("--fused", choices=["on", "off", "ab"], default="on",
                        help="off: the GPT without fused residual + layer norm and bias + GELU; ab: both, "
                             "alternating every iteration")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    parser.add_argument("--quality", metavar="CORPUS", help="instead of timing: train the PyTorch twin on CORPUS "
                        "(char-level) with scratchlm's initial weights, batches and eval batches; print its val losses "
                        "(compare with `scratchlm train` of the same preset)")
    parser.add_argument("--twin", choices=["scratchlm", "nanogpt"], default="scratchlm",
                        help="with --quality: the twin as scratchlm builds it (default), or with nanoGPT's defaults "
                             "where the recipe is silent (no biases, exact GELU, weight decay on the embeddings too)")
    parser.add_argument("--side", choices=["scratchlm", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.backend = args.backend or ("cupy" if args.device == "gpu" else "numpy")
    args.preset = args.preset or ("gpt2-124m" if args.device == "gpu" else "nano-cpu")
    args.iters = args.iters or (20 if args.device == "gpu" else 50)
    if args.dtype and not args.side:
        args.set = [*args.set, f"dtype={args.dtype}"]
    if args.side or args.quality:
        child(args)
        return

    results = {"scratchlm": spawn(args, "scratchlm")}
    try:
        import importlib.util
        has_torch = importlib.util.find_spec("torch") is not None
    except ValueError:
        has_torch = False
    if has_torch and not args.no_torch:
        results["torch"] = spawn(args, "torch")
    report(args, results)


def report(args, results) -> None:
    ours, theirs = results.get("scratchlm"), results.get("torch")
    label = f"scratchlm ({args.backend}, kernels {args.kernels}, fused {args.fused})"
    rows = [(label, ours)] + ([(f"PyTorch {theirs['torch']} eager", theirs)] if theirs else [])
    print(f"\n{args.preset}: B={ours['B'] if ours else '?'}, T={ours['T'] if ours else '?'}, device {args.device}"
          + (f", {args.threads} threads" if args.device == "cpu" else "") + f", median of {args.iters} iterations "
          f"after {args.warmup} warm-up")
    header = f"{'':44} {'ms/iter':>9} {'CPU ms':>8} {'tokens/s':>10} {'peak MB':>9} {'MFU':>7} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for name, r in rows:
        if r is None:
            print(f"{name:44} failed")
            continue
        mfu = ""
        if ours and ours.get("peak_flops"):
            r["mfu"] = ours["flops_per_token"] * r["tokens_per_s"] / ours["peak_flops"]
            mfu = f"{100 * r['mfu']:.1f}%"
        cpu = f"{r['cpu_ms_per_iter']:8.1f}" if "cpu_ms_per_iter" in r else f"{'':8}"
        print(f"{name:44} {r['ms_per_iter']:9.1f} {cpu} {r['tokens_per_s']:10,.0f} {r['peak_memory_mb']:9.0f} {mfu:>7} "
              f"{r['loss']:7.3f}")
    if ours and theirs:
        ratio = theirs["ms_per_iter"] / ours["ms_per_iter"]
        print(f"scratchlm speed / PyTorch speed = {ratio:.2f}x  (>= 1.0 means scratchlm is as fast or faster)")
        results["ratio_scratchlm_over_torch"] = ratio
    if ours and ours.get("ab"):
        f, u = ours["ab"]["fused"], ours["ab"]["unfused"]
        print(f"interleaved A/B (alternate iterations): fused {f['ms_per_iter']:.1f} ms, {f['cpu_ms_per_iter']:.1f} CPU ms; "
              f"unfused {u['ms_per_iter']:.1f} ms, {u['cpu_ms_per_iter']:.1f} CPU ms; unfused/fused CPU time "
              f"{u['cpu_ms_per_iter'] / f['cpu_ms_per_iter']:.3f}, wall {u['ms_per_iter'] / f['ms_per_iter']:.3f}")
        for name, r in (("unfused", u), ("fused", f)):
            kinds = r["dispatches_per_step"]
            print(f"  dispatches per step, {name}: {sum(kinds.values()):,} "
                  f"({', '.join(f'{kind} {n:,}' for kind, n in sorted(kinds.items()))})")
    print(f"peak memory: {(ours or theirs or {}).get('memory_kind', '')}")
    if ours and ours.get("dispatches_per_step"):
        per_kind = ours["dispatches_per_step"]
        print(f"scratchlm dispatches per training step: {sum(per_kind.values()):,} "
              f"({', '.join(f'{kind} {n:,}' for kind, n in sorted(per_kind.items()))}); array operators and "
              f"methods are not counted, so on a GPU this is a lower bound on kernel launches (scratchlm.launches)")
    for r in (ours, theirs):
        if r:
            r.pop("times", None)
    record = {"preset": args.preset, "device": args.device, "backend": args.backend, "kernels": args.kernels, "fused": args.fused,
              "threads": args.threads, "iters": args.iters, "warmup": args.warmup, "set": args.set,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "cupy_tf32": os.environ.get("CUPY_TF32") == "1", **results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    key = f"{args.preset}/{args.device}/{args.backend}/kernels-{args.kernels}/fused-{args.fused}" + "".join(f"/{s}" for s in args.set)
    existing[key] = record
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out} [{key}]")


if __name__ == "__main__":
    main()
