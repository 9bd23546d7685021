"""The ``scratchlm`` command: train, eval, sample, chat, summary, demo.

    scratchlm demo
    scratchlm train --corpus tinyshakespeare --tokenizer char --preset nano-cpu --out runs/nano
    scratchlm train --model lstm --corpus names --out runs/names-lstm     # preset names-lstm
    scratchlm eval --run runs/names-lstm --split test
    scratchlm sample --run runs/nano --prompt "ROMEO:"
    scratchlm summary --preset gpt2-124m

Mistakes a user can make (a missing run folder, a corrupt checkpoint, an unknown preset or key, a
bad value, a path that cannot be written, a full disk, a config too big for the memory) end in one
line on stderr, ``scratchlm: error: ...``, and exit status 2, with no traceback: ``main`` is the
one place that turns them into that line. Output piped into a reader that closes early (``| head``)
ends the command quietly with status 141 (128 + SIGPIPE, what a shell reports for Unix tools
killed by a closed pipe). Ctrl-C exits with 130 (while training, after saving a checkpoint).
Anything else is a bug and keeps its traceback.

Commands that write a run folder (train, demo) go through ``scratchlm.runguard``: arguments and
config checked first, then the folder's lock, then the writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from pathlib import Path

from scratchlm.backend import BackendUnavailable
from scratchlm.commands.arguments import (SAMPLING_FLAGS, add_sampling_arguments,  # noqa: F401
                                        check_sampling_flags, prompt_ids, real_number, whole_number)
from scratchlm.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141            # 128 + SIGPIPE
DEFAULT_PRESET = "nano-cpu"
DEFAULT_TOKENIZER = "char"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError (one line) instead of usage + exit."""

    def error(self, message):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _use_backend(name: str) -> None:
    from scratchlm import backend
    try:
        backend.use_backend(name)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None


def _config_from(args):
    from scratchlm.config import apply_overrides, load_preset
    config = load_preset(args.preset or DEFAULT_PRESET)
    config = apply_overrides(config, args.set)
    if getattr(args, "iters", None) is not None:
        config = config.with_value("max_iters", args.iters, where="--iters")
    if getattr(args, "backend", None):
        config = config.with_value("backend", args.backend, where="--backend")
    return config.validate()


# ================================================================ train

def cmd_train(args) -> int:
    from scratchlm.config import TrainConfig, apply_overrides
    from scratchlm.models.registry import get_family, resolve_config, route, run_model
    from scratchlm.runguard import check_out_folder
    from scratchlm.runs import read_run_config
    from scratchlm.train import train
    if args.resume:
        # a resumed run keeps its saved config and model; --set, --iters and --backend may still
        # change the non-architecture keys (e.g. train longer); a flag it would ignore is refused
        for flag, value in (("--preset", args.preset), ("--tokenizer", args.tokenizer)):
            if value is not None:
                raise UserError(f"--resume keeps the run's {flag[2:]}, so {flag} {value} would be ignored; "
                                f"drop {flag}, or start a new run in another --out")
        check_out_folder(args.out, may_hold_run=True, must_hold_run=True)
        header = read_run_config(args.out)
        family, _ = run_model(header, where=f"{args.out}/config.json")
        train_pairs, model_values = route(family, args.set)
        config = apply_overrides(TrainConfig.from_dict(header["train"], where=f"{args.out}/config.json"), train_pairs)
    else:
        if args.corpus is None:
            raise UserError("train needs --corpus NAME|PATH (e.g. --corpus pydoc), or --resume to continue a run")
        family = get_family(args.model or "gpt")
        config, model_values = resolve_config(family, args.corpus, args.preset, args.set)
    if args.iters is not None:
        config = config.with_value("max_iters", args.iters, where="--iters")
    if args.backend:
        config = config.with_value("backend", args.backend, where="--backend")
    config.validate()
    _start_ranks(args, config)
    result = train(config, args.out, corpus=args.corpus, tokenizer=args.tokenizer or DEFAULT_TOKENIZER,
                   resume=args.resume, progress=args.progress, model=args.model if args.resume else family.name,
                   model_config=model_values)
    from scratchlm.distributed import current
    if not current().is_main:                 # rank 0 reports for the job
        return 0
    val = f"{result.last_val_loss:.4f}" if result.last_val_loss is not None else "n/a"
    print(f"done: {result.iteration} iterations in {result.elapsed_s:.1f} s, val loss {val}; run in {result.run_dir}")
    print(f"sample from it: scratchlm sample --run {result.run_dir}; score it: scratchlm eval --run {result.run_dir}")
    return 0


def _start_ranks(args, config) -> None:
    """--nproc N outside an MPI launcher: re-execute this command as N ranks under mpiexec."""
    from scratchlm import distributed
    world = distributed.launched_world_size()
    if args.nproc is None or args.nproc == world:
        return
    if world > 1:
        raise UserError(f"--nproc {args.nproc} asks for {args.nproc} ranks but the launcher started {world}; "
                        "drop --nproc under mpiexec")
    distributed.check_config(config, args.nproc)
    raise SystemExit(distributed.relaunch(args.nproc, args.raw_argv))


# ================================================================ eval

def cmd_eval(args) -> int:
    from scratchlm.evaluate import evaluate_run
    _use_backend(args.backend)
    report = evaluate_run(args.run, split=args.split, batch_size=args.batch_size)
    bits = f", {report['bits_per_char']:.4f} bits/char" if "bits_per_char" in report else \
        f", {report['bits_per_token']:.4f} bits/token"
    print(f"{args.run} ({report['model']}, {report['corpus']}) {args.split}: loss {report['loss']:.4f} over "
          f"{report['tokens']:,} tokens, perplexity {report['perplexity']:.3f}{bits}; wrote {Path(args.run) / 'eval.json'}")
    return 0


# ================================================================ sample

def _stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


def _write_pieces(pieces, prompt: str, stream: bool) -> None:
    """Print the prompt and the streamed pieces, then a newline (--no-stream: all at the end)."""
    from scratchlm.generate import until_interrupted
    held = []                                 # --no-stream: printed at the end, or at Ctrl-C
    if stream:
        sys.stdout.write(prompt)
    try:
        for piece in until_interrupted(pieces):
            if stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            else:
                held.append(piece)
    finally:                                  # Ctrl-C too: what was generated is printed, then a newline,
        if not stream:                        # so "stopped by Ctrl-C" (stderr) starts its own line
            sys.stdout.write(prompt + "".join(held))
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_sample(args) -> int:
    """Stream the continuation of --prompt to stdout (KV-cached or recurrent-state decoding); Ctrl-C
    stops it (exit 130). A run on a document corpus (names) prints --num-samples new documents,
    each started at the boundary token (after --prompt, if given) and ended at the next one."""
    from scratchlm.generate import context_window, encode_prompt, stream_text
    from scratchlm.runs import load_model
    check_sampling_flags(args)
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    _use_backend(args.backend)
    model, tokenizer, header = load_model(args.run)
    documents = header["data"].get("split") is not None
    controls = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    if documents:
        ids = encode_prompt(tokenizer, "\n" + args.prompt)     # the boundary token starts every document
        for k in range(args.num_samples if args.num_samples is not None else 10):
            pieces = stream_text(model, tokenizer, ids, stop="\n", seed=args.seed + k, **controls)
            _write_pieces(pieces, args.prompt, args.stream)
        return 0
    ids = prompt_ids(tokenizer, args.prompt, context_window(model), note=_stderr_note)
    for k in range(args.num_samples if args.num_samples is not None else 1):
        _write_pieces(stream_text(model, tokenizer, ids, seed=args.seed + k, **controls), args.prompt, args.stream)
    return 0


def cmd_chat(args) -> int:
    from scratchlm.chat import run_chat
    return run_chat(args)


# ================================================================ bench

def cmd_bench(args) -> int:
    """Time training steps of a preset's model on random tokens (the shapes are what matter)."""
    import statistics
    import time
    import numpy as np
    from scratchlm import backend, kernels, optim
    from scratchlm.config import read_preset
    from scratchlm.models import GPT
    from scratchlm.memory import check_fits_in_memory
    _use_backend(args.backend)
    kernels.use_reference(args.kernels == "off")
    backend.keep_freed_host_memory()
    config = _config_from(args)
    vocab_size = args.vocab_size if args.vocab_size is not None else read_preset(args.preset).get("vocab_size", 65)
    check_fits_in_memory(config.model_config(vocab_size), config.batch_size, config.block_size)
    model = GPT(config.model_config(vocab_size), seed=config.seed)
    optimizer = optim.AdamW(model.configure_optimizer_groups(config.weight_decay), lr=config.learning_rate,
                            betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)
    B, T = config.batch_size, config.block_size
    rng = np.random.default_rng(0)
    seconds = []
    for step in range(args.warmup + args.iters):      # warm-up: Numba compiles, caches fill
        tokens = backend.to_device(rng.integers(0, vocab_size, size=(B, T + 1)))
        start = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        backend.synchronize()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    ms = statistics.median(seconds) * 1e3
    print(f"preset {args.preset}: {model.num_parameters(non_embedding=False):,} parameters, B={B} T={T}, "
          f"backend {backend.get_backend()}, kernels {args.kernels}")
    print(f"{ms:.1f} ms/iter, {B * T / ms * 1e3:,.0f} tokens/s (median of {args.iters} steps after "
          f"{args.warmup} warm-up; bench/train.py puts PyTorch beside it)")
    return 0


# ================================================================ summary

def cmd_summary(args) -> int:
    from scratchlm.config import TrainConfig, read_preset
    from scratchlm.memory import check_fits_in_memory, describe, estimate_training_memory
    from scratchlm.models.registry import build_model, summary_text
    from scratchlm.runs import model_config_of, read_run_config
    if (args.preset is None) == (args.run is None):
        raise UserError("summary needs exactly one of --preset NAME or --run DIR")
    if args.run is not None:
        for flag, value in (("--set", args.set), ("--vocab-size", args.vocab_size)):
            if value:
                raise UserError(f"summary --run shows the saved run as it is, so {flag} would be ignored; "
                                f"drop it (it applies to summary --preset)")
        header = read_run_config(args.run)
        family, model_config = model_config_of(args.run, header)
        config = TrainConfig.from_dict(header["train"], where=f"{args.run}/config.json")
        where = f"run {args.run}: model {family.name} (corpus {header['data'].get('corpus_name', '?')}, tokenizer " \
                f"{header['data'].get('tokenizer', '?')})"
    else:
        from scratchlm.models.registry import get_family, resolve_config
        preset = read_preset(args.preset)
        family = get_family(preset.get("model", "gpt"))
        config, model_values = resolve_config(family, preset=args.preset, overrides=args.set)
        vocab_size = args.vocab_size if args.vocab_size is not None else preset.get("vocab_size", 65)
        model_config = family.model_config(config, model_values, vocab_size)
        where = f"preset {args.preset} (model {family.name}) with vocab_size {vocab_size}" + \
                ("" if args.vocab_size else " (its typical tokenizer; change with --vocab-size)")
    # the table allocates the weights and runs one row through them: refuse before, if that cannot fit
    check_fits_in_memory(model_config, 1, config.block_size, components=("parameters", "activations"))
    estimate = estimate_training_memory(model_config, config.batch_size, config.block_size)
    model = build_model(family.name, model_config, seed=0)
    print(f"{where}")
    print(summary_text(model))
    print(f"memory for one training step at batch_size {config.batch_size}, block_size {config.block_size} "
          f"(float32): {describe(estimate)}")
    return 0


# ================================================================ demo

DEMO_PROMPT = "The "


def cmd_demo(args) -> int:
    from scratchlm.data import load_corpus, prepare
    from scratchlm.tokenizers import make_tokenizer
    from scratchlm.config import load_preset
    from scratchlm.memory import check_fits_in_memory
    from scratchlm.runguard import open_run_for_writing
    from scratchlm.train import Trainer
    config = load_preset("demo")
    if args.iters is not None:
        # a shorter (or longer) demo keeps the schedule's shape: warmup, then decay to the end
        config = dataclasses.replace(config, max_iters=args.iters, lr_decay_iters=args.iters,
                                     warmup_iters=min(config.warmup_iters, args.iters // 10))
    config = config.with_value("backend", args.backend, where="--backend").validate()
    out = Path(args.out)
    data = {}

    def validate():                        # everything checked before the run folder is touched
        _use_backend(config.backend)
        corpus = load_corpus("pydoc")
        tokenizer = make_tokenizer("char", corpus.text)
        check_fits_in_memory(config.model_config(tokenizer.vocab_size), config.batch_size, config.block_size)
        prepared = prepare(corpus, tokenizer)
        data.update(corpus=corpus, tokenizer=tokenizer, prepared=prepared, info={
            "corpus": "pydoc", "corpus_name": corpus.name, "corpus_sha256": corpus.sha256, "tokenizer": "char",
            "train_tokens": int(len(prepared.train)), "val_tokens": int(len(prepared.val)), "written_by": "demo"})

    # demo replaces its own earlier demo run in --out; any other run is kept (refused by the guard)
    with open_run_for_writing(out, validate=validate, overwrite=_holds_demo_run(out)):
        return _run_demo(args, config, out, Trainer(config, data["tokenizer"], data["prepared"], out, data["info"],
                                                    progress=args.progress), data["corpus"], data["tokenizer"])


def _holds_demo_run(out: Path) -> bool:
    from scratchlm.checkpoint import read_json
    try:
        header = read_json(out / "config.json")
    except UserError:
        return False
    return isinstance(header, dict) and isinstance(header.get("data"), dict) and \
        header["data"].get("written_by") == "demo"


def _run_demo(args, config, out, trainer, corpus, tokenizer) -> int:
    import time
    from scratchlm.generate import generate_text
    n_params = sum(int(p.data.size) for p in trainer.params)
    print(f"scratchlm demo: a {n_params:,}-parameter GPT ({config.n_layer} layers, {config.n_head} heads, "
          f"{config.n_embd} channels) learns Python's documentation ({len(corpus.text):,} characters of "
          f"pydoc_data, char-level, {tokenizer.vocab_size} symbols), {config.max_iters} iterations "
          f"on {config.backend}.")

    def show(title: str) -> None:
        text = generate_text(trainer.model, tokenizer, DEMO_PROMPT, max_new_tokens=args.sample_tokens,
                             temperature=0.8, top_k=None, seed=0)
        print(f"\n--- {title} ---\n{DEMO_PROMPT}{text}\n---\n", flush=True)

    show("sample before training (random weights)")
    start = time.perf_counter()
    result = trainer.fit()
    print(f"trained {result.iteration} iterations in {time.perf_counter() - start:.0f} s: "
          f"val loss {result.last_val_loss:.3f} (it was ~{_log_vocab(tokenizer.vocab_size):.2f} = ln(vocab) at the start)")
    show("sample after training")
    curve = ", loss.png" if (Path(out) / "loss.png").is_file() else ""
    print(f"The run is in {out}/ (weights, optimizer, metrics.jsonl{curve}). Next:")
    print(f"  scratchlm sample --run {out} --prompt \"The \" --max-new-tokens 300")
    print(f"  scratchlm chat --run {out}")
    print(f"  scratchlm summary --run {out}")
    print(f"  scratchlm train --resume --out {out} --iters {2 * result.iteration}     # train longer")
    print("  scratchlm train --corpus tinyshakespeare --tokenizer char --preset nano-cpu --out runs/nano")
    return 0


def _log_vocab(vocab_size: int) -> float:
    import math
    return math.log(vocab_size)


# ================================================================ the parser

def build_parser() -> argparse.ArgumentParser:
    from scratchlm.config import preset_names
    presets = ", ".join(preset_names())
    parser = _Parser(prog="scratchlm", description="GPT language models from scratch on NumPy/CuPy: "
                     "train on a text corpus, sample from the result.",
                     epilog="Start with: scratchlm demo")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(command_names=commands.choices)        # every command, for the no-command message

    def add_progress(p):
        p.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                       help="always show the progress bar (default: only on a terminal)")
        p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                       help="no bar and no per-iteration lines")

    from scratchlm.models.registry import FAMILIES
    models = ", ".join(FAMILIES)
    p = commands.add_parser("train", help="train a model (GPT, LSTM, ...) on a corpus (or continue a run with --resume)",
                            description="Train a language model on a corpus into a run folder. Config keys use "
                                        "nanoGPT's names; --set key=value overrides any of them (the training "
                                        "keys, or the model's own).")
    p.add_argument("--model", metavar="NAME", help=f"the model family: {models} (default gpt)")
    p.add_argument("--corpus", metavar="NAME|PATH",
                   help="a registered corpus (pydoc, stdlib, tinyshakespeare), a UTF-8 text file or a folder")
    p.add_argument("--tokenizer", metavar="char|bpe[:VOCAB]", help=f"default: {DEFAULT_TOKENIZER}")
    p.add_argument("--preset", metavar="NAME", help=f"one of: {presets} (default: <corpus>-<model> if it exists, "
                                                    f"e.g. names-lstm; else {DEFAULT_PRESET} for gpt and the model's "
                                                    "defaults)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set learning_rate=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--iters", type=whole_number("--iters", 0), metavar="N",
                   help="train until iteration N (sets max_iters)")
    p.add_argument("--backend", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--nproc", type=whole_number("--nproc", 1), metavar="N",
                   help="train data-parallel on N processes through mpiexec (needs the [mpi] extra); "
                        "batch_size is per rank, gradient_accumulation_steps the total")
    add_progress(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("sample", help="generate text from a trained run",
                            description="Generate text from a run folder's model, continuing --prompt.")
    add_sampling_arguments(p)
    p.add_argument("--prompt", default="", help="the text to continue (default: empty)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print each piece of text as soon as it is decoded (default); --no-stream prints "
                        "the whole text at the end")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help="how many samples (default 1; 10 new documents for a document corpus such as names)")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("eval", help="a run's loss, perplexity and bits per token over a whole split",
                            description="Score every token of a split once (not sampled batches) and write "
                                        "DIR/eval.json.")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder written by scratchlm train")
    p.add_argument("--split", choices=["val", "test", "train"], default="val",
                   help="default val; test exists for corpora with a fixed split (names)")
    p.add_argument("--batch-size", type=int, metavar="B", help="rows per forward (default: the run's, >= 32)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")
    p.set_defaults(func=cmd_eval)

    from scratchlm.chat import add_chat_arguments
    p = commands.add_parser("chat", help="talk to a trained run, one line at a time",
                            description="Talk to a run's model: each line you type is continued, the reply "
                                        "streamed; /help lists the commands.")
    add_chat_arguments(p)
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("summary", help="print a model's layers, output shapes and parameter counts",
                            description="Per-layer table of a preset's or a run's model.")
    p.add_argument("--preset", metavar="NAME", help=f"one of: {presets}")
    p.add_argument("--run", metavar="DIR", help="a run folder")
    p.add_argument("--vocab-size", type=whole_number("--vocab-size", 1), metavar="V",
                   help="vocabulary size for --preset (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_summary)

    p = commands.add_parser("bench", help="time training steps of a preset on this machine",
                            description="Forward, backward, clipping and AdamW on random tokens at a preset's "
                                        "shapes; prints ms/iter and tokens/s.")
    p.add_argument("--preset", default="nano-cpu", metavar="NAME", help=f"one of: {presets} (default nano-cpu)")
    p.add_argument("--vocab-size", type=whole_number("--vocab-size", 1), metavar="V",
                   help="vocabulary size (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--iters", type=whole_number("--iters", 1), default=20, metavar="N", help="timed steps (default 20)")
    p.add_argument("--warmup", type=whole_number("--warmup", 0), default=3, metavar="N",
                   help="untimed steps first (default 3)")
    p.add_argument("--kernels", choices=["on", "off"], default="on", help="off: the NumPy references")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("demo", help="train a small GPT on Python's docs in a couple of minutes",
                            description="Train the `demo` preset on the pydoc corpus (ships with Python, no "
                                        "download), char-level, printing a sample before and after. "
                                        "Replaces an earlier demo run in --out; any other run there is kept "
                                        "(refused).")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="the run folder (default runs/demo)")
    p.add_argument("--iters", type=whole_number("--iters", 1), metavar="N", help="iterations (default: the demo preset's)")
    p.add_argument("--sample-tokens", type=whole_number("--sample-tokens", 0), default=300, metavar="N",
                   help="length of each sample (default 300)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")
    add_progress(p)
    p.set_defaults(func=cmd_demo)

    from scratchlm.serve import add_serve_arguments, cmd_serve       # argparse only; the server loads on use
    p = commands.add_parser("serve", help="serve a run over HTTP: an OpenAI-compatible API and a web page",
                            description="Serve a run folder's model: POST /v1/completions and "
                                        "/v1/chat/completions (OpenAI's shapes, streaming), a web page at /.")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    from scratchlm.commands import classify; classify.register(commands)  # noqa: E702
    from scratchlm.commands import word2vec; word2vec.register(commands)  # noqa: E702
    from scratchlm.commands import attention, translate; translate.register(commands); attention.register(commands)
    from scratchlm.commands import vae; vae.register(commands)  # noqa: E702
    from scratchlm.commands import gan; gan.register(commands)  # noqa: E702
    return parser


# errno values of OSErrors a user causes (a path, a permission, a full disk): one line, exit 2
USER_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC,
               errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.EMFILE, errno.ENFILE, errno.ENOTEMPTY,
               errno.EXDEV, getattr(errno, "EDQUOT", errno.ENOSPC)}
OS_ERROR_FIX = {errno.ENOSPC: "free some disk space or choose another folder",
                getattr(errno, "EDQUOT", errno.ENOSPC): "free some disk space or choose another folder",
                errno.EACCES: "check the permissions or choose another folder",
                errno.EPERM: "check the permissions or choose another folder",
                errno.EROFS: "choose a folder on a writable file system"}


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device`` -> "no space left on device: runs/x/model.safetensors; free ..." """
    what = (exc.strerror or str(exc)).rstrip(".").lower()
    where = ": " + " -> ".join(os.fspath(f) for f in (exc.filename, exc.filename2) if f is not None) \
        if exc.filename is not None else ""
    fix = OS_ERROR_FIX.get(exc.errno, "check the path")
    return f"{what}{where}; {fix}"


def _quiet_closed_stdout() -> None:
    """stdout's reader is gone (``| head``): point stdout at /dev/null so the interpreter's final
    flush does not raise again (the recipe of Python's signal documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv=None) -> int:
    """Run one command; the one place where user errors become a line and an exit status."""
    def error(message) -> int:
        print(f"scratchlm: error: {' '.join(str(message).split())}", file=sys.stderr)
        return EXIT_USER_ERROR

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.raw_argv = list(sys.argv[1:] if argv is None else argv)     # for train --nproc's re-execution
        if args.command is None:
            raise UserError(f"choose a command: {', '.join(args.command_names)} (see 'scratchlm --help'; "
                            "start with 'scratchlm demo')")
        status = args.func(args) or 0
        sys.stdout.flush()                        # a closed pipe shows up here, not at exit
        return status
    except (UserError, BackendUnavailable) as exc:
        return error(exc)
    except BrokenPipeError:
        _quiet_closed_stdout()
        return EXIT_BROKEN_PIPE
    except MemoryError as exc:
        return error(f"out of memory ({exc or 'an allocation failed'}); lower batch_size, block_size or n_embd "
                     f"('scratchlm summary' prints the estimate per component)")
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            raise                                 # not something the user can fix: a bug, keep the traceback
        return error(describe_os_error(exc))
    except KeyboardInterrupt as exc:
        print(" ".join(str(exc).split()) or "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
