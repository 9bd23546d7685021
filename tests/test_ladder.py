"""One trainer for every model family, the names corpus and its split, whole-split evaluation.

Oracles: a resumed run equals an uninterrupted one bit for bit (every family); the names split
is makemore's recipe recomputed here; eval's loss equals a NumPy recomputation over every token;
sampling through a recurrent state gives the tokens of a full forward per step. Every model is
tiny and trains a few iterations.
"""
import json
import random

import numpy as np
import pytest

from scratchlm import backend
from scratchlm.config import TrainConfig
from scratchlm.data import load_corpus, split_documents
from scratchlm.datasets import dataset_path
from scratchlm.evaluate import evaluate_run
from scratchlm.generate import generate
from scratchlm.models.registry import FAMILIES
from scratchlm.runs import load_model, read_metrics
from scratchlm.tasks import IGNORE_INDEX, documents_task
from scratchlm.tokenizers import CharTokenizer
from scratchlm.train import train

from clitools import assert_one_line_error, cli, write_word_corpus  # noqa: E402

TINY_MODELS = {"bigram": {}, "mlp": {"block_size": 3, "n_embd": 4, "n_hidden": 16},
               "rnn": {"n_embd": 8, "n_hidden": 16, "dropout": 0.1},
               "lstm": {"n_embd": 8, "n_hidden": 16, "dropout": 0.1},
               "gru": {"n_embd": 8, "n_hidden": 16, "dropout": 0.1}, "gpt": {},
               "vae": {"n_embd": 8, "n_hidden": 16, "n_latent": 4, "word_dropout": 0.3, "dropout": 0.1},
               "gan": {"n_embd": 8, "n_hidden": 16, "d_embd": 4, "d_filters": 4, "g_pretrain_iters": 2,
                       "d_pretrain_iters": 1, "rollouts": 1, "dropout": 0.1}}


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    return write_word_corpus(tmp_path / "tiny.txt")


def tiny_config(**overrides) -> TrainConfig:
    values = dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1,
                  learning_rate=3e-3, max_iters=6, lr_decay_iters=8, min_lr=3e-4, warmup_iters=2,
                  eval_interval=3, eval_iters=2, log_interval=1, seed=7, gradient_accumulation_steps=2)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def state_dicts_equal(run_a, run_b):
    model_a, _, _ = load_model(run_a)
    model_b, _, _ = load_model(run_b)
    b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(b[key]), err_msg=key)


def train_losses(run):
    return [(m["iter"], m["train_loss"]) for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]


@pytest.mark.parametrize("family, corpus", [(name, "file") for name, f in FAMILIES.items() if f.data == "lm"] + [("lstm", "names")])
def test_every_family_trains_and_resumes_bit_identically(tmp_path, corpus_file, family, corpus):
    corpus = str(corpus_file) if corpus == "file" else corpus
    config = tiny_config()
    model_config = TINY_MODELS[family]
    train(config, tmp_path / "whole", corpus=corpus, model=family, model_config=model_config, progress=False)
    first = config.with_value("max_iters", 3)
    train(first, tmp_path / "split", corpus=corpus, model=family, model_config=model_config, progress=False)
    train(config, tmp_path / "split", resume=True, progress=False)

    header = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert header["model"] == family                          # config.json names the family
    whole = train_losses(tmp_path / "whole")
    assert [it for it, _ in whole] == list(range(config.max_iters))
    assert train_losses(tmp_path / "split") == whole          # exact float equality, every iteration
    state_dicts_equal(tmp_path / "whole", tmp_path / "split")


def test_the_old_config_layout_reads_as_a_gpt(tmp_path, corpus_file):
    train(tiny_config(max_iters=1), tmp_path / "run", corpus=str(corpus_file), progress=False)
    path = tmp_path / "run" / "config.json"
    header = json.loads(path.read_text())
    old = {k: v for k, v in header.items() if k not in ("model", "model_config")}
    path.write_text(json.dumps({**old, "model": header["model_config"]}))       # before the registry
    model, _, _ = load_model(tmp_path / "run")
    assert type(model).__name__ == "GPT" and model.config.n_embd == 16


# ---------------------------------------------------------------- names: makemore's split and framing

def test_names_split_is_makemores_lecture_split():
    words = dataset_path("names.txt").read_text(encoding="utf-8").splitlines()
    state = random.getstate()
    try:
        random.seed(42)
        random.shuffle(words)                                   # the lecture's recipe, verbatim
    finally:
        random.setstate(state)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    splits = split_documents(load_corpus("names"))
    assert len(words) == 32033                                 # as in the lecture notebooks
    assert splits == {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


def test_names_are_framed_by_the_boundary_token_as_makemore_does():
    text = dataset_path("names.txt").read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    # makemore's stoi: '.' -> 0, 'a' -> 1, ..., 'z' -> 26; here the newline is the boundary, id 0
    assert tokenizer.chars[0] == "\n" and tokenizer.encode("az") == [1, 26]
    task = documents_task({"train": ["emma", "bo"]}, tokenizer)
    x, y = task.padded("train", block_size=16)
    e, m, a, b, o = tokenizer.encode("emabo")
    assert x.shape[1] == 5                                     # as wide as the longest: "." + "emma"
    assert x.tolist() == [[0, e, m, m, a], [0, b, o, 0, 0]]
    assert y.tolist() == [[e, m, m, a, 0], [b, o, 0, IGNORE_INDEX, IGNORE_INDEX]]


def test_document_loss_drops_trailing_padding_and_keeps_the_loss():
    """A batch of short documents from a corpus with a long one: the task's loss trims the columns
    where no target is real, and the number is the full padded batch's (a causal LSTM's outputs at
    a position never depend on later inputs; cross-entropy ignores -100)."""
    from scratchlm.models.rnn import RNNLM, RNNLMConfig
    from scratchlm.tasks import trim_padding
    tokenizer = CharTokenizer.from_text("\nabcdefghij")
    task = documents_task({"train": ["ab", "abc", "abcdefghij"]}, tokenizer)
    x, y = task.padded("train", block_size=16)
    short = (x[:2], y[:2])                                     # longest real target at column 3 of 11
    tx, ty = trim_padding(short)
    assert tx.shape == ty.shape == (2, 4) and tx.tolist() == x[:2, :4].tolist()
    model = RNNLM(RNNLMConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_embd=8, n_hidden=8, cell="lstm"), seed=0)
    model.eval()
    _, full = model(*short)
    assert task.loss(model, short).item() == pytest.approx(full.item(), rel=1e-6)
    assert trim_padding((x, y))[0].shape == x.shape           # nothing to trim: unchanged


# ---------------------------------------------------------------- eval: every token once

def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_eval_of_a_bigram_on_names_equals_numpy_over_every_character(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    config = tiny_config(max_iters=4, learning_rate=0.1, dropout=0.0)
    train(config, tmp_path / "run", corpus="names", model="bigram", progress=False)
    report = evaluate_run(tmp_path / "run", split="test")
    model, tokenizer, _ = load_model(tmp_path / "run")
    table = log_softmax(backend.to_numpy(model.logits_table.weight.data).astype(np.float64))   # (V, V)
    words = split_documents(load_corpus("names"))["test"]
    nll, count = 0.0, 0
    for word in words:
        ids = [0] + tokenizer.encode(word) + [0]                 # "." + name + "."
        nll -= sum(table[a, b] for a, b in zip(ids[:-1], ids[1:]))
        count += len(ids) - 1
    assert report["tokens"] == count
    assert report["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)
    assert report["bits_per_char"] == pytest.approx(nll / count / np.log(2), rel=1e-5)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["test"]["loss"] == report["loss"]


def test_eval_of_a_gpt_on_a_stream_scores_every_val_token_once(tmp_path, corpus_file):
    config = tiny_config(max_iters=2, dropout=0.0, block_size=16)
    train(config, tmp_path / "run", corpus=str(corpus_file), progress=False)
    report = evaluate_run(tmp_path / "run", split="val", batch_size=3)
    model, tokenizer, _ = load_model(tmp_path / "run")
    text = corpus_file.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer.encode(text))
    val = ids[len(ids) - int(round(len(ids) * 0.1)):]          # prepare's split: the last 10% of tokens
    nll, count, T = 0.0, 0, config.block_size
    for start in range(0, len(val) - 1, T):                    # consecutive windows, one at a time
        x, y = val[start:start + T], val[start + 1:start + T + 1]
        x = x[:len(y)]
        logits, _ = model(x[None, :])
        lp = log_softmax(backend.to_numpy(logits.data)[0].astype(np.float64))
        nll -= lp[np.arange(len(y)), y].sum()
        count += len(y)
    assert count == len(val) - 1 and report["tokens"] == count
    assert report["loss"] == pytest.approx(nll / count, rel=1e-5)


# ---------------------------------------------------------------- generation through a recurrent state

@pytest.mark.parametrize("family", ["mlp", "lstm", "gru", "bigram"])
def test_state_decoding_gives_the_tokens_of_a_full_forward_per_step(family):
    from scratchlm.models.registry import build_model, get_family
    config = get_family(family).model_config(TrainConfig(), TINY_MODELS[family], vocab_size=11)
    model = build_model(family, config, seed=3)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    cached = generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=5, use_cache=True)
    full = generate(model, prompt, max_new_tokens=12, temperature=1.0, seed=5, use_cache=False)
    np.testing.assert_array_equal(backend.to_numpy(cached), backend.to_numpy(full))


# ---------------------------------------------------------------- the command line

TINY_LSTM = ["--model", "lstm", "--iters", 2, "--set", "batch_size=4", "--set", "n_embd=8", "--set", "n_hidden=16",
             "--set", "eval_iters=1", "--set", "eval_interval=2", "--set", "warmup_iters=0", "--set", "lr_decay_iters=2",
             "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LSTM run on a text file (no test split) and one on names."""
    root = tmp_path_factory.mktemp("ladder")
    corpus = root / "tiny.txt"
    corpus.write_text("the cat sat on the mat. " * 60, encoding="utf-8")
    env = {"SCRATCHLM_CACHE": str(root / "cache")}
    for name, source in (("stream", corpus), ("names", "names")):
        result = cli("train", "--corpus", source, "--out", root / name, *TINY_LSTM, env_extra=env)
        assert result.returncode == 0, result.stderr
    return {"root": root, "env": env}


def test_unknown_model_lists_the_models(tmp_path):
    result = cli("train", "--model", "transformer", "--corpus", "names", "--out", tmp_path / "r")
    assert_one_line_error(result, "unknown model 'transformer'", "bigram, mlp, rnn, lstm, gru, gpt")


def test_a_key_the_model_does_not_have_names_the_model_and_its_keys(tmp_path):
    result = cli("train", "--model", "lstm", "--corpus", "names", "--out", tmp_path / "r", "--set", "n_head=4")
    assert_one_line_error(result, "unknown config key 'n_head'", "model lstm", "n_hidden")
    assert not (tmp_path / "r").exists()                      # refused before anything was written


def test_eval_on_a_run_without_a_test_split(runs):
    result = cli("eval", "--run", runs["root"] / "stream", "--split", "test", env_extra=runs["env"])
    assert_one_line_error(result, "no 'test' split", "--split val")


def test_eval_and_sample_on_names(runs):
    run = runs["root"] / "names"
    result = cli("eval", "--run", run, "--split", "test", env_extra=runs["env"])
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval.json").read_text())["test"]
    assert report["tokens"] == sum(len(w) + 1 for w in split_documents(load_corpus("names"))["test"])
    result = cli("sample", "--run", run, "--num-samples", 4, env_extra=runs["env"])
    assert result.returncode == 0, result.stderr
    names = result.stdout.split("\n")[:-1]
    assert len(names) == 4                                     # one name per line, stopped at the boundary


def test_sample_prompt_with_characters_the_tokenizer_lacks(runs):
    result = cli("sample", "--run", runs["root"] / "stream", "--prompt", "the ZEBRA", env_extra=runs["env"])
    assert_one_line_error(result, "'Z'", "not in the")


def test_sample_and_summary_on_an_lstm_stream_run(runs):
    run = runs["root"] / "stream"
    result = cli("sample", "--run", run, "--prompt", "the ", "--max-new-tokens", 20, env_extra=runs["env"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the ") and len(result.stdout.rstrip("\n")) == 24
    result = cli("summary", "--run", run)
    assert result.returncode == 0 and "model lstm" in result.stdout and "Total params" in result.stdout
