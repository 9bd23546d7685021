"""Labelled text for classifiers: loading, stratified folds, and padded batches.

    from scratchlm import textdata
    data = textdata.load_labelled("sentiment")           # or a path to a .tsv / .csv file
    data.texts[0], data.labels[0], data.label_names       # str, int id, ['negative', 'positive']
    for train, dev, test in textdata.cross_validation_splits(data.labels, k=10, seed=0): ...
    ids, mask = textdata.pad_batch([tok.encode(t) for t in batch_texts])   # (B, T), (B, T)

Data sets:

- ``sentiment``: the shipped UCI "Sentiment Labelled Sentences" (3,000 review sentences from Amazon,
  IMDb and Yelp, 1,500 positive / 1,500 negative; columns sentence, label, source). Labels 0 and 1 are
  named ``negative`` and ``positive``; ``data.groups`` holds each sentence's source.
- A user file. ``.csv``: a header row naming a ``text`` (or ``sentence``) column and a ``label`` column
  (otherwise the first two columns are text and label). Anything else is read as TSV: ``text<TAB>label``
  per line, an optional third column as the group, an optional ``text<TAB>label`` header line.
  Labels are strings; the class ids are their sorted order (numerically when every label is an
  integer, so ``2`` comes before ``10``). Blank lines are skipped.

Lines are cut with ``split("\\n")`` (a trailing ``"\\r"`` dropped), never ``str.splitlines()``: some
IMDb sentences contain U+0085 (NEL), which ``splitlines`` takes for a line break, silently cutting a
sentence in two and losing its label.

Splits are functions of (labels, k, seed) only, so the same seed gives the same folds on any
machine: each class is shuffled with its own draw and dealt round-robin to the folds, so every
example is in exactly one test fold and each fold holds every class to within one example. Model
selection uses a dev slice carved (also stratified) from the training folds, never the test fold.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scratchlm.errors import UserError

SHIPPED = {"sentiment": ("sentiment_sentences.tsv", {"0": "negative", "1": "positive"})}


@dataclass
class LabelledData:
    """Texts with integer class ids; ``label_names[i]`` is the name of class ``i``."""
    name: str
    texts: list
    labels: np.ndarray                 # (N,) int64 class ids
    label_names: list
    groups: list = field(default=None)  # e.g. the source of each sentiment sentence, or None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"labelled data file {path} does not exist; give a .tsv/.csv path or "
                        f"a shipped data set name ({', '.join(SHIPPED)})") from None
    except OSError as exc:
        raise UserError(f"cannot read labelled data file {path}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 (bad byte at offset {exc.start}); "
                        f"re-save it as UTF-8") from None
    if text.startswith("\ufeff"):      # a byte-order mark some editors write
        text = text[1:]
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _sort_labels(names) -> list[str]:
    names = set(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _finish(name, path, texts, raw_labels, groups, display=None) -> LabelledData:
    if not texts:
        raise UserError(f"{path} holds no labelled examples; expected lines of text<TAB>label")
    classes = _sort_labels(raw_labels)
    if len(classes) < 2:
        raise UserError(f"{path}: every example has label {classes[0]!r}; a classifier needs at "
                        f"least two classes")
    ids = {c: i for i, c in enumerate(classes)}
    labels = np.array([ids[c] for c in raw_labels], dtype=np.int64)
    names = [display.get(c, c) for c in classes] if display else classes
    return LabelledData(name, texts, labels, names, groups if any(g is not None for g in groups) else None)


def _parse_tsv(path: Path, lines) -> tuple:
    texts, labels, groups = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        header = [f.strip().lower() for f in fields[:2]]
        if number == 1 and header in (["text", "label"], ["sentence", "label"]):
            continue                                     # a header line
        if len(fields) < 2 or not fields[1].strip():
            raise UserError(f"{path}:{number}: no label; each line must be text<TAB>label")
        text, label = fields[0].strip(), fields[1].strip()
        if not text:
            raise UserError(f"{path}:{number}: empty text before the label {label!r}")
        texts.append(text)
        labels.append(label)
        groups.append(fields[2].strip() if len(fields) > 2 else None)
    return texts, labels, groups


def _parse_csv(path: Path, lines) -> tuple:
    reader = csv.reader(line + "\n" for line in lines)   # line_num = physical line of a row's end
    header = next(reader, None)
    if not header:
        raise UserError(f"{path} is empty; expected a header row with text and label columns")
    header = [h.strip().lower() for h in header]
    text_col = next((header.index(h) for h in ("text", "sentence") if h in header), 0)
    label_col = header.index("label") if "label" in header else 1
    texts, labels, groups = [], [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= label_col or not row[label_col].strip():
            raise UserError(f"{path}:{reader.line_num}: no label in column {label_col + 1} "
                            f"({header[label_col] if label_col < len(header) else 'label'})")
        text = row[text_col].strip() if len(row) > text_col else ""
        if not text:
            raise UserError(f"{path}:{reader.line_num}: empty text")
        texts.append(text)
        labels.append(row[label_col].strip())
        groups.append(None)
    return texts, labels, groups


def load_labelled(name_or_path) -> LabelledData:
    """A shipped data set by name (``"sentiment"``) or a user's ``.tsv`` / ``.csv`` file."""
    display = None
    if str(name_or_path) in SHIPPED:
        from scratchlm.datasets import dataset_path
        filename, display = SHIPPED[str(name_or_path)]
        path, name = dataset_path(filename), str(name_or_path)
    else:
        path = Path(name_or_path)
        name = path.stem
        if not path.exists():
            raise UserError(f"no labelled data set {str(name_or_path)!r}: not a shipped name "
                            f"({', '.join(SHIPPED)}) and no such file")
    lines = _read_lines(path)
    parse = _parse_csv if path.suffix.lower() == ".csv" else _parse_tsv
    texts, labels, groups = parse(path, lines)
    return _finish(name, path, texts, labels, groups, display)


# ---------------------------------------------------------------- stratified splits

def _check_folds(labels, k: int) -> np.ndarray:
    labels = np.asarray(labels)
    if k < 2:
        raise UserError(f"folds must be >= 2 for cross-validation, got {k} (use a single split instead)")
    classes, counts = np.unique(labels, return_counts=True)
    if k > counts.min():
        raise UserError(f"--folds {k} is larger than the smallest class ({counts.min()} examples of "
                        f"class {classes[counts.argmin()]}); use at most {counts.min()} folds")
    return labels


def stratified_folds(labels, k: int, seed: int = 0) -> list[np.ndarray]:
    """k disjoint test folds (sorted index arrays) covering every example once, stratified.

    Each class is shuffled, then dealt round-robin; the deal continues where the previous class
    stopped, so fold sizes also differ by at most one overall.
    """
    labels = _check_folds(labels, k)
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(k)]
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for j, index in enumerate(members):
            folds[(start + j) % k].append(index)
        start = (start + len(members)) % k
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def stratified_holdout(indices, labels, fraction: float, seed: int = 0):
    """Split ``indices`` into (kept, held_out) with ~``fraction`` of each class held out (>= 1 each)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"a held-out fraction must be between 0 and 1, got {fraction}")
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == c])
        if len(members) < 2:
            continue                              # a class of one example stays in training
        n = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.append(members[:n])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(indices, held, assume_unique=True)
    return kept, held


def cross_validation_splits(labels, k: int, seed: int = 0, dev_fraction: float = 0.1):
    """[(train, dev, test)] per fold: test = fold i; dev carved from the other folds; train = the rest."""
    labels = np.asarray(labels)
    folds = stratified_folds(labels, k, seed)
    splits = []
    for i, test in enumerate(folds):
        rest = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i]))
        train, dev = stratified_holdout(rest, labels, dev_fraction, seed=seed + 1 + i)
        splits.append((train, dev, test))
    return splits


def train_dev_test_split(labels, dev_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0):
    """One stratified (train, dev, test) split (for ``--folds 1``)."""
    labels = np.asarray(labels)
    rest, test = stratified_holdout(np.arange(len(labels)), labels, test_fraction, seed)
    train, dev = stratified_holdout(rest, labels, dev_fraction / (1.0 - test_fraction), seed + 1)
    return train, dev, test


# ---------------------------------------------------------------- batches

def pad_batch(sequences, pad_id: int = 0, max_len=None):
    """Token id lists -> ids (B, T) int64 padded with ``pad_id`` and mask (B, T) bool.

    T is the longest sequence of the batch (capped at ``max_len``, longer ones truncated), at
    least 1 so that a batch of empty texts still has a shape. ``mask`` is True on real tokens;
    ``mask.sum(1)`` are the lengths, and ``~mask`` is an attention ``key_padding_mask`` (True = ignore).
    """
    lengths = [len(s) if max_len is None else min(len(s), max_len) for s in sequences]
    T = max([1] + lengths)
    ids = np.full((len(sequences), T), pad_id, dtype=np.int64)       # (B, T)
    mask = np.zeros((len(sequences), T), dtype=bool)                  # (B, T)
    for b, (seq, n) in enumerate(zip(sequences, lengths)):
        ids[b, :n] = seq[:n]
        mask[b, :n] = True
    return ids, mask


def batch_indices(indices, batch_size: int, rng=None):
    """Cut ``indices`` into batches of ``batch_size`` (the last may be smaller), shuffled when an
    ``np.random.Generator`` is given (training) and in order otherwise (evaluation)."""
    indices = np.asarray(indices, dtype=np.int64)
    if rng is not None:
        indices = rng.permutation(indices)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
