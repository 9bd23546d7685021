"""``scratchlm classify`` / ``scratchlm word2vec`` end to end (subprocesses): k-fold bookkeeping,
a saved model that labels text, and every bad input as one line on stderr with exit status 2."""
import json

import numpy as np
import pytest

from clitools import assert_one_line_error  # noqa: E402
from clitools import cli as scratchlm  # noqa: E402
FAST = ["--set", "max_iters=30", "--set", "lr_decay_iters=30", "--set", "eval_interval=10", "--set", "n_embd=8",
        "--set", "learning_rate=0.03", "--set", "batch_size=8"]


def write_tsv(path, n=24):
    """Two classes told apart by one word each (good / awful), other words shared."""
    rng = np.random.default_rng(0)
    filler = ["the", "food", "was", "service", "and", "very", "place", "it"]
    lines = []
    for k in range(n):
        words = list(rng.choice(filler, size=4)) + (["good"] if k % 2 else ["awful"])
        lines.append(" ".join(rng.permutation(words)) + "\t" + ("pos" if k % 2 else "neg"))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_kfold_tests_every_example_once_and_summarizes(tmp_path):
    data = write_tsv(tmp_path / "toy.tsv")
    result = scratchlm("classify", "--data", data, "--model", "bow", "--folds", "3", "--out", tmp_path / "cv", *FAST)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cv" / "eval.json").read_text())
    folds = report["per_fold"]
    assert len(folds) == 3 and all((tmp_path / "cv" / f"fold-0{i}" / "best.safetensors").exists() for i in (1, 2, 3))
    tested = sorted(j for f in folds for j in f["test_index"])
    assert tested == list(range(24))                                           # each example in one test fold
    for key in ("accuracy", "f1"):
        values = [f[key] for f in folds]
        assert report["mean"][key] == pytest.approx(np.mean(values))
        assert report["std"][key] == pytest.approx(np.std(values))
    labels = np.array([k % 2 for k in range(24)])                              # accuracy recomputed from predictions
    for f in folds:
        assert f["accuracy"] == pytest.approx(np.mean(labels[f["test_index"]] == np.array(f["test_predicted"])))
    metrics = [json.loads(line) for line in (tmp_path / "cv" / "fold-01" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in m for m in metrics if m["kind"] == "eval")
    labelled = scratchlm("classify", "--run", tmp_path / "cv", "good food")    # the folds' mean probability
    assert labelled.returncode == 0 and labelled.stdout.split("\t")[0] in ("pos", "neg"), labelled.stderr
    again = scratchlm("classify", "--data", data, "--model", "bow", "--folds", "3", "--out", tmp_path / "cv", *FAST)
    assert_one_line_error(again, "already holds")


def test_single_split_saves_a_model_that_labels_text(tmp_path):
    data = write_tsv(tmp_path / "toy.tsv", n=40)
    run = tmp_path / "run"
    result = scratchlm("classify", "--data", data, "--model", "bilstm", "--folds", "1", "--out", run,
                       "--augment", "eda", *FAST, "--set", "n_hidden=8")
    assert result.returncode == 0, result.stderr
    labelled = scratchlm("classify", "--run", run, "the food was good", "awful place")
    assert labelled.returncode == 0, labelled.stderr
    rows = [line.split("\t") for line in labelled.stdout.strip().split("\n")]
    assert [r[0] for r in rows] == ["pos", "neg"] and all(0.5 <= float(r[1]) <= 1.0 for r in rows)
    piped = scratchlm("classify", "--run", run, stdin="good food\n\nawful\n")
    assert [line.split("\t")[0] for line in piped.stdout.strip().split("\n")] == ["pos", "neg"]
    assert_one_line_error(scratchlm("classify", "--run", run, "   "), "no words")


@pytest.mark.parametrize("content,needle", [
    ("good food\tpos\nawful\n", "no label"),
    ("good food\tpos\nawful\tpos\n", "two classes"),
    ("good food\tpos\n\tneg\n", "empty text"),
])
def test_bad_data_is_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    assert_one_line_error(scratchlm("classify", "--data", path, "--model", "bow", "--out", tmp_path / "o"), needle)
    assert not (tmp_path / "o").exists()


def test_more_folds_than_the_smallest_class(tmp_path):
    path = tmp_path / "small.tsv"
    path.write_text("".join(f"word{k} good\tpos\n" for k in range(6)) + "bad one\tneg\nbad two\tneg\n")
    assert_one_line_error(scratchlm("classify", "--data", path, "--model", "bow", "--folds", "3",
                                    "--out", tmp_path / "o"), "--folds 3", "smallest class")


def test_vectors_of_the_wrong_dimension(tmp_path):
    data = write_tsv(tmp_path / "toy.tsv")
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("2 3\ngood 1 0 0\nawful 0 1 0\n")
    result = scratchlm("classify", "--data", data, "--model", "bow", "--vectors", vectors, "--out", tmp_path / "o",
                       "--set", "n_embd=8")
    assert_one_line_error(result, "3-dimensional", "8")


def test_word2vec_writes_vectors_that_initialise_a_classifier(tmp_path):
    data = write_tsv(tmp_path / "toy.tsv", n=40)
    w2v = tmp_path / "w2v"
    result = scratchlm("word2vec", "--corpus", data, "--out", w2v, "--set", "dim=8", "--set", "min_count=1",
                       "--set", "epochs=2", "--set", "workers=1")
    assert result.returncode == 0, result.stderr
    header = (w2v / "vectors.txt").read_text().split("\n")[0].split()
    assert int(header[1]) == 8 and json.loads((w2v / "config.json").read_text())["dim"] == 8
    neighbours = scratchlm("word2vec", "--run", w2v, "--neighbors", "good", "-k", "3")
    assert neighbours.returncode == 0 and neighbours.stdout.startswith("good:")
    cv = scratchlm("classify", "--data", data, "--model", "bow", "--folds", "1", "--vectors", w2v / "vectors.txt",
                   "--out", tmp_path / "run", *FAST)
    assert cv.returncode == 0, cv.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_config"]["init_embeddings"] == str(w2v / "vectors.txt")


def test_train_refuses_a_classifier(tmp_path):
    assert_one_line_error(scratchlm("train", "--model", "bow", "--corpus", "names", "--out", tmp_path / "o"),
                          "scratchlm classify")


def test_init_embeddings_copies_the_vectors_of_known_words(tmp_path):
    from scratchlm.models.classifier import BagOfEmbeddings, BagOfEmbeddingsConfig
    from scratchlm.tasks import Classification
    from scratchlm.tokenizers.word import WordTokenizer
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("2 3\ngood 1 2 3\nawful -1 -2 -3\n")
    tok = WordTokenizer.from_text(["good food", "awful food"], min_count=1)
    task = Classification({"train": [["good"]]}, {"train": [1]}, tok, 8, vectors=str(vectors))
    model = BagOfEmbeddings(BagOfEmbeddingsConfig(vocab_size=tok.vocab_size, n_embd=3, init_embeddings_scale="raw"),
                            seed=0)
    before = model.wte.weight.numpy().copy()
    task.init_model(model)
    table = model.wte.weight.numpy()
    np.testing.assert_allclose(table[tok.stoi["good"]], [1, 2, 3])
    np.testing.assert_allclose(table[tok.stoi["awful"]], [-1, -2, -3])
    assert np.all(table[tok.pad_id] == 0)
    food = tok.stoi["food"]                                           # no vector: the model's own row
    np.testing.assert_array_equal(table[food], before[food])


def test_init_embeddings_match_scale_puts_the_vectors_on_the_tables_scale(tmp_path):
    """Default ``init_embeddings_scale=match``: vector rows = vectors x (std of the model's random
    table) / (std of the vectors found), here std of {1,2,3,-1,-2,-3} = sqrt(14/3)."""
    from scratchlm.models.classifier import BagOfEmbeddings, BagOfEmbeddingsConfig
    from scratchlm.tasks import Classification
    from scratchlm.tokenizers.word import WordTokenizer
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("2 3\ngood 1 2 3\nawful -1 -2 -3\n")
    tok = WordTokenizer.from_text(["good food", "awful food"], min_count=1)
    task = Classification({"train": [["good"]]}, {"train": [1]}, tok, 8, vectors=str(vectors))
    model = BagOfEmbeddings(BagOfEmbeddingsConfig(vocab_size=tok.vocab_size, n_embd=3), seed=0)
    before = model.wte.weight.numpy().copy()
    task.init_model(model)
    table = model.wte.weight.numpy()
    factor = before.std() / np.sqrt(14 / 3)
    np.testing.assert_allclose(table[tok.stoi["good"]], np.array([1, 2, 3]) * factor, rtol=1e-5)
    np.testing.assert_allclose(table[tok.stoi["awful"]], np.array([-1, -2, -3]) * factor, rtol=1e-5)
    assert np.all(table[tok.pad_id] == 0)


def test_freeze_embeddings_leaves_the_table_out_of_the_optimiser():
    from scratchlm.models.classifier import MODELS
    for name, (cls, config_cls) in MODELS.items():
        frozen = cls(config_cls(vocab_size=12, n_embd=8, freeze_embeddings=True), seed=0)
        free = cls(config_cls(vocab_size=12, n_embd=8), seed=0)
        in_groups = lambda m: {id(p) for g in m.configure_optimizer_groups(0.01) for p in g["params"]}
        assert id(frozen.wte.weight) not in in_groups(frozen), name
        assert id(free.wte.weight) in in_groups(free), name
        assert len(in_groups(free)) == len(list(free.parameters())) == len(in_groups(frozen)) + 1, name
