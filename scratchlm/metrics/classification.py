"""Classification metrics, written from their definitions, equal to scikit-learn's.

Labels are ints, bools or strings (not a mix). With per-class counts over the sorted labels
(tp = true positives, pred = how often predicted, true = how often true, the "support"):

    precision = tp / pred        recall = tp / true        F1 = 2 tp / (pred + true)

and 0 where the denominator is 0 (scikit-learn's ``zero_division=0``). ``average``:
``"binary"`` reports the class ``pos_label`` only (two labels at most); ``"macro"`` the plain
mean over classes; ``"weighted"`` the mean weighted by support; ``"micro"`` sums tp, pred and
true over classes first (micro precision = recall = F1 = accuracy for single-label data);
``None`` returns one value per class.

    >>> precision([0, 1, 1, 0], [1, 1, 0, 0])      # one true positive, one false positive
    0.5
"""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import UserError

__all__ = ["accuracy", "precision", "recall", "f1", "precision_recall_f1", "confusion_matrix",
           "roc_auc", "pr_auc", "classification_report"]

AVERAGES = ("binary", "macro", "micro", "weighted", None)


def _labels_array(y, name):
    """One label vector as a 1-D NumPy array of ints/bools or of strings; UserError otherwise."""
    if isinstance(y, str):
        raise UserError(f"{name} is one string; pass a list of labels")
    values = list(y)
    if all(isinstance(v, str) for v in values):
        return np.array(values, dtype=str) if values else np.array([], dtype=str)
    if all(isinstance(v, (numbers.Integral, np.bool_)) for v in values):
        return np.array(values, dtype=np.int64) if values else np.array([], dtype=np.int64)
    if all(isinstance(v, numbers.Real) for v in values):
        arr = np.asarray(values, dtype=np.float64)
        if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)  # 1.0 and 1 are the same class, as in scikit-learn
        raise UserError(f"{name} holds non-integer numbers; class labels must be ints or strings "
                        "(threshold scores first, or use roc_auc/pr_auc for scores)")
    raise UserError(f"{name} mixes strings and numbers (or holds other objects); "
                    "use one kind of label")


def _pair(y_true, y_pred):
    """Checked (y_true, y_pred) arrays of one kind and equal, non-zero length."""
    yt, yp = _labels_array(y_true, "y_true"), _labels_array(y_pred, "y_pred")
    if len(yt) != len(yp):
        raise UserError(f"y_true has {len(yt)} labels but y_pred has {len(yp)}; they must pair up")
    if len(yt) == 0:
        raise UserError("y_true and y_pred are empty; a metric needs at least one sample")
    if (yt.dtype.kind == "U") != (yp.dtype.kind == "U"):
        raise UserError("y_true and y_pred mix string and numeric labels; use one kind for both")
    return yt, yp


def _counts(yt, yp, labels):
    """Confusion counts (L, L) over ``labels`` (rows = truth); samples with other labels drop out."""
    L = len(labels)
    it = np.searchsorted(labels, yt).clip(0, L - 1)
    ip = np.searchsorted(labels, yp).clip(0, L - 1)
    keep = (labels[it] == yt) & (labels[ip] == yp)
    return np.bincount(it[keep] * L + ip[keep], minlength=L * L).reshape(L, L)


def _divide(num, den, zero_division):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den == 0, float(zero_division), num / np.where(den == 0, 1.0, den))


def accuracy(y_true, y_pred) -> float:
    """Fraction of samples whose predicted label equals the true one."""
    yt, yp = _pair(y_true, y_pred)
    return float(np.mean(yt == yp))


def precision_recall_f1(y_true, y_pred, average="binary", pos_label=1, zero_division=0):
    """(precision, recall, F1) under one ``average`` (see the module docstring).

    ``average="binary"`` refuses more than two labels, and a ``pos_label`` that is not one of two
    present labels; with one label present that is not ``pos_label``, all three are
    ``zero_division`` (nothing positive to find).
    """
    if average not in AVERAGES:
        raise UserError(f"average={average!r} is not known; use one of binary, macro, micro, weighted, None")
    if zero_division not in (0, 1):
        raise UserError(f"zero_division={zero_division!r}; use 0 or 1")
    yt, yp = _pair(y_true, y_pred)
    labels = np.unique(np.concatenate([yt, yp]))
    cm = _counts(yt, yp, labels)
    tp, pred, true = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    if average == "binary":
        if len(labels) > 2:
            raise UserError(f"average='binary' but there are {len(labels)} labels; "
                            "use average='macro', 'micro' or 'weighted'")
        present = [lab.item() for lab in labels]
        if pos_label not in present:
            if len(present) == 2:
                raise UserError(f"pos_label={pos_label!r} is not one of the labels {present}; "
                                "pass pos_label=<the positive class>")
            tp = pred = true = np.zeros(1, dtype=np.int64)
        else:
            k = present.index(pos_label)
            tp, pred, true = tp[k:k + 1], pred[k:k + 1], true[k:k + 1]
    elif average == "micro":
        tp, pred, true = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    p = _divide(tp, pred, zero_division)
    r = _divide(tp, true, zero_division)
    f = _divide(2 * tp, pred + true, zero_division)
    if average is None:
        return p, r, f
    weights = true if average == "weighted" and true.sum() > 0 else None
    return tuple(float(np.average(m, weights=weights)) for m in (p, r, f))


def precision(y_true, y_pred, average="binary", pos_label=1, zero_division=0):
    """tp / (tp + fp): of the samples predicted as a class, the fraction that truly are."""
    return precision_recall_f1(y_true, y_pred, average, pos_label, zero_division)[0]


def recall(y_true, y_pred, average="binary", pos_label=1, zero_division=0):
    """tp / (tp + fn): of the samples truly of a class, the fraction predicted as it."""
    return precision_recall_f1(y_true, y_pred, average, pos_label, zero_division)[1]


def f1(y_true, y_pred, average="binary", pos_label=1, zero_division=0):
    """Harmonic mean of precision and recall per class, 2 tp / (2 tp + fp + fn), then averaged."""
    return precision_recall_f1(y_true, y_pred, average, pos_label, zero_division)[2]


def confusion_matrix(y_true, y_pred, labels=None) -> np.ndarray:
    """Counts (L, L): entry [i, j] = samples of true label i predicted as label j.

    Labels sorted by default; ``labels`` picks (and orders) the classes to count, and samples
    of other classes are left out.
    """
    yt, yp = _pair(y_true, y_pred)
    if labels is None:
        return _counts(yt, yp, np.unique(np.concatenate([yt, yp])))
    chosen = _labels_array(labels, "labels")
    if len(chosen) == 0 or not np.isin(chosen, yt).any():
        raise UserError("confusion_matrix: none of `labels` occurs in y_true; pass labels that do")
    order = np.argsort(chosen, kind="stable")
    cm = _counts(yt, yp, chosen[order])
    back = np.argsort(order)  # from sorted order back to the order the caller gave
    return cm[np.ix_(back, back)]


def _ranked_counts(positive, scores):
    """Cumulative (tp, fp) at each distinct score threshold, highest threshold first."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != positive.shape:
        raise UserError(f"scores has {scores.size} values but y_true has {positive.size} labels")
    if not np.all(np.isfinite(scores)):
        raise UserError("scores contain NaN or infinity; pass finite scores")
    order = np.argsort(-scores, kind="mergesort")
    s, hit = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(hit)[last]
    return tp, last + 1 - tp


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve (binary; the larger label is the positive class).

    The curve joins (FPR, TPR) at every distinct threshold, from (0, 0), and the area is the
    trapezoid rule over those points, so tied scores count half: it equals the probability that
    a random positive scores above a random negative, ties counting 1/2.
    """
    yt = _labels_array(y_true, "y_true")
    classes = np.unique(yt)
    if len(classes) != 2:
        raise UserError(f"roc_auc needs exactly two classes in y_true, found {len(classes)}; "
                        "ROC AUC is undefined with one class")
    tp, fp = _ranked_counts(yt == classes[1], scores)
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def pr_auc(y_true, scores, pos_label=1) -> float:
    """Average precision, sum over thresholds of (R_k - R_{k-1}) P_k: the area under the
    precision-recall curve as a step function, no interpolation (scikit-learn's
    ``average_precision_score``). No positive sample gives 0."""
    yt = _labels_array(y_true, "y_true")
    if len(yt) == 0:
        raise UserError("pr_auc: y_true is empty")
    present = [lab.item() for lab in np.unique(yt)]
    if len(present) > 2:
        raise UserError(f"pr_auc is binary but y_true has {len(present)} labels")
    if pos_label not in present and len(present) == 2:
        raise UserError(f"pos_label={pos_label!r} is not one of the labels {present}; "
                        "pass pos_label=<the positive class>")
    tp, fp = _ranked_counts(yt == pos_label, scores)
    if tp[-1] == 0:
        return 0.0
    rec = np.r_[0.0, tp / tp[-1]]
    return float(np.sum(np.diff(rec) * (tp / (tp + fp))))


def classification_report(y_true, y_pred, target_names=None, digits=2) -> str:
    """A table, laid out as scikit-learn's: per class precision, recall, F1 and support, then
    accuracy, macro average and support-weighted average."""
    yt, yp = _pair(y_true, y_pred)
    labels = np.unique(np.concatenate([yt, yp]))
    names = [str(lab) for lab in labels] if target_names is None else [str(n) for n in target_names]
    if len(names) != len(labels):
        raise UserError(f"{len(names)} target_names for {len(labels)} labels; give one name per label")
    p, r, f = precision_recall_f1(yt, yp, average=None)
    support = _counts(yt, yp, labels).sum(axis=1)
    width = max(max(map(len, names)), len("weighted avg"), digits)
    num = f" {{:>9.{digits}f}}"
    row = "{:>%ds} " % width + num * 3 + " {:>9}\n"
    lines = ["{:>%ds} " % width + " {:>9}" * 4]
    text = lines[0].format("", "precision", "recall", "f1-score", "support") + "\n\n"
    for i, name in enumerate(names):
        text += row.format(name, p[i], r[i], f[i], support[i])
    n = int(support.sum())
    text += "\n" + ("{:>%ds} " % width + " {:>9}" * 2 + num + " {:>9}\n").format(
        "accuracy", "", "", accuracy(yt, yp), n)
    for heading, average in (("macro avg", "macro"), ("weighted avg", "weighted")):
        text += row.format(heading, *precision_recall_f1(yt, yp, average=average), n)
    return text
