"""``scratchlm eval``: a run's loss over a whole split (``scratchlm.evaluate``), printed and written
to DIR/eval.json."""
from __future__ import annotations

from pathlib import Path

from scratchlm.commands.arguments import use_backend


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="a run's loss, perplexity and bits per token over a whole split",
                               description="Score every token of a split once (not sampled batches) and write "
                                           "DIR/eval.json.")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder written by scratchlm train")
    p.add_argument("--split", choices=["val", "test", "train"], default="val",
                   help="default val; test exists for corpora with a fixed split (names)")
    p.add_argument("--batch-size", type=int, metavar="B", help="rows per forward (default: the run's, >= 32)")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from scratchlm.evaluate import evaluate_run
    use_backend(args.backend)
    report = evaluate_run(args.run, split=args.split, batch_size=args.batch_size)
    bits = f", {report['bits_per_char']:.4f} bits/char" if "bits_per_char" in report else \
        f", {report['bits_per_token']:.4f} bits/token"
    print(f"{args.run} ({report['model']}, {report['corpus']}) {args.split}: loss {report['loss']:.4f} over "
          f"{report['tokens']:,} tokens, perplexity {report['perplexity']:.3f}{bits}; wrote {Path(args.run) / 'eval.json'}")
    return 0
