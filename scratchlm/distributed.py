"""Data parallelism across processes over MPI: ranks, batch splitting, gradient all-reduce, faults.

    scratchlm train --nproc 2 --corpus tinyshakespeare --tokenizer char --preset nano-cpu --out runs/dp
    mpiexec -n 2 scratchlm train ...            (the same, started by a cluster's launcher)

Every rank holds the whole model and optimizer (replicated; the weights stay equal because every
rank applies the same update to the same averaged gradient). What makes a run with N ranks the
*same run* as with one:

    the global batch of step it   = micro-batches  it*A + 0, ..., it*A + A-1   (A = gradient_accumulation_steps)
    rank r computes               the A/N consecutive ones  it*A + r*A/N + k,  k < A/N
    each micro-step's loss        is divided by A (the global count), backward adds into the flat
                                  gradient buffer; after the rank's last micro-step ONE Allreduce(SUM)
                                  of that buffer (per dtype, in place) gives every rank
                                  (1/A) sum over all A micro-batches of dL/dw -- the 1-rank gradient
    dropout                       re-seeded per micro-batch from (seed, it*A + micro)

``batch_size`` is per micro-step per rank, ``gradient_accumulation_steps`` the total (divided by
the rank count; a count that does not divide is refused), as in nanoGPT. The sums differ from the
1-rank run only in the order float32 additions are made (rank sums first), so losses and weights
agree to float32 rounding (tests/test_distributed.py checks 1e-5 relative).

The all-reduce is one blocking ``Allreduce`` of the whole flat buffer after the backward, not
buckets overlapped with it: MPICH makes progress on a nonblocking collective only inside MPI
calls, and our backward runs in Python/NumPy between them, so an ``Iallreduce`` started early
would mostly wait anyway; on a CPU the bytes (4 per parameter) take milliseconds next to a
backward of hundreds. The flat storage (``Module.flatten_``) is what makes it one call.

Rank 0 alone logs, evaluates (on the full split, as a 1-rank run), writes metrics.jsonl and
checkpoints, holding the run folder's lock (``scratchlm.runguard``); other ranks only read.

Faults. A rank that raises prints one line, ``scratchlm: error: rank R of N failed: ...``, and
calls ``MPI_Abort``, which makes the launcher end every rank (none waits forever in a collective).
A rank that dies outright (killed, out of memory) is noticed by the launcher, which ends the
others too. Ctrl-C reaches every rank through the launcher; the ranks agree (an all-reduce of the
flag at the top of each iteration) to stop after the same step, rank 0 saves, and ``--resume``
continues -- with any rank count, since the trajectory does not depend on it. A checkpoint is
written only by rank 0 and atomically, so a killed rank never leaves a partial one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys

import numpy as np

from scratchlm.errors import UserError

# launchers say how many processes they started (MPICH/Hydra, Open MPI, Slurm's PMI2)
_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
INSTALL_HINT = "pip install 'scratchlm[mpi]'"


def launched_world_size() -> int:
    """How many ranks the MPI launcher started this process among (1 when not under one)."""
    for name in _WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def check_accumulation(accum: int, world: int) -> None:
    """gradient_accumulation_steps is the total over the ranks: refuse a count they cannot share."""
    if accum % world:
        raise UserError(f"gradient_accumulation_steps ({accum}) is the total over all ranks and must be a "
                        f"multiple of the rank count ({world}); set it to "
                        f"{max(world, accum - accum % world)} or change --nproc")


class Single:
    """One process: rank 0 of 1; every collective is the identity."""

    rank, world = 0, 1
    is_main = True

    def check_accumulation(self, accum: int) -> None:
        pass

    def micro_steps(self, accum: int) -> range:
        """Which of a step's ``accum`` micro-batches this rank computes."""
        return range(accum)

    def reduce_gradients(self, storage) -> None:
        pass

    def sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def fail_fast(self):
        yield


class MPIGroup(Single):
    """The ranks of ``MPI.COMM_WORLD``."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        self.is_main = self.rank == 0

    def check_accumulation(self, accum: int) -> None:
        check_accumulation(accum, self.world)

    def micro_steps(self, accum: int) -> range:
        share = accum // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def reduce_gradients(self, storage) -> None:
        """Sum the flat gradient buffers over the ranks, in place (one Allreduce per dtype)."""
        storage.fill_missing_grads()           # every rank must send the whole buffer
        for buffer in storage.grad.values():
            self.comm.Allreduce(self.MPI.IN_PLACE, _host(buffer), op=self.MPI.SUM)

    def sum(self, values):
        values = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return values

    def any(self, flag: bool) -> bool:
        return bool(self.sum([1.0 if flag else 0.0])[0])

    def barrier(self) -> None:
        self.comm.Barrier()

    @contextlib.contextmanager
    def fail_fast(self):
        """Any exception on this rank: print one line naming the rank, then end the whole job."""
        from scratchlm.train import TrainingInterrupted
        try:
            yield
        except TrainingInterrupted:
            raise                                # every rank stops together; rank 0 has saved
        except BaseException as exc:
            what = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            print(f"scratchlm: error: rank {self.rank} of {self.world} failed: {' '.join(what.split())}; "
                  f"stopping all ranks", file=sys.stderr, flush=True)
            sys.stdout.flush()
            code = 2 if isinstance(exc, UserError) else 1
            self.comm.Abort(code)
            os._exit(code)                       # Abort may return before the launcher ends us


def _host(buffer):
    """MPI reads host memory: a NumPy buffer as is (the CPU path)."""
    if not isinstance(buffer, np.ndarray):
        raise NotImplementedError("MPI all-reduce of GPU buffers needs NCCL, which is not wired in yet")
    return buffer


_group: Single | None = None


def current() -> Single:
    """This process's group: MPI's world when started by an MPI launcher with N > 1, else Single."""
    global _group
    if _group is None:
        world = launched_world_size()
        if world > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise UserError(f"started as one of {world} MPI ranks, but mpi4py is not installed; "
                                f"{INSTALL_HINT}") from None
            _group = MPIGroup(MPI.COMM_WORLD)
        else:
            _group = Single()
    return _group


# ================================================================ the launcher: --nproc N

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


def relaunch(nproc: int, argv: list[str]):
    """Replace this process by mpiexec running ``nproc`` ranks (Ctrl-C then goes to mpiexec, which
    passes it to every rank). Never returns."""
    command, env = launch_command(nproc, without_nproc(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
