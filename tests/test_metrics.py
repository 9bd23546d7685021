"""scratchlm.metrics: values worked by hand from the papers' definitions, degenerate inputs, and
equality with the reference packages (sacrebleu, rouge-score, NLTK under Texygen's protocol,
scikit-learn) on Hypothesis-drawn sentences and labels when those packages are installed."""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

from scratchlm import metrics
from scratchlm.errors import UserError

# ----------------------------------------------------------------------------- hand-worked: text


def test_bleu_by_hand_with_brevity_penalty():
    # hyp 5 tokens, ref 6: clipped precisions 5/5, 3/4 (the cat, cat sat, sat on), 2/3, 1/2;
    # c = 5 < r = 6 so BP = exp(1 - 6/5)
    expected = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert metrics.bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(expected, abs=1e-9)


def test_bleu_clips_counts_and_smooths_missing_orders_exponentially():
    # Papineni's example: "the" x7 against a reference holding "the" twice -> unigram 2/7;
    # no bigram/trigram/4-gram matches: exp smoothing gives 1/(2*6), 1/(4*5), 1/(8*4); c=7 > r=6: BP=1
    p = [2 / 7, 1 / (2 * 6), 1 / (4 * 5), 1 / (8 * 4)]
    expected = 100 * math.exp(sum(map(math.log, p)) / 4)
    assert metrics.bleu(["the the the the the the the"], ["the cat is on the mat"]) == pytest.approx(expected, abs=1e-9)


def test_bleu_several_references_clip_at_the_best_one_and_take_the_closest_length():
    # "the" is clipped at 2 (the second reference holds it twice); the closest reference length
    # to 3 tokens is 3 ("the the cat" is 3, "a cat" is 2)
    hyp, refs = "the the the", ["a cat", "the the cat"]
    p = [2 / 3, 1 / 2, 1 / (2 * 1)]  # bigram "the the" x2 against 1, trigram 0 of 1
    expected = 100 * math.exp(sum(map(math.log, p)) / 3)
    assert metrics.bleu([hyp], [refs], max_order=3) == pytest.approx(expected, abs=1e-9)


def test_sentence_bleu_short_hypothesis_uses_the_orders_it_has():
    # 2 tokens: only 1- and 2-grams exist (effective order 2); p = 2/2, 1/1; BP = exp(1 - 3/2)
    assert metrics.sentence_bleu("the cat", "the cat sat") == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
    # corpus BLEU keeps all four orders, and no 3-gram at all makes it 0
    assert metrics.bleu(["the cat"], ["the cat sat"]) == 0.0


def test_tokenize_13a_splits_punctuation_but_not_numbers():
    assert metrics.tokenize_13a('He said "3.14, 1,000" &amp; left (fast)!') == \
        'He said " 3.14 , 1,000 " & left ( fast ) !'
    assert metrics.tokenize_13a("well-known 1990-2000") == "well-known 1990 - 2000"


def test_chrf_by_hand():
    # "abc" vs "abd": 1-grams 2/3 both ways, 2-grams 1/2, 3-grams 0/1; orders 4..6 have no n-gram
    # and are left out. P = R = (2/3 + 1/2 + 0) / 3 = 7/18, and F_beta(P, P) = P.
    assert metrics.chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18, abs=1e-9)
    assert metrics.chrf(["a b"], ["ab"]) == pytest.approx(100.0)  # whitespace is not a character n-gram


def test_rouge_by_hand_lin_2004():
    # Lin's example: LCS("police killed the gunman", "police kill the gunman") = 3 ("police the
    # gunman"): P = R = 3/4. Unigram overlap 3 -> 3/4; bigram overlap 1 ("the gunman") of 3 -> 1/3.
    r = metrics.rouge(["police kill the gunman"], ["police killed the gunman"])
    assert r == pytest.approx({"rouge1": 0.75, "rouge2": 1 / 3, "rougeL": 0.75}, abs=1e-12)
    # "the gunman kill police": LCS 2, P = R = 1/2, while ROUGE-1 still sees 3 shared words
    r = metrics.rouge(["the gunman kill police"], ["police killed the gunman"])
    assert r["rougeL"] == pytest.approx(0.5) and r["rouge1"] == pytest.approx(0.75)


def test_rouge_tokenizer_drops_non_ascii_letters_like_rouge_score():
    # lowercase, then every character outside [a-z0-9] is a separator: "héllo" -> "h", "llo"
    assert metrics.rouge(["héllo wörld"], ["hello world"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert metrics.rouge(["Hello, WORLD!"], ["hello world"])["rouge2"] == pytest.approx(1.0)


def test_texygen_bleu_by_hand():
    # "a b c" vs "a b d": p1 = 2/3, p2 = 1/2, equal lengths so BP = 1; BLEU-2 = sqrt(p1 p2)
    assert metrics.bleu_against(["a b c"], ["a b d"], n=2) == pytest.approx(math.sqrt(1 / 3), abs=1e-12)
    # BLEU-3: no trigram match, method 1 replaces 0/1 by 0.1/1
    assert metrics.bleu_against(["a b c"], ["a b d"], n=3) == pytest.approx((2 / 3 * 1 / 2 * 0.1) ** (1 / 3))
    # two references: "c" is clipped by the second; the closest length to 3 is 3 (not 1)
    assert metrics.bleu_against(["a b c"], ["a b d", "c"], n=1) == pytest.approx(1.0)


def test_self_bleu_leaves_each_sample_out():
    # the two copies match each other fully; the odd one matches nothing: (1 + 1 + 0) / 3
    assert metrics.self_bleu(["a b", "a b", "c d"], n=1) == pytest.approx(2 / 3)
    # a sample never matches itself
    assert metrics.self_bleu(["x y", "a b"], n=2) == 0.0


def test_perplexity():
    assert metrics.perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert metrics.perplexity(1e6) == math.inf


# ----------------------------------------------------------------------------- degenerate: text


def test_text_metrics_on_degenerate_input():
    assert metrics.bleu([""], ["the cat sat on the mat"]) == 0.0        # empty hypothesis
    assert metrics.sentence_bleu("", "the cat") == 0.0
    assert metrics.bleu([], []) == 0.0 and metrics.chrf([], []) == 0.0  # empty corpus
    assert metrics.rouge([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert metrics.bleu(["a b c d e"], ["v w x y z"]) == 0.0             # no overlap
    assert metrics.rouge([""], [""])["rougeL"] == 0.0
    unicode = "日本語 の 文 を 読む 。 ça va très bien"
    assert metrics.bleu([unicode], [unicode]) == pytest.approx(100.0)
    assert metrics.chrf([unicode], [unicode]) == pytest.approx(100.0)
    assert metrics.bleu_against([""], ["a b"]) == 0.0


@pytest.mark.parametrize("call", [
    lambda: metrics.bleu(["a", "b"], ["a"]),               # lengths differ
    lambda: metrics.bleu(["a"], [[]]),                     # a hypothesis without a reference
    lambda: metrics.bleu("a b", "a b"),                    # a string, not a corpus
    lambda: metrics.bleu(["a"], ["a"], smooth="add-k"),
    lambda: metrics.rouge(["a"], [["a"], ["b"]]),
    lambda: metrics.self_bleu(["only one"]),
    lambda: metrics.bleu_against([], ["a"]),
])
def test_text_metrics_refuse_impossible_input(call):
    with pytest.raises(UserError):
        call()


# ----------------------------------------------------------------------------- hand-worked: classes

Y_TRUE = [1, 1, 1, 0, 0, 0, 0, 1]
Y_PRED = [1, 0, 1, 1, 0, 0, 0, 0]   # tp = 2, fp = 1, fn = 2, tn = 3


def test_precision_recall_f1_2x2_by_hand():
    assert metrics.precision(Y_TRUE, Y_PRED) == pytest.approx(2 / 3)
    assert metrics.recall(Y_TRUE, Y_PRED) == pytest.approx(2 / 4)
    assert metrics.f1(Y_TRUE, Y_PRED) == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 8)
    # class 0: tp = 3, predicted 5 times, true 4 times
    assert metrics.precision(Y_TRUE, Y_PRED, average="macro") == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert metrics.recall(Y_TRUE, Y_PRED, average="weighted") == pytest.approx((4 * 3 / 4 + 4 * 2 / 4) / 8)
    assert metrics.f1(Y_TRUE, Y_PRED, average="micro") == pytest.approx(5 / 8)  # = accuracy
    np.testing.assert_array_equal(metrics.confusion_matrix(Y_TRUE, Y_PRED), [[3, 1], [2, 2]])
    # pos_label picks the class: class 0 seen as positive
    assert metrics.precision(Y_TRUE, Y_PRED, pos_label=0) == pytest.approx(3 / 5)


def test_a_class_never_predicted_scores_zero_and_all_correct_scores_one():
    y_true, y_pred = ["a", "b", "c", "c"], ["a", "a", "c", "c"]      # "b" never predicted
    p, r, f = metrics.precision_recall_f1(y_true, y_pred, average=None)
    np.testing.assert_allclose(p, [0.5, 0.0, 1.0])
    np.testing.assert_allclose(r, [1.0, 0.0, 1.0])
    assert metrics.precision([0, 0], [0, 0]) == 0.0        # binary, the positive class absent
    labels = [3, 1, 2, 1]
    assert metrics.accuracy(labels, labels) == 1.0
    assert metrics.f1(labels, labels, average="macro") == 1.0


def test_roc_auc_and_average_precision_by_hand():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # of the 4 positive/negative pairs, 3 are ordered correctly
    assert metrics.roc_auc(y, s) == pytest.approx(0.75)
    # thresholds 0.8, 0.4, 0.35, 0.1: recall steps 0 -> 1/2 at P = 1, 1/2 -> 1 at P = 2/3
    assert metrics.pr_auc(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.roc_auc(["neg", "pos"], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert metrics.pr_auc([0, 0], [0.3, 0.2]) == 0.0


def test_classification_report_is_a_table():
    text = metrics.classification_report(Y_TRUE, Y_PRED, target_names=["neg", "pos"])
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["neg", "0.60", "0.75", "0.67", "4"]
    assert lines[3].split() == ["pos", "0.67", "0.50", "0.57", "4"]
    assert lines[5].split() == ["accuracy", "0.62", "8"]
    assert lines[6].split()[:2] == ["macro", "avg"] and lines[7].split()[:2] == ["weighted", "avg"]


@pytest.mark.parametrize("call", [
    lambda: metrics.accuracy([0, 1], [0]),                       # lengths differ
    lambda: metrics.precision([0, 1, 2], [0, 1, 2]),             # binary with three labels
    lambda: metrics.precision(["a", "b"], ["a", "b"]),           # pos_label 1 is no label
    lambda: metrics.roc_auc([1, 1], [0.2, 0.3]),                 # one class only
    lambda: metrics.roc_auc([0, 1], [0.2, float("nan")]),
    lambda: metrics.f1([0, "a"], [0, 0]),                        # mixed label kinds
    lambda: metrics.recall([0.5, 1], [0, 1]),                    # scores, not labels
    lambda: metrics.accuracy([], []),
    lambda: metrics.f1([0, 1], [0, 1], average="samples"),
    lambda: metrics.classification_report([0, 1], [0, 1], target_names=["x"]),
    lambda: metrics.confusion_matrix([0, 1], [0, 1], labels=[7]),
])
def test_classification_metrics_refuse_impossible_input(call):
    with pytest.raises(UserError):
        call()


# ----------------------------------------------------------------------------- reference packages

WORDS = ["the", "The", "cat", "sat", "on", "mat", "a", "dog", ".", ",", "3.14", "1,000", "well-known",
         "(", ")", "\"", "'s", "&amp;", "&lt;", "-", "é", "çà", "日本", "ß", "Ünïcode", "don't", "$5", "x"]
sentence = st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join) | \
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=25)
pairs = st.lists(st.tuples(sentence, st.lists(sentence, min_size=1, max_size=3)), min_size=1, max_size=6)


def _streams(refs):
    """Per-hypothesis reference lists -> sacrebleu's reference streams (None = fewer references)."""
    return [[r[k] if k < len(r) else None for r in refs] for k in range(max(map(len, refs)))]


@given(pairs)
def test_bleu_and_chrf_equal_sacrebleu(data):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = [h for h, _ in data], [r for _, r in data]
    assert metrics.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, _streams(refs)).score, abs=0.01)
    assert metrics.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, _streams(refs)).score, abs=0.01)
    for h, r in data:
        assert metrics.sentence_bleu(h, r) == pytest.approx(sacrebleu.sentence_bleu(h, r).score, abs=0.01)


@given(pairs)
def test_rouge_equals_rouge_score(data):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    hyps, refs = [h for h, _ in data], [r for _, r in data]
    ours = metrics.rouge(hyps, refs)
    for key in ours:
        theirs = np.mean([scorer.score_multi(r, h)[key].fmeasure for h, r in data])
        assert ours[key] == pytest.approx(theirs, abs=1e-6)


tokens = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "the", "dog"]), max_size=9).map(" ".join)


@given(st.lists(tokens, min_size=2, max_size=8), st.lists(tokens, min_size=1, max_size=8), st.integers(1, 5))
def test_texygen_bleu_and_self_bleu_equal_nltk(samples, references, n):
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    smooth, weights = bleu_score.SmoothingFunction().method1, (1.0 / n,) * n
    split_s, split_r = [s.split() for s in samples], [r.split() for r in references]

    def nltk_bleu(hyp, refs):
        return bleu_score.sentence_bleu(refs, hyp, weights, smoothing_function=smooth)

    against = sum(nltk_bleu(s, split_r) for s in split_s) / len(split_s)
    self_ = sum(nltk_bleu(s, split_s[:i] + split_s[i + 1:]) for i, s in enumerate(split_s)) / len(split_s)
    assert metrics.bleu_against(samples, references, n) == pytest.approx(against, abs=1e-9)
    assert metrics.self_bleu(samples, n) == pytest.approx(self_, abs=1e-9)


labels_kind = st.sampled_from([st.integers(0, 1), st.integers(0, 3), st.sampled_from(["cat", "dog", "é"])])


@given(labels_kind.flatmap(lambda kind: st.lists(st.tuples(kind, kind), min_size=1, max_size=30)))
def test_classification_metrics_equal_scikit_learn(pairs_):
    skm = pytest.importorskip("sklearn.metrics")
    y_true, y_pred = [t for t, _ in pairs_], [p for _, p in pairs_]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
        for average in ["binary", "macro", "micro", "weighted"]:
            try:
                theirs = skm.precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)[:3]
            except ValueError:  # binary with 3 labels, or pos_label=1 not among 2: refused by both
                with pytest.raises(UserError):
                    metrics.precision_recall_f1(y_true, y_pred, average=average)
                continue
            ours = metrics.precision_recall_f1(y_true, y_pred, average=average)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred), skm.confusion_matrix(y_true, y_pred))
        ours_report = metrics.classification_report(y_true, y_pred)
        theirs_report = skm.classification_report(y_true, y_pred, zero_division=0)
    # the same table; scikit-learn 1.9 sometimes prints supports as "4.0", so compare cells as numbers
    cells = [[float(c) if c[0].isdigit() else c for c in line.split()] for line in ours_report.splitlines()]
    assert cells == [[float(c) if c[0].isdigit() else c for c in line.split()] for line in theirs_report.splitlines()]


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4) | st.floats(-3, 3)), min_size=1, max_size=30))
def test_roc_auc_and_average_precision_equal_scikit_learn(data):
    skm = pytest.importorskip("sklearn.metrics")
    y, scores = [t for t, _ in data], [s for _, s in data]   # small integers make many ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics.pr_auc(y, scores) == pytest.approx(skm.average_precision_score(y, scores), abs=1e-12)
        if len(set(y)) == 2:
            assert metrics.roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)
        else:
            with pytest.raises(UserError):
                metrics.roc_auc(y, scores)


def test_docstring_examples_hold():
    import doctest

    from scratchlm.metrics import classification, text
    for module in (metrics, text, classification):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
