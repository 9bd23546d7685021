"""``scratchlm summary`` (a model's layers, shapes, parameters and memory) and ``scratchlm bench``
(training steps of a preset timed on this machine)."""
from __future__ import annotations

from scratchlm.commands.arguments import use_backend, whole_number
from scratchlm.commands.train import DEFAULT_PRESET
from scratchlm.errors import UserError


def register(subparsers) -> None:
    from scratchlm.config import preset_names
    presets = ", ".join(preset_names())
    p = subparsers.add_parser("summary", help="print a model's layers, output shapes and parameter counts",
                               description="Per-layer table of a preset's or a run's model.")
    p.add_argument("--preset", metavar="NAME", help=f"one of: {presets}")
    p.add_argument("--run", metavar="DIR", help="a run folder")
    p.add_argument("--vocab-size", type=whole_number("--vocab-size", 1), metavar="V",
                   help="vocabulary size for --preset (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_summary)

    p = subparsers.add_parser("bench", help="time training steps of a preset on this machine",
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


def config_from(args):
    from scratchlm.config import apply_overrides, load_preset
    config = load_preset(args.preset or DEFAULT_PRESET)
    config = apply_overrides(config, args.set)
    if getattr(args, "iters", None) is not None:
        config = config.with_value("max_iters", args.iters, where="--iters")
    if getattr(args, "backend", None):
        config = config.with_value("backend", args.backend, where="--backend")
    return config.validate()


def cmd_bench(args) -> int:
    """Time training steps of a preset's model on random tokens (the shapes are what matter)."""
    import statistics
    import tempfile
    import time
    from scratchlm import backend, kernels
    from scratchlm.config import read_preset
    from scratchlm.memory import check_fits_in_memory
    from scratchlm.runsetup import random_tokens_trainer
    use_backend(args.backend)
    kernels.use_reference(args.kernels == "off")
    backend.keep_freed_host_memory()
    config = config_from(args)
    vocab_size = args.vocab_size if args.vocab_size is not None else read_preset(args.preset).get("vocab_size", 65)
    check_fits_in_memory(config.model_config(vocab_size), config.batch_size, config.block_size)
    seconds = []
    with tempfile.TemporaryDirectory() as run_dir:    # the trainer's own step, on random tokens
        trainer = random_tokens_trainer(config, vocab_size, run_dir)
        for step in range(args.warmup + args.iters):  # warm-up: Numba compiles, caches fill
            backend.synchronize()
            start = time.perf_counter()
            trainer.train_step(step)
            backend.synchronize()
            if step >= args.warmup:
                seconds.append(time.perf_counter() - start)
    model, B, T = trainer.model, config.batch_size, config.block_size
    tokens_per_step = B * T * config.gradient_accumulation_steps
    ms = statistics.median(seconds) * 1e3
    print(f"preset {args.preset}: {model.num_parameters(non_embedding=False):,} parameters, B={B} T={T}, "
          f"backend {backend.get_backend()}, kernels {args.kernels}")
    print(f"{ms:.1f} ms/iter, {tokens_per_step / ms * 1e3:,.0f} tokens/s (median of {args.iters} steps after "
          f"{args.warmup} warm-up; bench/train.py puts PyTorch beside it)")
    return 0
