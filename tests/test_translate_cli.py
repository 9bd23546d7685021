"""`scratchlm translate`, `scratchlm eval` and `scratchlm attention` on seq2seq runs, as subprocesses:
a tiny model trained for a few iterations (nothing is learned; the plumbing is what is checked)."""
import json

import numpy as np
import pytest

from clitools import assert_one_line_error, cli  # noqa: E402
TINY = ["--set", "d_model=16", "--set", "nhead=2", "--set", "dim_feedforward=32", "--set", "num_encoder_layers=1",
        "--set", "num_decoder_layers=2", "--set", "batch_size=8", "--set", "eval_iters=1", "--set", "eval_interval=3",
        "--set", "warmup_iters=1", "--set", "log_interval=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    result = cli("translate", "train", "--data", "copy", "--out", root / "copy", "--iters", 3, "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr
    return root / "copy"


def test_train_writes_a_run_with_dev_bleu_and_resumes(run, tmp_path):
    header = json.loads((run / "config.json").read_text())
    assert header["model"] == "seq2seq" and header["data"]["corpus"] == "copy"
    assert header["model_config"]["max_len"] == 13                  # 12 digits + </s>
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if m["kind"] == "eval"]
    assert [m["iter"] for m in evals] == [0, 3]
    assert all(0 <= m["val_bleu"] <= 100 and 0 <= m["val_exact_match"] <= 1 for m in evals)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    result = cli("translate", "train", "--resume", "--out", copy, "--iters", 5, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((copy / "trainer.json").read_text())["iteration"] == 5
    assert_one_line_error(cli("translate", "train", "--data", "copy", "--out", copy, *TINY), "already holds a run")


def test_translate_prints_one_line_per_sentence_and_notes_bad_input(run):
    result = cli("translate", "--run", run, "0123", "", "12a4", "1" * 30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 5 and lines[1] == "" and lines[4] == ""          # 4 translations, the empty one empty
    assert all(set(line) <= set("0123456789<unk>") for line in lines)
    assert "sentence 2 is empty" in result.stderr
    assert "sentence 4 has 30 tokens" in result.stderr and "cut off" in result.stderr
    assert result.stderr.count("outside the vocabulary") == 1 and "'a'" in result.stderr
    assert "Traceback" not in result.stderr


def test_stdin_lines_and_beam_n_best(run):
    result = cli("translate", "--run", run, "--beam", 3, "--n-best", 2, stdin="555\n70\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all("\t" in line for line in lines)
    scores = [float(line.split("\t")[1]) for line in lines]
    assert scores[0] >= scores[1] and scores[2] >= scores[3]


@pytest.mark.parametrize("args, fragment", [
    (["--beam", "0", "1"], "--beam must be at least 1"),
    (["--beam", "2", "--n-best", "3", "1"], "--n-best"),
    (["--data", "copy", "1"], "translate train"),
    (["--alpha", "nan", "--beam", "2", "1"], "--alpha must be a number >= 0"),
    (["--beam", "1000000000", "1"], "use a smaller beam"),
])
def test_bad_translate_arguments_are_one_line(run, args, fragment):
    assert_one_line_error(cli("translate", "--run", run, *args), fragment)


def test_bad_train_arguments_are_one_line(tmp_path):
    assert_one_line_error(cli("translate", "train", "--data", "klingon", "--out", tmp_path / "x"), "klingon")
    assert_one_line_error(cli("translate", "train", "--data", "copy", "--out", tmp_path / "x", "--set", "reverse=true"),
                          "reverse=true applies to eng-fra")
    assert_one_line_error(cli("translate", "train", "--data", "copy", "--out", tmp_path / "x", "--set", "max_len=5"),
                          "max_len 5 is too short")
    assert_one_line_error(cli("translate", "--run", tmp_path / "missing", "hi"), "does not exist")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    """(the eval command's result, the run it scored: a copy of ``run``)."""
    import shutil
    copy = tmp_path_factory.mktemp("evaluated") / "copy"
    shutil.copytree(run, copy)
    result = cli("eval", "--run", copy, "--split", "test")
    assert result.returncode == 0, result.stderr
    return result, copy


def test_eval_writes_bleu_chrf_rouge_and_exact_match(evaluated):
    from scratchlm import metrics
    from scratchlm.pairs import PairTask, load_pairs
    from scratchlm.runs import load_model
    from scratchlm.translate import decode
    _, copy = evaluated
    report = json.loads((copy / "eval.json").read_text())["test"]
    model, vocab, _ = load_model(copy)
    data = load_pairs("copy")
    sources, refs = data.references("test")
    hyps = [vocab.decode(h) for h in decode(model, [vocab.encode(s) + [2] for s in sources])]
    assert report["sentences"] == len(sources) == 500
    assert report["bleu"] == pytest.approx(metrics.bleu(hyps, refs))
    assert report["chrf"] == pytest.approx(metrics.chrf(hyps, refs))
    assert report["rougeL"] == pytest.approx(metrics.rouge(hyps, refs)["rougeL"])
    assert report["exact_match"] == pytest.approx(np.mean([h == r[0] for h, r in zip(hyps, refs)]))
    assert {"bleu", "chrf", "rougeL", "exact_match"} <= set(report["beam4"])
    task_loss = report["loss"]
    assert np.isfinite(task_loss) and report["tokens"] == PairTask(data, vocab).tokens("test")


def assert_line_shows(line, report):
    """The printed greedy and beam-4 figures are the report's, to the digits printed."""
    import re
    number = r"(-?[0-9.]+)"
    pattern = (rf"greedy BLEU {number}, chrF {number}, ROUGE-L {number}, exact match {number}%; "
               rf"beam 4 BLEU {number}, chrF {number}, ROUGE-L {number}, exact match {number}%")
    printed = [float(x) for x in re.search(pattern, line).groups()]
    expected = [report[side][key] * (100 if key == "exact_match" else 1)
                for side in ("greedy", "beam4") for key in ("bleu", "chrf", "rougeL", "exact_match")]
    places = [2, 2, 4, 1] * 2                                   # the digits each figure is printed with
    assert printed == [round(x, p) for x, p in zip(expected, places)]
    assert f"({report['sentences']} distinct sources)" in line


def test_eval_prints_the_figures_of_eval_json(evaluated):
    result, copy = evaluated
    report = json.loads((copy / "eval.json").read_text())["test"]
    assert_line_shows(next(line for line in result.stdout.splitlines() if "BLEU" in line), report)
    assert f"loss {report['loss']:.4f}" in result.stdout        # the loss line is still there


def test_translation_summary_keeps_greedy_and_beam_figures_apart():
    """The tiny run's figures are mostly 0; distinct made-up ones catch a swapped key or side."""
    from scratchlm.pairs import translation_summary
    report = {"split": "test", "sentences": 7,
              "greedy": {"bleu": 28.016, "chrf": 43.424, "rougeL": 0.51236, "exact_match": 0.1875},
              "beam4": {"bleu": 31.294, "chrf": 45.006, "rougeL": 0.53349, "exact_match": 0.2031}}
    assert_line_shows(translation_summary(report), report)


def test_attention_map_of_a_seq2seq_run(run, tmp_path):
    out = tmp_path / "maps.png"
    result = cli("attention", "--run", run, "--text", "0123", "--out", out, "--layer", 1)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(cli("attention", "--run", run, "--text", "0123", "--out", out, "--layer", 2),
                          "--layer must be between 0 and 1")
    assert_one_line_error(cli("attention", "--run", run, "--text", " ", "--out", out), "--text is empty")


def test_cross_attention_rows_are_distributions_over_the_source(run):
    from scratchlm.commands.attention import seq2seq_maps
    from scratchlm.runs import load_model
    from scratchlm.translate import greedy_search
    model, vocab, _ = load_model(run)
    weights, src_labels, tgt_labels, _ = seq2seq_maps(model, vocab, "90210", layer=0)
    assert weights.shape == (2, len(tgt_labels), 6) and src_labels == list("90210") + ["</s>"]
    np.testing.assert_allclose(weights.sum(axis=2), 1.0, rtol=1e-5)
    ids = np.asarray([vocab.encode("90210") + [2]])
    assert "".join(t for t in tgt_labels if t != "</s>") == vocab.decode(greedy_search(model, ids)[0])


def test_attention_map_of_a_gpt_run_and_translate_refuses_it(tmp_path):
    gpt = tmp_path / "gpt"
    result = cli("train", "--corpus", "names", "--out", gpt, "--iters", 1, "--set", "n_layer=1", "--set", "n_head=2",
                 "--set", "n_embd=16", "--set", "eval_iters=1", "--no-progress")
    assert result.returncode == 0, result.stderr
    result = cli("attention", "--run", gpt, "--text", "emma", "--out", tmp_path / "gpt.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gpt.png").read_bytes()[:4] == b"\x89PNG"
    assert_one_line_error(cli("translate", "--run", gpt, "hi"), "not a translation model")
