"""word2vec: training speed and the agreement of the two spaces, scratchlm vs gensim, same settings.

    python bench/word2vec.py [--corpus shipped|PATH] [--model skipgram|cbow] [--epochs 5] [--workers 2]
                             [--repeats 3] [--top 200] [--skip-top 0]

Corpus ``shipped`` (default): the text that ships with scratchlm, one sentence per line -- COCO
captions (train + test), the sentiment sentences, and the distinct English sentences of eng-fra-5k;
or a text file (e.g. ../shared/corpora/tinyshakespeare.txt), one sentence per line. Both libraries get
the same token lists (scratchlm's word tokenizer: lowercase, punctuation split off) and the same
settings: skip-gram (``--model cbow``: CBOW, mean of the context), negative=5, window=5,
vector_size=100, min_count=5, sample=1e-3, alpha 0.025 -> 0.0001, ``--epochs``, ``--workers`` threads.

Speed: words/s = raw corpus words x epochs / training seconds (vocabulary built beforehand, outside
the timing, for both; our time includes turning the token lists into ids, gensim's its own lookups),
the median of ``--repeats`` runs, the two libraries interleaved so machine load hits both alike.
Words per CPU-second (process time, all threads) is printed too: on a shared machine it measures the
work each library needs, whatever share of the cores it got.

Agreement: the cosine similarity of every pair of the ``--top`` most frequent words is computed in
each space, and the two lists are compared by Spearman rank correlation; also the mean overlap of
the top-10 neighbour lists over the same words. Two runs of the same library with different seeds
give the ceiling to read these against (ours vs ours, gensim vs gensim). A few neighbour lists are
printed side by side. Prints a table and writes bench/results/word2vec.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scratchlm.datasets import dataset_path                       # noqa: E402
from scratchlm.models.word2vec import Word2Vec, most_similar, to_sentences   # noqa: E402

SETTINGS = dict(window=5, negative=5, dim=100, min_count=5, sample=1e-3, alpha=0.025, min_alpha=0.0001)
PROBE_WORDS = ["dog", "red", "good", "great", "man", "food", "king", "love", "kitchen", "movie",
               "street", "water"]


def shipped_corpus() -> str:
    parts = [dataset_path("coco_captions_train.txt").read_text(encoding="utf-8"),
             dataset_path("coco_captions_test.txt").read_text(encoding="utf-8")]
    sentiment = dataset_path("sentiment_sentences.tsv").read_text(encoding="utf-8")
    parts.append("\n".join(line.split("\t")[0] for line in sentiment.split("\n") if line))
    english = [line.split("\t")[0] for line in
               dataset_path("eng-fra-5k.tsv").read_text(encoding="utf-8").split("\n") if line]
    parts.append("\n".join(dict.fromkeys(english)))           # distinct, in order
    return "\n".join(parts)


def train_ours(sentences, epochs, workers, seed, kind="skipgram"):
    model = Word2Vec(model=kind, epochs=epochs, workers=workers, seed=seed, **SETTINGS)
    model.build_vocab(sentences)
    start, cpu = time.perf_counter(), time.process_time()
    model.train(sentences, progress=False)
    return model.words, model.syn0.copy(), time.perf_counter() - start, time.process_time() - cpu


def train_gensim(sentences, epochs, workers, seed, kind="skipgram"):
    from gensim.models import Word2Vec as GensimWord2Vec
    model = GensimWord2Vec(sg=int(kind == "skipgram"), hs=0, cbow_mean=1,
                           vector_size=SETTINGS["dim"], window=SETTINGS["window"],
                           negative=SETTINGS["negative"], min_count=SETTINGS["min_count"],
                           sample=SETTINGS["sample"], alpha=SETTINGS["alpha"],
                           min_alpha=SETTINGS["min_alpha"], workers=workers, seed=seed)
    model.build_vocab(sentences)
    start, cpu = time.perf_counter(), time.process_time()
    model.train(sentences, total_examples=len(sentences), epochs=epochs)
    return (list(model.wv.index_to_key), model.wv.vectors.copy(), time.perf_counter() - start,
            time.process_time() - cpu)


def unit_rows(words, vectors, chosen):
    index = {w: i for i, w in enumerate(words)}
    rows = vectors[[index[w] for w in chosen]].astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def spearman(a, b) -> float:
    try:
        from scipy.stats import spearmanr
        return float(spearmanr(a, b).statistic)
    except ImportError:           # ranks by argsort (cosine ties have probability ~0)
        ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
        return float(np.corrcoef(ra, rb)[0, 1])


def agreement(space_a, space_b, top_words):
    """Spearman of pairwise cosines over top_words, and mean top-10 neighbour overlap (0..1)."""
    ua, ub = unit_rows(*space_a, top_words), unit_rows(*space_b, top_words)
    upper = np.triu_indices(len(top_words), k=1)
    rho = spearman((ua @ ua.T)[upper], (ub @ ub.T)[upper])
    full_a = space_a[1] / np.linalg.norm(space_a[1], axis=1, keepdims=True)
    full_b = space_b[1] / np.linalg.norm(space_b[1], axis=1, keepdims=True)
    index_a = {w: i for i, w in enumerate(space_a[0])}
    index_b = {w: i for i, w in enumerate(space_b[0])}
    overlaps = []
    for w in top_words[:100]:
        na = {x for x, _ in most_similar(space_a[0], full_a, full_a[index_a[w]], 10, exclude=w)}
        nb = {x for x, _ in most_similar(space_b[0], full_b, full_b[index_b[w]], 10, exclude=w)}
        overlaps.append(len(na & nb) / 10)
    return rho, float(np.mean(overlaps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="shipped", help="'shipped' or a text file, one sentence per line")
    parser.add_argument("--model", choices=["skipgram", "cbow"], default="skipgram")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=200, help="frequent words whose pairs are compared")
    parser.add_argument("--skip-top", type=int, default=0, help="leave out the N most frequent words")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "word2vec.json"))
    args = parser.parse_args(argv)

    text = shipped_corpus() if args.corpus == "shipped" else Path(args.corpus).read_text(encoding="utf-8")
    sentences = to_sentences(text)
    raw_words = sum(len(s) for s in sentences)
    try:
        import gensim
        gensim_version = gensim.__version__
    except ImportError:
        gensim_version = None
    print(f"corpus {args.corpus}: {len(sentences):,} sentences, {raw_words:,} words; epochs {args.epochs}, "
          f"workers {args.workers}, {os.cpu_count()} CPUs; gensim {gensim_version or 'not installed'}")
    print(f"settings: {args.model}, " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()))

    # Warm-up: load (or compile) the Numba kernel outside the timing.
    train_ours(sentences[:200], 1, args.workers, 0)

    ours, theirs = [], []
    for r in range(args.repeats):
        ours.append(train_ours(sentences, args.epochs, args.workers, 1 + r, args.model))
        if gensim_version:
            theirs.append(train_gensim(sentences, args.epochs, args.workers, 1 + r, args.model))
        print(f"  repeat {r + 1}: ours {ours[-1][2]:.2f} s ({ours[-1][3]:.2f} CPU s)" +
              (f", gensim {theirs[-1][2]:.2f} s ({theirs[-1][3]:.2f} CPU s)" if theirs else ""))

    work = raw_words * args.epochs
    ours_wps = [work / run[2] for run in ours]
    ours_cpu = [work / run[3] for run in ours]
    result = {"model": args.model, "corpus": args.corpus, "sentences": len(sentences), "raw_words": raw_words,
              "epochs": args.epochs, "workers": args.workers, "settings": SETTINGS, "repeats": args.repeats,
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "gensim": gensim_version, "ours_words_per_s": ours_wps,
              "ours_median_words_per_s": statistics.median(ours_wps),
              "ours_words_per_cpu_s": ours_cpu, "ours_median_words_per_cpu_s": statistics.median(ours_cpu),
              "vocab_size": len(ours[0][0])}
    header = f"{'':<22} {'scratchlm':>12} {'gensim':>12} {'ours/gensim':>12}"
    rows = [("words/s (median)", f"{result['ours_median_words_per_s']:>12,.0f}"),
            ("words/CPU-s (median)", f"{result['ours_median_words_per_cpu_s']:>12,.0f}")]
    if gensim_version:
        theirs_wps = [work / run[2] for run in theirs]
        theirs_cpu = [work / run[3] for run in theirs]
        result["gensim_words_per_s"] = theirs_wps
        result["gensim_median_words_per_s"] = statistics.median(theirs_wps)
        result["gensim_words_per_cpu_s"] = theirs_cpu
        result["gensim_median_words_per_cpu_s"] = statistics.median(theirs_cpu)
        result["speed_ratio"] = result["ours_median_words_per_s"] / result["gensim_median_words_per_s"]
        result["cpu_speed_ratio"] = (result["ours_median_words_per_cpu_s"]
                                     / result["gensim_median_words_per_cpu_s"])
        common = [w for w in ours[0][0] if w in set(theirs[0][0])]
        top = common[args.skip_top:args.skip_top + args.top]
        rho, overlap = agreement(ours[0][:2], theirs[0][:2], top)
        rho_oo, overlap_oo = agreement(ours[0][:2], ours[1][:2], top) if len(ours) > 1 else (None, None)
        rho_gg, overlap_gg = agreement(theirs[0][:2], theirs[1][:2], top) if len(theirs) > 1 else (None, None)
        result.update({"compared_words": len(top), "spearman_ours_vs_gensim": rho,
                       "top10_overlap_ours_vs_gensim": overlap, "spearman_ours_vs_ours": rho_oo,
                       "top10_overlap_ours_vs_ours": overlap_oo, "spearman_gensim_vs_gensim": rho_gg,
                       "top10_overlap_gensim_vs_gensim": overlap_gg})
        rows = [("words/s (median)", f"{result['ours_median_words_per_s']:>12,.0f} "
                 f"{result['gensim_median_words_per_s']:>12,.0f} {result['speed_ratio']:>12.2f}"),
                ("words/CPU-s (median)", f"{result['ours_median_words_per_cpu_s']:>12,.0f} "
                 f"{result['gensim_median_words_per_cpu_s']:>12,.0f} {result['cpu_speed_ratio']:>12.2f}")]
        fmt = lambda x: f"{x:>12.3f}" if x is not None else f"{'-':>12}"   # noqa: E731
        rows.append((f"Spearman, {len(top)} words", f"{fmt(rho)} (ours vs gensim)"))
        rows.append(("  same library, 2 seeds", f"{fmt(rho_oo)} {fmt(rho_gg)}"))
        rows.append(("top-10 overlap", f"{fmt(overlap)} (ours vs gensim)"))
        rows.append(("  same library, 2 seeds", f"{fmt(overlap_oo)} {fmt(overlap_gg)}"))
    print()
    print(header)
    print("-" * len(header))
    for name, values in rows:
        print(f"{name:<22} {values}")

    neighbours = {}
    ow, ov = ours[0][:2]
    ounit = ov / np.linalg.norm(ov, axis=1, keepdims=True)
    oindex = {w: i for i, w in enumerate(ow)}
    if gensim_version:
        gw, gv = theirs[0][:2]
        gunit = gv / np.linalg.norm(gv, axis=1, keepdims=True)
        gindex = {w: i for i, w in enumerate(gw)}
    print()
    for word in [w for w in PROBE_WORDS if w in oindex][:6]:
        mine = [x for x, _ in most_similar(ow, ounit, ounit[oindex[word]], 6, exclude=word)]
        neighbours[word] = {"scratchlm": mine}
        line = f"{word:>8}: ours   {' '.join(mine)}"
        if gensim_version and word in gindex:
            other = [x for x, _ in most_similar(gw, gunit, gunit[gindex[word]], 6, exclude=word)]
            neighbours[word]["gensim"] = other
            line += f"\n{'':>8}  gensim {' '.join(other)}"
        print(line)
    result["neighbours"] = neighbours

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
