"""The ``--nproc N`` launcher: run a command as N MPI ranks under mpiexec, and bound how it ends.

    scratchlm train --nproc 2 ...   ->   mpiexec -n 2 python -m scratchlm train ...

``relaunch`` starts mpiexec with each rank's thread count set (cores / N unless the user set
them), passes its output through, turns mpiexec's banner about a rank that died without a word
into one line naming the rank (each rank leaves its pid in a folder, ``leave_note``), passes
Ctrl-C on once and forces the job down if it has not stopped within the grace
($SCRATCHLM_STOP_GRACE_S), so nothing of the job outlives the launcher. What the ranks do with
Ctrl-C and with a failing rank is in ``scratchlm/distributed.py``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

from scratchlm.errors import UserError

INSTALL_HINT = "pip install 'scratchlm[mpi]'"


def mpiexec_path() -> str:
    """mpiexec beside this Python (the mpich wheel puts it in the venv's bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if found is None:
        raise UserError(f"--nproc needs an MPI launcher (mpiexec) and mpi4py; {INSTALL_HINT}")
    return found


def launch_command(nproc: int, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The mpiexec command that runs ``scratchlm <argv>`` (--nproc already removed) as ``nproc``
    ranks, and its environment: each rank gets cores / nproc threads unless the user set them."""
    try:
        import mpi4py  # noqa: F401  (the ranks need it; refuse here, once, rather than N times)
    except ImportError:
        raise UserError(f"--nproc {nproc} needs mpi4py; {INSTALL_HINT}") from None
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env.setdefault(name, threads)
    return [mpiexec_path(), "-n", str(nproc), sys.executable, "-m", "scratchlm", *argv], env


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` with ``--nproc N`` / ``--nproc=N`` taken out."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


# Set by the --nproc launcher: a folder where each rank leaves "pid.R" (its process id) and, when it
# fails with its own line, "failed.R" -- so the launcher can name a rank that died without a word.
RANK_FOLDER_VARIABLE = "SCRATCHLM_RANK_FOLDER"
_HYDRA_BANNER = ("=====", "=   ", "YOUR APPLICATION TERMINATED", "This typically refers", "Please see the FAQ")


def leave_note(name: str, text: str) -> None:
    """A rank's note for the launcher (its pid, or that it failed with its own line), when under one."""
    folder = os.environ.get(RANK_FOLDER_VARIABLE)
    if folder:
        with contextlib.suppress(OSError), open(os.path.join(folder, name), "w") as f:
            f.write(text)


STOP_GRACE_VARIABLE = "SCRATCHLM_STOP_GRACE_S"


def stop_grace_seconds() -> float:
    """How long the ranks get after Ctrl-C to finish their step, save and exit before the launcher
    forces them down ($SCRATCHLM_STOP_GRACE_S, default 120 s: an eval in progress on rank 0 runs
    to its end, then the save)."""
    text = os.environ.get(STOP_GRACE_VARIABLE, "120")
    try:
        return max(1.0, float(text))
    except ValueError:
        raise UserError(f"{STOP_GRACE_VARIABLE}={text!r} is not a number of seconds; e.g. 120") from None


def _launcher_child() -> None:
    """In mpiexec before it starts: its own process group (a terminal's Ctrl-C reaches the launcher
    alone, which passes it on once -- two Ctrl-C at mpiexec mean "abort now"), and SIGINT's default
    disposition and an empty signal mask, whatever this process inherited (a background job of a
    non-interactive shell starts with SIGINT ignored, and ignored signals survive exec down to the
    ranks, where Python would then never turn SIGINT into a stop)."""
    import signal
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _force_stop(proc, grace: float, folder: str, forced) -> None:
    """The grace after Ctrl-C ran out: a second SIGINT (mpiexec: "abort now"), then, if mpiexec
    still runs, SIGKILL to it and every rank. Sets the event ``forced``: an aborted mpiexec may
    still exit with status 0, and the job was not a success."""
    import signal
    import time
    if proc.poll() is not None:
        return
    forced.set()
    print(f"scratchlm: error: the ranks did not stop within {grace:g} s of Ctrl-C "
          f"(${STOP_GRACE_VARIABLE}); killing them; the last checkpoint is what --resume continues",
          file=sys.stderr, flush=True)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    time.sleep(10)
    if proc.poll() is None:
        _kill_job(proc, folder)


def _kill_job(proc, folder: str) -> None:
    """SIGKILL to mpiexec's process group (mpiexec, its proxy) and to every rank still running: Hydra
    puts each rank in a process group of its own, so the ranks are found by the pids they noted
    in ``folder``, each checked to be ours (its environment names ``folder``) before it is killed."""
    import signal
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for name in os.listdir(folder):
        if not name.startswith("pid."):
            continue
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(folder, name)) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/environ", "rb") as f:
                ours = f"{RANK_FOLDER_VARIABLE}={folder}".encode() in f.read()
            if ours:
                os.kill(pid, signal.SIGKILL)


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run this command as ``nproc`` ranks under mpiexec and return its exit status.

    mpiexec's output passes through, except its banner about a rank that died (killed, out of
    memory): that becomes one line naming the rank. Ctrl-C (or a SIGINT sent to this process) is
    passed on to mpiexec, which gives it to every rank; the ranks agree to stop after the same step
    and rank 0 saves. If the job has not ended ``stop_grace_seconds()`` later it is forced down, and
    whatever of it is left when mpiexec ends is killed, so the stop is bounded in time."""
    import re
    import signal
    import subprocess
    import tempfile
    import threading
    command, env = launch_command(nproc, without_nproc(argv))
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="scratchlm-ranks-") as folder:
        env[RANK_FOLDER_VARIABLE] = folder
        grace = stop_grace_seconds()            # (a bad value refused before anything starts)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, bufsize=1,
                                preexec_fn=_launcher_child)
        forced = threading.Event()
        force = threading.Timer(grace, _force_stop, args=(proc, grace, folder, forced))
        force.daemon = True

        def forward(signum, frame):
            proc.send_signal(signal.SIGINT)      # mpiexec passes it to every rank; a second one aborts
            if not force.is_alive():
                force.start()                    # a bounded stop, whatever a rank is doing
        previous = signal.signal(signal.SIGINT, forward)
        dead_pid, how = None, None
        try:
            for line in proc.stdout:
                if line.startswith(_HYDRA_BANNER):
                    found = re.search(r"PID (\d+) RUNNING", line) or re.search(r"EXIT STRING: (.*)", line)
                    if found and "PID" in line:
                        dead_pid = found.group(1)
                    elif found:
                        how = found.group(1).strip()
                    continue
                sys.stdout.write(line)
                sys.stdout.flush()
            status = proc.wait()
            if forced.is_set() and status == 0:
                status = 130                     # forced down after Ctrl-C (128 + SIGINT), whatever mpiexec said
        finally:
            signal.signal(signal.SIGINT, previous)
            force.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            # nothing of the job outlives the launcher (a rank left behind would hold our pipes)
            _kill_job(proc, folder)
        notes = os.listdir(folder)
        if dead_pid is not None and not any(name.startswith("failed.") for name in notes):
            rank_of = {}
            for name in notes:
                if name.startswith("pid."):
                    with open(os.path.join(folder, name)) as f:
                        rank_of[f.read().strip()] = name.split(".", 1)[1]
            who = f"rank {rank_of[dead_pid]}" if dead_pid in rank_of else f"a rank (process {dead_pid})"
            print(f"scratchlm: error: {who} of {nproc} died without a word ({how or 'no exit string'}); "
                  "mpiexec stopped the other ranks; continue from the last checkpoint with --resume",
                  file=sys.stderr, flush=True)
    return status
