"""``scratchlm vae`` and ``scratchlm gan`` as a user runs them (subprocesses): a tiny training run
writes eval.json and samples.txt (1,000 lines) through the shared trainer, the uses print what
they promise, and bad input ends in one line and exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "n_embd=4", "--set", "n_hidden=8", "--set", "batch_size=4", "--set", "block_size=38",
        "--set", "eval_iters=1", "--set", "eval_interval=100", "--no-progress"]


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scratchlm", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny VAE and one tiny GAN trained by the CLI on coco (2 iterations each)."""
    root = tmp_path_factory.mktemp("generators")
    vae = run("vae", "--corpus", "coco", "--out", root / "vae", "--iters", 2, *TINY, "--set", "n_latent=3",
              "--iw-samples", 1)
    assert vae.returncode == 0, vae.stderr
    gan = run("gan", "--corpus", "coco", "--out", root / "gan", "--iters", 3, *TINY, "--set", "g_pretrain_iters=1",
              "--set", "d_pretrain_iters=1", "--set", "rollouts=1", "--set", "d_filters=2", "--set", "d_embd=4")
    assert gan.returncode == 0, gan.stderr
    return root / "vae", root / "gan"


@pytest.mark.parametrize("which", [0, 1])
def test_training_writes_eval_and_samples(runs, which):
    run_dir = runs[which]
    report = json.loads((run_dir / "eval.json").read_text())["test"]
    samples = (run_dir / "samples.txt").read_text(encoding="utf-8").split("\n")
    assert len(samples) == 1000 + 1 and samples[-1] == ""           # 1,000 lines, newline-terminated
    for n in (2, 3, 4, 5):
        assert 0 <= report[f"bleu{n}"] <= 1 and 0 <= report[f"self_bleu{n}"] <= 1
    if which == 0:
        assert report["sentences"] == 10_000 and report["kl"] >= 0 and 0 <= report["active_units"] <= 3
        assert report["nll_bound_per_sentence"] >= 0
    else:
        assert report["tokens"] > 100_000 and report["nll"] > 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if m["kind"] == "train"]
    keys = ("recon", "kl", "kl_weight") if which == 0 else ("phase",)
    assert all(k in m for m in train_lines for k in keys)
    assert (run_dir / "model.safetensors").exists() and (run_dir / "trainer.json").exists()


def test_vae_uses(runs):
    vae = runs[0]
    out = run("vae", "--run", vae, "--sample", 3, "--seed", 1)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3
    out = run("vae", "--run", vae, "--interpolate", "a man riding a horse.", "two dogs on a bed.", "--steps", 4)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 4
    out = run("vae", "--run", vae, "--reconstruct", "a man riding a qwzxv horse.")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    notes = [line for line in out.stderr.splitlines() if "vocabulary" in line]
    assert len(notes) == 1 and "1 of" in notes[0]                     # said once, not an error


def test_gan_samples(runs):
    out = run("gan", "--run", runs[1], "--sample", 2)
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2


@pytest.mark.parametrize("args, says", [
    (("vae", "--run", "{vae}", "--interpolate", "a man riding a horse."), "--interpolate needs two sentences"),
    (("vae", "--run", "{gan}", "--sample", 2), "holds a gan run, not a vae run"),
    (("gan", "--run", "{vae}", "--sample", 2), "holds a vae run, not a gan run"),
    (("vae", "--run", "{vae}"), "exactly one of"),
    (("vae", "--run", "{vae}", "--reconstruct", "   "), "has no words"),
    (("vae", "--run", "{vae}", "--sample", 2, "--corpus", "coco"), "--corpus is for training"),
    (("vae", "--corpus", "coco"), "needs --out"),
])
def test_bad_input_is_one_line_and_exit_2(runs, args, says):
    args = [str(a).format(vae=runs[0], gan=runs[1]) for a in args]
    out = run(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error:") and says in lines[0], lines


def test_a_sampled_unk_is_one_word_for_bleu():
    """The word tokenizer decodes an unknown word as "<unk>": one token the model wrote, so BLEU
    sees one unmatched word (as Texygen, whose vocabulary has every training word, sees one rare
    word), not the three pieces "<", "unk", ">" the punctuation rule would make of it."""
    from scratchlm.commands.textgen import sample_words
    assert sample_words("a <unk> on a bed.") == ["a", "<unk>", "on", "a", "bed", "."]
    assert sample_words("<unk><unk>, two") == ["<unk>", "<unk>", ",", "two"]
    assert sample_words("a man riding a horse.") == ["a", "man", "riding", "a", "horse", "."]


def test_sample_of_a_word_level_coco_lm_with_the_default_empty_prompt(tmp_path):
    """``scratchlm sample --run DIR`` on a word-level coco LM, prompt left empty: every sentence starts
    at the boundary and ends at the next one (one per line), its words spaced as the tokenizer decodes
    them: each printed line reads back to the same line through the run's vocabulary."""
    from scratchlm.runs import load_model
    out = run("train", "--model", "lstm", "--corpus", "coco", "--tokenizer", "word", "--out", tmp_path / "lm",
              "--iters", 2, *TINY, "--set", "tie_weights=false")
    assert out.returncode == 0, out.stderr
    printed = run("sample", "--run", tmp_path / "lm", "--num-samples", 4, "--max-new-tokens", 12, "--seed", 2)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.split("\n")
    assert len(lines) == 4 + 1 and lines[-1] == ""
    _, tokenizer, _ = load_model(tmp_path / "lm")
    for line in lines[:-1]:
        assert line and tokenizer.decode(tokenizer.encode(line)) == line
        assert len(tokenizer.encode(line)) <= 12
