"""Data parallelism across processes over MPI: ranks, batch splitting, gradient all-reduce, faults.

    scratchlm train --nproc 2 --corpus tinyshakespeare --tokenizer char --preset nano-cpu --out runs/dp
    mpiexec -n 2 scratchlm train ...            (the same, started by a cluster's launcher)
    scratchlm train --nproc 8 --backend cupy ...   (one GPU per rank: NCCLGroup, never run on a device)

The group is chosen once per process (``current``, ``group_class``): MPI between CPU processes,
NCCL between GPUs (MPI still starts the ranks and carries NCCL's id), none for one rank.

Every rank holds the whole model and optimizer (replicated; the weights stay equal because every
rank applies the same update to the same averaged gradient). What makes a run with N ranks the
*same run* as with one:

    the global batch of step it   = micro-batches  it*A + 0, ..., it*A + A-1   (A = gradient_accumulation_steps)
    rank r computes               the A/N consecutive ones  it*A + r*A/N + k,  k < A/N
    each micro-step's loss        is divided by A (the global count), backward adds into the flat
                                  gradient buffer; during the rank's last micro-step's backward the
                                  buffer is all-reduced (SUM, in place, in buckets), which gives every
                                  rank (1/A) sum over all A micro-batches of dL/dw -- the 1-rank gradient
    dropout                       re-seeded per micro-batch from (seed, it*A + micro)

``batch_size`` is per micro-step per rank, ``gradient_accumulation_steps`` the total (divided by
the rank count; a count that does not divide is refused), as in nanoGPT. The sums differ from the
1-rank run only in the order float32 additions are made (rank sums first), so losses and weights
agree to float32 rounding (tests/test_distributed.py checks 1e-5 relative).

The all-reduce goes in buckets (``GradientBuckets``, ``--set ddp_bucket_mb``, default 1 MB): each
bucket's ``Iallreduce`` starts as soon as the backward has completed its gradients, and the
backward calls ``Test`` between ops, which is when MPICH moves the bytes (it makes progress on a
nonblocking collective only inside MPI calls). On a CPU the reduction is itself CPU work, so what
overlap can hide is mostly the wait for the slower rank, not the copying; bench/distributed.py
measures the exposed all-reduce time both ways. ``ddp_bucket_mb=0`` gives one blocking
``Allreduce`` of the whole flat buffer after the backward (the flat storage, ``Module.flatten_``,
is what makes it one call). Both give the same sum (for 2 ranks, bit for bit).

Rank 0 alone logs, evaluates (on the full split, as a 1-rank run), writes metrics.jsonl and
checkpoints, holding the run folder's lock (``scratchlm.runguard``); other ranks only read.

Faults. A rank that raises prints one line, ``scratchlm: error: rank R of N failed: ...``, and
calls ``MPI_Abort``, which makes the launcher end every rank (none waits forever in a collective).
A rank that dies outright (killed, out of memory) is noticed by mpiexec, which ends the others;
under ``--nproc`` our launcher (``scratchlm/launcher.py``) turns mpiexec's banner into one line
naming that rank. Ctrl-C reaches every rank through the launcher (mpiexec in its own process group, SIGINT's default
disposition restored for it: a background job inherits SIGINT ignored); each rank reads its flag
once per iteration and the ranks agree on it (an all-reduce at the top of the iteration; a flag
read again later would let rank 0, whose Ctrl-C landed during its eval, stop alone while the
others wait in the next step's all-reduce), so they stop after the same step, rank 0 saves, and
``--resume`` continues -- with any rank count, since the trajectory does not depend on it. The
launcher bounds the stop ($SCRATCHLM_STOP_GRACE_S, then mpiexec's abort, then SIGKILL). A checkpoint is
written only by rank 0 and atomically, so a killed rank never leaves a partial one.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import numpy as np

from scratchlm.errors import UserError
from scratchlm.launcher import INSTALL_HINT, leave_note

# launchers say how many processes they started (MPICH/Hydra, Open MPI, Slurm's PMI2)
_WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def launched_world_size() -> int:
    """How many ranks the MPI launcher started this process among (1 when not under one)."""
    for name in _WORLD_SIZE_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def check_config(config, world: int) -> None:
    """What a run on ``world`` ranks cannot do, refused before anything starts."""
    if world > 1 and config.backend not in ("numpy", "cupy"):
        raise UserError(f"--nproc {world} runs on backend numpy (MPI) or cupy (NCCL, one GPU per rank), "
                        f"not {config.backend}")
    if world > 1 and config.backend == "cupy" and config.zero_stage == 1:
        raise UserError(ZERO_ON_GPUS)
    if world > 1 and config.backend == "cupy" and importlib.util.find_spec("cupy") is None:
        raise UserError(f"--nproc {world} with backend cupy runs one rank per GPU over NCCL and needs CuPy: "
                        "pip install 'scratchlm[cuda12]' (or [cuda13] for CUDA 13)")
    check_accumulation(config.gradient_accumulation_steps, world)


ZERO_ON_GPUS = "zero_stage=1 runs over MPI on the CPU; across GPUs set zero_stage=0"


def group_class(backend_name: str, world: int) -> type:
    """Which group a process of ``world`` ranks uses: NCCL between GPUs (backend cupy), MPI between
    CPU processes, none for one rank."""
    if world == 1:
        return Single
    return NCCLGroup if backend_name == "cupy" else MPIGroup


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

    def check_config(self, config) -> None:
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

    def bcast(self, value):
        """Rank 0's ``value``, on every rank."""
        return value

    def barrier(self) -> None:
        pass

    def shard_optimizer(self, optimizer, storage, zero_stage: int, bucket_mb: float = 0.0):
        """ZeRO-1 (or gradient buckets) when asked for and there is more than one rank; else the
        optimizer as it is."""
        return optimizer

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

    def check_config(self, config) -> None:
        check_config(config, self.world)

    buckets: "GradientBuckets | None" = None

    def micro_steps(self, accum: int):
        """This rank's share of the step's micro-batches; before the last one's backward the
        gradient buckets (if any) start listening, so they go out as the backward finishes them."""
        share = accum // self.world
        for k, micro in enumerate(range(self.rank * share, (self.rank + 1) * share)):
            if k == share - 1 and self.buckets is not None:
                self.buckets.arm()
            yield micro

    def reduce_gradients(self, storage) -> None:
        """Sum the flat gradient buffers over the ranks, in place: wait for the buckets' all-reduces
        (started during the backward), or, without buckets, one blocking Allreduce per dtype."""
        if self.buckets is not None:
            self.buckets.finish()
            return
        storage.fill_missing_grads()           # every rank must send the whole buffer
        for buffer in storage.grad.values():
            self.comm.Allreduce(self.MPI.IN_PLACE, _host(buffer), op=self.MPI.SUM)

    def sum(self, values):
        values = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, values, op=self.MPI.SUM)
        return values

    def any(self, flag: bool) -> bool:
        return bool(self.sum([1.0 if flag else 0.0])[0])

    def bcast(self, value):
        return self.comm.bcast(value, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def shard_optimizer(self, optimizer, storage, zero_stage: int, bucket_mb: float = 0.0):
        """ZeRO-1's sharded optimizer; else the optimizer as it is, and (``bucket_mb`` > 0) gradient
        buckets of about that many MB all-reduced while the backward runs."""
        if zero_stage == 1:
            return ZeroOneOptimizer(optimizer, storage, self)
        if bucket_mb > 0:
            self.buckets = GradientBuckets(storage, self.comm, int(bucket_mb * 2**20))
        return optimizer

    @contextlib.contextmanager
    def fail_fast(self):
        """Any exception on this rank: print one line naming the rank, then end the whole job."""
        from scratchlm.train import TrainingInterrupted
        try:
            yield
        except TrainingInterrupted:
            raise                                # every rank stops together; rank 0 has saved
        except KeyboardInterrupt:                # Ctrl-C before the loop started: nothing to save
            if self.rank == 0:
                print("interrupted before training started; nothing saved", file=sys.stderr, flush=True)
            self.comm.Abort(130)
            os._exit(130)
        except BaseException as exc:
            what = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            print(f"scratchlm: error: rank {self.rank} of {self.world} failed: {' '.join(what.split())}; "
                  f"stopping all ranks", file=sys.stderr, flush=True)
            leave_note(f"failed.{self.rank}", what)
            sys.stdout.flush()
            code = 2 if isinstance(exc, UserError) else 1
            self.comm.Abort(code)
            os._exit(code)                       # Abort may return before the launcher ends us


class NCCLGroup(MPIGroup):
    """One rank per GPU: MPI starts the ranks and carries NCCL's unique id from rank 0 to the others
    (as llm.c does); NCCL sums the gradients on the devices, with no host copy. The interface is
    MPIGroup's (micro-steps, ``reduce_gradients``, ``sum``, ``any``, ``bcast``, ``barrier``, faults);
    the gradient all-reduce is one ``ncclAllReduce`` per dtype on the current stream, so it is
    ordered after the backward's kernels without the host waiting.

    ``current("cupy")`` gives it under an MPI launcher with more than one rank (``--nproc N
    --backend cupy``). NEVER RUN ON A DEVICE: ``nccl`` is ``cupy.cuda.nccl``, or a stand-in with the
    same calls (tests/test_distributed.py passes one that reduces host arrays, and runs a 2-rank
    training with it). No gradient buckets here: the one all-reduce per dtype is queued on the
    stream after the backward's kernels, which the host does not wait for anyway
    (``ddp_bucket_mb`` applies to MPI only); ZeRO-1 is MPI only.
    """

    def __init__(self, comm, nccl=None, device_id: int | None = None):
        super().__init__(comm)
        if nccl is None:
            from cupy.cuda import nccl
        self.nccl = nccl
        if device_id is None:           # the rank's index among the ranks on its machine
            device_id = comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank()
        self.device_id = device_id
        self._use_device(device_id)
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        self.unique_id = comm.bcast(unique_id, root=0)
        self.device_comm = nccl.NcclCommunicator(self.world, self.unique_id, self.rank)

    def _use_device(self, device_id: int) -> None:
        try:
            import cupy
        except ImportError:
            return                      # a stand-in nccl on the CPU (tests)
        cupy.cuda.Device(device_id).use()

    def _all_reduce(self, array) -> None:
        """In place, SUM over the ranks, on the current stream."""
        self.device_comm.allReduce(_pointer(array), _pointer(array), array.size, _nccl_dtype(self.nccl, array.dtype),
                                   self.nccl.NCCL_SUM, _current_stream())

    def reduce_gradients(self, storage) -> None:
        storage.fill_missing_grads()
        for buffer in storage.grad.values():
            self._all_reduce(buffer)

    def sum(self, values):
        """The sum over the ranks, on the device (float64), e.g. of the step's loss: no host wait."""
        from scratchlm import backend
        xp = backend.xp
        values = xp.stack([xp.asarray(v, dtype=xp.float64) for v in values])
        self._all_reduce(values)
        return values

    def any(self, flag: bool) -> bool:
        return bool(MPIGroup.sum(self, [1.0 if flag else 0.0])[0])     # a host flag: over MPI

    def shard_optimizer(self, optimizer, storage, zero_stage: int, bucket_mb: float = 0.0):
        if zero_stage == 1:
            raise UserError(ZERO_ON_GPUS)
        return optimizer


def _pointer(array) -> int:
    """The address of an array's first element: CuPy's device pointer, or a NumPy array's."""
    memory = getattr(array, "data", None)
    return memory.ptr if hasattr(memory, "ptr") else array.ctypes.data


def _nccl_dtype(nccl, dtype):
    names = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "float16": "NCCL_FLOAT16",
             "bfloat16": "NCCL_BFLOAT16"}
    name = names.get(np.dtype(dtype).name)
    if name is None or not hasattr(nccl, name):
        raise NotImplementedError(f"NCCL all-reduce of {np.dtype(dtype).name} arrays is not wired in")
    return getattr(nccl, name)


def _current_stream() -> int:
    try:
        import cupy
    except ImportError:
        return 0                        # a stand-in nccl on the CPU: the default stream's handle
    return cupy.cuda.get_current_stream().ptr


class GradientBuckets:
    """The gradient all-reduce in buckets, started while the backward is still running (as
    PyTorch DDP does), waited for before the optimizer step.

    A bucket is a set of parameters whose gradients the backward finishes one after another: the
    first step records the order in which the last micro-step's backward completes each leaf
    (``tensor.set_backward_hook``), does one blocking Allreduce, and cuts rank 0's order (broadcast,
    so every rank has the same plan) into buckets of about ``bucket_bytes``. From then on, when the
    backward has completed every gradient of the next bucket, that bucket's contiguous runs of the
    flat gradient buffer go out as in-place ``Iallreduce`` calls -- buckets strictly in plan order,
    since every rank must start its collectives in the same order (a rank whose backward finishes
    leaves in another order only starts later, never differently). A bucket's runs are contiguous
    slices of the flat buffer: the buffer is laid out by optimizer group (weights, then biases and
    norms), so a layer's gradients are two runs, not one.

    MPICH advances a nonblocking collective only inside MPI calls; the hook calls ``Testall`` after
    every op's backward, which is what lets a bucket travel while the next layer's backward computes.
    Only the rank's last micro-step is bucketed: earlier ones only add into the buffer.

    The sum is the blocking Allreduce's: every element is summed over the same ranks; the order of
    the additions inside MPI's reduction is that of the same algorithm on a shorter buffer, so a
    2-rank sum of two float32 values is the same bits either way.
    """

    def __init__(self, storage, comm, bucket_bytes: int, MPI=None):
        if MPI is None:
            from mpi4py import MPI
        self.storage, self.comm, self.MPI = storage, comm, MPI
        self.bucket_bytes = max(1, bucket_bytes)
        self.index = {id(p): i for i, p in enumerate(storage.params)}
        self.plan: list[list[tuple[str, int, int]]] | None = None     # per bucket: (dtype, start, stop) runs
        self.bucket_of: dict[int, int] = {}                           # id(param) -> its bucket
        self.sizes: list[int] = []                                    # parameters per bucket
        self.seen: list[int] = []                                     # first step: completion order
        self.requests: list = []
        self.left: list[int] = []
        self.next = 0

    def arm(self) -> None:
        """Before the last micro-step's backward: listen to the tape."""
        from scratchlm.tensor import set_backward_hook
        self.left, self.next, self.requests, self.seen = list(self.sizes), 0, [], []
        set_backward_hook(self._hook)

    def _hook(self, leaf) -> None:
        if leaf is None:                                   # between ops: let MPI move the bytes
            if self.requests:
                self.MPI.Request.Testall(self.requests)
            return
        i = self.index.get(id(leaf))
        if i is None:
            return
        if leaf.grad is not leaf._grad_slot:               # (a .grad set by hand) into the buffer
            leaf._grad_slot[...] = leaf.grad
            leaf.grad = leaf._grad_slot
        if self.plan is None:
            self.seen.append(i)
            return
        b = self.bucket_of[id(leaf)]
        self.left[b] -= 1
        self._start_ready()

    def _start_ready(self) -> None:
        grad, MPI = self.storage.grad, self.MPI
        while self.next < len(self.plan) and self.left[self.next] == 0:
            for dtype, start, stop in self.plan[self.next]:
                self.requests.append(self.comm.Iallreduce(MPI.IN_PLACE, _host(grad[dtype][start:stop]), op=MPI.SUM))
            self.next += 1

    def finish(self) -> None:
        """After the backward: every bucket started, every all-reduce finished."""
        from scratchlm.tensor import set_backward_hook
        set_backward_hook(None)
        if self.plan is None:                               # the first step: blocking, then the plan
            self.storage.fill_missing_grads()
            for buffer in self.storage.grad.values():
                self.comm.Allreduce(self.MPI.IN_PLACE, _host(buffer), op=self.MPI.SUM)
            self._make_plan(self.comm.bcast(self.seen, root=0))
            return
        # parameters the backward never reached get zeros -- their buckets have not started yet
        self.storage.fill_missing_grads()
        self.left[self.next:] = [0] * (len(self.plan) - self.next)
        self._start_ready()
        self.MPI.Request.Waitall(self.requests)
        self.requests = []

    def _make_plan(self, order: list[int]) -> None:
        params = self.storage.params
        listed = set(order)
        order = list(order) + [i for i in range(len(params)) if i not in listed]   # never reached: last
        buckets, current, size = [], [], 0
        for i in order:
            current.append(i)
            size += params[i].size * params[i].dtype.itemsize
            if size >= self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        self.plan, self.sizes, self.bucket_of = [], [len(b) for b in buckets], {}
        for b, members in enumerate(buckets):
            spans = sorted(params[i]._flat[1:] for i in members)          # (dtype, start, stop)
            runs = [list(spans[0])]
            for dtype, start, stop in spans[1:]:
                if dtype == runs[-1][0] and start == runs[-1][2]:
                    runs[-1][2] = stop
                else:
                    runs.append([dtype, start, stop])
            self.plan.append([tuple(run) for run in runs])
            self.bucket_of.update({id(params[i]): b for i in members})


class ZeroOneOptimizer:
    """ZeRO stage 1 (``--set zero_stage=1``): each rank keeps the optimizer moments of one slice of
    the flat buffer only, as llm.c does. A step is

        reduce-scatter   rank r receives the sum over ranks of the gradient slice [lo_r, hi_r)
        clip             the global norm from each slice's sum of squares (one scalar all-reduce)
        update           the wrapped optimizer's own ``_update`` on the slice, one call per group
                         the slice meets (elementwise, so the same bits as the unsharded update)
        all-gather       every rank's updated slice of the parameters, to every rank

    The moments take 1/N of the memory; the bytes on the wire are those of one all-reduce (a ring
    all-reduce *is* a reduce-scatter and an all-gather). ``state_dict`` gathers the slices into the
    unsharded optimizer's format, so a checkpoint resumes with or without ZeRO, on any rank count.
    """

    def __init__(self, optimizer, storage, group: "MPIGroup"):
        if len(storage.grad) != 1:
            raise UserError("zero_stage=1 needs every parameter in one dtype; set zero_stage=0")
        self.optimizer, self.storage, self.group = optimizer, storage, group
        self.param_groups = optimizer.param_groups              # the trainer sets lr here
        (self.dtype,) = storage.grad
        total = storage.grad[self.dtype].size
        bounds = [total * r // group.world for r in range(group.world + 1)]
        self.counts = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        self.displacements = bounds[:-1]
        self.lo, self.hi = bounds[group.rank], bounds[group.rank + 1]
        # where each optimizer group meets this rank's slice: (group index, start, stop) in the buffer
        self.pieces = []
        for g, group_ in enumerate(optimizer.param_groups):
            run = storage.segment(group_["params"])
            if run is None:
                raise UserError("zero_stage=1 needs each optimizer group to be one run of the flat buffer")
            start, stop = max(run[1], self.lo), min(run[2], self.hi)
            if start < stop:
                self.pieces.append((g, start, stop))
        self.shard_state: dict[int, dict] | None = None
        self.grad_slice = storage.grad[self.dtype][self.lo:self.hi]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self, max_norm: float = 0.0):
        """Reduce-scatter, clip to ``max_norm`` (0: no clipping), update this slice, all-gather.
        Returns the gradient norm before clipping (a 0-d float64 array), or None without clipping."""
        MPI, comm = self.group.MPI, self.group.comm
        self.storage.fill_missing_grads()
        full = _host(self.storage.grad[self.dtype])
        received = np.empty(self.hi - self.lo, dtype=full.dtype)
        comm.Reduce_scatter(full, received, recvcounts=self.counts, op=MPI.SUM)
        self.grad_slice[...] = received
        norm = None
        if max_norm > 0:
            wide = received.astype(np.float64)
            square = np.dot(wide, wide)
            norm = np.sqrt(self.group.sum([square])[0])
            if np.isfinite(norm) and norm > max_norm:
                self.grad_slice *= received.dtype.type(max_norm / (norm + 1e-6))
        if self.shard_state is None:
            self.shard_state = {g: self.optimizer._init_state(_Run(self.storage.data[self.dtype][a:b]),
                                                              self.optimizer.param_groups[g])
                                for g, a, b in self.pieces}
        data = self.storage.data[self.dtype]
        for g, a, b in self.pieces:
            self.optimizer._update(data[a:b], self.storage.grad[self.dtype][a:b], self.optimizer.param_groups[g],
                                   self.shard_state[g])
        comm.Allgatherv(MPI.IN_PLACE, [_host(data), self.counts, self.displacements, _mpi_type(data)])
        return None if norm is None else np.asarray(norm)

    # ------------------------------------------------------------ checkpoints: the unsharded format

    def _full_moments(self) -> dict[str, np.ndarray]:
        """Each moment as one full-length vector on every rank (all-gather of the slices)."""
        names = [name for name, value in next(iter(self.shard_state.values())).items()
                 if not isinstance(value, (bool, int, float))] if self.shard_state else []
        out = {}
        for name in names:
            mine = np.concatenate([self.shard_state[g][name] for g, _, _ in self.pieces]) if self.pieces \
                else np.empty(0, dtype=self.dtype)
            full = np.empty(sum(self.counts), dtype=self.dtype)
            self.group.comm.Allgatherv(mine, [full, self.counts, self.displacements, _mpi_type(full)])
            out[name] = full
        return out

    def gather(self) -> None:
        """Collective, every rank before a save: put the moments' slices together in the wrapped
        optimizer's per-parameter state, so ``state_dict`` (rank 0) is the unsharded one."""
        if self.shard_state is None:
            return
        moments = self._full_moments()
        steps = self.group.comm.allgather({g: state.get("step") for g, state in self.shard_state.items()})
        step_of = {g: step for part in steps for g, step in part.items()}
        for g, (group_, indices) in enumerate(zip(self.optimizer.param_groups, self.optimizer._index_of_group)):
            for i, p in zip(indices, group_["params"]):
                _, _, start, stop = p._flat
                entry = {"step": step_of[g]} if step_of.get(g) is not None else {}
                entry.update({name: full[start:stop].reshape(p.shape) for name, full in moments.items()})
                self.optimizer.state[i] = entry
        self.optimizer._flat_state = {}

    def state_dict(self):
        """The unsharded optimizer's (scalars, arrays) as of the last ``gather``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, scalars, arrays) -> None:
        """Load the unsharded format, then keep this rank's slice of each moment."""
        self.optimizer.load_state_dict(scalars, arrays)
        if not self.optimizer.state:
            self.shard_state = None
            return
        self.shard_state = {}
        for g, a, b in self.pieces:
            indices, params = self.optimizer._index_of_group[g], self.optimizer.param_groups[g]["params"]
            first = self.optimizer.state[indices[0]]
            entry = {name: value for name, value in first.items() if isinstance(value, (bool, int, float))}
            for name in first:
                if name not in entry:
                    full = np.concatenate([self.optimizer.state[i][name].reshape(-1) for i in indices])
                    start = params[0]._flat[2]
                    entry[name] = full[a - start:b - start].copy()
            self.shard_state[g] = entry
        self.optimizer.state = {}                # only the slices are kept


class _Run:
    """A slice of the flat buffer where ``Optimizer._init_state`` expects a parameter."""

    def __init__(self, data):
        self.data = data


def _mpi_type(array):
    from mpi4py.util.dtlib import from_numpy_dtype
    return from_numpy_dtype(array.dtype)


def _host(buffer):
    """MPI reads host memory: a NumPy buffer as is (the CPU path)."""
    if not isinstance(buffer, np.ndarray):
        raise NotImplementedError("MPI all-reduces host buffers; GPU buffers go through NCCLGroup")
    return buffer


_group: Single | None = None


def current(backend_name: str = "numpy") -> Single:
    """This process's group, made on the first call (``group_class``): under an MPI launcher with
    N > 1 ranks, NCCL's for backend cupy and MPI's world otherwise; else Single."""
    global _group
    if _group is None:
        world = launched_world_size()
        kind = group_class(backend_name, world)
        if kind is Single:
            _group = Single()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise UserError(f"started as one of {world} MPI ranks, but mpi4py is not installed; "
                                f"{INSTALL_HINT}") from None
            _group = kind(MPI.COMM_WORLD)
            leave_note(f"pid.{_group.rank}", str(os.getpid()))
    return _group
