"""Issue 9: nothing a user had is lost, and no user-caused condition ends in a traceback.

Run as a user would (``python -m scratchlm`` subprocesses): exit status, exactly one line on
stderr, and -- where nothing may change -- every file of the run folder unchanged by sha256.
The lock is tested with two real processes, bounded by timeouts; the memory estimate against
the bytes tracemalloc sees the tape hold.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from test_cli import REPO, TINY, assert_one_line_error, cli, copy_run, workspace  # noqa: F401  (fixture)

from scratchlm.errors import UserError


def checksums(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def refused_unchanged(result, run, before, *fragments):
    assert_one_line_error(result, *fragments)
    assert checksums(run) == before


def popen(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "scratchlm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- 1, 2, 5, 6, 11: refused means untouched

def test_1_demo_validates_before_writing(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    before = checksums(run)
    refused_unchanged(cli("demo", "--out", run, "--sample-tokens", -1), run, before, "--sample-tokens must be >= 0")
    # a valid demo still refuses a run it did not write (only its own earlier demo run is replaced)
    refused_unchanged(cli("demo", "--out", run, "--iters", 1, "--sample-tokens", 1, "--no-progress",
                          env_extra=workspace["env"], timeout=300), run, before, "already holds a run")
    assert cli("sample", "--run", run, "--max-new-tokens", 3).returncode == 0


def test_2_any_run_file_means_the_folder_holds_a_run(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    for name in ("trainer.json", "optimizer.safetensors", "metrics.jsonl"):
        (run / name).unlink()
    assert cli("sample", "--run", run, "--max-new-tokens", 3).returncode == 0      # a usable model
    before = checksums(run)
    refused_unchanged(cli("train", "--corpus", workspace["corpus"], "--out", run, *TINY, env_extra=workspace["env"]),
                      run, before, "already holds a run", "model.safetensors")


@pytest.mark.parametrize("flag", [["--preset", "nano-cpu"], ["--tokenizer", "bpe"]])
def test_5_resume_refuses_flags_it_would_ignore(workspace, tmp_path, flag):
    run = copy_run(workspace, tmp_path)
    before = checksums(run)
    refused_unchanged(cli("train", "--resume", "--out", run, "--iters", 8, *flag, env_extra=workspace["env"]),
                      run, before, flag[0], "ignored")


def test_6_resume_refuses_iters_at_or_below_the_current_iteration(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    before = checksums(run)
    for iters in (4, 2):                                  # the run is at iteration 4
        refused_unchanged(cli("train", "--resume", "--out", run, "--iters", iters, env_extra=workspace["env"]),
                          run, before, "the run is at iteration 4", "--iters")


def test_11_metrics_with_bad_utf8_is_refused_by_line(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(lines[0] + b'{"iter": 1, \xff\xfe}\n' + b"".join(lines[1:]))
    before = checksums(run)
    refused_unchanged(cli("train", "--resume", "--out", run, "--iters", 8, env_extra=workspace["env"]),
                      run, before, "metrics.jsonl line 2", "UTF-8")


# ---------------------------------------------------------------- 3: one writer, readers see whole sets

def test_3_second_writer_is_refused_with_the_holders_pid_and_readers_never_fail(workspace, tmp_path):
    run = tmp_path / "run"
    # eval_interval=1: a checkpoint (model, optimizer, trainer.json) is saved every iteration
    first = popen("train", "--corpus", workspace["corpus"], "--out", run, "--iters", 100000, *TINY,
                  "--set", "eval_interval=1", "--set", "eval_iters=1", "--no-progress", env_extra=workspace["env"])
    try:
        wait_for(lambda: (run / "trainer.json").exists(), first)
        metrics_lines = len((run / "metrics.jsonl").read_text().splitlines())
        second = cli("train", "--resume", "--out", run, "--iters", 100001, env_extra=workspace["env"], timeout=120)
        assert_one_line_error(second, f"pid {first.pid}", "being written")
        fresh = cli("train", "--corpus", workspace["corpus"], "--out", run, *TINY, env_extra=workspace["env"])
        assert_one_line_error(fresh, "already holds a run")
        for k in range(6):                           # readers while checkpoints are replaced under them
            reader = cli("sample", "--run", run, "--prompt", "the", "--max-new-tokens", 4, "--seed", k)
            assert reader.returncode == 0 and "Traceback" not in reader.stderr, reader.stderr
            assert reader.stdout.startswith("the")
        assert first.poll() is None                  # the writer was never disturbed
        assert len((run / "metrics.jsonl").read_text().splitlines()) >= metrics_lines    # no lines lost
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=60)
        assert first.returncode == 130, stderr
    finally:
        if first.poll() is None:
            first.kill()
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_iters"] == 100000    # the refused writer rewrote nothing
    iteration = json.loads((run / "trainer.json").read_text())["iteration"]
    resumed = cli("train", "--resume", "--out", run, "--iters", iteration + 1, "--no-progress",
                  env_extra=workspace["env"])
    assert resumed.returncode == 0, resumed.stderr   # the lock went with its process


def test_3_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    from scratchlm.runguard import run_lock, writer_active
    code = ("import sys, time; from pathlib import Path; from scratchlm.runguard import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert writer_active(tmp_path)
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
        holder.kill()                               # kill -9: no clean-up code runs
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not writer_active(tmp_path)
    with run_lock(tmp_path):                        # the kernel released it
        assert (tmp_path / ".scratchlm.lock").read_text().strip() == str(os.getpid())


def test_3_a_reader_waits_for_a_save_in_progress(workspace, tmp_path):
    """model.safetensors of iteration k+1 beside trainer.json of k while a writer holds the lock:
    the reader waits until trainer.json catches up, then loads the whole set."""
    import threading
    from scratchlm.runguard import run_lock
    from scratchlm.runs import load_model
    run = copy_run(workspace, tmp_path)
    state = json.loads((run / "trainer.json").read_text())
    behind = dict(state, iteration=state["iteration"] - 1)
    (run / "trainer.json").write_text(json.dumps(behind))
    released = threading.Event()

    def writer():
        with run_lock(run):
            time.sleep(0.5)                          # a save between its two renames
            (run / "trainer.json").write_text(json.dumps(state))
            released.set()

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.1)
    _, _, header = load_model(run)
    thread.join(timeout=30)
    assert released.is_set() and header["iteration"] == state["iteration"]


# ---------------------------------------------------------------- 4: resume from anywhere

def test_4_resume_from_another_folder_and_a_moved_corpus(workspace, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(workspace["corpus"], here / "c.txt")
    result = cli("train", "--corpus", "c.txt", "--out", "run", "--iters", 2, *TINY, "--no-progress", cwd=here,
                 env_extra=workspace["env"])
    assert result.returncode == 0, result.stderr
    run = here / "run"
    assert json.loads((run / "config.json").read_text())["data"]["corpus"] == str((here / "c.txt").resolve())
    resumed = cli("train", "--resume", "--out", run, "--iters", 4, "--no-progress", cwd=tmp_path,
                  env_extra=workspace["env"])
    assert resumed.returncode == 0, resumed.stderr
    (here / "c.txt").rename(here / "moved.txt")
    before = checksums(run)
    refused_unchanged(cli("train", "--resume", "--out", run, "--iters", 6, cwd=tmp_path, env_extra=workspace["env"]),
                      run, before, "pass --corpus PATH")
    again = cli("train", "--resume", "--out", run, "--iters", 6, "--corpus", here / "moved.txt", "--no-progress",
                env_extra=workspace["env"])
    assert again.returncode == 0, again.stderr


# ---------------------------------------------------------------- 7, 8: paths and pipes

def test_7_out_that_is_a_file_or_under_one(workspace, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, fragment in ((afile, "is a file"), (afile / "sub", "lies under")):
        assert_one_line_error(cli("train", "--corpus", workspace["corpus"], "--out", out, *TINY), fragment)
        assert_one_line_error(cli("demo", "--out", out, "--iters", 1), fragment)
    assert afile.read_text() == "keep me"
    assert_one_line_error(cli("sample", "--run", afile), "is a file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_7_out_that_is_not_writable(workspace, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    assert_one_line_error(cli("train", "--corpus", workspace["corpus"], "--out", locked / "run", *TINY), "not writable")


@pytest.mark.parametrize("exc, fragment", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors"), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied: /root/x"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs"), "is a directory: runs"),
    (MemoryError("Unable to allocate 373. GiB"), "out of memory"),
])
def test_7_the_error_boundary_turns_user_caused_os_errors_into_one_line(monkeypatch, capsys, exc, fragment):
    from scratchlm import cli as cli_module
    from scratchlm.commands import inspect as summary_module

    def fail(args):
        raise exc
    monkeypatch.setattr(summary_module, "cmd_summary", fail)
    assert cli_module.main(["summary", "--preset", "nano-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scratchlm: error: ") and fragment in err


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "Input/output error"), ValueError("a bug")])
def test_7_bugs_keep_their_traceback(monkeypatch, exc):
    from scratchlm import cli as cli_module
    from scratchlm.commands import inspect as summary_module

    def fail(args):
        raise exc
    monkeypatch.setattr(summary_module, "cmd_summary", fail)
    with pytest.raises(type(exc)):
        cli_module.main(["summary", "--preset", "nano-cpu"])


@pytest.mark.parametrize("command", [["summary", "--preset", "nano-cpu"], ["sample", "--prompt", "the",
                                                                           "--max-new-tokens", 3000]])
def test_8_a_closed_pipe_ends_quietly(workspace, tmp_path, command):
    if command[0] == "sample":
        command = [*command, "--run", workspace["run"]]
    line = " ".join(f"'{a}'" for a in command)
    script = (f"'{sys.executable}' -m scratchlm {line} 2> '{tmp_path / 'err'}' | head -c 20 > /dev/null; "
              "echo ${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.stdout.strip() in ("141", "0")       # 141 when the pipe closed before the output ended
    assert (tmp_path / "err").read_text() == ""


# ---------------------------------------------------------------- 9: bench's flags

@pytest.mark.parametrize("flags, fragment", [
    (["--iters", 0], "--iters must be >= 1"), (["--warmup", -5], "--warmup must be >= 0"),
    (["--iters", -3], "--iters must be >= 1"), (["--vocab-size", 0], "--vocab-size must be >= 1"),
])
def test_9_bench_refuses_bad_flags_by_name(flags, fragment):
    assert_one_line_error(cli("bench", "--kernels", "off", *flags), fragment)


# ---------------------------------------------------------------- 10: the memory estimate

def test_10_estimate_counts_parameters_exactly_and_activations_within_a_stated_factor():
    """Parameters: the formula equals the model's count. Activations: within a factor 1.25 of the
    bytes tracemalloc sees held after the forward (the tape), for a few shapes."""
    from scratchlm.memory import estimate_training_memory
    from scratchlm.models import GPT, GPTConfig
    for shape in [dict(n_layer=1, n_head=4, n_embd=64, block_size=64, vocab_size=65),
                  dict(n_layer=2, n_head=8, n_embd=64, block_size=64, vocab_size=500),
                  dict(n_layer=1, n_head=4, n_embd=128, block_size=32, vocab_size=65, bias=False)]:
        config = GPTConfig(**shape)
        model = GPT(config, seed=0)
        B, T = 4, config.block_size
        estimate = estimate_training_memory(config, B, T)
        n = model.num_parameters(non_embedding=False)
        assert estimate["parameters"] == estimate["gradients"] == 4 * n and estimate["optimizer"] == 8 * n
        x = np.random.default_rng(0).integers(0, config.vocab_size, (B, T + 1))
        model(x[:, :4], x[:, 1:5])                   # first call: caches and compiled kernels out of the way
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            _, loss = model(x[:, :-1], x[:, 1:])     # the tape holds what backward will need
            held = tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
        assert held / 1.25 <= estimate["activations"] <= held * 1.25, (shape, held, estimate["activations"])
        del loss


def test_10_refusal_names_the_largest_batch_that_fits():
    """An invariant oracle: the batch_size named fits, one more does not."""
    from scratchlm.memory import check_fits_in_memory, estimate_training_memory
    from scratchlm.models import GPTConfig
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    available = estimate_training_memory(config, 37, 64)["total"] + 1000
    with pytest.raises(UserError, match="largest batch_size that fits is 37"):
        check_fits_in_memory(config, 500, 64, available=available)
    assert check_fits_in_memory(config, 37, 64, available=available)["total"] <= available
    with pytest.raises(UserError):
        check_fits_in_memory(config, 38, 64, available=available)
    # when even one row is too much, the largest n_embd is named, and it fits
    small = estimate_training_memory(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=32), 1, 64)
    with pytest.raises(UserError, match=r"largest n_embd that fits at this batch_size is (\d+)") as info:
        check_fits_in_memory(config, 1, 64, available=small["total"])
    assert info.match("is 32 ")


@pytest.mark.parametrize("pair, fragment", [("n_embd=1e9", "largest n_embd"), ("batch_size=1e6", "largest batch_size")])
def test_10_cli_refuses_a_config_too_big_for_memory(workspace, tmp_path, pair, fragment):
    result = cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--set", pair,
                 env_extra=workspace["env"])
    assert_one_line_error(result, "needs about", "available", fragment)
    assert not (tmp_path / "r").exists()
    assert_one_line_error(cli("bench", "--set", pair), "needs about")


def test_10_summary_prints_the_estimate_per_component(workspace):
    result = cli("summary", "--run", workspace["run"])
    assert result.returncode == 0, result.stderr
    line = [x for x in result.stdout.splitlines() if x.startswith("memory for one training step")][0]
    for part in ("parameters", "gradients", "optimizer", "activations", "batch_size 4", "block_size 16"):
        assert part in line


# ---------------------------------------------------------------- 13: folder corpora say what they skipped

def test_13_folder_corpus_notes_skipped_files(workspace, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    shutil.copy(workspace["corpus"], folder / "a.txt")
    (folder / "b.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (folder / "c.txt").write_bytes(b"\x00" * 32)
    result = cli("train", "--corpus", folder, "--out", tmp_path / "r", "--iters", 1, *TINY, "--no-progress",
                 env_extra=workspace["env"])
    assert result.returncode == 0, result.stderr
    note = [x for x in result.stderr.splitlines() if x.startswith("note: skipped")]
    assert len(note) == 1 and "b.txt (not UTF-8: byte 0xe9" in note[0] and "c.txt (binary" in note[0]
    assert_one_line_error(cli("train", "--corpus", folder / "c.txt", "--out", tmp_path / "r2"), "binary")


# ---------------------------------------------------------------- 14: the small ones

@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_14_run_files_follow_the_umask(workspace, tmp_path, umask, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO), **workspace["env"])
    result = subprocess.run([sys.executable, "-c", f"import os, sys; os.umask({umask}); from scratchlm.cli import "
                             f"main; sys.exit(main(sys.argv[1:]))", "train", "--corpus", str(workspace["corpus"]),
                             "--out", str(tmp_path / "r"), "--iters", "2", *TINY, "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir() if not p.name.startswith(".")}
    assert set(modes.values()) == {mode}, modes


def test_14_summary_run_refuses_set(workspace):
    assert_one_line_error(cli("summary", "--run", workspace["run"], "--set", "n_layer=8"), "--set", "ignored")


def test_14_no_command_lists_every_command():
    from scratchlm.cli import build_parser
    names = build_parser().parse_args([]).command_names
    result = cli()
    assert_one_line_error(result, "choose a command")
    assert "bench" in names and all(name in result.stderr for name in names)


@pytest.mark.parametrize("flags, fragment", [(["--top-k", -1], "--top-k must be"), (["--top-p", 2], "--top-p must be"),
                                             (["--max-new-tokens", -1], "--max-new-tokens must be"),
                                             (["--temperature", "nan"], "--temperature")])
def test_14_sampling_errors_name_the_flags(workspace, flags, fragment):
    assert_one_line_error(cli("sample", "--run", workspace["run"], *flags), fragment)
    assert_one_line_error(cli("chat", "--run", workspace["run"], *flags), fragment)


def test_14_damaged_config_errors_name_the_file(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    header = json.loads((run / "config.json").read_text())
    header["model_config"]["n_embdd"] = 3
    (run / "config.json").write_text(json.dumps(header))
    assert_one_line_error(cli("sample", "--run", run), "config.json", "n_embdd")
    assert_one_line_error(cli("summary", "--run", run), "config.json", "n_embdd")


def test_14_one_number_parser_for_flags_and_set(workspace):
    result = cli("sample", "--run", workspace["run"], "--prompt", "the", "--max-new-tokens", "2e1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len("the") + 20 + 1           # char-level: 1 token = 1 char; the final newline
    assert_one_line_error(cli("sample", "--run", workspace["run"], "--max-new-tokens", "2.5"),
                          "--max-new-tokens='2.5' is not a valid int")


def test_14_demo_iters_0_is_refused():
    assert_one_line_error(cli("demo", "--iters", 0), "--iters must be >= 1")


def test_14_bpe_vocabulary_smaller_than_asked_is_said(workspace, tmp_path):
    result = cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--iters", 1, *TINY,
                 "--tokenizer", "bpe:100000", "--no-progress", env_extra=workspace["env"])
    assert result.returncode == 0, result.stderr
    vocab = json.loads((tmp_path / "r" / "config.json").read_text())["model_config"]["vocab_size"]
    assert "asked for 100,000 tokens" in result.stderr and f"the vocabulary is {vocab:,}" in result.stderr
    assert vocab < 100000


def _interrupt_sample(workspace, *flags):
    """Start a long sample, let it generate, Ctrl-C it; retried if the signal came during start-up."""
    for delay in (3, 6, 12):
        process = popen("sample", "--run", workspace["run"], "--prompt", "the", "--max-new-tokens", 10 ** 6, *flags)
        try:
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        if "stopped by Ctrl-C" in stderr:
            return process.returncode, stdout, stderr
    pytest.fail(f"sample was never interrupted while generating: {stderr}")


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_14_ctrl_c_in_sample_keeps_the_text_and_ends_the_line(workspace, stream):
    status, stdout, stderr = _interrupt_sample(workspace, stream)
    assert status == 130 and "Traceback" not in stderr
    assert stderr.strip() == "stopped by Ctrl-C"
    assert stdout.startswith("the") and len(stdout) > len("the\n") and stdout.endswith("\n")


def test_14_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the command loads (deterministic: the interrupt is raised by the import of
    scratchlm.cli, then by building the parser) is one line and status 130.
    (Ctrl-C inside ``import scratchlm`` itself, before any scratchlm code can catch it, is not covered.)"""
    code = ("import runpy, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'scratchlm.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "runpy.run_module('scratchlm', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 130 and result.stderr == "interrupted\n", result.stderr
    from scratchlm import cli as cli_module

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_module, "build_parser", interrupted)
    assert cli_module.main(["summary"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_10_memory_refusal_works_for_models_without_heads():
    """The refusal's hint must not assume a GPT: an RNN or a bigram table gets one clear line too."""
    from scratchlm.errors import UserError
    from scratchlm.memory import check_fits_in_memory
    from scratchlm.models.rnn import BigramLMConfig, RNNLMConfig
    for config in (RNNLMConfig(vocab_size=27), BigramLMConfig(vocab_size=27)):
        with pytest.raises(UserError, match="for one training step, more than"):
            check_fits_in_memory(config, 64, available=1000)
