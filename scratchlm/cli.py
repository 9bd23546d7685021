"""The ``scratchlm`` command: the top of the house. It builds the parser from the command modules
in ``scratchlm/commands/`` (one module per family: train, demo, sample/chat, eval, summary/bench,
serve, translate, attention, classify, word2vec, vae, gan) and is the one place where a user's
mistake becomes a line and an exit status.

    scratchlm demo
    scratchlm train --corpus tinyshakespeare --tokenizer char --preset nano-cpu --out runs/nano
    scratchlm train --model lstm --corpus names --out runs/names-lstm     # preset names-lstm
    scratchlm eval --run runs/names-lstm --split test
    scratchlm sample --run runs/nano --prompt "ROMEO:"
    scratchlm summary --preset gpt2-124m

Mistakes a user can make (a missing run folder, a corrupt checkpoint, an unknown preset or key, a
bad value, a path that cannot be written, a full disk, a config too big for the memory) end in one
line on stderr, ``scratchlm: error: ...``, and exit status 2, with no traceback: ``main`` turns
them into that line. Output piped into a reader that closes early (``| head``) ends the command
quietly with status 141 (128 + SIGPIPE, what a shell reports for Unix tools killed by a closed
pipe). Ctrl-C exits with 130 (while training, after saving a checkpoint). Anything else is a bug
and keeps its traceback.

Commands that write a run folder (train, demo, translate train, classify, word2vec, vae, gan) go
through ``scratchlm.runguard``: arguments and config checked first, then the folder's lock, then
the writes.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from scratchlm.backend import BackendUnavailable
from scratchlm.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141            # 128 + SIGPIPE

# the command modules, in the order `scratchlm --help` lists them
COMMAND_MODULES = ("train", "generation", "evaluation", "inspect", "demo", "serve", "classify", "word2vec",
                   "translate", "attention", "vae", "gan")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError (one line) instead of usage + exit."""

    def error(self, message):
        raise UserError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    parser = _Parser(prog="scratchlm", description="Language models from scratch on NumPy/CuPy: train the "
                     "ladder from bigram to GPT, translators, classifiers, word vectors and text generators; "
                     "sample, evaluate and serve them.",
                     epilog="Start with: scratchlm demo")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(command_names=commands.choices)        # every command, for the no-command message
    for name in COMMAND_MODULES:
        importlib.import_module(f"scratchlm.commands.{name}").register(commands)
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
