"""The language-model ladder: every rung, bigram to GPT, trained by the one trainer on the same data.

    python bench/ladder.py                              # names (the presets) and tiny shakespeare
    python bench/ladder.py --corpora names --models bigram,mlp,lstm
    python bench/ladder.py --quick                      # a smoke run: 50 iterations a rung

What runs: for each corpus and each model, ``scratchlm.train.train`` with the budget below, then
``scratchlm.evaluate`` over every split (every token once, not sampled batches). The table gives
the parameters, the whole-split losses (nats per character), ms/iter and tokens/s of training
(the median over the logged windows; tokens = B x T positions, padding included for names) and a
sample. The peer is makemore's published figures on the same split of names (its lecture
notebooks: count bigram 2.48 on the whole set, MLP dev 2.17, batch-normed MLP 2.10, hierarchical
MLP val 1.99, makemore's transformer test ~1.92), printed beside ours.

Budgets (2 cores, numpy backend):
- names: each model's preset, exactly what ``scratchlm train --model NAME --corpus names`` runs
  (presets/names-<model>.json; iterations and shapes there).
- tinyshakespeare (char-level, the file /work/shared/corpora/tinyshakespeare.txt or --shakespeare
  PATH; train = first 90% of the characters, val = the rest): SHAKESPEARE below, 750 iterations a
  rung at B=32, T=64 (minutes, not the hours these models would need to converge); the GPT is
  nanoGPT's CPU recipe (nano-cpu: 4x4x128, T=64) at the same B=32 and 750 iterations (at its own
  B=12 it sees 2.7x fewer characters than the other rungs and lands last: val 2.21).
  ``--iters N`` sets every tinyshakespeare rung to N iterations (e.g. 1500 on a quiet machine).
  CPU seconds a training step, measured (numpy backend, one thread): bigram 0.003, MLP 0.016,
  RNN 0.025, LSTM 0.085, GRU 0.066, GPT 0.089 at B=12 (~0.24 at B=32), so at 750 iterations a
  rung is 2 s (bigram) to ~3 CPU-minutes (GPT), about 5 CPU-minutes of training for the half.
  The train column there is the trainer's last estimate (eval_iters batches), not the whole
  million characters; val is the whole split.

Results: the table on stdout, JSON in bench/results/ladder.json, runs in --out (default runs/ladder);
``--show A.json B.json`` prints the table of saved results (e.g. the two corpora run apart).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ["bigram", "mlp", "rnn", "lstm", "gru", "gpt"]

# makemore's figures on names (its lecture split; nats per character)
MAKEMORE = {"bigram": "2.48 (count, whole set)", "mlp": "dev 2.17; batch-norm 2.10; hierarchical val 1.99",
            "rnn": "", "lstm": "", "gru": "", "gpt": "test ~1.92"}

COMMON_SHAKESPEARE = {"batch_size": 32, "block_size": 64, "eval_interval": 500, "eval_iters": 20,
                      "log_interval": 50, "warmup_iters": 50, "grad_clip": 1.0}
SHAKESPEARE = {      # --set overrides on top of the family's defaults (gpt: the nano-cpu preset)
    "bigram": {"learning_rate": 0.1, "max_iters": 750, "lr_decay_iters": 750, "min_lr": 0.01, "weight_decay": 0.0},
    "mlp": {"model.block_size": 8, "n_embd": 16, "n_hidden": 256, "learning_rate": 3e-3, "max_iters": 750,
            "lr_decay_iters": 750, "min_lr": 3e-4, "weight_decay": 0.01},
    "rnn": {"n_embd": 64, "n_hidden": 256, "learning_rate": 3e-3, "max_iters": 750, "lr_decay_iters": 750,
            "min_lr": 3e-4, "weight_decay": 0.01},
    "lstm": {"n_embd": 64, "n_hidden": 256, "learning_rate": 3e-3, "max_iters": 750, "lr_decay_iters": 750,
             "min_lr": 3e-4, "weight_decay": 0.01},
    "gru": {"n_embd": 64, "n_hidden": 256, "learning_rate": 3e-3, "max_iters": 750, "lr_decay_iters": 750,
            "min_lr": 3e-4, "weight_decay": 0.01},
    "gpt": {"batch_size": 32, "max_iters": 750, "lr_decay_iters": 750},     # the same tokens as the other rungs
}


def train_rung(model: str, corpus: str, corpus_label: str, out: Path, quick: bool, iters: int | None) -> dict:
    from scratchlm.models.registry import get_family, resolve_config
    from scratchlm.train import train
    family = get_family(model)
    if corpus_label == "names":
        overrides, preset = [], None                       # the names-<model> preset
    else:
        preset = "nano-cpu" if model == "gpt" else None     # nano-cpu keeps its T and warmup (B: SHAKESPEARE)
        common = {k: v for k, v in COMMON_SHAKESPEARE.items()
                  if model != "gpt" or k in ("eval_interval", "eval_iters", "log_interval")}
        overrides = [f"{k}={v}" for k, v in {**common, **SHAKESPEARE[model]}.items()]
        if iters:
            overrides += [f"max_iters={iters}", f"lr_decay_iters={iters}"]
    if quick:
        overrides += ["max_iters=50", "lr_decay_iters=50", "warmup_iters=5", "eval_interval=50", "eval_iters=2",
                      "log_interval=10"]
    config, model_values = resolve_config(family, corpus=corpus_label, preset=preset, overrides=overrides)
    run_dir = out / f"{corpus_label}-{model}"
    start, cpu_start = time.perf_counter(), time.process_time()
    train(config, run_dir, corpus=corpus, model=model, model_config=model_values, progress=False,
          overwrite=True, log=lambda *_: None)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "iters": config.max_iters, "batch_size": config.batch_size, "run": str(run_dir)}


def speed(run_dir: Path) -> tuple[float, float]:
    """Median ms/iter and tokens/s over the logged training windows (the first, with Numba's
    compilation and the first eval, left out)."""
    from scratchlm.runs import read_metrics
    train = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("kind") == "train"]
    windows = {}
    for m in train:
        windows.setdefault((round(m["ms_per_iter"], 6), round(m["tokens_per_s"], 3)), m)
    values = list(windows)[1:] or list(windows)
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


def sample_text(run_dir: Path, documents: bool) -> str:
    from scratchlm.generate import generate_text
    from scratchlm.runs import load_model
    model, tokenizer, _ = load_model(run_dir)
    if documents:
        return ", ".join(generate_text(model, tokenizer, "\n", max_new_tokens=40, temperature=1.0, stop="\n",
                                       seed=k) for k in range(6))
    return generate_text(model, tokenizer, "\n", max_new_tokens=60, temperature=0.8, seed=0).replace("\n", " / ")


def last_train_estimate(run_dir: Path) -> float:
    """The trainer's last train-loss estimate (eval_iters batches), for a split too big to score whole."""
    from scratchlm.runs import read_metrics
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("kind") == "eval"][-1]["train_loss"]


def run_corpus(corpus: str, label: str, models: list[str], out: Path, quick: bool, iters: int | None) -> list[dict]:
    from scratchlm.evaluate import evaluate_run
    from scratchlm.models.registry import num_parameters
    from scratchlm.runs import load_model
    rows = []
    for model in models:
        print(f"[{label}] training {model} ...", file=sys.stderr, flush=True)
        info = train_rung(model, corpus, label, out, quick, iters)
        run_dir = Path(info["run"])
        splits = json.loads((run_dir / "config.json").read_text())["data"]["splits"]
        whole = splits if label == "names" else [s for s in splits if s != "train"]   # see the docstring
        losses = {split: evaluate_run(run_dir, split=split, batch_size=256)["loss"] for split in whole}
        if "train" not in whole:
            losses = {"train": last_train_estimate(run_dir), **losses}
        ms, tok_s = speed(run_dir)
        net, _, _ = load_model(run_dir)
        row = {"corpus": label, "model": model, "parameters": num_parameters(net), **info,
               **{f"{s}_loss": v for s, v in losses.items()}, "ms_per_iter": ms, "tokens_per_s": tok_s,
               "sample": sample_text(run_dir, documents=label == "names"),
               "makemore": MAKEMORE[model] if label == "names" else ""}
        rows.append(row)
        print(f"[{label}] {model}: " + ", ".join(f"{s} {v:.4f}" for s, v in losses.items())
              + f", {info['seconds']:.0f} s ({info['cpu_seconds']:.0f} CPU s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for label in dict.fromkeys(r["corpus"] for r in rows):
        group = sorted((r for r in rows if r["corpus"] == label), key=lambda r: MODELS.index(r["model"]))
        splits = [s for s in ("train", "val", "test") if f"{s}_loss" in group[0]]
        names = {"val": "dev"} if label == "names" else {"train": "train (est.)"}
        head = ["model", "params", *[names.get(s, s) for s in splits], "iters", "train s", "CPU s", "ms/iter",
                "tok/s",
                *(["makemore"] if label == "names" else []), "sample"]
        lines += [f"\n{label}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in group:
            cells = [r["model"], f"{r['parameters']:,}", *[f"{r[f'{s}_loss']:.3f}" for s in splits], str(r["iters"]),
                     f"{r['seconds']:.0f}", f"{r.get('cpu_seconds', float('nan')):.0f}", f"{r['ms_per_iter']:.1f}", f"{r['tokens_per_s']:,.0f}",
                     *([r["makemore"]] if label == "names" else []), r["sample"][:70].replace("|", "/")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", default="names,tinyshakespeare", help="comma-separated (default both)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--shakespeare", default=str(REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"),
                        help="path of tinyshakespeare.txt (default ../shared/corpora)")
    parser.add_argument("--out", default="runs/ladder", help="run folders (default runs/ladder)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "ladder.json"))
    parser.add_argument("--quick", action="store_true", help="50 iterations a rung (a smoke run)")
    parser.add_argument("--iters", type=int, help="iterations of every tinyshakespeare rung (default: the budgets "
                        "in SHAKESPEARE, 750)")
    parser.add_argument("--show", nargs="+", metavar="JSON", help="print the table of saved results and stop")
    args = parser.parse_args(argv)
    if args.show:
        print(table([row for path in args.show for row in json.loads(Path(path).read_text())["rows"]]))
        return 0
    from scratchlm import backend
    backend.use_backend("numpy")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = []
    for label in [c.strip() for c in args.corpora.split(",") if c.strip()]:
        corpus = args.shakespeare if label == "tinyshakespeare" else label
        rows += run_corpus(corpus, label, models, Path(args.out), args.quick, args.iters)
    print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"quick": args.quick, "iters": args.iters, "rows": rows}, indent=1) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
