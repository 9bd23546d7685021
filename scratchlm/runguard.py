"""The one guard every command that writes a run folder goes through.

    from scratchlm.runguard import open_run_for_writing
    with open_run_for_writing(out, resume=args.resume, validate=check_everything) as run_dir:
        ...  # write config.json, checkpoints, metrics.jsonl into run_dir

In this order, and nothing is written before step 3:

1. The folder is checked: ``--out`` must not be a file, lie under one or be unwritable; without
   ``resume`` it must not hold a run (any run file counts, see ``RUN_HOLDING_FILES``), with
   ``resume`` it must.
2. ``validate()`` runs: every argument, the config, the memory estimate. A refusal in 1 or 2
   leaves the folder exactly as it was.
3. The folder is created and its lock taken: ``fcntl.flock`` on ``.scratchlm.lock`` inside it,
   which then holds the writer's pid. The kernel releases a flock when its process exits, however
   it exits (a crash, ``kill -9``), so a lock is never left stale. A second writer is refused
   with one line naming the holder's pid. The "holds a run" check is repeated under the lock, so
   two fresh runs started together cannot both pass it.
4. The body writes. The lock is released when it ends.

Readers (``sample``, ``eval``, ``summary``) take no lock: each checkpoint file is replaced
atomically, and ``runs.load_model`` checks that model.safetensors and trainer.json carry the same
iteration, waiting briefly while a save is between the two (see ``runs.read_consistent``).

Where ``fcntl`` does not exist (Windows) the lock is skipped; everything else holds.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

from scratchlm.errors import UserError
from scratchlm.runs import RUN_FILES

LOCK_NAME = ".scratchlm.lock"
# Any of these means "this folder holds a run": a usable model.safetensors alone is worth keeping.
RUN_HOLDING_FILES = RUN_FILES + ("metrics.jsonl",)


def run_files_in(run_dir) -> list[str]:
    """The run files present in ``run_dir`` (empty when it is not a folder)."""
    run_dir = Path(run_dir)
    return [name for name in RUN_HOLDING_FILES if (run_dir / name).exists()] if run_dir.is_dir() else []


def check_out_folder(out, may_hold_run: bool = False, flag: str = "--out", must_hold_run: bool = False) -> Path:
    """Refuse an ``--out`` no run can be written to, before anything is written; returns it as a Path.
    A folder holding a run is refused unless ``may_hold_run``; one without is refused if ``must_hold_run``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; choose a folder for the run")
    for parent in out.parents:                   # a path under a file cannot be created
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {out} lies under {parent}, which is a file; choose another folder")
            if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {out} cannot be created: {parent} is not writable; choose another folder")
            break
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out} is not writable; choose another folder or fix its permissions")
    present = run_files_in(out)
    if must_hold_run and "config.json" not in present:
        if not out.exists():
            raise UserError(f"run folder {out} does not exist; nothing to resume (drop --resume to start a run)")
        raise UserError(f"{out} holds no run to resume (no config.json); drop --resume to start a run there")
    if not may_hold_run and present:
        raise UserError(f"{out} already holds a run ({', '.join(present)}); pass --resume to continue it or "
                        f"choose another {flag}")
    return out


@contextlib.contextmanager
def open_run_for_writing(out, resume: bool = False, validate: Callable[[], object] | None = None,
                         overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Validate, check the folder, lock it, then let the body write (see the module docstring).

    ``overwrite=True`` (a fresh run only) replaces a run in ``out``: its run files are deleted
    under the lock, before the body writes, so no reader ever sees old and new files mixed.
    """
    out = check_out_folder(out, resume or overwrite, flag, must_hold_run=resume)
    if validate is not None:
        validate()
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        check_out_folder(out, resume or overwrite, flag, must_hold_run=resume)      # again, under the lock
        if overwrite and not resume:
            for name in run_files_in(out):
                (out / name).unlink()
        yield out


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock (an exclusive flock) for the ``with`` block."""
    try:
        import fcntl
    except ImportError:                            # no flock here: unguarded, as before
        yield
        return
    path = Path(run_dir) / LOCK_NAME
    # O_RDWR|O_CREAT without O_TRUNC: opening must not erase the holder's pid before we know we hold it
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise UserError(f"{run_dir} is being written by another scratchlm (pid {holder}); wait for it to "
                            f"finish or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def writer_active(run_dir) -> bool:
    """Whether a process holds ``run_dir``'s writer lock now (read-only: a reader's question)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:                       # no lock file: no writer ever locked it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)                      # closing drops the shared lock if we got it
    return False
