"""``scratchlm word2vec``: train word vectors from scratch, or show a trained space's neighbours.

    scratchlm word2vec --corpus sentiment --out runs/w2v                  # writes vectors.txt, config.json
    scratchlm word2vec --corpus tinyshakespeare --out runs/w2v-ts --set model=cbow --set dim=64
    scratchlm word2vec --run runs/w2v --neighbors good

The training itself is ``scratchlm.models.word2vec.train_word2vec`` (skip-gram or CBOW, negative
sampling; its docstring has the math). The corpus is a text, one sentence per line, lowercased and
cut into words as the classifiers' word tokenizer does: a registered corpus name, ``sentiment``
(its sentences, labels dropped) or a file. ``--set`` takes the keys of ``Word2VecConfig``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from scratchlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("word2vec", help="train word vectors (skip-gram / CBOW) or show nearest neighbours",
                              description="Train word2vec on a corpus into DIR/vectors.txt (the word2vec text "
                                          "format) and DIR/config.json, or print a trained space's neighbours.")
    p.add_argument("--corpus", metavar="NAME|PATH", help="sentiment, a registered corpus, or a UTF-8 text file "
                                                         "(one sentence per line)")
    p.add_argument("--out", metavar="DIR", help="the folder for vectors.txt and config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a word2vec setting: model (skipgram|cbow), dim, window, negative, min_count, sample, "
                        "epochs, ... (repeatable)")
    p.add_argument("--run", metavar="DIR", help="a trained folder to query")
    p.add_argument("--neighbors", "--neighbours", nargs="+", metavar="WORD", help="with --run: words to query")
    p.add_argument("-k", type=int, default=10, help="neighbours per word (default 10)")
    p.set_defaults(func=cmd_word2vec)


def _settings(pairs) -> dict:
    """--set pairs converted to Word2VecConfig's field types, unknown keys refused by name."""
    from scratchlm.config import _convert, _did_you_mean, parse_overrides
    from scratchlm.models.word2vec import Word2VecConfig
    kinds = {f.name: f.type for f in dataclasses.fields(Word2VecConfig)}
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    out = {}
    for key, value in parse_overrides(pairs):
        if key not in kinds:
            raise UserError(f"--set: unknown word2vec key {key!r}{_did_you_mean(key, kinds)}; "
                            f"keys: {', '.join(kinds)}")
        kind = hints.get(kinds[key], kinds[key]) if isinstance(kinds[key], str) else kinds[key]
        out[key] = _convert(key, value, kind, "word2vec") if kind in (int, float, bool, str) else value
    return out


def corpus_sentences(name_or_path) -> list[str]:
    """One string per sentence: a labelled set's texts, else the corpus text's lines."""
    from scratchlm.textdata import SHIPPED
    if str(name_or_path) in SHIPPED or str(name_or_path).lower().endswith((".tsv", ".csv")):
        from scratchlm.textdata import load_labelled
        return list(load_labelled(name_or_path).texts)
    from scratchlm.data import load_corpus
    return [line for line in load_corpus(name_or_path).text.split("\n") if line.strip()]


def cmd_word2vec(args) -> int:
    if args.run:
        from scratchlm.models.word2vec import Word2Vec
        if not args.neighbors:
            raise UserError("--run needs --neighbors WORD [WORD ...]")
        model = Word2Vec.load(args.run)
        for word in args.neighbors:
            if word.lower() not in model.index:
                raise UserError(f"{word!r} is not in the vocabulary of {args.run}")
            print(f"{word.lower()}: " + ", ".join(f"{w} {s:.3f}" for w, s in model.most_similar(word.lower(), args.k)))
        return 0
    if not args.corpus or not args.out:
        raise UserError("word2vec needs --corpus NAME|PATH and --out DIR (or --run DIR --neighbors WORD)")
    from scratchlm.models.word2vec import Word2VecConfig, train_word2vec
    from scratchlm.tokenizers.word import split_words
    settings = _settings(args.set)
    Word2VecConfig(**settings).validate()                                  # refuse bad values before reading
    from scratchlm.runguard import check_out_folder, open_run_for_writing
    out = check_out_folder(args.out)             # a file, or a folder holding a run: refused before reading
    sentences = [split_words(s) for s in corpus_sentences(args.corpus)]
    with open_run_for_writing(out):              # the one run-folder guard: lock, re-check, then write
        stats = train_word2vec([s for s in sentences if s], out, progress=sys.stderr.isatty(), **settings)
    print(f"{stats['vocab_size']} words in the vocabulary, {stats['words_per_s']:,.0f} words/s, "
          f"{stats['seconds']:.1f} s; wrote {stats['vectors']}")
    return 0
