"""``scratchlm demo``: the newcomer's first run -- a small GPT learns Python's own documentation
(the pydoc corpus ships with every Python) in a couple of minutes, with a sample before and after."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from scratchlm.commands.arguments import add_progress_arguments, use_backend, whole_number
from scratchlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a small GPT on Python's docs in a couple of minutes",
                               description="Train the `demo` preset on the pydoc corpus (ships with Python, no "
                                           "download), char-level, printing a sample before and after. "
                                           "Replaces an earlier demo run in --out; any other run there is kept "
                                           "(refused).")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="the run folder (default runs/demo)")
    p.add_argument("--iters", type=whole_number("--iters", 1), metavar="N", help="iterations (default: the demo preset's)")
    p.add_argument("--sample-tokens", type=whole_number("--sample-tokens", 0), default=300, metavar="N",
                   help="length of each sample (default 300)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")
    add_progress_arguments(p)
    p.set_defaults(func=cmd_demo)


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
        use_backend(config.backend)
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
