"""What a model trains on: a task hands the trainer its batches and scores a whole split.

The trainer (``scratchlm.train``) owns the loop; a task owns the data side of it:

    task.splits                          split names, e.g. ("train", "val") or ("train", "val", "test")
    task.sampler(split, B, T, seed)      an object with .batch(step) -> batch, .state_dict()
    task.loss(model, batch)              the scalar loss Tensor of one batch
    task.whole_split(split, B, T)        every example of a split once: yields (batch, weight)
    task.eval_metrics(model)             optional: more figures for the eval lines, {"val_bleu": 31.2}

Language models have two tasks, both giving batches ``(x, y)`` of token ids (B, T):

- ``StreamLM`` -- one long token stream per split (tiny shakespeare, pydoc): random windows of T
  tokens, y = x shifted by one (``scratchlm.data.BatchSampler``); the whole-split score cuts the
  stream into consecutive windows, so every token but the first is predicted exactly once.
- ``DocumentLM`` -- one document per line (``names``): each framed by the boundary token b, as
  makemore frames a name with ".": x = b + doc, y = doc + b. A batch holds whole documents,
  padded to T with b in x and -100 (cross-entropy's ignore_index) in y, so the loss is the mean
  over real characters -- makemore's per-character loss.

A family with other batches (seq2seq pairs, labelled sentences, images for a VAE or GAN) plugs
in a task of its own with the same four members; a model that needs its own update (a GAN's two
optimizers) may define ``train_step`` and the trainer calls it instead (see train.py).
"""
from __future__ import annotations

import numpy as np

from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.tokenizers.base import boundary_id

IGNORE_INDEX = -100                    # F.cross_entropy's default: padding targets


def lm_loss(model, batch):
    """Language models: ``model(x, y)`` returns (logits, mean loss over non-ignored targets)."""
    _, loss = model(*batch)
    return loss


# ================================================================ one token stream per split

class StreamLM:
    """Token streams (1-D integer arrays) by split name; see the module docstring."""

    def __init__(self, streams: dict):
        self.streams = dict(streams)
        self.splits = tuple(self.streams)

    def sampler(self, split: str, batch_size: int, block_size: int, seed: int):
        from scratchlm.data import BatchSampler
        return BatchSampler(self._split(split), batch_size, block_size, seed=seed, name=f"{split} split")

    loss = staticmethod(lm_loss)

    def _split(self, split):
        if split not in self.streams:
            raise UserError(f"this corpus has no {split!r} split (it has {', '.join(self.splits)})")
        return self.streams[split]

    def whole_split(self, split: str, batch_size: int, block_size: int):
        """Consecutive windows: inputs tokens[k*T : (k+1)*T], targets one further, B windows a
        batch, the remainder (shorter than T) last. Yields ((x, y), number of targets)."""
        tokens = np.asarray(self._split(split), dtype=np.int64)                 # (N,)
        n = len(tokens) - 1                                                     # predicted tokens
        if n < 1:
            raise UserError(f"the {split} split has {len(tokens)} tokens; nothing to score")
        full = n // block_size
        x = tokens[:full * block_size].reshape(full, block_size)                # (W, T)
        y = tokens[1:full * block_size + 1].reshape(full, block_size)           # (W, T)
        for start in range(0, full, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            yield (backend.to_device(xb), backend.to_device(yb)), int(yb.size)
        rest = n - full * block_size
        if rest:
            xb, yb = tokens[None, full * block_size:n], tokens[None, full * block_size + 1:n + 1]   # (1, rest)
            yield (backend.to_device(xb), backend.to_device(yb)), rest


# ================================================================ one document per line

class DocumentSampler:
    """Random whole documents: ``batch(step) -> (x, y)`` (B, T), drawn from ``(seed, step)`` only
    (so resuming needs the step number, as ``BatchSampler``), with replacement as makemore's loader."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        self.x, self.y = x, y                                                   # (N, T), (N, T)
        self.batch_size, self.block_size, self.seed = int(batch_size), int(x.shape[1]), int(seed)

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, int(step)])
        rows = rng.integers(0, len(self.x), size=self.batch_size)               # (B,)
        return backend.to_device(self.x[rows]), backend.to_device(self.y[rows])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "block_size": self.block_size}


def trim_padding(batch):
    """(x, y) (B, T) -> (x, y) (B, T') without the trailing columns where no target is real (all
    -100). Documents are padded to the corpus's longest (38 on coco) while a batch's longest is
    about half that, and a causal model's outputs at a position never depend on later inputs, so
    the loss is the same number for about half the work."""
    x, y = batch
    real = backend.to_numpy((y != IGNORE_INDEX).any(axis=0))                  # (T,)
    T = int(np.flatnonzero(real)[-1]) + 1 if real.any() else y.shape[1]
    return x[:, :T], y[:, :T]


class DocumentLM:
    """Documents (lists of token ids, boundary not included) by split; see the module docstring."""

    def __init__(self, documents: dict, boundary: int):
        self.documents = {split: [np.asarray(d, dtype=np.int64) for d in docs] for split, docs in documents.items()}
        self.splits = tuple(self.documents)
        self.boundary = int(boundary)
        self.longest = max(len(d) for docs in self.documents.values() for d in docs) + 1   # x = b + doc
        self._padded = {}

    def tokens(self, split: str) -> int:
        """Predicted tokens in a split: each document's characters and its closing boundary."""
        return sum(len(d) + 1 for d in self._docs(split))

    def _docs(self, split):
        if split not in self.documents:
            raise UserError(f"this corpus has no {split!r} split (it has {', '.join(self.splits)})")
        return self.documents[split]

    def padded(self, split: str, block_size: int):
        """(x, y) of every document of the split, host int64 (N, T): x = b + doc + b.., y = doc + b + -100..

        T is the longest document's length + 1 (the same for every split, whatever block_size:
        padding beyond it would be computed and ignored); block_size must not be shorter."""
        if block_size < self.longest:
            raise UserError(f"block_size {block_size} is too short for this corpus: its longest document "
                            f"needs {self.longest} positions (boundary + characters); --set block_size={self.longest}")
        key = split
        if key not in self._padded:
            docs = self._docs(split)
            x = np.full((len(docs), self.longest), self.boundary, dtype=np.int64)     # (N, T)
            y = np.full((len(docs), self.longest), IGNORE_INDEX, dtype=np.int64)      # (N, T)
            for row, doc in enumerate(docs):
                x[row, 1:len(doc) + 1] = doc
                y[row, :len(doc)] = doc
                y[row, len(doc)] = self.boundary
            self._padded[key] = (x, y)
        return self._padded[key]

    def sampler(self, split: str, batch_size: int, block_size: int, seed: int) -> DocumentSampler:
        return DocumentSampler(*self.padded(split, block_size), batch_size, seed)

    @staticmethod
    def loss(model, batch):
        """``lm_loss`` on the batch without its trailing padding (``trim_padding``)."""
        return lm_loss(model, trim_padding(batch))

    def whole_split(self, split: str, batch_size: int, block_size: int):
        """Every document once, in order, B a batch; yields ((x, y), number of real targets)."""
        x, y = self.padded(split, block_size)
        for start in range(0, len(x), batch_size):
            yb = y[start:start + batch_size]
            yield (backend.to_device(x[start:start + batch_size]), backend.to_device(yb)), int((yb != IGNORE_INDEX).sum())


def documents_task(splits: dict, tokenizer, boundary: str = "\n") -> DocumentLM:
    """A ``DocumentLM`` from text documents by split, encoded with ``tokenizer``; ``boundary`` must be
    one token of it (the newline: for a char tokenizer on names it is id 0, makemore's "."; a word
    tokenizer, which drops whitespace, uses its ``<pad>``, also id 0)."""
    b = boundary_id(tokenizer, boundary)
    return DocumentLM({split: [tokenizer.encode(doc) for doc in docs] for split, docs in splits.items()}, b)


def make_task(corpus, tokenizer, cache_dir=None):
    """The LM task of a corpus: documents for a corpus with its own split (``names``), else the
    train/val token streams ``scratchlm.data.prepare`` writes."""
    from scratchlm.data import prepare, split_documents
    splits = split_documents(corpus)
    if splits is not None:
        return documents_task(splits, tokenizer)
    prepared = prepare(corpus, tokenizer, cache_dir=cache_dir)
    return StreamLM({"train": prepared.train, "val": prepared.val})


def as_task(prepared):
    """Trainer(prepared=...) takes a task, or a ``scratchlm.data.Prepared`` (train/val streams)."""
    if hasattr(prepared, "sampler") and hasattr(prepared, "whole_split"):
        return prepared
    return StreamLM({"train": prepared.train, "val": prepared.val})


def split_sizes(task) -> dict:
    """``{"train_tokens": n, ...}`` for config.json's data section."""
    if isinstance(task, Classification):
        return {f"{s}_examples": int(len(task.labels[s])) for s in task.splits}
    if isinstance(task, DocumentLM):
        return {**{f"{s}_documents": len(task.documents[s]) for s in task.splits},
                **{f"{s}_tokens": task.tokens(s) for s in task.splits}}
    return {f"{s}_tokens": int(len(task.streams[s])) for s in task.splits}


# ================================================================ labelled sentences (classifiers)

class ClassificationSampler:
    """Shuffled passes over a split: ``batch(step) -> (ids (B, T), mask (B, T), labels (B,))``.

    Step s is batch s mod n_batches of pass s // n_batches, whose order is drawn from (seed, pass);
    augmentation (training only) draws from (seed, s). So, as ``BatchSampler``, a batch is a
    function of the step alone and resuming needs no saved state."""

    def __init__(self, task: "Classification", split: str, batch_size: int, seed: int, augment: bool):
        self.task, self.split, self.seed, self.augment = task, split, int(seed), augment
        self.batch_size, self.block_size = int(batch_size), task.max_len
        self.n = len(task.labels[split])
        self.per_pass = -(-self.n // self.batch_size)

    def batch(self, step: int):
        epoch, k = divmod(int(step), self.per_pass)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        rows = order[k * self.batch_size:(k + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, int(step), 1]) if self.augment else None
        return self.task.batch(self.split, rows, rng)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "split": self.split}


class Classification:
    """Labelled texts by split for a classifier (``scratchlm.models.classifier``).

    ``tokens[split]``: each example's word tokens (``WordTokenizer.tokenize``); ``labels[split]``:
    int class ids. A batch is ``(ids, mask, labels)``, ids padded with 0 (``<pad>``) and cut to
    ``max_len`` tokens. ``augmenter`` (``scratchlm.augment.Augmenter``) rewrites the tokens of
    *training* batches on the fly; dev ("val") and test examples are never augmented. The eval
    hook scores the whole val split: its accuracy is the trainer's model-selection score.
    The training-loss estimate at evals draws training batches, so it sees augmented ones too.
    """

    def __init__(self, tokens: dict, labels: dict, tokenizer, max_len: int, augmenter=None, vectors=None):
        self.tokens = {s: [list(t) for t in v] for s, v in tokens.items()}
        self.labels = {s: np.asarray(v, dtype=np.int64) for s, v in labels.items()}
        self.splits = tuple(self.tokens)
        self.tokenizer, self.max_len, self.augmenter, self.vectors = tokenizer, int(max_len), augmenter, vectors

    def _ids(self, tokens) -> list:
        stoi, unk = self.tokenizer.stoi, self.tokenizer.unk_id
        return [stoi.get(w, unk) for w in tokens]

    def batch(self, split: str, rows, rng=None):
        from scratchlm.textdata import pad_batch
        tokens = [self.tokens[split][r] for r in rows]
        labels = self.labels[split][rows]
        if rng is not None and self.augmenter is not None and split == "train":
            tokens = self.augmenter.batch(tokens, rng, labels.tolist())
        ids, mask = pad_batch([self._ids(t) for t in tokens], pad_id=self.tokenizer.pad_id, max_len=self.max_len)
        return backend.to_device(ids), backend.to_device(mask), backend.to_device(labels)

    def sampler(self, split: str, batch_size: int, block_size: int, seed: int) -> ClassificationSampler:
        if split not in self.tokens:
            raise UserError(f"this data has no {split!r} split (it has {', '.join(self.splits)})")
        return ClassificationSampler(self, split, batch_size, seed, augment=split == "train")

    @staticmethod
    def loss(model, batch):
        return model(*batch)[1]

    def whole_split(self, split: str, batch_size: int, block_size: int = 0):
        """Every example once, in order; yields ((ids, mask, labels), batch rows)."""
        n = len(self.labels[split])
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(n, start + batch_size))
            yield self.batch(split, rows), len(rows)

    def probabilities(self, model, split: str, batch_size: int = 256) -> np.ndarray:
        """(N, K) class probabilities of every example of ``split`` (eval mode)."""
        return np.concatenate([model.probabilities(ids, mask)
                               for (ids, mask, _), _ in self.whole_split(split, batch_size)])

    def eval_metrics(self, model) -> dict:
        """Accuracy and mean loss over the whole val split; ``selection_score`` (higher is better)
        is the accuracy, ties broken by the lower loss (1e-4 x loss is below one example's worth)."""
        p = self.probabilities(model, "val")
        y = self.labels["val"]
        accuracy = float((p.argmax(1) == y).mean())
        loss = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
        return {"val_accuracy": accuracy, "val_loss_all": loss, "selection_score": accuracy - 1e-4 * loss}

    def init_model(self, model) -> None:
        """Start the embedding from word vectors (``vectors``: a word2vec text file), if given."""
        if not self.vectors:
            return
        from scratchlm.models.word2vec import embedding_from_vectors
        # words without a vector keep the model's own random rows; the vectors are put on that
        # rows' scale unless the config says init_embeddings_scale=raw
        table, _ = embedding_from_vectors(self.tokenizer.itos, self.vectors, model.config.n_embd,
                                          np.random.default_rng(0), base=model.wte.weight.numpy(),
                                          match_scale=getattr(model.config, "init_embeddings_scale", "raw") == "match")
        model.set_embeddings(table)
