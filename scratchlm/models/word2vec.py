"""word2vec: skip-gram and CBOW with negative sampling (Mikolov et al. 2013), trained from scratch.

Two tables of D-dimensional vectors: v (input, ``syn0``: the word vectors one keeps) and u
(output, ``syn1neg``). For a pair (input word w, output word c) seen together within a window and
K noise words n_1..n_K drawn from the unigram distribution raised to 3/4, skip-gram with negative
sampling (SGNS) minimises, with s(x) = 1 / (1 + e^-x),

    L(v_w, u_c, u_n) = -log s(u_c . v_w) - sum_k log s(-u_nk . v_w)

Since d/dx [-log s(x)] = s(x) - 1 and d/dx [-log s(-x)] = s(x):

    dL/dv_w  = (s(u_c . v_w) - 1) u_c + sum_k s(u_nk . v_w) u_nk
    dL/du_c  = (s(u_c . v_w) - 1) v_w
    dL/du_nk = s(u_nk . v_w) v_w

and one SGD step with rate alpha is v_w -= alpha dL/dv_w etc.: in the kernel's words
g = alpha (label - s(f)) per target, u_t += g v_w, and v_w += sum_t g u_t (computed with the old u_t,
so it is the exact gradient step). (``pair_loss`` / ``pair_gradients`` below state this in code;
the tests check one against the other by finite differences.) Like word2vec.c and gensim, skip-gram
lets the *context* word's input vector predict the centre word: over a whole corpus every window
pair is seen both ways, so this is the same objective. CBOW replaces v_w by h = the mean of the
context words' input vectors and predicts the centre word; the exact gradient for each context
vector is dL/dh / (number of context words), but word2vec.c and gensim add dL/dh itself to each, and
so do we, to stay comparable.

Around the objective, the recipe of the paper and of word2vec.c:

- vocabulary: words seen at least ``min_count`` times, most frequent first;
- frequent-word subsampling: word w of corpus frequency f_w = count_w / total is kept with
  probability min(1, (sqrt(f_w / t) + 1) t / f_w), t = ``sample`` (word2vec.c's and gensim's form
  of the paper's 1 - sqrt(t / f_w)), drawn afresh every epoch;
- noise distribution count^0.75 (``ns_exponent``), as a cumulative integer table;
- dynamic window: each centre word uses a window of size uniform on 1..``window``, so near words
  count more;
- learning rate falling linearly from ``alpha`` to ``min_alpha`` over all epochs;
- ``workers`` threads, each on its own contiguous range of sentences, updating the shared tables
  without locks (Hogwild), as word2vec.c does;
- initialisation: v uniform on (-0.5/D, 0.5/D), u = 0.

The update itself is the kernel ``scratchlm.kernels.word2vec`` (Numba, beside a NumPy reference).
Vectors are saved in the word2vec text format (a ``count dim`` header line, then ``word v1 ... vD``),
which gensim's ``KeyedVectors.load_word2vec_format`` and other tools read.

    >>> stats = train_word2vec("the cat sat on the mat\\n" * 200, "runs/w2v", min_count=1, epochs=1,
    ...                        dim=16, workers=1, progress=False)      # doctest: +SKIP
    >>> Word2Vec.load("runs/w2v").most_similar("cat", k=3)            # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from scratchlm.errors import UserError
from scratchlm.kernels import word2vec as kernel
from scratchlm.tokenizers.base import atomic_write_text
from scratchlm.tokenizers.word import split_words

MAX_SENTENCE = 10_000       # longer "sentences" are cut, as gensim does (one line of a big file)
BLOCK_WORDS = 100_000       # words per worker per kernel call (a progress-bar step)


@dataclass
class Word2VecConfig:
    model: str = "skipgram"     # or "cbow"
    dim: int = 100
    window: int = 5
    negative: int = 5
    min_count: int = 5
    sample: float = 1e-3
    epochs: int = 5
    alpha: float = 0.025
    min_alpha: float = 0.0001
    ns_exponent: float = 0.75
    max_vocab: int = 0          # 0 = no limit
    workers: int = 2
    seed: int = 1

    def validate(self) -> "Word2VecConfig":
        if self.model not in ("skipgram", "cbow"):
            raise UserError(f"word2vec model must be 'skipgram' or 'cbow', got {self.model!r}")
        for name in ("dim", "window", "min_count", "epochs", "workers"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"word2vec {name} must be >= 1, got {getattr(self, name)}")
        if self.negative < 1:
            raise UserError(f"word2vec negative must be >= 1 (negative sampling), got {self.negative}")
        if self.sample < 0 or not 0 <= self.min_alpha <= self.alpha:
            raise UserError(f"word2vec needs sample >= 0 and 0 <= min_alpha <= alpha; got sample="
                            f"{self.sample}, alpha={self.alpha}, min_alpha={self.min_alpha}")
        return self


# ---------------------------------------------------------------- the per-pair loss, in code

def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def pair_loss(v_w, u_c, u_n) -> float:
    """L = -log s(u_c . v_w) - sum_k log s(-u_nk . v_w);  v_w, u_c (D,), u_n (K, D)."""
    return float(-np.log(_sigmoid(u_c @ v_w)) - np.log(_sigmoid(-(u_n @ v_w))).sum())


def pair_gradients(v_w, u_c, u_n):
    """(dL/dv_w, dL/du_c, dL/du_n) of ``pair_loss``, from the derivation in the module docstring."""
    pos = _sigmoid(u_c @ v_w) - 1.0               # scalar
    neg = _sigmoid(u_n @ v_w)                     # (K,)
    return pos * u_c + neg @ u_n, pos * v_w, neg[:, None] * v_w[None, :]


# ---------------------------------------------------------------- tables

def keep_table(counts, sample: float) -> np.ndarray:
    """P(keep word w) * 2^32 as int64: min(1, (sqrt(c / (t N)) + 1) (t N) / c), gensim's formula."""
    counts = np.asarray(counts, dtype=np.float64)
    if sample <= 0:
        return np.full(len(counts), 1 << 32, dtype=np.int64)
    threshold = sample * counts.sum()
    p = np.minimum(1.0, (np.sqrt(counts / threshold) + 1.0) * threshold / counts)
    return np.round(p * 2.0**32).astype(np.int64)


def noise_table(counts, exponent: float = 0.75, domain: int = 2**31 - 1) -> np.ndarray:
    """Cumulative integer table of count^exponent scaled to ``domain`` (gensim's cum_table).

    Word i is drawn when a uniform integer x in [0, table[-1]) falls in [table[i-1], table[i]).
    """
    weights = np.asarray(counts, dtype=np.float64) ** exponent
    cum = np.round(np.cumsum(weights) / weights.sum() * domain).astype(np.int64)
    return cum


# ---------------------------------------------------------------- sentences

def to_sentences(corpus) -> list:
    """A text (one sentence per line), a list of strings, or a list of token lists -> token lists."""
    if isinstance(corpus, str):
        corpus = corpus.split("\n")            # not splitlines(): U+0085 is not a line break here
    out = []
    for item in corpus:
        tokens = split_words(item) if isinstance(item, str) else list(item)
        for start in range(0, len(tokens), MAX_SENTENCE):
            if tokens[start:start + MAX_SENTENCE]:
                out.append(tokens[start:start + MAX_SENTENCE])
    return out


class Word2Vec:
    """Vocabulary, the two vector tables, training, queries and the text format."""

    def __init__(self, config: Word2VecConfig | None = None, **overrides):
        config = config or Word2VecConfig()
        known = {f.name for f in fields(Word2VecConfig)}
        for key in overrides:
            if key not in known:
                raise UserError(f"unknown word2vec setting {key!r}; known: {', '.join(sorted(known))}")
        self.config = Word2VecConfig(**{**asdict(config), **overrides}).validate()
        self.words, self.counts, self.index = [], np.zeros(0, np.int64), {}
        self.syn0 = self.syn1neg = None

    # ------------------------------------------------------------ vocabulary

    def build_vocab(self, sentences) -> None:
        """Keep words seen >= min_count times, most frequent first (ties: first seen first)."""
        cfg = self.config
        counts = Counter()
        for tokens in sentences:
            counts.update(tokens)
        # Counter keeps first-seen order, and sorted() is stable: ties stay in that order.
        kept = sorted(((w, c) for w, c in counts.items() if c >= cfg.min_count), key=lambda wc: -wc[1])
        if cfg.max_vocab:
            kept = kept[:cfg.max_vocab]
        if len(kept) < 2:
            raise UserError(f"word2vec: fewer than two words occur at least min_count={cfg.min_count} "
                            f"times in the corpus ({sum(counts.values())} words); lower min_count or "
                            f"give a larger corpus")
        self.words = [w for w, _ in kept]
        self.counts = np.array([c for _, c in kept], dtype=np.int64)
        self.index = {w: i for i, w in enumerate(self.words)}
        rng = np.random.default_rng(cfg.seed)
        D = cfg.dim
        self.syn0 = ((rng.random((len(self.words), D)) - 0.5) / D).astype(np.float32)   # (V, D)
        self.syn1neg = np.zeros((len(self.words), D), dtype=np.float32)                   # (V, D)

    def encode(self, sentences):
        """Token lists -> (corpus (N,) int32 of in-vocabulary ids, offsets (S + 1,), raw word count)."""
        index = self.index
        ids, offsets, raw = [], [0], 0
        for tokens in sentences:
            raw += len(tokens)
            row = [index[w] for w in tokens if w in index]
            if row:
                ids.extend(row)
                offsets.append(len(ids))
        return np.array(ids, dtype=np.int32), np.array(offsets, dtype=np.int64), raw

    # ------------------------------------------------------------ training

    def train(self, sentences, progress: bool = True) -> dict:
        """Train on token lists (``build_vocab`` first, or it is done here). Returns stats."""
        if self.syn0 is None:
            self.build_vocab(sentences)
        cfg = self.config
        start_time = time.perf_counter()
        corpus, offsets, raw_words = self.encode(sentences)
        n_sent = len(offsets) - 1
        if n_sent == 0:
            raise UserError("word2vec: no sentence of the corpus has a word of the vocabulary")
        keep = keep_table(self.counts, cfg.sample)
        cum = noise_table(self.counts, cfg.ns_exponent)
        seed_rng = np.random.default_rng(cfg.seed + 1)
        seeds = seed_rng.integers(0, 2**48, size=cfg.workers, dtype=np.uint64)
        blocks = self._blocks(offsets, cfg.workers)
        epoch_words = int(offsets[-1])
        total = epoch_words * cfg.epochs

        def alpha_at(words_done):
            return cfg.alpha - (cfg.alpha - cfg.min_alpha) * min(1.0, words_done / total)

        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="word", unit_scale=True, desc="word2vec")
        trained = 0
        for epoch in range(cfg.epochs):
            for lo, hi, first, last in blocks:
                done = epoch * epoch_words
                kept = kernel.train_block(self.syn0, self.syn1neg, corpus, offsets, lo, hi, seeds, keep,
                                          cum, alpha_at(done + first), alpha_at(done + last),
                                          cfg.window, cfg.negative, cfg.model == "cbow")
                trained += int(kept.sum())
                if bar is not None:
                    bar.update(last - first)
                    bar.set_postfix(epoch=epoch + 1, alpha=f"{alpha_at(done + last):.5f}")
        if bar is not None:
            bar.close()
        if not np.isfinite(self.syn0).all():
            raise FloatingPointError("word2vec vectors became non-finite; lower alpha")
        seconds = time.perf_counter() - start_time
        return {"vocab_size": len(self.words), "raw_words_per_epoch": raw_words,
                "vocab_words_per_epoch": epoch_words, "trained_words": trained, "epochs": cfg.epochs,
                "seconds": seconds, "words_per_s": raw_words * cfg.epochs / seconds}

    @staticmethod
    def _blocks(offsets, workers: int):
        """Cut the sentences into blocks of ~BLOCK_WORDS per worker, each into ``workers`` ranges
        of about equal word counts: [(lo (W,), hi (W,), first word, last word)]."""
        n_sent, words = len(offsets) - 1, int(offsets[-1])
        n_blocks = max(1, math.ceil(words / (BLOCK_WORDS * workers)))
        bounds = np.searchsorted(offsets, np.linspace(0, words, n_blocks * workers + 1)[1:-1])
        cuts = np.concatenate([[0], np.clip(bounds, 0, n_sent), [n_sent]]).astype(np.int64)
        blocks = []
        for b in range(n_blocks):
            c = cuts[b * workers:(b + 1) * workers + 1]
            blocks.append((c[:-1].copy(), c[1:].copy(), int(offsets[c[0]]), int(offsets[c[-1]])))
        return blocks

    # ------------------------------------------------------------ queries

    def _unit(self):
        norms = np.linalg.norm(self.syn0, axis=1, keepdims=True)
        return self.syn0 / np.maximum(norms, 1e-12)

    def vector(self, word: str) -> np.ndarray:
        if word not in self.index:
            raise UserError(f"word {word!r} is not in the word2vec vocabulary ({len(self.words)} words, "
                            f"min_count={self.config.min_count})")
        return self.syn0[self.index[word]]

    def similarity(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))

    def most_similar(self, word: str, k: int = 10) -> list:
        """The k words of highest cosine similarity to ``word`` (itself excluded): [(word, cos)]."""
        return most_similar(self.words, self._unit(), self.vector(word), k, exclude=word)

    # ------------------------------------------------------------ files

    def save(self, out_dir) -> Path:
        """Write ``out_dir/vectors.txt`` (word2vec text format) and ``out_dir/config.json``."""
        out_dir = Path(out_dir)
        save_vectors(out_dir / "vectors.txt", self.words, self.syn0)
        atomic_write_text(out_dir / "config.json", json.dumps(asdict(self.config), indent=1) + "\n")
        return out_dir / "vectors.txt"

    @classmethod
    def load(cls, run_dir) -> "Word2Vec":
        """Read a folder written by ``save`` (the output table is not kept: queries only)."""
        run_dir = Path(run_dir)
        try:
            config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{run_dir} has no config.json; is it a word2vec run folder?") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{run_dir / 'config.json'} is not valid JSON ({exc})") from None
        model = cls(**config)
        model.words, model.syn0 = load_vectors(run_dir / "vectors.txt", dim=model.config.dim)
        model.index = {w: i for i, w in enumerate(model.words)}
        return model


def most_similar(words, unit_vectors, query, k: int = 10, exclude=None) -> list:
    """Nearest words to ``query`` (D,) by cosine; ``unit_vectors`` (V, D) has rows of norm 1."""
    scores = unit_vectors @ (query / max(np.linalg.norm(query), 1e-12))       # (V,)
    order = np.argsort(-scores, kind="stable")
    out = []
    for i in order:
        if words[i] != exclude:
            out.append((words[i], float(scores[i])))
            if len(out) == k:
                break
    return out


def save_vectors(path, words, vectors) -> None:
    """The word2vec text format: ``count dim``, then ``word v1 ... vD`` per line (atomic write)."""
    V, D = vectors.shape
    lines = [f"{V} {D}"]
    for word, row in zip(words, vectors):
        if not word or any(ch.isspace() for ch in word):
            raise UserError(f"word {word!r} contains whitespace; the word2vec text format cannot hold it")
        lines.append(word + " " + " ".join(f"{x:.6g}" for x in row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_vectors(path, dim: int | None = None):
    """Read a word2vec text file -> (words, vectors (V, D) float32); ``dim`` refuses another D."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"vectors file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read vectors file {path}: {exc}") from None
    lines = [line for line in text.split("\n") if line.strip()]
    try:
        count, file_dim = (int(x) for x in lines[0].split())
    except (IndexError, ValueError):
        raise UserError(f"{path}: first line must be 'count dim' (word2vec text format)") from None
    if dim is not None and file_dim != dim:
        raise UserError(f"{path} holds {file_dim}-dimensional vectors but {dim} are needed; "
                        f"train vectors with dim={dim} or set the embedding size to {file_dim}")
    if len(lines) - 1 != count:
        raise UserError(f"{path}: header says {count} words but {len(lines) - 1} lines follow")
    words, vectors = [], np.empty((count, file_dim), dtype=np.float32)
    for i, line in enumerate(lines[1:]):
        parts = line.rstrip().split(" ")
        if len(parts) != file_dim + 1:
            raise UserError(f"{path}:{i + 2}: expected a word and {file_dim} numbers, got {len(parts) - 1}")
        words.append(parts[0])
        try:
            vectors[i] = [float(x) for x in parts[1:]]
        except ValueError:
            raise UserError(f"{path}:{i + 2}: a vector entry is not a number") from None
    return words, vectors


def embedding_from_vectors(itos, path, dim: int, rng, scale: float = 0.02, base=None, match_scale: bool = False):
    """An embedding table (len(itos), dim) initialised from a vectors file where a word has a vector
    (elsewhere the row of ``base`` if given, else random N(0, scale^2); zero for ``<pad>``); returns
    (table, number of words found). ``match_scale`` multiplies the vectors by s_table / s_vectors
    (standard deviations over all entries: the table's random rows, the vectors found) so pretrained
    rows start on the scale the rest of the table, and the model's optimiser settings, were made for:
    word2vec's vectors are ~0.24 per entry at dim 64, 4-12x a classifier's init."""
    words, vectors = load_vectors(path, dim=dim)
    found = {w: i for i, w in enumerate(words)}
    table = (np.array(base, dtype=np.float32) if base is not None
             else (rng.standard_normal((len(itos), dim)) * scale).astype(np.float32))
    rows = [(i, found[w]) for i, w in enumerate(itos) if w in found]
    if rows:
        mine, theirs = np.array(rows).T
        factor = 1.0
        if match_scale:
            factor = float(table.std()) / max(float(vectors[theirs].std()), 1e-12)
        table[mine] = vectors[theirs] * factor
    for i, w in enumerate(itos):
        if w == "<pad>":
            table[i] = 0.0
    return table, len(rows)


def train_word2vec(corpus, out_dir, progress: bool = True, **settings) -> dict:
    """Train on a text (one sentence per line), strings or token lists; write ``out_dir/vectors.txt``
    and ``out_dir/config.json``; return the stats (vocabulary, words/s, seconds, paths)."""
    model = Word2Vec(**settings)
    sentences = to_sentences(corpus)
    if not sentences:
        raise UserError("word2vec: the corpus has no words")
    model.build_vocab(sentences)
    stats = model.train(sentences, progress=progress)
    stats["vectors"] = str(model.save(out_dir))
    stats["config"] = asdict(model.config)
    return stats
