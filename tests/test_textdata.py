"""Labelled data: the shipped sentiment set's counts, the U+0085 trap, user TSV/CSV files and
their errors, fold invariants (disjoint, covering, stratified), and padded batches."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from scratchlm import textdata
from scratchlm.datasets import dataset_path
from scratchlm.errors import UserError


# ---------------------------------------------------------------- loading

def test_sentiment_counts_labels_and_sources():
    data = textdata.load_labelled("sentiment")
    assert len(data) == 3000 and data.num_classes == 2
    assert data.label_names == ["negative", "positive"]
    assert np.bincount(data.labels).tolist() == [1500, 1500]
    groups = np.array(data.groups)
    for source in ("amazon", "imdb", "yelp"):
        assert np.bincount(data.labels[groups == source]).tolist() == [500, 500]
    assert all(t and t == t.strip() for t in data.texts)


def test_sentiment_sentences_with_u0085_stay_whole():
    # The raw file, read the safe way, is the oracle: 3000 lines, some with NEL inside a sentence.
    raw = dataset_path("sentiment_sentences.tsv").read_text(encoding="utf-8")
    with_nel = [line.split("\t")[0] for line in raw.split("\n") if "\x85" in line]
    assert with_nel, "the shipped file no longer has the U+0085 case this test is about"
    assert len(raw.splitlines()) > 3000          # the trap: splitlines() cuts these sentences
    texts = textdata.load_labelled("sentiment").texts
    for sentence in with_nel:
        assert sentence in texts


def test_user_tsv_multiclass_labels_sorted_numerically_and_header_skipped(tmp_path):
    path = tmp_path / "topics.tsv"
    path.write_text("text\tlabel\nfirst one\t10\r\nsecond\t2\n\nthird\t2\tweb\nfourth\t10\n",
                    encoding="utf-8")
    data = textdata.load_labelled(path)
    assert data.texts == ["first one", "second", "third", "fourth"]
    assert data.label_names == ["2", "10"]                     # 2 < 10 as numbers
    assert data.labels.tolist() == [1, 0, 0, 1]
    assert data.groups == [None, None, "web", None]


def test_user_csv_with_header_and_string_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,label,text\n1,sports,"a goal, a win"\n2,politics,"a vote\nacross lines"\n'
                    '3,arts,a song\n', encoding="utf-8")
    data = textdata.load_labelled(path)
    assert data.texts == ["a goal, a win", "a vote\nacross lines", "a song"]
    assert data.label_names == ["arts", "politics", "sports"]
    assert data.labels.tolist() == [2, 1, 0]


@pytest.mark.parametrize("content, message", [
    ("good\t1\nno label here\nbad\t0\n", r"bad\.tsv:2: no label"),
    ("good\t1\nbad\t\n", r"bad\.tsv:2: no label"),
    ("good\t1\n\t0\n", r"bad\.tsv:2: empty text"),
    ("good\t1\nfine\t1\n", r"every example has label '1'.*at least two classes"),
    ("\n\n", r"no labelled examples"),
])
def test_tsv_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        textdata.load_labelled(path)


def test_csv_and_file_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nok,1\nmissing\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv:3: no label"):
        textdata.load_labelled(path)
    path.write_text("text,label\nok,1\n,0\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv:3: empty text"):
        textdata.load_labelled(path)
    with pytest.raises(UserError, match="not a shipped name"):
        textdata.load_labelled(tmp_path / "absent.tsv")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("caf\xe9\t1\nx\t0\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        textdata.load_labelled(latin)


# ---------------------------------------------------------------- folds

labels_strategy = st.lists(st.integers(0, 3), min_size=12, max_size=80)


@settings(max_examples=40, deadline=None)
@given(labels_strategy, st.integers(2, 6), st.integers(0, 2**16))
def test_folds_are_disjoint_cover_everything_and_are_stratified(labels, k, seed):
    labels = np.array(labels)
    if k > np.bincount(labels)[np.unique(labels)].min():
        with pytest.raises(UserError, match="larger than the smallest class"):
            textdata.stratified_folds(labels, k, seed)
        return
    folds = textdata.stratified_folds(labels, k, seed)
    assert len(folds) == k
    everything = np.concatenate(folds)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))   # each index exactly once
    for c in np.unique(labels):
        per_fold = [int((labels[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(folds, textdata.stratified_folds(labels, k, seed)))


@settings(max_examples=25, deadline=None)
@given(labels_strategy, st.integers(0, 2**16))
def test_cross_validation_never_trains_or_selects_on_the_test_fold(labels, seed):
    labels = np.array(labels)
    k = 2
    if k > np.bincount(labels)[np.unique(labels)].min():
        return
    splits = textdata.cross_validation_splits(labels, k, seed, dev_fraction=0.2)
    tests = []
    for train, dev, test in splits:
        assert not set(train) & set(test) and not set(dev) & set(test) and not set(train) & set(dev)
        assert len(train) + len(dev) + len(test) == len(labels)
        assert len(dev) > 0
        tests.append(test)
    assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(len(labels)))


def test_ten_folds_on_sentiment_and_a_single_split():
    labels = textdata.load_labelled("sentiment").labels
    folds = textdata.stratified_folds(labels, 10, seed=0)
    assert [np.bincount(labels[f]).tolist() for f in folds] == [[150, 150]] * 10
    train, dev, test = textdata.train_dev_test_split(labels, 0.1, 0.1, seed=0)
    assert (len(train), len(dev), len(test)) == (2400, 300, 300)
    assert np.bincount(labels[test]).tolist() == [150, 150]
    assert len(set(train) | set(dev) | set(test)) == 3000
    with pytest.raises(UserError, match="--folds 1501"):
        textdata.stratified_folds(labels, 1501)


# ---------------------------------------------------------------- batches

def test_pad_batch_ids_and_mask():
    ids, mask = textdata.pad_batch([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert ids.dtype == np.int64 and mask.dtype == bool
    ids, mask = textdata.pad_batch([[1, 2, 3, 4], [5]], max_len=2)
    assert ids.tolist() == [[1, 2], [5, 0]] and mask.sum(1).tolist() == [2, 1]
    ids, mask = textdata.pad_batch([[], []])
    assert ids.shape == (2, 1) and not mask.any()


def test_batch_indices_cover_in_order_or_shuffled():
    batches = textdata.batch_indices(np.arange(10), 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = textdata.batch_indices(np.arange(10), 4, rng=np.random.default_rng(0))
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10))
