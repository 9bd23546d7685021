"""The `scratchlm` command, run as a subprocess: every user error is one line, exit 2, no traceback.

A real user sees stderr, not Python; so each case runs ``python -m scratchlm ...`` with PYTHONPATH
set to this checkout, and checks the exit status and the exact shape of stderr.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from clitools import REPO, assert_one_line_error, cli, write_word_corpus  # noqa: E402
TINY = ["--set", "batch_size=4", "--set", "block_size=16", "--set", "n_layer=1", "--set", "n_head=2",
        "--set", "n_embd=16", "--set", "eval_iters=2", "--set", "eval_interval=2", "--set", "log_interval=1",
        "--set", "warmup_iters=1", "--set", "lr_decay_iters=4"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A cache folder, a small corpus, and one trained tiny run that tests copy before damaging."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_word_corpus(root / "tiny.txt", seed=1)
    env = {"SCRATCHLM_CACHE": str(root / "cache")}
    result = cli("train", "--corpus", corpus, "--preset", "nano-cpu", "--out", root / "run", "--iters", 4,
                 *TINY, env_extra=env)
    assert result.returncode == 0, result.stderr
    return {"root": root, "corpus": corpus, "run": root / "run", "env": env}


def copy_run(workspace, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(workspace["run"], target)
    return target


# ---------------------------------------------------------------- happy paths

@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["chat"], ["summary"], ["demo"], ["bench"]])
def test_help_works_on_every_subcommand(command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scratchlm")


def test_train_then_sample_and_summary(workspace):
    run = workspace["run"]
    for name in ("config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors", "trainer.json",
                 "metrics.jsonl"):
        assert (run / name).is_file()
    result = cli("sample", "--run", run, "--prompt", "the cat", "--max-new-tokens", 12, "--seed", 3)
    assert result.returncode == 0, result.stderr
    text = result.stdout.rstrip("\n")
    assert text.startswith("the cat") and len(text) == len("the cat") + 12      # char-level: 1 token = 1 char
    again = cli("sample", "--run", run, "--prompt", "the cat", "--max-new-tokens", 12, "--seed", 3)
    assert again.stdout == result.stdout                                          # seeded
    summary = cli("summary", "--run", run)
    assert summary.returncode == 0 and "Total params" in summary.stdout


def test_bench_times_a_preset_and_counts_its_parameters():
    result = cli("bench", "--preset", "nano-cpu", "--iters", 1, "--warmup", 1, "--kernels", "off")
    assert result.returncode == 0, result.stderr
    C = 128   # the same parameter count as the summary below: the model is the preset's
    assert f"{4 * (12 * C * C + 13 * C) + 65 * C + 64 * C + 2 * C:,} parameters, B=12 T=64" in result.stdout
    assert "tokens/s" in result.stdout


def test_summary_of_a_preset_counts_gpt2_small():
    result = cli("summary", "--preset", "nano-cpu")
    assert result.returncode == 0, result.stderr
    # 4 blocks of 12 C^2 + 13 C weights/biases, wte 65 x C, wpe 64 x C, final LayerNorm 2C (C = 128)
    C = 128
    expected = 4 * (12 * C * C + 13 * C) + 65 * C + 64 * C + 2 * C
    assert f"Total params: {expected:,}" in result.stdout


def test_prompt_longer_than_block_size_is_cropped_with_a_note(workspace):
    prompt = "the cat sat on the mat " * 3                 # 69 chars > block_size 16
    result = cli("sample", "--run", workspace["run"], "--prompt", prompt, "--max-new-tokens", 5)
    assert result.returncode == 0, result.stderr
    assert "longer than block_size 16" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout.startswith(prompt)


def test_resume_from_the_command_line_extends_a_run(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    result = cli("train", "--resume", "--out", run, "--iters", 6, env_extra=workspace["env"])
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "trainer.json").read_text())["iteration"] == 6
    iters = [m["iter"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if m["kind"] == "train"]
    assert iters == list(range(6))


def test_demo_runs_end_to_end(tmp_path):
    result = cli("demo", "--iters", 2, "--sample-tokens", 10, "--out", tmp_path / "demo",
                 env_extra={"SCRATCHLM_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sample before training" in result.stdout and "sample after training" in result.stdout
    assert "scratchlm sample --run" in result.stdout
    assert (tmp_path / "demo" / "model.safetensors").is_file()


# ---------------------------------------------------------------- user errors: one line, exit 2

def test_no_command(workspace):
    assert_one_line_error(cli(), "choose a command")


def test_unknown_option():
    assert_one_line_error(cli("sample", "--run", "x", "--bogus"), "unrecognized arguments: --bogus")


def test_missing_run_folder(tmp_path):
    assert_one_line_error(cli("sample", "--run", tmp_path / "nope", "--prompt", "a"), "does not exist")


@pytest.mark.parametrize("damage, fragment", [
    ("garbage", "model.safetensors"),
    ("truncated", "truncated"),
    ("missing", "does not exist"),
])
def test_damaged_checkpoint(workspace, tmp_path, damage, fragment):
    run = copy_run(workspace, tmp_path)
    weights = run / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x07" * 100)
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.unlink()
    assert_one_line_error(cli("sample", "--run", run, "--prompt", "the"), fragment)
    assert_one_line_error(cli("train", "--resume", "--out", run, "--iters", 8, env_extra=workspace["env"]), fragment)


def test_corrupt_config_json(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    (run / "config.json").write_text("{not json")
    assert_one_line_error(cli("sample", "--run", run, "--prompt", "the"), "config.json", "not valid JSON")


def test_checkpoint_of_another_architecture(workspace, tmp_path):
    run = copy_run(workspace, tmp_path)
    header = json.loads((run / "config.json").read_text())
    header["model_config"]["n_embd"] = 32                          # the weights are n_embd 16
    (run / "config.json").write_text(json.dumps(header))
    assert_one_line_error(cli("sample", "--run", run, "--prompt", "the"), "model.safetensors", "shape")


def test_n_embd_not_divisible_by_n_head(workspace, tmp_path):
    result = cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--set", "n_head=3")
    assert_one_line_error(result, "n_embd (128) must be divisible by n_head (3)")


def test_unknown_preset(workspace, tmp_path):
    assert_one_line_error(cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--preset", "huge"),
                          "unknown preset 'huge'")
    assert_one_line_error(cli("summary", "--preset", "huge"), "unknown preset 'huge'")


def test_unknown_key_is_named(workspace, tmp_path):
    result = cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--set", "lerning_rate=1")
    assert_one_line_error(result, "unknown config key 'lerning_rate'", "did you mean 'learning_rate'")


@pytest.mark.parametrize("pair, fragment", [("max_iters=lots", "not a valid int"), ("bias=perhaps", "true or false"),
                                            ("learning_rate", "not key=value")])
def test_bad_set_value(workspace, tmp_path, pair, fragment):
    assert_one_line_error(cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--set", pair),
                          fragment)


def test_corpus_errors(tmp_path):
    env = {"SCRATCHLM_CACHE": str(tmp_path / "cache")}
    assert_one_line_error(cli("train", "--corpus", tmp_path / "absent.txt", "--out", tmp_path / "r", env_extra=env),
                          "neither a registered name")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 50)
    assert_one_line_error(cli("train", "--corpus", latin1, "--out", tmp_path / "r", env_extra=env), "not UTF-8")
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert_one_line_error(cli("train", "--corpus", short, "--out", tmp_path / "r", env_extra=env), "tokens")


def test_bad_tokenizer_spec(workspace, tmp_path):
    assert_one_line_error(cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--tokenizer", "wordpiece"),
                          "unknown tokenizer spec")


def test_existing_run_without_resume(workspace):
    assert_one_line_error(cli("train", "--corpus", workspace["corpus"], "--out", workspace["run"], *TINY,
                              env_extra=workspace["env"]), "already holds a run", "--resume")


def test_bad_sampling_argument(workspace):
    assert_one_line_error(cli("sample", "--run", workspace["run"], "--prompt", "the", "--top-p", "1.5"), "--top-p")


def test_prompt_with_characters_the_tokenizer_never_saw(workspace):
    assert_one_line_error(cli("sample", "--run", workspace["run"], "--prompt", "\u00e9\u00e9"))


def test_nan_loss_exits_2_naming_the_iteration(workspace, tmp_path):
    result = cli("train", "--corpus", workspace["corpus"], "--out", tmp_path / "r", "--iters", 6, *TINY,
                 "--set", "learning_rate=1e30", "--set", "grad_clip=0", env_extra=workspace["env"])
    assert_one_line_error(result, "at iteration", "last good checkpoint", "learning_rate")


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_saves_a_checkpoint_and_exits_130(workspace, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), **workspace["env"])
    args = [sys.executable, "-m", "scratchlm", "train", "--corpus", str(workspace["corpus"]), "--out", str(run),
            "--iters", "100000", *TINY, "--set", "eval_interval=100000", "--no-progress"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:      # wait until it is iterating: a train line is logged
            if metrics.exists() and '"kind": "train"' in metrics.read_text():
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "saved a checkpoint at iteration" in stderr
    iteration = json.loads((run / "trainer.json").read_text())["iteration"]
    logged = [m for m in map(json.loads, metrics.read_text().splitlines()) if m["kind"] == "train"]
    assert iteration >= 1 and len(logged) == iteration          # the checkpoint is after the last logged step
    # the checkpoint loads: sampling from it and resuming it both work
    assert cli("sample", "--run", run, "--prompt", "the", "--max-new-tokens", 3).returncode == 0
    resumed = cli("train", "--resume", "--out", run, "--iters", iteration + 1, env_extra=workspace["env"])
    assert resumed.returncode == 0, resumed.stderr
