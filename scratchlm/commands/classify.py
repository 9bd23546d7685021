"""``scratchlm classify``: train and cross-validate a text classifier, or label new text with one.

    scratchlm classify --data sentiment --model bilstm --out runs/sent            # 10-fold CV
    scratchlm classify --data sentiment --model bow --folds 1 --out runs/sent-bow  # one split, a saved model
    scratchlm classify --run runs/sent-bow "the food was great"                   # label and probability
    scratchlm classify --run runs/sent "the food was great"                       # the 10 fold models' mean
    scratchlm classify --data reviews.tsv --model bow --augment eda --vectors w2v/vectors.txt --out runs/r

k-fold cross-validation (``--folds K``, default 10): the folds are stratified and drawn from a
fixed seed (``scratchlm.textdata.cross_validation_splits``), so every model sees the same folds.
Each fold is one ordinary training run (the one Trainer: checkpoints, metrics.jsonl, loss.png) in
``DIR/fold-01`` ... ``DIR/fold-K``: its vocabulary is built from its training examples only, model
selection keeps the weights of the eval with the best accuracy on a dev slice carved from the
training folds (``best.safetensors``; ``--dev-fraction``, default 5% of them: on ``sentiment`` a
10% slice cost 0.8 points of bow accuracy, the examples being worth more in training than in
selection), and those weights are scored once on the held-out fold.
``DIR/eval.json`` holds every fold's accuracy, precision, recall and F1 (binary, positive = the
second label, for two classes; macro averages for more) and their mean and standard deviation
(over folds, ddof=0). ``--folds 1``: one stratified train/dev/test split (85/5/10) in DIR itself,
a saved model that ``--run DIR`` loads. ``--run`` on a cross-validation folder labels text with
the mean probability of its K fold models.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

from scratchlm.errors import UserError

METRICS = ("accuracy", "precision", "recall", "f1")
DEV_FRACTION = 0.05
# --model NAME -> the registry's family (scratchlm.models.registry; "transformer" alone would read as an LM there)
MODELS = {"bow": "bow", "bilstm": "bilstm", "transformer": "transformer-classifier"}


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="train and cross-validate a text classifier, or label text with one",
                              description="Cross-validate a classifier on labelled sentences (stratified k-fold, "
                                          "fixed seed), or train one on a single split (--folds 1), or label "
                                          "text with a saved one (--run DIR).")
    p.add_argument("text", nargs="*", help="with --run: texts to label (default: one per line from stdin)")
    p.add_argument("--data", metavar="sentiment|PATH", help="the shipped 'sentiment' set or a text<TAB>label "
                                                           ".tsv / .csv file")
    p.add_argument("--model", choices=list(MODELS), default="bilstm", help="default bilstm")
    p.add_argument("--folds", type=int, default=10, metavar="K", help="folds of cross-validation (default 10; "
                                                                     "1 = one train/dev/test split and a saved model)")
    p.add_argument("--augment", choices=["none", "eda"], default="none",
                   help="eda: random deletion/swap/insertion/replacement on training batches (default none)")
    p.add_argument("--vectors", metavar="FILE", help="word2vec text file to start the embeddings from "
                                                     "(= --set init_embeddings=FILE), rescaled to the "
                                                     "embedding's init scale (--set init_embeddings_scale=raw: "
                                                     "as read; --set freeze_embeddings=true: never updated)")
    p.add_argument("--min-count", type=int, default=1, metavar="N",
                   help="words seen fewer times in a fold's training text map to <unk> (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the folds (default 0)")
    p.add_argument("--dev-fraction", type=float, default=DEV_FRACTION, metavar="F",
                   help=f"share of each fold's training examples held out for model selection (default {DEV_FRACTION})")
    p.add_argument("--preset", metavar="NAME", help="default: sentiment-<model>")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (model or training), e.g. --set n_embd=128 "
                        "or --set class_weights=balanced")
    p.add_argument("--out", metavar="DIR", help="the folder for the runs and eval.json")
    p.add_argument("--run", metavar="DIR", help="label text with the model saved in DIR (--folds 1 runs)")
    p.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="per-iteration lines for every fold")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args) -> int:
    if args.run:
        return _label(args)
    if not args.data or not args.out:
        raise UserError("classify needs --data sentiment|PATH and --out DIR (or --run DIR to label text)")
    if args.text:
        raise UserError(f"texts to label ({args.text[0]!r}) need --run DIR, not --data")
    cross_validate(args.data, args.model, Path(args.out), folds=args.folds, augment=args.augment,
                   vectors=args.vectors, overrides=args.set, preset=args.preset, min_count=args.min_count,
                   seed=args.seed, dev_fraction=args.dev_fraction, progress=args.progress)
    return 0


# ================================================================ cross-validation

def _writing(out: Path, validate):
    """The run-folder guard (scratchlm.runguard) where it exists; else the same checks, unlocked."""
    try:
        from scratchlm.runguard import open_run_for_writing
    except ImportError:
        open_run_for_writing = None
    if open_run_for_writing is not None:
        return open_run_for_writing(out, resume=False, validate=validate)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder")
    validate()
    out.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(out)


def cross_validate(data_name, model: str, out: Path, folds: int = 10, augment: str = "none", vectors=None,
                   overrides=(), preset=None, min_count: int = 1, seed: int = 0, dev_fraction: float = DEV_FRACTION,
                   progress=None, log=print) -> dict:
    """Train one run per fold (``folds`` >= 2) or one run in ``out`` (``folds`` == 1); returns eval.json."""
    from scratchlm import textdata
    from scratchlm.models.registry import get_family, resolve_config
    from scratchlm.tokenizers.word import split_words
    family = get_family(MODELS.get(model, model))
    if family.data != "classify":
        raise UserError(f"model {model} is not a classifier; choose bow, bilstm or transformer")
    if folds < 1:
        raise UserError(f"--folds must be >= 1, got {folds}")
    if min_count < 1:
        raise UserError(f"--min-count must be >= 1, got {min_count}")
    data = textdata.load_labelled(data_name)
    overrides = list(overrides) + ([f"init_embeddings={vectors}"] if vectors else [])
    balanced = any(p.replace(" ", "") in ("class_weights=balanced", "model.class_weights=balanced") for p in overrides)
    overrides = [p for p in overrides if p.replace(" ", "") not in ("class_weights=balanced",
                                                                    "model.class_weights=balanced")]
    train_config, model_dict = resolve_config(family, corpus=data.name, preset=preset, overrides=overrides)
    train_config.validate()
    splits = (textdata.cross_validation_splits(data.labels, folds, seed=seed, dev_fraction=dev_fraction) if folds > 1
              else [textdata.train_dev_test_split(data.labels, dev_fraction=dev_fraction, seed=seed)])
    vectors = model_dict.get("init_embeddings") or None
    word_vectors = None
    if vectors:
        from scratchlm.models.word2vec import load_vectors
        n_embd = family.model_config(train_config, model_dict, vocab_size=2).n_embd
        word_vectors = load_vectors(vectors, dim=n_embd)                  # a wrong dimension stops here

    def validate():
        if folds > 1 and ((out / "eval.json").exists() or any(out.glob("fold-*"))):
            raise UserError(f"{out} already holds a cross-validation; choose another --out")

    tokens = [split_words(t) for t in data.texts]
    results = []
    with _writing(out, validate) as out:
        for i, (train, dev, test) in enumerate(splits):
            run_dir = out if folds == 1 else out / f"fold-{i + 1:02d}"
            fold = _train_fold(data, tokens, (train, dev, test), run_dir, family, train_config, model_dict,
                               augment, vectors, word_vectors, min_count, balanced,
                               {"data": str(data_name), "folds": folds, "fold": i + 1, "split_seed": seed,
                                "dev_fraction": dev_fraction},
                               progress=progress if folds == 1 else (progress or False), log=log)
            results.append(fold)
            log(f"fold {i + 1}/{len(splits)}: " + ", ".join(f"{m} {fold[m]:.4f}" for m in METRICS) +
                f" (best dev accuracy {fold['dev_accuracy']:.4f} at iteration {fold['best_iteration']}, "
                f"{fold['train_seconds']:.0f} s)")
        report = summarize(results, data, model, folds, augment, vectors, seed)
        from scratchlm.checkpoint import write_json_atomic
        write_json_atomic(out / "eval.json", report)
    log(format_report(report))
    return report


def _train_fold(data, tokens, split, run_dir, family, train_config, model_dict, augment, vectors, word_vectors,
                min_count, balanced, where: dict, progress, log) -> dict:
    from scratchlm.checkpoint import load_safetensors
    from scratchlm.tasks import Classification, split_sizes
    from scratchlm.tokenizers.word import WordTokenizer
    from scratchlm.train import Trainer
    train, dev, test = split
    tokenizer = WordTokenizer.from_text([data.texts[j] for j in train], min_count=min_count)
    model_values = {**model_dict, "num_classes": data.num_classes}
    if balanced:                                        # n / (K n_k) from this fold's training labels
        counts = np.bincount(data.labels[train], minlength=data.num_classes)
        model_values["class_weights"] = ",".join(f"{len(train) / (data.num_classes * max(c, 1)):.6g}" for c in counts)
    model_config = family.model_config(train_config, model_values, tokenizer.vocab_size)
    augmenter = None
    if augment == "eda":
        from scratchlm.augment import Augmenter, WordSource
        source = WordSource.from_examples([tokens[j] for j in train], data.labels[train].tolist(), vectors=word_vectors)
        augmenter = Augmenter(p=0.5, source=source)
    max_len = getattr(model_config, "block_size", train_config.block_size)
    task = Classification({s: [tokens[j] for j in idx] for s, idx in zip(("train", "val", "test"), split)},
                          {s: data.labels[idx] for s, idx in zip(("train", "val", "test"), split)},
                          tokenizer, max_len, augmenter=augmenter, vectors=vectors)
    info = {**where, "data_name": data.name, "label_names": list(data.label_names), "tokenizer": f"word:{min_count}",
            "augment": augment, "splits": list(task.splits), **split_sizes(task)}
    trainer = Trainer(train_config, tokenizer, task, run_dir, info, progress=progress, log=log,
                      model=family.name, model_config=model_config)
    result = trainer.fit()
    tensors, metadata = load_safetensors(Path(run_dir) / "best.safetensors")      # model selection
    trainer.model.load_state_dict(tensors, strict=True)
    probabilities = task.probabilities(trainer.model, "test")
    scores = score(data.labels[test], probabilities, data.num_classes)
    best = trainer.task.eval_metrics(trainer.model)
    return {**scores, "dev_accuracy": best["val_accuracy"], "best_iteration": int(metadata["iteration"]),
            "train_seconds": result.elapsed_s, "train_examples": len(train), "dev_examples": len(dev),
            "test_examples": len(test), "run": str(run_dir),
            "test_index": [int(j) for j in test], "test_predicted": [int(k) for k in probabilities.argmax(1)]}


def score(y_true, probabilities, num_classes: int) -> dict:
    """Accuracy, precision, recall, F1 (binary for two classes, else macro) and, for two classes, ROC-AUC."""
    from scratchlm import metrics
    y_pred = probabilities.argmax(1)
    average = "binary" if num_classes == 2 else "macro"
    out = {"accuracy": metrics.accuracy(y_true, y_pred)}
    for name in ("precision", "recall", "f1"):
        out[name] = getattr(metrics, name)(y_true, y_pred, average=average)
    if num_classes == 2:
        out["roc_auc"] = metrics.roc_auc(y_true, probabilities[:, 1])
    return {k: float(v) for k, v in out.items()}


def summarize(results, data, model, folds, augment, vectors, seed) -> dict:
    keys = [k for k in (*METRICS, "roc_auc") if k in results[0]]
    mean = {k: float(np.mean([r[k] for r in results])) for k in keys}
    std = {k: float(np.std([r[k] for r in results])) for k in keys}
    return {"data": data.name, "model": model, "folds": folds, "seed": seed, "augment": augment,
            "vectors": vectors, "examples": len(data), "label_names": list(data.label_names),
            "average": "binary" if data.num_classes == 2 else "macro", "mean": mean, "std": std,
            "train_minutes": sum(r["train_seconds"] for r in results) / 60, "per_fold": results}


def format_report(report: dict) -> str:
    keys = [k for k in (*METRICS, "roc_auc") if k in report["mean"]]
    lines = [f"{report['model']} on {report['data']}, {report['folds']}-fold (augment {report['augment']}"
             f"{', vectors ' + report['vectors'] if report['vectors'] else ''}):",
             "fold  " + "  ".join(f"{k:>9}" for k in keys)]
    for i, fold in enumerate(report["per_fold"]):
        lines.append(f"{i + 1:>4}  " + "  ".join(f"{fold[k]:>9.4f}" for k in keys))
    lines.append("mean  " + "  ".join(f"{report['mean'][k]:>9.4f}" for k in keys))
    lines.append(" std  " + "  ".join(f"{report['std'][k]:>9.4f}" for k in keys))
    return "\n".join(lines)


# ================================================================ labelling text with a saved model

def load_classifier(run_dir):
    """(model with its best dev weights, tokenizer, label names) of one run folder."""
    from scratchlm.checkpoint import load_safetensors
    from scratchlm.runs import load_model
    run_dir = Path(run_dir)
    model, tokenizer, header = load_model(run_dir)
    names = header["data"].get("label_names")
    if not hasattr(model, "probabilities") or not names:
        raise UserError(f"{run_dir} holds a {header.get('model')} language model, not a classifier; "
                        f"use scratchlm sample")
    if (run_dir / "best.safetensors").exists():
        tensors, _ = load_safetensors(run_dir / "best.safetensors")
        model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, tokenizer, names


def load_classifiers(run_dir) -> list:
    """[(model, tokenizer, names)]: the run in ``run_dir``, or, for a cross-validation folder, every
    fold's (labelling then averages their probabilities: each fold saw 90% of the data)."""
    from scratchlm.runs import read_run_config
    run_dir = Path(run_dir)
    folds = sorted(run_dir.glob("fold-*")) if not (run_dir / "config.json").exists() else []
    if folds:
        return [load_classifier(f) for f in folds]
    read_run_config(run_dir)                                        # a missing folder: one clear line
    return [load_classifier(run_dir)]


def _label(args) -> int:
    from scratchlm.textdata import pad_batch
    if args.data or args.out:
        raise UserError("--run labels text with a saved model; it takes no --data or --out")
    models = load_classifiers(args.run)
    names = models[0][2]
    texts = args.text if args.text else [line.rstrip("\r") for line in sys.stdin.read().split("\n") if line.strip()]
    if not texts:
        raise UserError("no text to label; give texts as arguments or one per line on stdin")
    for text in texts:
        p = 0.0
        for model, tokenizer, _ in models:
            ids = tokenizer.encode(text)
            if not ids:
                raise UserError(f"text {text!r} has no words to classify")
            batch, mask = pad_batch([ids], pad_id=tokenizer.pad_id, max_len=getattr(model.config, "block_size", None))
            p = p + model.probabilities(batch, mask)[0] / len(models)
        k = int(p.argmax())
        print(f"{names[k]}\t{p[k]:.4f}\t{text}")
    return 0
