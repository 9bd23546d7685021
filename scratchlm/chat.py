"""``scratchlm chat --run DIR``: talk to a trained model, one line at a time, replies streamed.

The models trained here are plain language models: they continue text, they were never taught a
dialogue format. So the conversation is kept as plain text that such a model can continue:

    <your line>\\n<its reply>\\n\\n<your next line>\\n<its next reply>\\n\\n ...

Each reply is generated after ``<your line>\\n`` until its own text contains a blank line (the
stop string ``"\\n\\n"``; a single leading newline does not count, since the stop string is
looked for in the reply only; ``"<|endoftext|>"`` also stops it) or reaches ``max_new_tokens``;
the stop string is not shown. The whole conversation is the context of the next reply, trimmed
oldest token first so that it leaves room for a reply in the model's window: it keeps at most
block_size - min(max_new_tokens, block_size // 2) tokens (``/context`` shows how many). Reply
number n (counting from 0 since the start, ``/reset`` or ``/seed``) is sampled with seed
``seed + n``, so a scripted session is reproducible.

Commands: /help /reset /temp X /topk K /topp P /seed S /max N /context /quit. A bad command gets a
one-line hint. Ctrl-C during a reply stops that reply (what was shown stays in the conversation)
and returns to the prompt; Ctrl-D or /quit exits with status 0.

In a terminal there is a ``you>`` prompt with line editing and history (readline, where Python
has it). With piped stdin there is no decoration: every non-empty line that is not a command gets
exactly one reply line on stdout (a newline inside a reply is written as the two characters
``\\n``, a backslash as ``\\\\``; a line the tokenizer refuses gets an empty reply line and
its error, positioned in that line, on stderr), and what commands print goes to stderr, so
stdout holds only replies, line k answering the k-th non-command line:

    printf 'The list type\\n/temp 0\\nThe dict type\\n' | scratchlm chat --run runs/demo
"""
from __future__ import annotations

import argparse
import sys

from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.generate import SamplingArgumentError, check_sampling_args, stream_text, until_interrupted

REPLY_STOPS = ["\n\n", "<|endoftext|>"]
TURN_END = "\n\n"          # after a reply, before the next line of the user
RECURRENT_WINDOW = 1024   # a recurrent model (no window) rereads at most this much of the conversation

HELP = """commands:
  /help        this list
  /reset       forget the conversation
  /temp X      temperature (0 = greedy)          /topk K   keep the K likeliest tokens (0 = off)
  /topp P      nucleus: keep tokens up to mass P (1 = off)
  /seed S      seed of the next reply (reply n uses S + n)
  /max N       longest reply, in tokens           /context  how much of the window the conversation uses
  /quit        leave (Ctrl-D too); Ctrl-C stops a reply"""


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scratchlm chat`` (those of ``sample`` less the prompt), added to ``parser``."""
    from scratchlm.commands.arguments import add_sampling_arguments
    add_sampling_arguments(parser)


class ChatSession:
    """The conversation and the sampling controls; no terminal I/O (``run_chat`` does that)."""

    def __init__(self, model, tokenizer, temperature=0.8, top_k=200, top_p=None, repetition_penalty=1.0,
                 seed=1337, max_new_tokens=200):
        self.model, self.tokenizer = model, tokenizer
        self.controls = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)
        self.seed = seed
        check_chat_controls(self.controls, {}, seed)
        try:
            tokenizer.encode(TURN_END)
        except UserError:
            raise UserError("this run's tokenizer has no newline, which chat puts between turns; "
                            "use scratchlm sample instead") from None
        self.reset()

    def reset(self) -> None:
        self.history = ""          # the conversation so far, in the format of the module docstring
        self.replies = 0           # replies since the start, /reset or /seed (reply n uses seed + n)

    # ------------------------------------------------------------- context
    def window(self) -> int:
        """The model's window; a recurrent model has none, and rereads at most RECURRENT_WINDOW tokens."""
        from scratchlm.generate import context_window
        return context_window(self.model) or RECURRENT_WINDOW

    def context_limit(self) -> int:
        block_size = self.window()
        return block_size - min(self.controls["max_new_tokens"], block_size // 2)

    def context_ids(self, text: str) -> list[int]:
        """Token ids of ``text``, its oldest tokens dropped to fit ``context_limit``."""
        ids = self.tokenizer.encode(text) if text else []
        return ids[-self.context_limit():]

    # ------------------------------------------------------------- one reply
    def reply(self, line: str):
        """Stream the reply to ``line`` (an iterator of text pieces). The conversation records
        what was streamed when the iterator ends, is closed, or is interrupted. A line the
        tokenizer refuses raises UserError, its position counted in ``line`` (not the conversation)."""
        self.tokenizer.encode(line)           # a character outside the vocabulary raises here, located in the line
        text = self.history + line + "\n"
        ids = self.context_ids(text)
        pieces = stream_text(self.model, self.tokenizer, ids, stop=REPLY_STOPS,
                             seed=self.seed + self.replies, **self.controls)
        return self._record(text, pieces)

    def _record(self, text, pieces):
        shown = []
        try:
            for piece in pieces:
                shown.append(piece)
                yield piece
        finally:
            pieces.close()
            self.history = text + "".join(shown) + TURN_END
            self.replies += 1

    # ------------------------------------------------------------- commands
    def command(self, line: str) -> str:
        """Run a /command; return what to print. Raises ``QuitChat`` for /quit and
        ``CommandError`` (a one-line hint) for a bad command or value."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name == "/quit":
            raise QuitChat
        if name == "/help":
            return HELP
        if name == "/reset":
            self.reset()
            return "conversation cleared"
        if name == "/context":
            used = len(self.context_ids(self.history))
            return (f"context: {used} of {self.context_limit()} tokens kept for the conversation "
                    f"(window {self.window()}; {self.replies} replies so far)")
        setters = {command: (key, int if key in ("top_k", "max_new_tokens", "seed") else float)
                   for key, command in COMMAND_OF.items()}
        if name not in setters:
            raise CommandError(f"unknown command {name!r}; /help lists the commands")
        key, kind = setters[name]
        try:
            value = kind(arg)
        except ValueError:
            raise CommandError(f"{name} needs {'an integer' if kind is int else 'a number'}, e.g. "
                               f"{name} {'1' if kind is int else '0.8'}") from None
        if key == "seed":
            try:
                check_sampling_args(seed=value, names=COMMAND_OF)
            except SamplingArgumentError as exc:
                raise CommandError(str(exc)) from None
            self.seed, self.replies = value, 0
            return f"seed = {value}"
        controls = {**self.controls, key: value}
        try:
            check_chat_controls(controls, COMMAND_OF)
        except SamplingArgumentError as exc:
            raise CommandError(str(exc)) from None
        self.controls = controls
        return f"{key} = {value}"


# what each control is typed as inside chat
COMMAND_OF = {"temperature": "/temp", "top_k": "/topk", "top_p": "/topp", "max_new_tokens": "/max", "seed": "/seed"}


def check_chat_controls(controls: dict, names: dict, seed: int = 0) -> None:
    """``check_sampling_args`` plus chat's own rule, the same for ``--max-new-tokens`` and ``/max``:
    a reply has at least one token (0 would answer every line with nothing)."""
    check_sampling_args(seed=seed, names=names, **controls)
    if controls["max_new_tokens"] < 1:
        raise SamplingArgumentError(f"{names.get('max_new_tokens', 'max_new_tokens')} must be an integer >= 1 in "
                                    f"chat (a reply needs a token), got {controls['max_new_tokens']}")


def one_line(text: str) -> str:
    """A reply piece as it goes down a pipe: each backslash doubled, each newline written as a
    backslash and ``n``, so a reply is exactly one line."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class QuitChat(Exception):
    """/quit was typed."""


class CommandError(Exception):
    """A bad command or value; the message is the one-line hint."""


# ====================================================================== the terminal loop

def run_chat(args) -> int:
    """The chat loop on stdin/stdout for parsed ``args`` (see ``add_chat_arguments``); exit code."""
    from scratchlm.commands.arguments import SAMPLING_FLAGS
    from scratchlm.runs import load_model
    check_chat_controls({key: getattr(args, key) for key in SAMPLING_FLAGS if key != "seed"}, SAMPLING_FLAGS,
                        args.seed)                          # before the model loads, by the flags' names
    try:
        backend.use_backend(args.backend)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    model, tokenizer, _ = load_model(args.run)
    session = ChatSession(model, tokenizer, args.temperature, args.top_k, args.top_p,
                          args.repetition_penalty, args.seed, args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() gains line editing and history)
        except ImportError:
            pass
        from scratchlm.models.registry import num_parameters
        print(f"chatting with {args.run} ({num_parameters(model):,} parameters, a {session.window()}-token window). "
              f"/help for commands, Ctrl-C stops a reply, Ctrl-D leaves.")
    notes = sys.stdout if interactive else sys.stderr    # piped: stdout holds replies only
    lines = iter(sys.stdin.readline, "") if not interactive else None
    while True:
        try:
            line = input("you> ") if interactive else next(lines)
        except (EOFError, StopIteration):
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit leaves)", file=notes)
            continue
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            try:
                print(session.command(line), file=notes, flush=True)
            except QuitChat:
                return 0
            except CommandError as exc:
                print(exc, file=notes, flush=True)
            continue
        try:
            _print_reply(session, line, notes)
        except KeyboardInterrupt:                # Ctrl-C just before or after the reply streamed
            print(" [stopped]", flush=True)


def _print_reply(session: ChatSession, line: str, notes) -> None:
    """Stream one reply to stdout; Ctrl-C stops it. A line the tokenizer refuses is a note, and
    still gets its (empty) reply line on stdout, so piped replies stay one per line."""
    out = sys.stdout
    try:
        pieces = session.reply(line)
    except UserError as exc:
        print(" ".join(str(exc).split()), file=notes, flush=True)
        if notes is not out:
            out.write("\n")
            out.flush()
        return
    piped = notes is not out
    try:
        for piece in until_interrupted(pieces):   # Ctrl-C: raised between pieces, stream closed
            out.write(one_line(piece) if piped else piece)
            out.flush()
        out.write("\n")
    except KeyboardInterrupt:                      # the conversation keeps what was shown
        out.write(" [stopped]\n")
    out.flush()


def main(argv=None) -> int:
    """``python -m scratchlm.chat --run DIR``: the same as ``scratchlm chat``."""
    parser = argparse.ArgumentParser(prog="scratchlm chat", description="Talk to a trained run.")
    add_chat_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_chat(args)
    except UserError as exc:
        print(f"scratchlm: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
