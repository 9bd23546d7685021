"""Text classification on ``sentiment``: scratchlm's classifiers vs TF-IDF + logistic regression, same folds.

    python bench/classify.py [--folds 10] [--models bow,bilstm,transformer] [--variants plain,eda,w2v]
                             [--w2v-corpus small|large] [--w2v-extra FILE ...] [--set KEY=VALUE]
                             [--baseline-only] [--out bench/results/classify.json]

Every row is 10-fold cross-validation on the same stratified folds (``textdata.stratified_folds``,
seed 0): the exact folds ``scratchlm classify --data sentiment --folds 10`` uses.

- ``tfidf+lr`` (when scikit-learn is installed): ``TfidfVectorizer`` (unigrams; also a 1-2-gram row)
  and ``LogisticRegression(C=10)``, fitted on the nine training folds (it needs no dev slice).
- each scratchlm model with its CLI defaults (the ``sentiment-<model>`` preset), via the same code
  as ``scratchlm classify --data sentiment --model NAME --folds 10`` (``commands.classify.cross_validate``):
  ``plain``; ``eda`` = ``--augment eda``; ``w2v`` = ``--vectors`` from word2vec trained (here, once)
  on unlabelled text (``w2v_sentences``: ``--w2v-corpus large`` by default; the sentiment sentences'
  labels are never used), rescaled to the embedding's init scale (``init_embeddings_scale=match``).
  A scratchlm model trains on 95% of the training folds and selects its checkpoint on the other 5%.

Prints accuracy / precision / recall / F1 (positive class) mean +- std over folds, accuracy per
source (amazon, imdb, yelp), the ratio of each row's mean accuracy to the TF-IDF baseline's, and
the training minutes (all folds); writes the JSON to bench/results/classify.json. The default run
takes tens of minutes on 2 shared cores: ``--models bow --variants plain`` is the short one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread: these matrices are small, and on a shared machine OpenBLAS's spinning worker
# threads made the BiLSTM and Transformer steps ~10x slower in CPU time (set the variable to override).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scratchlm import textdata  # noqa: E402
from scratchlm.commands.classify import MODELS, cross_validate, score  # noqa: E402

SEED = 0


def baseline(data, folds, ngram_range=(1, 1)) -> dict:
    """TF-IDF + logistic regression on the same test folds; None without scikit-learn."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    texts = np.array(data.texts, dtype=object)
    start, per_fold, predicted = time.perf_counter(), [], np.zeros(len(texts), dtype=np.int64)
    for test in folds:
        train = np.setdiff1d(np.arange(len(texts)), test)
        vectorizer = TfidfVectorizer(ngram_range=ngram_range)
        model = LogisticRegression(C=10, max_iter=2000).fit(vectorizer.fit_transform(texts[train]), data.labels[train])
        p = model.predict_proba(vectorizer.transform(texts[test]))
        per_fold.append(score(data.labels[test], p, data.num_classes))
        predicted[test] = p.argmax(1)
    return summary(per_fold, predicted, time.perf_counter() - start)


def summary(per_fold, predicted, seconds) -> dict:
    keys = ("accuracy", "precision", "recall", "f1")
    return {"mean": {k: float(np.mean([f[k] for f in per_fold])) for k in keys},
            "std": {k: float(np.std([f[k] for f in per_fold])) for k in keys},
            "per_fold_accuracy": [f["accuracy"] for f in per_fold], "predicted": predicted.tolist(),
            "train_minutes": seconds / 60}


def w2v_sentences(corpus: str, extra=()) -> list:
    """Unlabelled sentences for word2vec. ``small``: the sentiment sentences (labels unused) and the
    shipped COCO captions (23,000 sentences, 0.27 M words). ``large``: those, the English side of
    eng-fra, CPython's pydoc topics (always there) and every ``extra`` text file, one sentence a
    line (e.g. tinyshakespeare.txt): 0.63 M words with tinyshakespeare."""
    from scratchlm.commands.word2vec import corpus_sentences
    from scratchlm.data import load_corpus
    from scratchlm.datasets import dataset_path
    lines = lambda text: [s for s in text.split("\n") if s.strip()]
    sentences = corpus_sentences("sentiment")
    for name in ("coco_captions_train.txt", "coco_captions_test.txt"):
        sentences += lines(dataset_path(name).read_text(encoding="utf-8"))
    if corpus == "large":
        sentences += [s.split("\t")[0] for s in lines(dataset_path("eng-fra-5k.tsv").read_text(encoding="utf-8"))]
        sentences += [s for s in lines(load_corpus("pydoc").text) if len(s.split()) > 3]
        for path in extra:
            sentences += lines(Path(path).read_text(encoding="utf-8"))
    return sentences


def shipped_vectors(out_dir: Path, dim: int, corpus: str = "small", extra=()) -> str:
    """word2vec (skip-gram, scratchlm's) on unlabelled text (``w2v_sentences``); returns the vectors file."""
    from scratchlm.models.word2vec import train_word2vec
    from scratchlm.tokenizers.word import split_words
    sentences = [split_words(s) for s in w2v_sentences(corpus, extra)]
    stats = train_word2vec(sentences, out_dir, progress=False, dim=dim, min_count=2, epochs=10, workers=2)
    print(f"word2vec ({corpus}): {len(sentences):,} sentences, {sum(map(len, sentences)):,} words, "
          f"{stats['vocab_size']:,} in the vocabulary, {stats['seconds']:.0f} s")
    return stats["vectors"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--models", default="bow,bilstm,transformer")
    parser.add_argument("--variants", default="plain,eda,w2v")
    parser.add_argument("--baseline-only", action="store_true")
    parser.add_argument("--w2v-corpus", choices=["small", "large"], default="large",
                        help="the unlabelled text word2vec trains on for the w2v variants (w2v_sentences)")
    parser.add_argument("--w2v-extra", nargs="*", default=[], metavar="FILE",
                        help="more unlabelled text files for --w2v-corpus large (e.g. tinyshakespeare.txt)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every scratchlm row (as scratchlm classify --set)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "classify.json"))
    args = parser.parse_args()

    data = textdata.load_labelled("sentiment")
    folds = textdata.stratified_folds(data.labels, args.folds, seed=SEED)
    groups = np.array(data.groups)
    rows = {}
    for name, ngrams in (("tfidf+lr", (1, 1)), ("tfidf+lr 1-2g", (1, 2))):
        result = baseline(data, folds, ngrams)
        if result is not None:
            rows[name] = result
    models = [] if args.baseline_only else [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    vectors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for variant in variants:
                extra = {}
                if variant == "eda":
                    extra["augment"] = "eda"
                elif variant == "w2v":
                    from scratchlm.models.registry import get_family, resolve_config
                    family = get_family(MODELS[model])
                    config, model_dict = resolve_config(family, corpus="sentiment")
                    dim = family.model_config(config, model_dict, vocab_size=2).n_embd
                    if dim not in vectors:
                        vectors[dim] = shipped_vectors(Path(tmp) / f"w2v-{dim}", dim, args.w2v_corpus, args.w2v_extra)
                    extra["vectors"] = vectors[dim]
                start = time.perf_counter()
                report = cross_validate("sentiment", model, Path(tmp) / f"{model}-{variant}", folds=args.folds,
                                        seed=SEED, log=lambda *a: None, overrides=args.set, **extra)
                predicted = np.zeros(len(data), dtype=np.int64)
                for fold in report["per_fold"]:
                    predicted[fold["test_index"]] = fold["test_predicted"]
                rows[f"{model} {variant}"] = summary(report["per_fold"], predicted, time.perf_counter() - start)
                print(f"{model} {variant}: accuracy {rows[f'{model} {variant}']['mean']['accuracy']:.4f}", flush=True)

    sources = sorted(set(groups)) if data.groups else []
    reference = rows.get("tfidf+lr", {}).get("mean", {}).get("accuracy")
    header = (f"{'model':<22}{'accuracy':>16}{'precision':>16}{'recall':>16}{'f1':>16}"
              + "".join(f"{s:>9}" for s in sources) + f"{'vs tfidf':>10}{'minutes':>9}")
    print(f"\n{args.folds}-fold CV on sentiment ({len(data)} sentences), same folds (seed {SEED}); "
          f"mean +- std over folds, per-source accuracy, ratio of mean accuracy to TF-IDF+LR")
    print(header)
    for name, row in rows.items():
        predicted = np.array(row["predicted"])
        per_source = [float(np.mean(predicted[groups == s] == data.labels[groups == s])) for s in sources]
        row["per_source_accuracy"] = dict(zip(sources, per_source))
        ratio = row["mean"]["accuracy"] / reference if reference else float("nan")
        print(f"{name:<22}" + "".join(f"{row['mean'][k]:>9.4f} +-{row['std'][k]:.3f}"
                                      for k in ("accuracy", "precision", "recall", "f1"))
              + "".join(f"{a:>9.4f}" for a in per_source) + f"{ratio:>10.3f}{row['train_minutes']:>9.1f}")
    for row in rows.values():
        row.pop("predicted")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "load_average": os.getloadavg()},
                               "folds": args.folds, "seed": SEED, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
