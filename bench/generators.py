"""Text generators on coco (Texygen's MS-COCO captions), judged the way the text-GAN literature judges them:
an MLE LSTM language model at temperatures 1.0 / 0.8 / 0.6, the sentence VAE (prior samples) and
SeqGAN, side by side.

    python bench/generators.py --runs runs/generators             # score existing runs (minutes)
    python bench/generators.py --runs runs/generators --train     # train the missing ones first (long)

Columns, all on the 10,000 test captions (never trained on or used for selection):
- test NLL per word: exact for the language models (the GAN's generator is one); for the VAE the
  importance-weighted bound (k samples, Burda et al.), an upper bound on its NLL;
- BLEU-2..5 of 1,000 samples against the whole test set and self-BLEU-2..5 of the first 500
  samples: Texygen's scorer (utils/metrics/Bleu.py, SelfBleu.py: NLTK sentence_bleu, uniform
  weights, SmoothingFunction().method1, each sample against the whole reference list, averaged;
  self-BLEU: each of the first 500 samples against the other 499), in scratchlm.metrics, with
  words cut by the word tokenizer's rule (as nltk's word_tokenize on this data; a sampled <unk>
  is one word). One difference: Texygen's Bleu.get_score() by default takes its "fast" path,
  which keeps only the first 500 lines of the reference file; the issue's protocol (and the
  table's BLEU columns) use all 10,000 test captions, and "B4/500" is BLEU-4 against the first
  500 only, for comparison;
- training minutes: wall and CPU minutes of the training process (``--train`` measures them
  with getrusage and writes RUNS/NAME/train_time.json with the load average; without that file,
  the sum of the run's ms_per_iter, wall only).

The peers are the published Texygen figures on this exact data (its README): BLEU-4 MLE 0.305,
SeqGAN 0.294, LeakGAN 0.355; self-BLEU-4 MLE 0.583, SeqGAN 0.670; the table prints them as rows
and the ratio of our BLEU-4 to Texygen's MLE.

--train runs, under ``nice -n 10`` and ``timeout``, the commands a newcomer types (the coco-lstm and
coco-vae presets hold the settings; the GAN's are spelled out):
    scratchlm train --model lstm --corpus coco --tokenizer word --out RUNS/mle
    scratchlm vae --corpus coco --out RUNS/vae
    scratchlm gan --corpus coco --out RUNS/gan  SETTINGS["gan"]

Writes bench/results/generators.json and docs/generators.png (BLEU-4 against self-BLEU-4: quality
against diversity, the MLE temperature sweep as a curve, as Caccia et al. 2020).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results" / "generators.json"
PLOT = ROOT / "docs" / "generators.png"
TEXYGEN = {"MLE": (0.305, 0.583), "SeqGAN": (0.294, 0.670), "LeakGAN": (0.355, None)}   # BLEU-4, self-BLEU-4
TEMPERATURES = (1.0, 0.8, 0.6)

COMMON = ["--set", "batch_size=32", "--set", "block_size=38", "--set", "learning_rate=3e-3", "--set", "min_lr=3e-4",
          "--set", "warmup_iters=50", "--set", "grad_clip=1.0", "--set", "eval_interval=250", "--set", "eval_iters=10",
          "--set", "log_interval=50", "--set", "seed=1337", "--no-progress"]
SETTINGS = {
    "mle": ["train", "--model", "lstm", "--corpus", "coco", "--tokenizer", "word", "--no-progress"],   # preset coco-lstm
    "vae": ["vae", "--corpus", "coco", "--no-progress"],                                               # preset coco-vae
    "gan": ["gan", "--corpus", "coco", *COMMON, "--set", "max_iters=1140", "--set", "lr_decay_iters=1000",
            "--set", "n_embd=128", "--set", "n_hidden=256", "--set", "dropout=0.1", "--set", "g_pretrain_iters=1000",
            "--set", "d_pretrain_iters=100", "--set", "rollouts=2"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "generators", help="folder of mle/, vae/, gan/")
    parser.add_argument("--train", action="store_true", help="train the runs that are missing (with timeout)")
    parser.add_argument("--budget-min", type=float, default=15.0, help="--train: minutes per model (timeout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--only", default="mle,vae,gan",
                        help="score only these runs; the other rows come from --out's earlier results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    return parser.parse_args()


def train_missing(runs: Path, budget_min: float) -> None:
    import resource
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for name, args in SETTINGS.items():
        out = runs / name
        if (out / "trainer.json").exists():
            continue
        command = [sys.executable, "-m", "scratchlm", *args, "--out", str(out)]
        print(f"training {name}: timeout {budget_min:g} min: {' '.join(command[2:])}", flush=True)
        load, started = os.getloadavg()[0], time.perf_counter()
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(["nice", "-n", "10", "timeout", "-s", "INT", str(int(budget_min * 60)), *command],
                       env=env, cwd=ROOT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = {"wall_min": (time.perf_counter() - started) / 60,
                  "cpu_min": (after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime) / 60,
                  "load_average_start": load, "load_average_end": os.getloadavg()[0], "includes": "training + eval.json"}
        if out.exists():
            (out / "train_time.json").write_text(json.dumps(record, indent=1) + "\n")


def training_minutes(run: Path) -> dict:
    """{"wall": minutes, "cpu": minutes or None}: train_time.json when --train measured it, else the
    sum of ms_per_iter in metrics.jsonl (the iterations' wall time, evals excluded)."""
    timed = run / "train_time.json"
    if timed.exists():
        t = json.loads(timed.read_text())
        return {"wall": t["wall_min"], "cpu": t["cpu_min"], "load": t.get("load_average_start")}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall": sum(m["ms_per_iter"] for m in lines if m.get("kind") == "train") / 60_000, "cpu": None,
            "load": None}


def lm_row(run: Path, temperature: float, seed: int, family: str, nll: float) -> dict:
    """The test NLL (exact, computed once per run) and the scores of 1,000 samples at ``temperature``."""
    from scratchlm.commands import textgen
    from scratchlm.commands.gan import lm_samples
    model, tokenizer, header = textgen.load_run(run, family)
    references = textgen.test_sentences(header)
    samples = lm_samples(model, tokenizer, header, textgen.N_SAMPLES, temperature, seed)
    scores = textgen.sample_scores(samples, references)
    scores["bleu4_500refs"] = _bleu4_500(samples, references)
    return {"nll": nll, "nll_kind": "exact", **scores, "example": samples[:3]}


def _bleu4_500(samples, references):
    from scratchlm import metrics
    from scratchlm.commands.textgen import sample_words
    return metrics.bleu_against([sample_words(s) for s in samples if s.strip()],
                                [sample_words(r) for r in references[:500]], 4)


def real_captions_row() -> dict:
    """The 500 dev captions scored as if they were samples: what a perfect model's samples would
    score (BLEU against the test set, self-BLEU of 500), the ceiling of the sample columns."""
    from scratchlm.commands import textgen
    from scratchlm.data import load_corpus, split_documents
    splits = split_documents(load_corpus("coco"))
    scores = textgen.sample_scores(splits["val"], splits["test"])
    return {"nll": float("nan"), "nll_kind": "none", **scores, "bleu4_500refs": _bleu4_500(splits["val"], splits["test"]),
            "minutes": {"wall": 0.0, "cpu": 0.0}, "example": splits["val"][:3]}


def from_eval_json(run: Path, kind: str) -> dict:
    report = json.loads((run / "eval.json").read_text())["test"]
    samples = (run / "samples.txt").read_text(encoding="utf-8").splitlines()
    from scratchlm.commands import textgen
    header = json.loads((run / "config.json").read_text())
    report["bleu4_500refs"] = _bleu4_500(samples, textgen.test_sentences(header))
    report["nll"] = report.get("nll", report.get("nll_bound"))
    report["nll_kind"] = kind
    report["example"] = samples[:3]
    return report


def plot(rows: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    mle = [rows[f"MLE T={t}"] for t in TEMPERATURES if f"MLE T={t}" in rows]
    if mle:
        ax.plot([r["self_bleu4"] for r in mle], [r["bleu4"] for r in mle], "o-", color="C0",
                label="MLE LSTM, temperature sweep")
        for t, r in zip(TEMPERATURES, mle):
            ax.annotate(f"T={t}", (r["self_bleu4"], r["bleu4"]), textcoords="offset points", xytext=(6, -10))
    for name, marker, color in (("VAE (prior)", "s", "C1"), ("SeqGAN", "^", "C3"), ("real (dev)", "*", "k")):
        if name in rows:
            ax.plot(rows[name]["self_bleu4"], rows[name]["bleu4"], marker, color=color, markersize=9, label=name)
    for name, (b4, sb4) in TEXYGEN.items():
        if sb4 is not None:
            ax.plot(sb4, b4, marker="x", color="gray", markersize=8, linestyle="none")
            ax.annotate(f"Texygen {name}", (sb4, b4), textcoords="offset points", xytext=(-30, 6), color="gray",
                        fontsize=8)
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("self-BLEU-4 of 500 samples (lower = more diverse)")
    ax.set_ylabel("BLEU-4 against the 10,000 test captions (higher = closer to real)")
    ax.set_title("coco captions: quality against diversity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.train:
        train_missing(args.runs, args.budget_min)
    started = time.perf_counter()
    only = set(args.only.split(","))
    keep = {"mle": "MLE", "vae": "VAE", "gan": "SeqGAN"}
    earlier = json.loads(args.out.read_text())["rows"] if args.out.exists() and only != set(keep) else {}
    rows = {name: row for name, row in earlier.items()
            if not any(name.startswith(keep[k]) for k in only)}
    mle, vae, gan = (args.runs / name if name in only else Path("/nonexistent") for name in ("mle", "vae", "gan"))
    if (mle / "trainer.json").exists():
        from scratchlm.evaluate import evaluate_run
        nll = evaluate_run(mle, split="test", write=False)["loss"]
        for t in TEMPERATURES:
            rows[f"MLE T={t}"] = {**lm_row(mle, t, args.seed, "lstm", nll), "minutes": training_minutes(mle)}
    if (vae / "eval.json").exists():
        rows["VAE (prior)"] = {**from_eval_json(vae, "IW bound"), "minutes": training_minutes(vae)}
    if (gan / "eval.json").exists():
        rows["SeqGAN"] = {**from_eval_json(gan, "exact"), "minutes": training_minutes(gan)}
    if rows:
        rows["real (dev)"] = real_captions_row()
    if not rows:
        print(f"no runs in {args.runs}; pass --train to train them (about {args.budget_min:g} minutes each)")
        return 1
    head = (f"{'model':<16} {'test NLL':>10} {'BLEU-2':>7} {'BLEU-3':>7} {'BLEU-4':>7} {'BLEU-5':>7} {'sBLEU-2':>8} "
            f"{'sBLEU-3':>8} {'sBLEU-4':>8} {'sBLEU-5':>8} {'B4/500':>7} {'B4/Texygen':>10} {'wall min':>8} {'CPU min':>7}")
    print(f"coco (Texygen's captions): 1,000 samples, BLEU vs 10,000 test captions, self-BLEU of 500; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(head)
    for name, r in rows.items():
        nll = "-" if r["nll_kind"] == "none" else f"{r['nll']:.3f}" + ("*" if r["nll_kind"] != "exact" else " ")
        m = r["minutes"] if isinstance(r["minutes"], dict) else {"wall": r["minutes"]}
        cpu = f"{m['cpu']:>7.1f}" if m.get("cpu") is not None else f"{'-':>7}"
        b4_500 = f"{r['bleu4_500refs']:>7.3f}" if r.get("bleu4_500refs") is not None else f"{'-':>7}"
        print(f"{name:<16} {nll:>10} " + " ".join(f"{r[f'bleu{n}']:>7.3f}" for n in (2, 3, 4, 5)) + " " +
              " ".join(f"{r[f'self_bleu{n}']:>8.3f}" for n in (2, 3, 4, 5)) +
              f" {b4_500} {r['bleu4'] / TEXYGEN['MLE'][0]:>10.2f} {m['wall']:>8.1f} {cpu}" +
              (f"  ({r['source']})" if r.get("source") else ""))
    for name, (b4, sb4) in TEXYGEN.items():
        self_bleu4 = f"{sb4:>8.3f}" if sb4 is not None else f"{'-':>8}"
        print(f"{'Texygen ' + name:<16} {'':>10} {'':>7} {'':>7} {b4:>7.3f} {'':>7} {'':>8} {'':>8} {self_bleu4}")
    print("* the VAE's test NLL is its importance-weighted upper bound (nats per word, boundary included)")
    if "VAE (prior)" in rows:
        v = rows["VAE (prior)"]
        print(f"VAE: KL {v['kl']:.2f} nats/sentence, {v['active_units']} of {v['n_latent']} active units, "
              f"recon {v['recon_nll']:.2f} nats/sentence, bound k={v['iw_samples']}")
        if "latent" in v:
            t = v["latent"]
            print(f"VAE latent code (bench/vae_latent.py, test): greedy reconstructions of {t['reconstructions']} "
                  f"captions BLEU {t['recon_bleu']:.1f}, WER {t['recon_wer']:.2f}; {t['pairs']} random homotopies: "
                  f"ends' BLEU {t['ends_bleu']:.1f}, {t['path_distinct']:.1f} distinct sentences of {t['steps']}, "
                  f"{t['step_edits']:.1f} word edits per step")
    print(plot(rows, args.plot))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "texygen": TEXYGEN, "settings": SETTINGS,
                                    "load_average": os.getloadavg(), "seconds": time.perf_counter() - started},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
