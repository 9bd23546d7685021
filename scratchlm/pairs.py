"""Sentence pairs for the translation model: eng-fra and three generated tasks, split and batched.

    from scratchlm.pairs import load_pairs, PairTask
    data = load_pairs("eng-fra")                 # or "copy", "reverse", "dates"; reverse=True: fr -> en
    data.splits["train"][0]                      # Pair(source='Go.', target='Va !', attribution='CC-BY ...')
    task = PairTask(data, vocab)                 # the trainer's task (scratchlm.tasks' interface)

eng-fra: the 5,000 Tatoeba pairs shipped in ``scratchlm/datasets/eng-fra-5k.tsv`` (CC BY 2.0 FR;
the attribution column is kept on every ``Pair``). The split is fixed and seeded and GROUPED by
the English sentence: the distinct English sentences are shuffled with seed 0 and cut 80/10/10,
and every pair of a sentence goes with it, so no English sentence is in two splits. English to
French by default; ``reverse=True`` swaps the sides (the split stays the same). A source sentence
with several translations in its split is scored against all of them (BLEU's multiple references).

Generated tasks (for tests and learning; ``seed`` fixes them): ``copy`` and ``reverse`` of digit
strings of 1-12 digits, and ``dates``: "3rd of March 2021", "March 3, 2021", "03/03/2021" and a
few more surface forms -> "2021-03-03". Held-out strings: the split is by target (a digit string,
a date), so no test target is ever seen in training.

A batch is ``(src, tgt_in, tgt_out)``, int64 (B, S), (B, T), (B, T), padded with <pad> = 0 to its
own longest row: src = x_1..x_m </s>, tgt_in = <s> y_1..y_n, tgt_out = y_1..y_n </s>.
"""
from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.models.seq2seq import BOS, EOS, PAD

DATASETS = ("eng-fra", "copy", "reverse", "dates")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    attribution: str = ""


@dataclass
class PairData:
    name: str
    splits: dict                                    # split -> list of Pair
    description: str = ""
    sha256: str | None = None
    reverse: bool = False
    info: dict = field(default_factory=dict)

    def references(self, split: str) -> tuple[list[str], list[list[str]]]:
        """(distinct sources in first-seen order, the list of targets of each) of ``split``."""
        refs = defaultdict(list)
        for p in self.splits[split]:
            refs[p.source].append(p.target)
        return list(refs), list(refs.values())


def _grouped_split(pairs: list[Pair], key, seed: int = 0, fractions=(0.8, 0.1)) -> dict:
    """Shuffle the distinct ``key(pair)`` values with ``seed`` and cut them train/val/test by
    ``fractions``; every pair follows its key."""
    keys = sorted({key(p) for p in pairs})
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train, n_val = int(fractions[0] * len(keys)), int(fractions[1] * len(keys))
    where = {}
    for rank, k in enumerate(order):
        where[keys[k]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    splits = {s: [] for s in SPLITS}
    for p in pairs:
        splits[where[key(p)]].append(p)
    return splits


def load_eng_fra(reverse: bool = False) -> PairData:
    import hashlib

    from scratchlm.datasets import dataset_path
    path = dataset_path("eng-fra-5k.tsv")
    raw = path.read_bytes()
    pairs = []
    for number, line in enumerate(raw.decode("utf-8").split("\n"), 1):
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) < 2:
            raise UserError(f"{path}:{number}: expected English<TAB>French<TAB>attribution")
        pairs.append(Pair(cells[0], cells[1], cells[2] if len(cells) > 2 else ""))
    splits = _grouped_split(pairs, key=lambda p: p.source)                  # grouped by the English side
    if reverse:
        splits = {s: [Pair(p.target, p.source, p.attribution) for p in ps] for s, ps in splits.items()}
    return PairData("eng-fra", splits, "Tatoeba English-French, 5,000 pairs (CC BY 2.0 FR)",
                    hashlib.sha256(raw).hexdigest(), reverse)


# ================================================================ generated tasks

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


DATE_FORMS = (
    lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",          # 3rd of March 2021
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                      # March 3, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                       # 3 March 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",                   # 3 Mar 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {ordinal(d.day)}, {d.year}",         # Mar 3rd, 2021
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}",                           # 03/03/2021 (day first)
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1].lower()}, {d.year}",  # the 3rd of march, 2021
)


def make_generated(name: str, seed: int = 0, n_train: int = 20000, n_eval: int = 500) -> PairData:
    """copy / reverse of digit strings, or date normalisation; held-out targets in val and test."""
    rng = np.random.default_rng([seed, DATASETS.index(name)])
    targets, seen = [], set()
    want = n_train + 2 * n_eval
    while len(targets) < want:
        if name == "dates":
            day = datetime.date(1900, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 200 * 365)))
            key = day.isoformat()
        else:
            key = "".join(map(str, rng.integers(0, 10, size=int(rng.integers(1, 13)))))
        if key not in seen:
            seen.add(key)
            targets.append(day if name == "dates" else key)
    splits = {"train": targets[:n_train], "val": targets[n_train:n_train + n_eval],
              "test": targets[n_train + n_eval:]}
    out = {}
    for split, items in splits.items():
        pairs = []
        for item in items:
            if name == "dates":
                form = DATE_FORMS[int(rng.integers(len(DATE_FORMS)))]
                pairs.append(Pair(form(item), item.isoformat()))
            else:
                pairs.append(Pair(item, item if name == "copy" else item[::-1]))
        out[split] = pairs
    described = {"copy": "copy a digit string", "reverse": "reverse a digit string",
                 "dates": "normalise a written date to YYYY-MM-DD"}[name]
    return PairData(name, out, f"generated: {described} (seed {seed})", None, False, {"seed": seed})


def load_pairs(name: str, reverse: bool = False, seed: int = 0) -> PairData:
    if name == "eng-fra":
        return load_eng_fra(reverse)
    if name in DATASETS:
        if reverse:
            raise UserError(f"reverse=true applies to eng-fra only (the {name} task has one direction)")
        return make_generated(name, seed)
    raise UserError(f"unknown translation data {name!r}; choose one of: {', '.join(DATASETS)}")


def default_level(name: str) -> str:
    """eng-fra: words (a higher BLEU than characters at this size, see README); the rest: characters."""
    return "word" if name == "eng-fra" else "char"


# ================================================================ the task

def _pad(rows: list[list[int]]) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), PAD, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class PairSampler:
    """Random pairs with replacement, drawn from ``(seed, step)`` only (resuming needs the step)."""

    def __init__(self, task: "PairTask", split: str, batch_size: int, seed: int):
        self.task, self.split, self.batch_size, self.seed = task, split, int(batch_size), int(seed)
        self.block_size = task.longest_target + 1      # positions per row at most (tokens_per_iter)

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, int(step)])
        rows = rng.integers(0, len(self.task.encoded[self.split][0]), size=self.batch_size)
        return self.task.batch(self.split, rows)

    def state_dict(self) -> dict:
        return {"split": self.split, "seed": self.seed, "batch_size": self.batch_size}


class PairTask:
    """The trainer's task for a ``PairData`` and a ``PairVocab`` (``scratchlm.tasks``' interface,
    plus ``eval_metrics``: dev BLEU on the trainer's eval lines)."""

    splits = SPLITS

    def __init__(self, data: PairData, vocab, max_len: int | None = None, bleu_sentences: int = 200):
        self.data, self.vocab, self.bleu_sentences = data, vocab, bleu_sentences
        self.encoded = {}
        for split, pairs in data.splits.items():
            src = [vocab.encode(p.source) + [EOS] for p in pairs]
            tgt = [vocab.encode(p.target) for p in pairs]
            self.encoded[split] = (src, tgt)
        self.longest_source = max(len(s) for src, _ in self.encoded.values() for s in src)
        self.longest_target = max(len(t) for _, tgt in self.encoded.values() for t in tgt) + 1
        self.max_len = max_len or max(self.longest_source, self.longest_target)

    def needed_len(self) -> int:
        """The positions the model needs: the longest source (with </s>) or target (with <s>)."""
        return max(self.longest_source, self.longest_target)

    def batch(self, split: str, rows):
        src, tgt = self.encoded[split]
        s = _pad([src[i] for i in rows])                                   # (B, S)
        tgt_in = _pad([[BOS] + tgt[i] for i in rows])                      # (B, T)
        tgt_out = _pad([tgt[i] + [EOS] for i in rows])                     # (B, T)
        return backend.to_device(s), backend.to_device(tgt_in), backend.to_device(tgt_out)

    def sampler(self, split: str, batch_size: int, block_size: int, seed: int) -> PairSampler:
        if split not in self.encoded:
            raise UserError(f"this data has no {split!r} split (it has {', '.join(self.splits)})")
        return PairSampler(self, split, batch_size, seed)

    @staticmethod
    def loss(model, batch):
        _, loss = model(*batch)
        return loss

    def whole_split(self, split: str, batch_size: int, block_size: int = 0):
        """Every pair once, in order; yields (batch, number of target tokens incl. </s>)."""
        src, tgt = self.encoded[split]
        for start in range(0, len(src), batch_size):
            rows = range(start, min(start + batch_size, len(src)))
            yield self.batch(split, rows), sum(len(tgt[i]) + 1 for i in rows)

    def tokens(self, split: str) -> int:
        return sum(len(t) + 1 for t in self.encoded[split][1])

    # ------------------------------------------------------------ translation metrics
    def translate_split(self, model, split: str, beam: int = 1, alpha: float = 0.6, limit: int | None = None,
                        use_cache: bool = True, search=None):
        """(sources, hypotheses, references) over the distinct sources of ``split`` (the first ``limit``);
        ``search``: another search function (``scratchlm.translate.decode``'s)."""
        from scratchlm.translate import decode
        sources, refs = self.data.references(split)
        sources, refs = sources[:limit], refs[:limit]
        ids = [self.vocab.encode(s)[:self.max_len - 1] + [EOS] for s in sources]
        hyps = [self.vocab.decode(h) for h in decode(model, ids, beam=beam, alpha=alpha, use_cache=use_cache,
                                                          search=search)]
        return sources, hyps, refs

    def eval_metrics(self, model, split: str = "val") -> dict:
        """Greedy BLEU on the first ``bleu_sentences`` sources of ``split`` (the trainer's eval lines)."""
        from scratchlm import metrics
        _, hyps, refs = self.translate_split(model, split, limit=self.bleu_sentences)
        return {f"{split}_bleu": float(metrics.bleu(hyps, refs)),
                f"{split}_exact_match": float(np.mean([h in r for h, r in zip(hyps, refs)]))}

    def scores(self, model, split: str = "test", beam: int = 1, alpha: float = 0.6, use_cache: bool = True,
               search=None) -> dict:
        """BLEU, chrF, ROUGE-L and exact match (the hypothesis equals one reference) over a split."""
        from scratchlm import metrics
        sources, hyps, refs = self.translate_split(model, split, beam, alpha, use_cache=use_cache, search=search)
        rouge = metrics.rouge(hyps, refs)                                 # best reference per type
        return {"sentences": len(sources), "bleu": float(metrics.bleu(hyps, refs)),
                "chrf": float(metrics.chrf(hyps, refs)), "rougeL": float(rouge["rougeL"]),
                "exact_match": float(np.mean([h in r for h, r in zip(hyps, refs)])),
                "beam": beam, "examples": [{"source": s, "hypothesis": h, "references": r}
                                           for s, h, r in list(zip(sources, hyps, refs))[:5]]}


def translation_summary(report: dict) -> str:
    """One line of ``evaluate_translation``'s figures, greedy then beam 4: BLEU and chrF (0..100),
    ROUGE-L F (0..1), exact match (%), as ``scratchlm eval`` prints them."""
    def figures(r):
        return (f"BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}, ROUGE-L {r['rougeL']:.4f}, "
                f"exact match {100 * r['exact_match']:.1f}%")
    return (f"{report['split']} ({report['sentences']} distinct sources): greedy {figures(report['greedy'])}; "
            f"beam 4 {figures(report['beam4'])}")


def evaluate_translation(run_dir, split: str = "test", batch_size: int | None = None, write: bool = True,
                         log=print) -> dict:
    """``scratchlm eval`` of a seq2seq run: the whole-split loss and, greedy and with beam 4, BLEU,
    chrF, ROUGE-L and exact match over the split's distinct sources; written to DIR/eval.json and
    given to ``log`` as one line (``translation_summary``; the loss line is the caller's)."""
    import math
    from pathlib import Path

    from scratchlm.checkpoint import read_json, write_json_atomic
    from scratchlm.evaluate import whole_split_loss
    from scratchlm.metrics import perplexity
    from scratchlm.runs import load_model
    run_dir = Path(run_dir)
    model, vocab, header = load_model(run_dir)
    info = header["data"]
    data = load_pairs(info["corpus"], reverse=bool(info.get("reverse", False)))
    if split not in data.splits:
        raise UserError(f"split {split!r} does not exist; {info['corpus']} has {', '.join(SPLITS)}")
    task = PairTask(data, vocab, max_len=model.config.max_len)
    loss, count = whole_split_loss(model, task, split, batch_size or 64, 0)
    greedy, beam = task.scores(model, split, beam=1), task.scores(model, split, beam=4)
    report = {"run": str(run_dir), "model": "seq2seq", "split": split, "corpus": info["corpus"],
              "reverse": bool(info.get("reverse", False)), "tokens": count, "loss": loss,
              "perplexity": perplexity(loss), "bits_per_token": loss / math.log(2),
              "bleu": greedy["bleu"], "chrf": greedy["chrf"], "rougeL": greedy["rougeL"],
              "exact_match": greedy["exact_match"], "sentences": greedy["sentences"],
              "greedy": greedy, "beam4": beam}
    if write:
        path = run_dir / "eval.json"
        previous = read_json(path) if path.exists() else {}
        results = previous if isinstance(previous, dict) else {}
        results[split] = report
        write_json_atomic(path, results)
    if log is not None:
        log(translation_summary(report))
    return report
