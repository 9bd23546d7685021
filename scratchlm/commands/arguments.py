"""Argument helpers shared by the commands (``scratchlm/commands/``) and ``chat.py``: number flags parsed like
``--set``, and the sampling options of ``sample`` and ``chat``. They sit below both, so neither
imports the other."""
from __future__ import annotations

import argparse


def whole_number(flag: str, minimum: int | None = None):
    """An argparse ``type`` for an integer flag: the same parser as ``--set`` (``1e3`` is 1000)."""
    def parse(text):
        from scratchlm.config import parse_int
        return parse_int(text, flag, minimum)
    return parse


def real_number(flag: str):
    """An argparse ``type`` for a number flag: the same parser as ``--set``."""
    def parse(text):
        from scratchlm.config import parse_float
        return parse_float(text, flag)
    return parse


def prompt_ids(tokenizer, prompt: str, block_size: int, note=None) -> list[int]:
    """The prompt's token ids, cropped to the model's window (its last ``block_size`` tokens) with a note."""
    from scratchlm.generate import encode_prompt
    ids = encode_prompt(tokenizer, prompt)
    if block_size is not None and len(ids) > block_size:         # None: a recurrent model, no window
        if note is not None:
            note(f"note: the prompt is {len(ids)} tokens, longer than block_size {block_size}; "
                 f"using its last {block_size} tokens")
        ids = ids[-block_size:]
    return ids


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``sample`` and ``chat``: which run, the sampling controls, the backend."""
    parser.add_argument("--run", required=True, metavar="DIR", help="a run folder written by scratchlm train")
    parser.add_argument("--max-new-tokens", type=whole_number("--max-new-tokens"), default=200, metavar="N",
                        help="default 200")
    parser.add_argument("--temperature", type=real_number("--temperature"), default=0.8, metavar="T",
                        help="default 0.8; lower is more conservative, 0 = greedy")
    parser.add_argument("--top-k", type=whole_number("--top-k"), default=200, metavar="K",
                        help="keep the K likeliest tokens (0 = off; default 200)")
    parser.add_argument("--top-p", type=real_number("--top-p"), default=None, metavar="P",
                        help="nucleus sampling: keep tokens up to mass P")
    parser.add_argument("--repetition-penalty", type=real_number("--repetition-penalty"), default=1.0, metavar="R",
                        help="> 1 discourages tokens already in the context (default 1 = off)")
    parser.add_argument("--seed", type=whole_number("--seed"), default=1337, metavar="S", help="default 1337")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")


# the flag each sampling control is typed as, for error messages
SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                  "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def check_sampling_flags(args) -> None:
    """Refuse a bad sampling flag by the name the user typed, before the model is loaded."""
    from scratchlm.generate import check_sampling_args
    check_sampling_args(**{key: getattr(args, key) for key in SAMPLING_FLAGS}, names=SAMPLING_FLAGS)


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """--progress / --no-progress of the commands that train."""
    parser.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                        help="always show the progress bar (default: only on a terminal)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                        help="no bar and no per-iteration lines")


def use_backend(name: str) -> None:
    """Switch the array backend, or refuse with one line (e.g. --backend cupy without a GPU)."""
    from scratchlm import backend
    from scratchlm.errors import UserError
    try:
        backend.use_backend(name)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
