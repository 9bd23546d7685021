"""What ``scratchlm vae`` and ``scratchlm gan`` share: training through ``scratchlm train``'s path
(the one Trainer: checkpoints, --resume, metrics.jsonl, loss.png), reading a run of the right
family, sentences in and out of the word vocabulary, and the sample-quality figures.

Sample quality is Texygen's protocol (``scratchlm.metrics.bleu_against`` / ``self_bleu``): BLEU-n
of each sample against the whole test set, averaged; self-BLEU-n of the first 500 samples, each
against the other 499 (Texygen's fast path keeps 500). Sentences are cut into words and
punctuation by the word tokenizer's rule (``sample_words``), as Texygen's nltk ``word_tokenize``
on this data. Texygen's ``Bleu.get_score()`` also takes that fast path by default, which keeps
only the first 500 reference lines; the issue asks for the whole test set, so that is what
eval.json reports (bench/generators.py prints BLEU-4 against the first 500 beside it).
"""
from __future__ import annotations

import sys
from pathlib import Path

from scratchlm.errors import UserError

N_SAMPLES = 1000           # DIR/samples.txt
SELF_BLEU_SAMPLES = 500    # Texygen's self-BLEU keeps the first 500 samples
BLEU_ORDERS = (2, 3, 4, 5)


def add_training_arguments(p, family: str, corpus_help: str) -> None:
    p.add_argument("--corpus", metavar="NAME|PATH", help=corpus_help)
    p.add_argument("--out", metavar="DIR", help="train: the run folder (writes eval.json and samples.txt at the end)")
    p.add_argument("--tokenizer", default="word", metavar="word[:MIN_COUNT]", help="train: default word")
    p.add_argument("--preset", metavar="NAME", help=f"train: default <corpus>-{family} if it exists")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"train: a {family} model key or a training key (repeatable)")
    p.add_argument("--resume", action="store_true", help="train: continue the run in --out")
    p.add_argument("--iters", type=int, metavar="N", help="train: until iteration N (sets max_iters)")
    p.add_argument("--backend", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    p.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="train: always show the progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="train: no bar")


def check_mode(args, family: str, uses: tuple[str, ...]) -> str:
    """"train" (--corpus/--out) or "use" (--run with one of ``uses``); one line for anything mixed."""
    training = [flag for flag, value in (("--corpus", args.corpus), ("--out", args.out), ("--preset", args.preset),
                                        ("--iters", args.iters)) if value is not None] + \
        (["--resume"] if args.resume else []) + (["--set"] if args.set else [])
    if args.run is None:
        if args.out is None:
            raise UserError(f"{family} needs --out DIR (with --corpus NAME) to train, or --run DIR with "
                            f"{' | '.join(uses)} to use a trained run (see 'scratchlm {family} --help')")
        if args.corpus is None and not args.resume:
            raise UserError(f"{family} training needs --corpus NAME|PATH (e.g. --corpus coco), or --resume")
        return "train"
    if training:
        raise UserError(f"{training[0]} is for training ('scratchlm {family} --corpus coco --out DIR'); "
                        f"with --run give {' | '.join(uses)}")
    return "use"


def train(args, family: str):
    """``scratchlm train --model FAMILY`` with these arguments: the same config routing, trainer and run."""
    from scratchlm.commands.train import cmd_train
    args.model = family
    args.nproc = None                      # one process: the VAE and GAN steps are not data-parallel
    cmd_train(args)
    return Path(args.out)


def load_run(run_dir, family: str):
    """(model, tokenizer, header) of a run that must be of ``family``; one line otherwise."""
    from scratchlm.runs import load_model, read_run_config
    header = read_run_config(run_dir)
    named = header.get("model") if isinstance(header.get("model"), str) else "gpt"
    if named != family:
        raise UserError(f"{run_dir} holds a {named} run, not a {family} run; give --run a folder written by "
                        f"'scratchlm {family} --corpus ... --out DIR'")
    return load_model(run_dir)


def boundary_id(tokenizer) -> int:
    """The token that frames each sentence (scratchlm.tokenizers.base.boundary_id: <pad> for words)."""
    from scratchlm.tokenizers.base import boundary_id as document_boundary
    return document_boundary(tokenizer)


def encode_sentences(tokenizer, sentences, flag: str):
    """Framed batch (x, y) of sentences for the run's vocabulary; words it lacks read as <unk>,
    said once on stderr. An empty sentence is refused."""
    import numpy as np
    b, rows, unknown, words = boundary_id(tokenizer), [], 0, 0
    for text in sentences:
        ids, n_unknown = tokenizer.encode(text, count_unknown=True) if hasattr(tokenizer, "unk_id") else \
            (tokenizer.encode(text), 0)
        if not ids:
            raise UserError(f"{flag}: {text!r} has no words; give a sentence, e.g. \"a man riding a horse\"")
        rows.append(ids)
        unknown, words = unknown + n_unknown, words + len(ids)
    if unknown:
        print(f"scratchlm: note: {unknown} of {words} words are not in the run's vocabulary; they read as <unk>",
              file=sys.stderr)
    T = max(map(len, rows)) + 1
    x = np.full((len(rows), T), b, dtype=np.int64)
    y = np.full((len(rows), T), -100, dtype=np.int64)
    for r, ids in enumerate(rows):
        x[r, 1:len(ids) + 1], y[r, :len(ids)], y[r, len(ids)] = ids, ids, b
    return x, y


def test_sentences(header) -> list[str]:
    """The test split of the run's corpus (coco: the 10,000 Texygen test captions)."""
    from scratchlm.data import load_corpus, split_documents
    splits = split_documents(load_corpus(header["data"]["corpus"]))
    if splits is None or "test" not in splits:
        raise UserError(f"corpus {header['data'].get('corpus_name')!r} has no test split to score samples "
                        f"against; train on a corpus with one (coco)")
    return splits["test"]


def sample_words(text: str) -> list[str]:
    """A sentence's words for BLEU: ``split_words`` (Texygen's nltk ``word_tokenize`` on this data),
    except that the word tokenizer's ``<unk>`` stays one word, as the one token the model wrote
    (split_words would cut it into ``<``, ``unk``, ``>``: three unmatched words instead of one)."""
    from scratchlm.tokenizers.word import UNK, split_words
    pieces = text.split(UNK)
    words = split_words(pieces[0])
    for piece in pieces[1:]:
        words += [UNK] + split_words(piece)
    return words


def sample_scores(samples: list[str], references: list[str]) -> dict:
    """Texygen's BLEU-2..5 of the samples against the references and self-BLEU-2..5 of the first 500."""
    from scratchlm import metrics
    hyps, refs = [sample_words(s) for s in samples], [sample_words(r) for r in references]
    hyps = [h for h in hyps if h] or [["<empty>"]]
    out = {f"bleu{n}": metrics.bleu_against(hyps, refs, n) for n in BLEU_ORDERS}
    kept = hyps[:SELF_BLEU_SAMPLES]
    if len(kept) >= 2:
        out.update({f"self_bleu{n}": metrics.self_bleu(kept, n) for n in BLEU_ORDERS})
    out["samples"], out["empty_samples"] = len(samples), sum(1 for s in samples if not s.strip())
    return out


def write_report(run_dir: Path, report: dict, samples: list[str]) -> None:
    """DIR/samples.txt (one sample per line) and DIR/eval.json's "test" entry."""
    from scratchlm.checkpoint import read_json, write_json_atomic
    (run_dir / "samples.txt").write_text("".join(s + "\n" for s in samples), encoding="utf-8")
    path = run_dir / "eval.json"
    previous = read_json(path) if path.exists() else {}
    results = previous if isinstance(previous, dict) else {}
    results["test"] = report
    write_json_atomic(path, results)
