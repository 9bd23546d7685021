"""Metrics for generated text and for classifiers, written from their definitions (no dependency).

    >>> from scratchlm import metrics
    >>> round(metrics.bleu(["the cat sat on the mat"], [["the cat sat on the mat", "a cat"]]), 2)
    100.0
    >>> metrics.accuracy([0, 1, 1], [0, 1, 0])  # doctest: +ELLIPSIS
    0.666...

Each is tested equal to the package whose numbers people quote: sacrebleu (``bleu``,
``sentence_bleu``, ``chrf``), rouge-score (``rouge``), NLTK under Texygen's protocol
(``bleu_against``, ``self_bleu``) and scikit-learn (the classification metrics). The protocol of
each (tokenisation, references, smoothing) is in its docstring; quote it beside any figure.
"""
from .classification import (accuracy, classification_report, confusion_matrix, f1, pr_auc,
                             precision, precision_recall_f1, recall, roc_auc)
from .text import (bleu, bleu_against, chrf, perplexity, rouge, self_bleu, sentence_bleu,
                   tokenize_13a)

__all__ = ["bleu", "sentence_bleu", "chrf", "rouge", "perplexity", "bleu_against", "self_bleu",
           "tokenize_13a", "accuracy", "precision", "recall", "f1", "precision_recall_f1",
           "confusion_matrix", "roc_auc", "pr_auc", "classification_report"]
