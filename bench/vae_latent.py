"""How much of a held-out sentence a sentence VAE's latent code carries: reconstructions and
interpolations of trained runs (scratchlm vae --corpus coco --out DIR), side by side.

    python bench/vae_latent.py runs/vae-old runs/vae --split val            # choose settings on the dev slice
    python bench/vae_latent.py runs/vae-old runs/vae --split test --show 3  # report on the test split

For each run, on sentences drawn by --seed from the split (never the training captions):
- reconstruction of --recon sentences: greedy decoding of the posterior mean, scored against the
  sentence itself: corpus BLEU (sacrebleu's defaults), word error rate, exact matches;
- interpolation of --pairs random pairs (Bowman et al.'s homotopy between posterior means,
  --steps points): endpoints' BLEU to their own sentences, distinct sentences along the path,
  word edits per step (mean; and the largest step: a path that jumps at once has
  largest = the whole A -> B distance and mean = largest / (steps - 1)), and the share of paths
  with a middle sentence that is neither end's decoding; "share" is the largest step's share of
  the distance between the path's ends (1 = one jump, 1/6 = even steps of a 7-point path).
The figures are scratchlm.commands.vae.latent_checks. --show N prints the first N pairs' paths of
each run (the pairs are the seed's draw, the same for every run: not chosen by their look).
Writes bench/results/vae_latent.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results" / "vae_latent.json"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="VAE run folders")
    parser.add_argument("--split", choices=["val", "test"], default="val",
                        help="val: the dev slice (500 captions carved from train; for choosing settings); test: report")
    parser.add_argument("--recon", type=int, default=200, help="sentences reconstructed (default 200)")
    parser.add_argument("--pairs", type=int, default=50, help="random pairs interpolated (default 50)")
    parser.add_argument("--steps", type=int, default=7, help="points per interpolation, ends included (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="draws the sentences and the pairs")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print the first N paths of each run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from scratchlm.commands import textgen
    from scratchlm.commands.vae import latent_checks
    from scratchlm.data import load_corpus, split_documents
    started, rows, split = time.perf_counter(), {}, None
    for run in args.runs:
        model, tokenizer, header = textgen.load_run(run, "vae")
        split = split or split_documents(load_corpus(header["data"]["corpus"]))[args.split]
        rows[str(run)] = latent_checks(model, tokenizer, split, args.recon, args.pairs, args.steps, args.seed)
        ev = run / "eval.json"
        if ev.exists():
            rows[str(run)]["eval"] = {k: v for k, v in json.loads(ev.read_text())["test"].items()
                                      if k in ("kl", "active_units", "n_latent", "recon_nll", "nll_bound", "bleu4",
                                               "self_bleu4")}
    print(f"split {args.split} ({len(split)} sentences): {args.recon} reconstructions, {args.pairs} pairs x "
          f"{args.steps} steps, seed {args.seed}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'run':<28} {'rec BLEU':>8} {'rec WER':>7} {'exact':>6} {'ends BLEU':>9} {'distinct':>8} "
          f"{'edits/step':>10} {'max step':>8} {'share':>5} {'middle':>6} {'KL':>6} {'AU':>5} {'B4 prior':>8} {'sB4':>6}")
    for name, r in rows.items():
        e = r.get("eval", {})
        tail = (f" {e['kl']:>6.2f} {e['active_units']:>2}/{e['n_latent']:<2} {e['bleu4']:>8.3f} {e['self_bleu4']:>6.3f}"
                if e else "")
        print(f"{Path(name).name[:28]:<28} {r['recon_bleu']:>8.1f} {r['recon_wer']:>7.3f} {r['recon_exact']:>6.2f} "
              f"{r['ends_bleu']:>9.1f} {r['path_distinct']:>8.2f} {r['step_edits']:>10.2f} "
              f"{r['largest_step_edits']:>8.2f} {r['largest_step_share']:>5.2f} {r['paths_with_middle']:>6.2f}" + tail)
    print("rec: greedy decoding of mu vs the sentence; ends BLEU: sentence BLEU of the path's ends to A and B; "
          "distinct: sentences on a path; share: largest step / ends' distance; middle: share of paths with a sentence neither end's; KL (nats/sentence), "
          "AU (active units), B4 prior / sB4 (prior samples' BLEU-4 / self-BLEU-4) from the run's eval.json (test)")
    for name, r in rows.items():
        for p in r["paths"][:args.show]:
            print(f"\n{Path(name).name}: A = {p['a']!r}\n{'':>{len(Path(name).name) + 2}}B = {p['b']!r}")
            for i, s in enumerate(p["path"]):
                print(f"  t={i / (args.steps - 1):.2f}  {s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": args.split, "rows": rows, "seconds": time.perf_counter() - started,
                                    "load_average": os.getloadavg()}, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
