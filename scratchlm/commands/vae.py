"""``scratchlm vae``: train a sentence VAE (scratchlm.models.vae) and use it.

    scratchlm vae --corpus coco --out runs/vae [--set n_latent=32 --set kl_anneal=linear ...]
    scratchlm vae --run runs/vae --sample 10
    scratchlm vae --run runs/vae --reconstruct "a man riding a horse on a beach."
    scratchlm vae --run runs/vae --interpolate "a cat sleeping on a bed." "two men playing frisbee in a park."

Training is ``scratchlm train --model vae`` (the one Trainer; metrics.jsonl has recon, kl and
kl_weight on every train line). At the end it writes DIR/samples.txt (1,000 prior samples) and
DIR/eval.json: on the test split, reconstruction NLL and KL per sentence, the importance-weighted
bound on NLL (k = --iw-samples) per token and its perplexity, the active units, and the samples'
BLEU-2..5 / self-BLEU-2..5 (Texygen's protocol), and under "latent" how much of a test sentence
its code carries (``latent_checks``: reconstructions of 200 test captions, 50 random homotopies).
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from scratchlm.commands import textgen
from scratchlm.errors import UserError

USES = ("--sample N", "--reconstruct SENTENCE", "--interpolate A B")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "vae", help="train a sentence VAE (--corpus coco --out DIR) or sample/reconstruct/interpolate (--run DIR)",
        description="Train a sentence variational autoencoder on one-sentence-per-line text with the shared "
                    "trainer, or use a trained run: prior samples, reconstructions, latent interpolations.")
    textgen.add_training_arguments(p, "vae", "train: a registered corpus (coco) or a file, one sentence a line")
    p.add_argument("--run", metavar="DIR", help="use the VAE in DIR")
    p.add_argument("--sample", type=int, metavar="N", help="print N sentences decoded from z ~ N(0, I)")
    p.add_argument("--reconstruct", metavar="SENTENCE", help="print the greedy decoding of the sentence's mu")
    p.add_argument("--interpolate", nargs="+", metavar="SENTENCE",
                   help="two sentences: print the decodings along the line between their mu")
    p.add_argument("--steps", type=int, default=7, metavar="K", help="--interpolate: points, ends included (default 7)")
    p.add_argument("--temperature", type=float, default=1.0, help="--sample: softmax temperature (default 1)")
    p.add_argument("--iw-samples", type=int, default=5, metavar="K",
                   help="train: samples of the importance-weighted bound in eval.json (default 5)")
    p.set_defaults(func=cmd_vae)


def cmd_vae(args) -> int:
    mode = textgen.check_mode(args, "vae", USES)
    if args.iw_samples < 1 or args.steps < 2:
        raise UserError("--iw-samples must be >= 1 and --steps >= 2")
    if mode == "train":
        run_dir = textgen.train(args, "vae")
        report = write_vae_report(run_dir, args.iw_samples, seed=args.seed)
        print(f"test: KL {report['kl']:.2f} nats/sentence, {report['active_units']} active units, NLL bound "
              f"{report['nll_bound']:.4f}/token (perplexity {report['perplexity']:.1f}), BLEU-4 "
              f"{report['bleu4']:.3f}, self-BLEU-4 {report['self_bleu4']:.3f}; reconstruction BLEU "
              f"{report['latent']['recon_bleu']:.1f}, {report['latent']['path_distinct']:.1f} distinct sentences "
              f"per interpolation; wrote {run_dir}/eval.json, samples.txt")
        return 0
    chosen = [flag for flag, value in (("--sample", args.sample), ("--reconstruct", args.reconstruct),
                                       ("--interpolate", args.interpolate)) if value is not None]
    if len(chosen) != 1:
        raise UserError(f"with --run give exactly one of {', '.join(USES)}" +
                        (f" (got {' and '.join(chosen)})" if chosen else ""))
    model, tokenizer, _ = textgen.load_run(args.run, "vae")
    b = textgen.boundary_id(tokenizer)
    if args.sample is not None:
        if args.sample < 1:
            raise UserError(f"--sample needs a positive number of sentences, got {args.sample}")
        rows = model.sample(args.sample, b, temperature=args.temperature, seed=args.seed)
    elif args.reconstruct is not None:
        rows = model.reconstruct(textgen.encode_sentences(tokenizer, [args.reconstruct], "--reconstruct")[1], b)
    else:
        if len(args.interpolate) != 2:
            raise UserError(f"--interpolate needs two sentences, got {len(args.interpolate)}: "
                            f"--interpolate \"a cat on a bed.\" \"two men in a park.\"")
        rows = model.interpolate(textgen.encode_sentences(tokenizer, args.interpolate, "--interpolate")[1], b,
                                 steps=args.steps)
    for ids in rows:
        sys.stdout.write(tokenizer.decode(ids) + "\n")
    return 0


def score_split(model, sentences, tokenizer, k: int, seed: int = 0, batch_size: int = 250) -> dict:
    """The VAE's figures over sentences (every one once): recon and KL per sentence, the k-sample
    importance-weighted bound per token and its perplexity, active units (Var of mu >= 0.01)."""
    from scratchlm.models.vae import active_units
    from scratchlm.tasks import IGNORE_INDEX, documents_task, trim_padding
    task = documents_task({"test": sentences}, tokenizer)
    x, y = task.padded("test", task.longest)
    # shortest first, each batch without its trailing padding: the same figures (sums and a variance
    # over all sentences) for about a third of the work of padding every batch to the longest
    order = np.argsort((y != IGNORE_INDEX).sum(axis=1), kind="stable")
    x, y = x[order], y[order]
    totals, mus = {"recon": 0.0, "kl": 0.0, "iw_bound": 0.0, "tokens": 0}, []
    for start in range(0, len(x), batch_size):
        xb, yb = trim_padding((x[start:start + batch_size], y[start:start + batch_size]))
        scores = model.sentence_scores(xb, yb, k=k, seed=seed + start)
        for key in totals:
            totals[key] += float(np.sum(scores[key]))
        mus.append(scores["mu"])
    n, tokens = len(x), totals["tokens"]
    return {"sentences": n, "tokens": int(tokens), "recon_nll": totals["recon"] / n, "kl": totals["kl"] / n,
            "iw_samples": k, "nll_bound_per_sentence": totals["iw_bound"] / n, "nll_bound": totals["iw_bound"] / tokens,
            "perplexity": math.exp(min(totals["iw_bound"] / tokens, 700.0)),
            "active_units": active_units(np.concatenate(mus)), "n_latent": model.config.n_latent}


def word_edits(a, b) -> int:
    """Levenshtein distance between two word (or id) sequences: insertions, deletions, substitutions."""
    row = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, wb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (wa != wb))
    return row[-1]


def latent_checks(model, tokenizer, sentences, reconstructions: int = 200, pairs: int = 50, steps: int = 7,
                  seed: int = 0) -> dict:
    """How much of a held-out sentence its latent code carries, measured on ``sentences``:

    - reconstruction: greedy decodings of the posterior means of ``reconstructions`` sentences
      (drawn by ``seed``) against the sentences themselves: corpus BLEU (sacrebleu's defaults),
      word error rate (word edits / reference words) and the exact-match fraction;
    - interpolation: for ``pairs`` random pairs (drawn by ``seed``, after the reconstructions'), the
      homotopy of ``steps`` points z_t = (1 - t) mu_a + t mu_b decoded greedily: the endpoints'
      sentence BLEU to their own sentences (mean of both ends), the distinct sentences along the
      path (1 = the path never moves), the word edits between consecutive steps (mean and the
      largest step, which is the whole A -> B distance when the path jumps at once), the largest
      step's share of the distance between the path's two ends (1 = one jump; 1 / (steps - 1) =
      even steps; over pairs whose ends differ), and the share of pairs whose path passes through
      at least one sentence that is neither end's decoding.
    Returns the figures and the pairs' paths (texts) under "paths"."""
    from scratchlm import metrics
    b, rng = textgen.boundary_id(tokenizer), np.random.default_rng(seed)
    chosen = rng.choice(len(sentences), reconstructions + 2 * pairs, replace=False)
    picked = [sentences[i] for i in chosen]
    ids = [tokenizer.encode(s) for s in picked]
    mu = np.concatenate([model.posterior_mean(textgen.encode_sentences(tokenizer, picked[i:i + 100], "check")[1])
                         for i in range(0, len(picked), 100)])                             # (N, D)
    recon = model.decode_z(mu[:reconstructions], b, temperature=0)
    texts = [tokenizer.decode(r) for r in recon]
    edits = sum(word_edits(r, w) for r, w in zip(recon, ids[:reconstructions]))
    out = {"reconstructions": reconstructions, "recon_bleu": metrics.bleu(texts, picked[:reconstructions]),
           "recon_wer": edits / sum(len(w) for w in ids[:reconstructions]),
           "recon_exact": float(np.mean([r == w for r, w in zip(recon, ids[:reconstructions])]))}
    t = np.linspace(0.0, 1.0, steps)[:, None, None]                                       # (S, 1, 1)
    a, z = mu[reconstructions::2], mu[reconstructions + 1::2]                               # (P, D) x2
    path_ids = model.decode_z(((1 - t) * a + t * z).transpose(1, 0, 2).reshape(-1, mu.shape[1]), b, temperature=0)
    paths = [path_ids[p * steps:(p + 1) * steps] for p in range(pairs)]
    ends_bleu, distinct, step_edits, largest, share, passes = [], [], [], [], [], []
    for p, path in enumerate(paths):
        source, target = picked[reconstructions + 2 * p], picked[reconstructions + 2 * p + 1]
        ends_bleu += [metrics.sentence_bleu(tokenizer.decode(path[0]), source),
                      metrics.sentence_bleu(tokenizer.decode(path[-1]), target)]
        distinct.append(len({tuple(s) for s in path}))
        moves = [word_edits(u, v) for u, v in zip(path, path[1:])]
        step_edits.append(np.mean(moves))
        largest.append(max(moves))
        if path[0] != path[-1]:
            share.append(max(moves) / word_edits(path[0], path[-1]))
        passes.append(any(s != path[0] and s != path[-1] for s in path))
    out.update({"pairs": pairs, "steps": steps, "ends_bleu": float(np.mean(ends_bleu)),
                "path_distinct": float(np.mean(distinct)), "step_edits": float(np.mean(step_edits)),
                "largest_step_edits": float(np.mean(largest)),
                "largest_step_share": float(np.mean(share)) if share else float("nan"), "paths_with_middle": float(np.mean(passes)),
                "paths": [{"a": picked[reconstructions + 2 * p], "b": picked[reconstructions + 2 * p + 1],
                           "path": [tokenizer.decode(s) for s in path]} for p, path in enumerate(paths)]})
    return out


def write_vae_report(run_dir, k: int, seed: int = 0) -> dict:
    started = time.perf_counter()
    model, tokenizer, header = textgen.load_run(run_dir, "vae")
    references = textgen.test_sentences(header)
    report = score_split(model, references, tokenizer, k, seed=seed)
    samples = [tokenizer.decode(ids) for ids in
               model.sample(textgen.N_SAMPLES, textgen.boundary_id(tokenizer), seed=seed)]
    report.update(textgen.sample_scores(samples, references))
    report["latent"] = latent_checks(model, tokenizer, references, seed=seed)
    report["eval_seconds"] = time.perf_counter() - started
    textgen.write_report(run_dir, report, samples)
    return report
