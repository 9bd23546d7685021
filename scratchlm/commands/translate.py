"""``scratchlm translate``: train a translation model on sentence pairs, and translate with it.

    scratchlm translate train --data eng-fra --out runs/enfr            # the shared trainer
    scratchlm translate train --data dates --out runs/dates --set max_iters=500
    scratchlm translate --run runs/enfr --beam 4 "I am tired."          # or sentences on stdin
    scratchlm eval --run runs/enfr --split test                         # BLEU, chrF, ROUGE-L, exact match

Training goes through ``scratchlm.train.Trainer`` (checkpoints, --resume, metrics.jsonl with dev
BLEU on its eval lines, loss.png) with the task of ``scratchlm.pairs``. Data keys among --set:
``reverse=true`` (eng-fra: French to English) and ``tokenizer=char|word``; the rest are the
seq2seq model's keys (d_model, nhead, ...) and the training keys.
"""
from __future__ import annotations

import sys
from pathlib import Path

from scratchlm.errors import UserError

DATA_KEYS = ("reverse", "tokenizer")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "translate", help="train an encoder-decoder translator (translate train ...) or translate with one",
        description="'scratchlm translate train --data eng-fra|copy|reverse|dates --out DIR' trains a model; "
                    "'scratchlm translate --run DIR [--beam 4] \"I am tired.\"' translates the sentences given "
                    "(or one per line on stdin).")
    p.add_argument("text", nargs="*", help="'train', or sentences to translate (none: read stdin)")
    p.add_argument("--run", metavar="DIR", help="translate with the run in DIR")
    p.add_argument("--beam", type=int, default=1, metavar="K", help="beam size (default 1 = greedy)")
    p.add_argument("--alpha", type=float, default=0.6, metavar="A",
                   help="length penalty ((5+|Y|)/6)^A of beam search (default 0.6; 0 = none)")
    p.add_argument("--n-best", type=int, default=1, metavar="N", help="print the N best of the beam (default 1)")
    p.add_argument("--data", metavar="NAME", help="train: eng-fra, copy, reverse or dates")
    p.add_argument("--out", metavar="DIR", help="train: the run folder")
    p.add_argument("--preset", metavar="NAME", help="train: default <data>-seq2seq")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train: a model, training or data key (reverse=true, tokenizer=char|word)")
    p.add_argument("--resume", action="store_true", help="train: continue the run in --out")
    p.add_argument("--iters", type=int, metavar="N", help="train: until iteration N (sets max_iters)")
    p.add_argument("--backend", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="train: always show the progress bar")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="train: no bar")
    p.set_defaults(func=cmd_translate)


def cmd_translate(args) -> int:
    if args.text[:1] == ["train"]:
        if len(args.text) > 1:
            raise UserError(f"translate train takes no sentences (got {args.text[1]!r}); see --help")
        if args.run is not None:
            raise UserError("translate train writes --out DIR; --run is for translating")
        return train_command(args)
    for flag, value in (("--data", args.data), ("--out", args.out), ("--preset", args.preset),
                        ("--iters", args.iters)):
        if value is not None:
            raise UserError(f"{flag} is for 'scratchlm translate train'; to translate give --run DIR")
    if args.set or args.resume:
        raise UserError("--set and --resume are for 'scratchlm translate train'")
    if args.run is None:
        raise UserError("translate needs --run DIR (a run from 'scratchlm translate train'), or 'train' to train one")
    return translate_command(args)


# ================================================================ train

def _split_data_keys(pairs: list[str]) -> tuple[dict, list[str]]:
    from scratchlm.config import parse_overrides
    data, rest = {}, []
    for key, value in parse_overrides(pairs):
        if key in DATA_KEYS:
            data[key] = value
        else:
            rest.append(f"{key}={value}")
    if "reverse" in data:
        text = str(data["reverse"]).lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise UserError(f"--set reverse={data['reverse']}: write true or false")
        data["reverse"] = text in ("true", "1", "yes")
    if "tokenizer" in data and data["tokenizer"] not in ("char", "word"):
        raise UserError(f"--set tokenizer={data['tokenizer']}: choose char or word")
    return data, rest


def train_command(args) -> int:
    result = train_translation(args.data, args.out, args.set, preset=args.preset, resume=args.resume,
                               iters=args.iters, backend_name=args.backend, progress=args.progress)
    val = f"{result.last_val_loss:.4f}" if result.last_val_loss is not None else "n/a"
    print(f"done: {result.iteration} iterations in {result.elapsed_s:.1f} s, val loss {val}; run in {result.run_dir}")
    print(f"translate with it: scratchlm translate --run {result.run_dir} \"...\"; "
          f"score it: scratchlm eval --run {result.run_dir} --split test")
    return 0


def train_translation(data: str | None, out, sets=(), preset=None, resume: bool = False, iters=None,
                      backend_name=None, progress=None, log=print):
    """Train (or resume) a seq2seq run on ``data`` in ``out`` with the shared ``Trainer``."""
    from scratchlm import backend
    from scratchlm.config import TrainConfig, apply_overrides
    from scratchlm.models.registry import get_family, resolve_config, route, run_model
    from scratchlm.pairs import PairTask, default_level, load_pairs
    from scratchlm.runguard import check_out_folder, open_run_for_writing
    from scratchlm.runs import read_run_config
    from scratchlm.tokenizers import load as load_tokenizer
    from scratchlm.tokenizers.pairs import PairVocab
    from scratchlm.train import Trainer
    if out is None:
        raise UserError("translate train needs --out DIR (the run folder)")
    run_dir = Path(out)
    family = get_family("seq2seq")
    data_keys, sets = _split_data_keys(list(sets))
    if resume:
        header = read_run_config(run_dir)
        saved_family, saved_model = run_model(header, where=f"{run_dir}/config.json")
        if saved_family.name != "seq2seq":
            raise UserError(f"{run_dir} holds a {saved_family.name} run; resume it with scratchlm train --resume")
        info = header["data"]
        if data is not None and data != info.get("corpus"):
            raise UserError(f"{run_dir} was trained on {info.get('corpus')!r}, not {data!r}; --resume keeps its data")
        if data_keys:
            raise UserError(f"--resume keeps the run's data; drop --set {', '.join(data_keys)}")
        train_pairs, model_values = route(family, sets)
        if model_values:
            raise UserError(f"--resume cannot change the architecture ({', '.join(model_values)}); start a new run")
        config = apply_overrides(TrainConfig.from_dict(header["train"], where=f"{run_dir}/config.json"), train_pairs)
        data, reverse, level = info["corpus"], bool(info.get("reverse", False)), info.get("tokenizer", "char")
        vocab, model_config = load_tokenizer(run_dir / "tokenizer.json"), saved_model
    else:
        if data is None:
            raise UserError("translate train needs --data eng-fra|copy|reverse|dates")
        check_out_folder(run_dir)          # before the corpus and vocabulary: a refusal costs nothing
        config, model_config = resolve_config(family, data, preset, sets)
        reverse, level = data_keys.get("reverse", False), data_keys.get("tokenizer", default_level(data))
    pairs = load_pairs(data, reverse=reverse)
    if not resume:
        train_split = pairs.splits["train"]
        vocab = PairVocab.from_texts([p.source for p in train_split] + [p.target for p in train_split], level)
    task = PairTask(pairs, vocab)
    if not resume:
        needed = task.needed_len()
        model_config.setdefault("max_len", needed)
        if model_config["max_len"] < needed:
            raise UserError(f"max_len {model_config['max_len']} is too short for {data}: its longest sentence needs "
                            f"{needed} positions; --set max_len={needed}")
    if iters is not None:
        config = config.with_value("max_iters", iters, where="--iters")
    if backend_name:
        config = config.with_value("backend", backend_name, where="--backend")
    config.validate()
    try:
        backend.use_backend(config.backend)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    data_info = {"corpus": data, "corpus_name": pairs.description, "corpus_sha256": pairs.sha256,
                 "tokenizer": level, "reverse": reverse, "splits": list(task.splits),
                 **{f"{s}_pairs": len(pairs.splits[s]) for s in task.splits},
                 **{f"{s}_tokens": task.tokens(s) for s in task.splits}}
    # everything is validated: now the run-folder guard (lock, re-check under it), then the writes
    with open_run_for_writing(run_dir, resume=resume):
        trainer = Trainer(config, vocab, task, run_dir, data_info, resume=resume, progress=progress, log=log,
                          model="seq2seq", model_config=model_config)
        if resume and progress is not False:
            log(f"resuming {run_dir} at iteration {trainer.iteration} of {config.max_iters}")
        return trainer.fit()


# ================================================================ translate

def load_translator(run_dir):
    """(model, vocab, task-less header) of a seq2seq run; refuses other families in one line."""
    from scratchlm.runs import load_model, read_run_config
    header = read_run_config(run_dir)
    if header.get("model") != "seq2seq":
        raise UserError(f"{run_dir} holds a {header.get('model') if isinstance(header.get('model'), str) else 'gpt'} "
                        f"run, not a translation model; train one with scratchlm translate train")
    model, vocab, header = load_model(run_dir)
    return model, vocab, header


def prepare_sources(vocab, max_len: int, sentences, note, numbers=None):
    """Encoded sources (ids + </s>), cut to the model's max_len; notes for unknown units and cuts
    (``numbers``: how the notes call the sentences, default 1, 2, ...)."""
    from scratchlm.models.seq2seq import EOS
    ids, unknown = [], []
    for number, sentence in zip(numbers or range(1, len(sentences) + 1), sentences):
        unknown += [u for u in vocab.unknown(sentence) if u not in unknown]
        encoded = vocab.encode(sentence)
        if len(encoded) > max_len - 1:
            cut = vocab.decode(encoded[max_len - 1:])
            note(f"note: sentence {number} has {len(encoded)} tokens, more than the model's {max_len - 1}; "
                 f"cut off: {cut!r}")
            encoded = encoded[:max_len - 1]
        ids.append(encoded + [EOS])
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        note(f"note: {len(unknown)} {'character' if vocab.level == 'char' else 'word'}(s) outside the vocabulary, "
             f"read as <unk>: {shown}")
    return ids


def translate_command(args) -> int:
    from scratchlm import backend
    from scratchlm.pairs import _pad
    from scratchlm.translate import beam_search, greedy_search
    if args.beam < 1:
        raise UserError(f"--beam must be at least 1 (1 = greedy), got {args.beam}")
    if not 1 <= args.n_best <= args.beam:
        raise UserError(f"--n-best must be between 1 and --beam ({args.beam}), got {args.n_best}")
    if not 0 <= args.alpha < float("inf"):                  # also refuses nan, which no comparison passes
        raise UserError(f"--alpha must be a number >= 0, got {args.alpha}")
    try:
        backend.use_backend(args.backend or "numpy")
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    sentences = args.text if args.text else [line.rstrip("\r\n") for line in sys.stdin]
    model, vocab, _ = load_translator(args.run)
    note = lambda message: print(message, file=sys.stderr)
    for number, sentence in enumerate(sentences, 1):
        if not sentence.strip():
            note(f"note: sentence {number} is empty; its translation is an empty line")
    keep = [i for i, s in enumerate(sentences) if s.strip()]
    ids = prepare_sources(vocab, model.config.max_len, [sentences[i] for i in keep], note, [i + 1 for i in keep])
    out = {i: [""] for i in range(len(sentences))}
    for start in range(0, len(ids), 64):
        src = _pad(ids[start:start + 64])                                   # (B, S), sentences in order
        if args.beam == 1:
            texts = [[vocab.decode(h)] for h in greedy_search(model, src)]
        else:
            texts = [[vocab.decode(t) if args.n_best == 1 else f"{vocab.decode(t)}\t{s:.4f}" for t, s in nbest]
                     for nbest in beam_search(model, src, args.beam, args.alpha, n_best=args.n_best)]
        for k, text in enumerate(texts):
            out[keep[start + k]] = text
    for i in range(len(sentences)):
        print("\n".join(out[i]))
    return 0
