"""``scratchlm sample`` and ``scratchlm chat``: text from a trained run through the one sampler
(``scratchlm.generate``), streamed to the terminal."""
from __future__ import annotations

import argparse
import sys

from scratchlm.commands.arguments import add_sampling_arguments, check_sampling_flags, prompt_ids, use_backend
from scratchlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate text from a trained run",
                               description="Generate text from a run folder's model, continuing --prompt.")
    add_sampling_arguments(p)
    p.add_argument("--prompt", default="", help="the text to continue (default: empty)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print each piece of text as soon as it is decoded (default); --no-stream prints "
                        "the whole text at the end")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help="how many samples (default 1; 10 new documents for a document corpus such as names)")
    p.set_defaults(func=cmd_sample)

    from scratchlm.chat import add_chat_arguments
    p = subparsers.add_parser("chat", help="talk to a trained run, one line at a time",
                               description="Talk to a run's model: each line you type is continued, the reply "
                                           "streamed; /help lists the commands.")
    add_chat_arguments(p)
    p.set_defaults(func=cmd_chat)


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
    use_backend(args.backend)
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
