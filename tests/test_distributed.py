"""Data parallelism over MPI (scratchlm.distributed), run for real: 2 ranks under mpiexec.

Oracle: the 1-rank run of the same config (same global batch). A step's micro-batches are drawn
from (seed, step) and split across the ranks, and the gradient is summed over them, so the
2-rank run computes the same numbers up to the order of float32 additions. Tolerances (float32):
losses 1e-5 relative, weights 1e-5 absolute (they are O(0.1)). Resumed runs are compared
bit for bit with the uninterrupted run of the same rank count.

Skipped when mpi4py or mpiexec is missing (the [mpi] extra). Every subprocess is bounded by a
timeout, so a hang fails the test instead of stalling the suite.
"""
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py")
from scratchlm import distributed, launcher  # noqa: E402
from scratchlm.checkpoint import load_safetensors  # noqa: E402
from scratchlm.datasets import dataset_path  # noqa: E402

try:
    MPIEXEC = launcher.mpiexec_path()
except Exception:                                           # noqa: BLE001 -- no launcher: skip all
    pytest.skip("mpiexec is not installed (pip install 'scratchlm[mpi]')", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
CORPUS = str(dataset_path("names.txt"))
TINY = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=16", "--set", "block_size=16",
        "--set", "batch_size=4", "--set", "eval_interval=10", "--set", "eval_iters=2", "--set", "log_interval=1",
        "--set", "warmup_iters=2", "--set", "lr_decay_iters=20", "--set", "learning_rate=3e-3"]
TIMEOUT = 120


def env(threads: int = 1):
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
             NUMBA_NUM_THREADS=str(threads))
    return {k: v for k, v in e.items() if k not in distributed._WORLD_SIZE_VARIABLES}


def train_args(out, accum, iters=20, extra=()):
    return ["train", "--corpus", CORPUS, "--tokenizer", "char", "--preset", "nano-cpu", *TINY,
            "--set", f"gradient_accumulation_steps={accum}", "--iters", str(iters), "--out", str(out),
            "--no-progress", *extra]


def scratchlm(args, launcher=(), timeout=TIMEOUT):
    return subprocess.run([*launcher, sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True,
                          env=env(), timeout=timeout, cwd=REPO)


def losses(run):
    return np.array([m["train_loss"] for m in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
                     if m["kind"] == "train"])


def weights(run, file="model.safetensors"):
    return load_safetensors(Path(run) / file)[0]


def assert_same_run(expected, actual, exact=False):
    want, got = losses(expected), losses(actual)
    assert len(want) == len(got) == 20
    if exact:
        assert want.tobytes() == got.tobytes()
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for file in ("model.safetensors", "optimizer.safetensors"):      # weights, and AdamW's moments
        w_want, w_got = weights(expected, file), weights(actual, file)
        assert sorted(w_want) == sorted(w_got)
        for name in w_want:
            if exact:
                assert w_want[name].tobytes() == w_got[name].tobytes(), name
            else:
                np.testing.assert_allclose(w_got[name], w_want[name], rtol=0, atol=1e-5, err_msg=name)
    steps = [json.loads((Path(run) / "trainer.json").read_text())["optimizer"]["state"] for run in (expected, actual)]
    assert steps[0] == steps[1]


class Runs:
    """Uninterrupted 20-step runs, each made once for the module: (nproc, accum, zero_stage,
    ddp_bucket_mb) -> folder. The default 1 MB bucket holds the whole tiny model (one Iallreduce at
    the end of the backward); 0.002 MB cuts it into about ten buckets."""

    def __init__(self, factory):
        self.factory, self.made = factory, {}

    def __call__(self, nproc, accum, zero=0, bucket_mb=1.0):
        key = (nproc, accum, zero, bucket_mb)
        if key not in self.made:
            out = self.factory.mktemp(f"run_{nproc}_{accum}_{zero}_{bucket_mb}") / "run"
            extra = ["--set", f"zero_stage={zero}", "--set", f"ddp_bucket_mb={bucket_mb}"] + \
                (["--nproc", str(nproc)] if nproc > 1 else [])
            done = scratchlm(train_args(out, accum, extra=extra))
            assert done.returncode == 0, done.stderr
            assert done.stdout.count("done: 20 iterations") == 1           # rank 0 alone reports
            self.made[key] = out
        return self.made[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)


@pytest.mark.parametrize("accum, zero, bucket_mb", [(2, 0, 0), (2, 0, 0.002), (4, 0, 0.002), (4, 1, 1.0)],
                         ids=["one-micro-step-per-rank-one-allreduce", "one-micro-step-per-rank-buckets",
                              "accumulating-2-per-rank-buckets", "zero-1"])
def test_two_ranks_equal_one_rank(runs, accum, zero, bucket_mb):
    """Blocking all-reduce after the backward (bucket 0) and buckets during it, with and without
    accumulation; ZeRO-1 too: its moments, gathered into the checkpoint, equal the unsharded
    optimizer's."""
    out = runs(2, accum, zero, bucket_mb)
    assert_same_run(runs(1, accum), out)
    assert json.loads((out / "trainer.json").read_text())["nproc"] == 2


@pytest.mark.parametrize("zero", [0, 1], ids=["replicated", "zero-1"])
def test_mpiexec_started_by_hand_then_resumed_equals_uninterrupted(tmp_path, runs, zero):
    """mpiexec -n 2 scratchlm train (as a cluster launcher would), stop at 10, resume to 20: the
    same bits as the uninterrupted 2-rank run (started with --nproc 2)."""
    straight, split = runs(2, 4, zero), tmp_path / "split"
    hand = [MPIEXEC, "-n", "2"]
    extra = ["--set", f"zero_stage={zero}"]
    first = scratchlm(train_args(split, 4, iters=10, extra=extra), launcher=hand)
    assert first.returncode == 0, first.stderr
    second = scratchlm(["train", "--resume", "--out", str(split), "--iters", "20", "--no-progress"], launcher=hand)
    assert second.returncode == 0, second.stderr
    assert_same_run(straight, split, exact=True)


def test_accumulation_that_does_not_divide_is_one_line(tmp_path):
    done = scratchlm(train_args(tmp_path / "run", 3, extra=["--nproc", "2"]))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "scratchlm: error: gradient_accumulation_steps (3) is the total over all ranks and must be a multiple "
        "of the rank count (2); set it to 2 or change --nproc"]
    assert not (tmp_path / "run").exists()


def test_gpu_ranks_pick_nccl_and_cpu_ranks_mpi():
    assert distributed.group_class("cupy", 2) is distributed.NCCLGroup
    assert distributed.group_class("numpy", 2) is distributed.MPIGroup
    assert distributed.group_class("cupy", 1) is distributed.Single


def test_zero_1_across_gpus_is_refused_in_one_line(tmp_path):
    done = scratchlm(train_args(tmp_path / "run", 2, extra=["--nproc", "2", "--backend", "cupy", "--set", "zero_stage=1"]))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "scratchlm: error: zero_stage=1 runs over MPI on the CPU; across GPUs set zero_stage=0"]
    assert not (tmp_path / "run").exists()


def test_gpu_ranks_without_cupy_are_refused_in_one_line(tmp_path):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: --nproc 2 --backend cupy would start")
    done = scratchlm(train_args(tmp_path / "run", 2, extra=["--nproc", "2", "--backend", "cupy"]))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "scratchlm: error: --nproc 2 with backend cupy runs one rank per GPU over NCCL and needs CuPy: "
        "pip install 'scratchlm[cuda12]' (or [cuda13] for CUDA 13)"]
    assert not (tmp_path / "run").exists()


# Loaded by every Python process through PYTHONPATH (sitecustomize), so the fault reaches the ranks
# that `scratchlm train --nproc 2` starts: rank 1 raises, or is killed, at iteration 5.
FAULT = """
import os, signal
from scratchlm import train
step = train.Trainer.train_step
def faulty(self, it):
    if self.dist.rank == 1 and it == 5:
        if {kill}:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected fault at iteration 5")
    return step(self, it)
train.Trainer.train_step = faulty
"""


@pytest.mark.parametrize("kill", [False, True], ids=["raises", "killed"])
def test_a_failing_rank_ends_the_job_with_one_line(tmp_path, kill):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT.format(kill=kill))
    out = tmp_path / "run"
    environment = env()
    environment["PYTHONPATH"] = f"{tmp_path / 'inject'}{os.pathsep}{REPO}"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "scratchlm", *train_args(out, 2, iters=40, extra=["--nproc", "2"])],
                          capture_output=True, text=True, env=environment, timeout=TIMEOUT, cwd=REPO)
    assert done.returncode != 0 and time.monotonic() - start < TIMEOUT
    ours = [line for line in done.stderr.splitlines() if line.startswith("scratchlm: error:")]
    if kill:
        assert ours == ["scratchlm: error: rank 1 of 2 died without a word (Killed (signal 9)); mpiexec stopped "
                        "the other ranks; continue from the last checkpoint with --resume"]
        assert "BAD TERMINATION" not in done.stdout
    else:
        assert ours == ["scratchlm: error: rank 1 of 2 failed: RuntimeError: injected fault at iteration 5; "
                        "stopping all ranks"]
    # nothing half-written: the checkpoint of iteration 0 is whole (its checksum holds), no temp files
    assert json.loads((out / "trainer.json").read_text())["iteration"] == 0
    weights(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = scratchlm(["train", "--resume", "--out", str(out), "--iters", "10", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr                   # and the run continues from it


def test_ctrl_c_on_the_launcher_saves_and_resume_equals_uninterrupted(tmp_path, runs):
    """SIGINT to `scratchlm train --nproc 2` (which became mpiexec): every rank stops after the same
    step, rank 0 saves, exit 130, within a bounded time; --resume (here with 1 rank: the trajectory
    does not depend on the count) ends where the uninterrupted run ends.

    The launcher starts with SIGINT *ignored*, as a background job of a non-interactive shell (or a
    test suite run as one) does: ignored dispositions survive exec, and before the fix they reached
    the ranks. Rank 0's Ctrl-C landing during its eval used to stop it alone (the hang this test had
    in the full suite): the ranks now agree on one reading of the flag per iteration."""
    out = tmp_path / "run"
    args = train_args(out, 2, extra=["--nproc", "2"])
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"train"' in line) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C arrived (machine too fast for this timing)")
    assert proc.returncode == 130, stderr
    stopped = json.loads((out / "trainer.json").read_text())["iteration"]
    assert 0 < stopped < 20 and f"saved a checkpoint at iteration {stopped}" in stderr
    done = scratchlm(["train", "--resume", "--out", str(out), "--iters", "20", "--no-progress"])
    assert done.returncode == 0, done.stderr
    assert_same_run(runs(1, 2), out)


# Rank 1 stops answering at iteration 3 (SIGINT ignored, asleep): Ctrl-C cannot stop the job
# cleanly, so the launcher must force it down after its grace.
STUCK_RANK = """
import signal, time
from scratchlm import train
step = train.Trainer.train_step
def stuck(self, it):
    if self.dist.rank == 1 and it == 3:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        time.sleep(600)
    return step(self, it)
train.Trainer.train_step = stuck
"""


def test_ctrl_c_with_a_stuck_rank_is_forced_down_after_the_grace(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(STUCK_RANK)
    out = tmp_path / "run"
    environment = dict(env(), SCRATCHLM_STOP_GRACE_S="3")
    environment["PYTHONPATH"] = f"{tmp_path / 'inject'}{os.pathsep}{REPO}"
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", *train_args(out, 2, extra=["--nproc", "2"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, cwd=REPO)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"train"' in line) >= 3:
            break
        time.sleep(0.05)
    time.sleep(1)                                   # rank 1 is asleep by now, rank 0 waits for it
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and time.monotonic() - sent < 60
    assert "scratchlm: error: the ranks did not stop within 3 s of Ctrl-C" in stderr
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == []                               # no rank outlives the launcher
    assert json.loads((out / "trainer.json").read_text())["iteration"] == 0     # the last whole checkpoint


# Rank 0 alone gets SIGINT, in the middle of its eval at iteration 10 (the other rank is already
# waiting in the next step's all-reduce): the race that once stopped rank 0 alone and hung rank 1.
INTERRUPT_DURING_EVAL = """
import os, signal
from scratchlm import train
evaluate = train.Trainer.evaluate
def interrupted(self, interrupt=None):
    if self.dist.rank == 0 and self.iteration == 10:
        os.kill(os.getpid(), signal.SIGINT)
    return evaluate(self, interrupt)
train.Trainer.evaluate = interrupted
"""


def test_ctrl_c_on_rank_0_during_its_eval_stops_every_rank_after_the_same_step(tmp_path, runs):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INTERRUPT_DURING_EVAL)
    out = tmp_path / "run"
    environment = env()
    environment["PYTHONPATH"] = f"{tmp_path / 'inject'}{os.pathsep}{REPO}"
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "scratchlm", *train_args(out, 2)],
                          capture_output=True, text=True, env=environment, timeout=TIMEOUT, cwd=REPO)
    assert done.returncode == 130, done.stderr
    # the flag is read at the top of an iteration: iteration 10 runs on every rank, the stop is at 11
    assert json.loads((out / "trainer.json").read_text())["iteration"] == 11
    assert "saved a checkpoint at iteration 11" in done.stderr
    resumed = scratchlm(["train", "--resume", "--out", str(out), "--iters", "20", "--no-progress"],
                        launcher=[MPIEXEC, "-n", "2"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(runs(2, 2), out, exact=True)


class TwinRanks:
    """A communicator of 2 ranks whose other rank computed the very same gradient: a SUM doubles
    every element. Nonblocking calls double at Wait (as MPI may finish at any point until then) and
    are logged with how many leaves the backward had completed when each started."""

    class Request:
        def __init__(self, buffer):
            self.buffer, self.done = buffer, False

        def finish(self):
            if not self.done:
                self.buffer *= 2
                self.done = True

        @staticmethod
        def Testall(requests):
            return False

        @staticmethod
        def Waitall(requests):
            for request in requests:
                request.finish()

    IN_PLACE, SUM = object(), object()

    def __init__(self):
        self.started, self.completed_leaves = [], 0

    def Allreduce(self, _, buffer, op):
        buffer *= 2

    def Iallreduce(self, _, buffer, op):
        self.started.append((buffer.__array_interface__["data"][0], buffer.size, self.completed_leaves))
        return self.Request(buffer)

    def bcast(self, value, root=0):
        return value


@pytest.mark.parametrize("accum", [1, 3])
def test_gradient_buckets_cover_the_buffer_once_and_start_during_the_backward(accum):
    """GradientBuckets with a fake 2-rank communicator on a real GPT backward: the buckets' runs tile
    the flat gradient buffer exactly once, the first goes out while the backward still has leaves
    to complete, and the result is the blocking all-reduce's (twice the 1-rank gradient)."""
    tape = importlib.import_module("scratchlm.tensor")     # the module (scratchlm.tensor is also a function)
    from scratchlm.models.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16), seed=0)
    storage = model.flatten_()
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))) for _ in range(accum)]
    comm = TwinRanks()
    counting = distributed.GradientBuckets(storage, comm, bucket_bytes=2048, MPI=comm)

    def step(buckets):
        for k, (x, y) in enumerate(batches):
            if buckets is not None and k == accum - 1:
                buckets.arm()
                hook = tape.backward_hook
                tape.set_backward_hook(lambda leaf: (setattr(comm, "completed_leaves", comm.completed_leaves
                                                             + (leaf is not None)), hook(leaf)))
            model(x, y)[1].backward()
        if buckets is not None:
            buckets.finish()
        grad = storage.grad["float32"].copy()
        for p in model.parameters():
            p.grad = None
        comm.completed_leaves = 0
        return grad

    plain = step(None)
    assert np.array_equal(step(counting), 2 * plain)                # the first step: blocking, records the order
    assert comm.started == [] and counting.plan is not None and len(counting.plan) > 2
    assert np.array_equal(step(counting), 2 * plain)                # bucketed
    base = storage.grad["float32"].__array_interface__["data"][0]
    covered = np.zeros(storage.grad["float32"].size, dtype=int)
    for address, size, _ in comm.started:
        start = (address - base) // 4
        covered[start:start + size] += 1
    assert (covered == 1).all()
    leaves = len(model.parameters())
    assert comm.started[0][2] < leaves                               # out before the backward ended
    assert tape.backward_hook is None


# Run under mpiexec -n 2: NCCLGroup with a stand-in for cupy.cuda.nccl whose allReduce sums the
# host memory at the pointer it is given (over MPI), so the pointers, counts, dtypes and the id
# exchange are what is tested; oracle: MPI's own Allreduce of the same gradients.
FAKE_NCCL_MODULE = """
import ctypes, json
import numpy as np
from mpi4py import MPI
from scratchlm import distributed

class FakeNccl:
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = "float", "double", "sum"
    calls = []

    @staticmethod
    def get_unique_id():
        return tuple(int(b) for b in np.random.default_rng().integers(0, 256, 128))

    class NcclCommunicator:
        def __init__(self, ndev, unique_id, rank):
            self.made_with = (ndev, unique_id, rank)

        def allReduce(self, send, recv, count, dtype, op, stream):
            assert send == recv and op == "sum" and stream == 0
            ctype = {"float": ctypes.c_float, "double": ctypes.c_double}[dtype]
            view = np.ctypeslib.as_array((ctype * count).from_address(recv))
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, view, op=MPI.SUM)
            FakeNccl.calls.append((count, dtype))
"""

FAKE_NCCL = FAKE_NCCL_MODULE + """
from scratchlm.models.gpt import GPT, GPTConfig

comm = MPI.COMM_WORLD
group = distributed.NCCLGroup(comm, nccl=FakeNccl)
model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
storage = model.flatten_()
rng = np.random.default_rng(group.rank)                   # each rank its own batch
x, y = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
model(x, y)[1].backward()
expected = storage.grad["float32"].copy()
comm.Allreduce(MPI.IN_PLACE, expected, op=MPI.SUM)
group.reduce_gradients(storage)
ids = comm.allgather(group.unique_id)
total = group.sum([group.rank + 1.0])
flags = [group.any(False), group.any(group.rank == 1)]
if group.rank == 0:
    print("RESULT " + json.dumps({
        "same_bits": storage.grad["float32"].tobytes() == expected.tobytes(),
        "ids_equal": ids[0] == ids[1], "made_with": [group.device_comm.made_with[0], group.device_comm.made_with[2]],
        "calls": FakeNccl.calls, "size": int(expected.size), "total": float(total[0]),
        "any": flags}))
"""


def test_nccl_group_exchanges_the_id_over_mpi_and_sums_on_the_buffers_it_is_given(tmp_path):
    script = tmp_path / "fake_nccl.py"
    script.write_text(FAKE_NCCL)
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                          env=env(), timeout=TIMEOUT, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["same_bits"] and result["ids_equal"] and result["made_with"] == [2, 0]
    assert result["calls"] == [[result["size"], "float"], [1, "double"]]   # the gradient, then the loss sum
    assert result["total"] == 3.0 and result["any"] == [False, True]


# The trainer on NCCLGroup (what `--nproc N --backend cupy` gives each rank), here with the stand-in
# nccl on the NumPy backend: every gradient and loss sum of the run goes through its allReduce.
FAKE_NCCL_TRAIN = FAKE_NCCL_MODULE + """
import sys
from scratchlm.cli import main
distributed._group = distributed.NCCLGroup(MPI.COMM_WORLD, nccl=FakeNccl)
code = main(sys.argv[1:])
if distributed._group.rank == 0:
    print("NCCL_CALLS " + json.dumps(len(FakeNccl.calls)))
sys.exit(code)
"""


def test_a_two_rank_run_on_nccl_group_equals_one_rank(tmp_path, runs):
    script = tmp_path / "fake_nccl_train.py"
    script.write_text(FAKE_NCCL_TRAIN)
    out = tmp_path / "run"
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), *train_args(out, 2)],
                          capture_output=True, text=True, env=env(), timeout=TIMEOUT, cwd=REPO)
    assert done.returncode == 0, done.stderr
    calls = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("NCCL_CALLS "))[11:])
    assert calls == 2 * 20            # per step: the gradient buffer, then the loss sum
    assert_same_run(runs(1, 2), out)


def test_without_mpi_the_group_is_one_rank():
    group = distributed.Single()
    assert (group.rank, group.world, list(group.micro_steps(3))) == (0, 1, [0, 1, 2])


def test_launch_command_drops_nproc_and_sets_threads():
    command, environment = launcher.launch_command(2, launcher.without_nproc(
        ["train", "--nproc", "2", "--out", "x", "--nproc=3"]))
    assert command[1:3] == ["-n", "2"] and command[-3:] == ["train", "--out", "x"]
    assert "OMP_NUM_THREADS" in environment


def test_the_micro_batches_of_a_step_are_shared_out_without_overlap():
    """Each rank's share of a step's A micro-batches: consecutive, disjoint, together all A."""
    class Fake(distributed.MPIGroup):
        def __init__(self, rank, world):
            self.rank, self.world = rank, world
    for world, accum in ((2, 4), (4, 8), (3, 3)):
        shares = [list(Fake(r, world).micro_steps(accum)) for r in range(world)]
        assert sum(shares, []) == list(range(accum))
