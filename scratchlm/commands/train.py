"""``scratchlm train``: any registered model family on a corpus, into a run folder (or ``--resume``).

    scratchlm train --corpus tinyshakespeare --tokenizer char --preset nano-cpu --out runs/nano
    scratchlm train --model lstm --corpus names --out runs/names-lstm     # preset names-lstm
    scratchlm train --nproc 2 --corpus tinyshakespeare --preset nano-cpu --out runs/dp

The family's config and constructor come from ``scratchlm.models.registry``; the loop is
``scratchlm.train``'s one Trainer; ``--nproc N`` re-executes this command as N MPI ranks.
"""
from __future__ import annotations

from scratchlm.commands.arguments import add_progress_arguments, whole_number
from scratchlm.errors import UserError

DEFAULT_PRESET = "nano-cpu"
DEFAULT_TOKENIZER = "char"


def register(subparsers) -> None:
    from scratchlm.config import preset_names
    presets = ", ".join(preset_names())
    from scratchlm.models.registry import FAMILIES
    models = ", ".join(FAMILIES)
    p = subparsers.add_parser("train", help="train a model (GPT, LSTM, ...) on a corpus (or continue a run with --resume)",
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
    add_progress_arguments(p)
    p.set_defaults(func=cmd_train)


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
    from scratchlm import launcher
    raise SystemExit(launcher.relaunch(args.nproc, args.raw_argv))
