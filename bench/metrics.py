"""Texygen BLEU-n and self-BLEU: scratchlm.metrics (precomputed clips) vs NLTK's per-sample loop.

    python bench/metrics.py [--samples 1000] [--references 10000] [--nltk-subset 5] [--n 4]

Samples are the first ``--samples`` coco training captions, references the coco test captions
(Texygen's data, shipped in scratchlm.datasets), whitespace-tokenised. scratchlm scores all
samples; NLTK's ``sentence_bleu`` (method 1 smoothing, uniform weights), which rescans every
reference for every sample, scores the first ``--nltk-subset`` samples, and its time is scaled
to the full sample count. The subset's values are checked equal (1e-9) before anything is timed.
Prints a table and writes bench/results/metrics.json; times are medians of ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is called metrics.py: keep its folder off the path so no "import metrics" finds it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from scratchlm import metrics                    # noqa: E402
from scratchlm.datasets import dataset_path      # noqa: E402


def median_time(repeats, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--references", type=int, default=10000)
    ap.add_argument("--nltk-subset", type=int, default=5)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    samples = dataset_path("coco_captions_train.txt").read_text(encoding="utf-8").splitlines()[:args.samples]
    references = dataset_path("coco_captions_test.txt").read_text(encoding="utf-8").splitlines()[:args.references]
    n, k = args.n, args.nltk_subset
    rows = []

    t_ours, ours = median_time(args.repeats, lambda: metrics.bleu_against(samples, references, n))
    rows.append({"metric": f"BLEU-{n} vs refs", "value": ours, "scratchlm_s": t_ours})
    t_self, self_ = median_time(args.repeats, lambda: metrics.self_bleu(samples, n))
    rows.append({"metric": f"self-BLEU-{n}", "value": self_, "scratchlm_s": t_self})

    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    except ImportError:
        print("nltk is not installed: scratchlm times only")
    else:
        smooth, weights = SmoothingFunction().method1, (1.0 / n,) * n
        s_tok, r_tok = [s.split() for s in samples], [r.split() for r in references]
        # the same values on the subset first: a fast wrong answer is not a speed-up
        for i in range(k):
            theirs = sentence_bleu(r_tok, s_tok[i], weights, smoothing_function=smooth)
            assert abs(metrics.bleu_against([samples[i]], references, n) - theirs) < 1e-9
        t, _ = median_time(1, lambda: [sentence_bleu(r_tok, s, weights, smoothing_function=smooth)
                                       for s in s_tok[:k]])
        rows[0]["nltk_s"] = t * len(samples) / k
        t, _ = median_time(1, lambda: [sentence_bleu(s_tok[:i] + s_tok[i + 1:], s_tok[i], weights,
                                                     smoothing_function=smooth) for i in range(k)])
        rows[1]["nltk_s"] = t * len(samples) / k

    print(f"{len(samples)} coco samples, {len(references)} references, n = {n}; "
          f"NLTK timed on {k} samples and scaled\n")
    print(f"{'metric':<18}{'value':>9}{'scratchlm s':>14}{'nltk s':>12}{'speed-up':>10}")
    for r in rows:
        nltk_s = r.get("nltk_s")
        extra = f"{nltk_s:>12.1f}{nltk_s / r['scratchlm_s']:>9.0f}x" if nltk_s else ""
        print(f"{r['metric']:<18}{r['value']:>9.4f}{r['scratchlm_s']:>14.3f}{extra}")
    out = REPO / "bench" / "results" / "metrics.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
