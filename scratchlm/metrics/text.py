"""Metrics for generated text: BLEU, chrF, ROUGE, perplexity, and Texygen's BLEU / self-BLEU.

Each is written from its definition and pinned by tests to the package whose numbers people quote:

- ``bleu`` / ``sentence_bleu``: Papineni et al. 2002 with sacrebleu's conventions (Post 2018):
  13a tokenisation, corpus-level counts, exponential smoothing (``exp``, NIST's), the closest
  reference length in the brevity penalty, n-grams 1..4, case kept. Scores are 0..100.
- ``chrf``: Popovic 2015 as sacrebleu's ``corpus_chrf``: character n-grams 1..6 with whitespace
  removed, no word n-grams, beta = 2 (recall weighs twice precision).
- ``rouge``: Lin 2004, ROUGE-1/2/L F-measures as Google's ``rouge-score`` with its default
  tokenizer (lowercase, every character outside [a-z0-9] becomes a space: accented and non-Latin
  letters vanish, as there), no stemming; averaged over hypothesis/reference pairs.
- ``bleu_against`` / ``self_bleu``: the protocol of the Texygen benchmark (Zhu et al. 2018) for
  unconditional generators: each sample's NLTK ``sentence_bleu`` (uniform weights over 1..n,
  Chen & Cherry's smoothing method 1, epsilon 0.1) against a whole reference set, averaged.
  Values are 0..1, as Texygen prints them.

References (``refs``): ``refs[i]`` belongs to ``hyps[i]`` and is a string or a list of strings
(several references, not necessarily as many for every hypothesis). sacrebleu takes reference
*streams* instead, ``streams[k][i]`` = the k-th reference of hypothesis i (``None`` where a
hypothesis has fewer); ours is its transpose, so ``bleu(hyps, refs)`` equals
``sacrebleu.corpus_bleu(hyps, streams)`` with ``streams = [[r[k] if k < len(r) else None for r in
refs] for k in range(max(map(len, refs)))]``.
"""
from __future__ import annotations

import bisect
import math
import re
from collections import Counter

from ..errors import UserError

__all__ = ["tokenize_13a", "bleu", "sentence_bleu", "chrf", "rouge", "perplexity",
           "bleu_against", "self_bleu"]


# ----------------------------------------------------------------------------- shared helpers

def _as_ref_lists(hyps, refs, what):
    """Check the pairing of hypotheses and references; return refs as a list of lists of str."""
    if isinstance(hyps, str):
        raise UserError(f"{what}: hyps must be a list of strings, not one string; wrap it: [hyp]")
    if len(hyps) != len(refs):
        raise UserError(f"{what}: {len(hyps)} hypotheses but {len(refs)} references; "
                        "give one reference (or one list of references) per hypothesis")
    out = []
    for i, r in enumerate(refs):
        r = [r] if isinstance(r, str) else list(r)
        if not r:
            raise UserError(f"{what}: hypothesis {i} has no reference; every hypothesis needs one")
        if not all(isinstance(x, str) for x in r) or not isinstance(hyps[i], str):
            raise UserError(f"{what}: hypotheses and references must be strings (item {i} is not)")
        out.append(r)
    return out


def _ngrams(tokens, n):
    """Counter of the n-grams (tuples) of one token list: len(tokens) - n + 1 of them."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ----------------------------------------------------------------------------- BLEU (sacrebleu)

_13A_RULES = [
    # mteval-v13a.pl's "language-dependent part": symbols and punctuation become tokens, except
    # the apostrophe, hyphen, period and comma; the class spells the ASCII ranges { to ~, [ to `,
    # space to &, ( to +, : to @, and the slash
    (re.compile(r"([{-~\[-` -&(-+:-@/])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),   # a period or comma not after a digit ...
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),   # ... or not before one (3.14 and 1,000 stay)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),       # a dash after a digit
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a's tokenisation (WMT's, sacrebleu's default), tokens joined by single spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:  # the four SGML entities mteval unescapes, in its order
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            line = line.replace(entity, char)
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _bleu_tokens(text, tokenize, lowercase):
    if lowercase:
        text = text.lower()
    text = text.rstrip()  # sacrebleu strips trailing whitespace before tokenising
    return (tokenize_13a(text) if tokenize == "13a" else text).split()


def _closest(hyp_len, ref_lens):
    """The reference length nearest the hypothesis length; the shorter one on a tie."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def _bleu_segment_stats(hyp, refs, max_order, tokenize, lowercase):
    """[hyp_len, ref_len, matches_1..N, totals_1..N] of one segment.

    A hypothesis n-gram's count is clipped at its largest count in any one reference.
    """
    hyp_tok = _bleu_tokens(hyp, tokenize, lowercase)
    refs_tok = [_bleu_tokens(r, tokenize, lowercase) for r in refs]
    matches, totals = [0] * max_order, [0] * max_order
    for n in range(1, max_order + 1):
        ref_max = Counter()
        for r in refs_tok:
            ref_max |= _ngrams(r, n)  # Counter union = element-wise max
        for gram, count in _ngrams(hyp_tok, n).items():
            totals[n - 1] += count
            matches[n - 1] += min(count, ref_max[gram])
    return [len(hyp_tok), _closest(len(hyp_tok), [len(r) for r in refs_tok])] + matches + totals


def _bleu_from_stats(stats, max_order, smooth, effective_order):
    """BLEU (0..100) = BP * exp(mean_n log p_n) from summed segment statistics.

    BP = 1 if c >= r else exp(1 - r/c) (0 when c = 0), c = hypothesis length, r = reference
    length, both summed over the corpus. p_n = matches_n / totals_n in percent. 'exp' smoothing
    replaces the k-th zero p_n by 100 / (2^k totals_n). With effective_order (sentence BLEU),
    orders that have no n-gram at all are left out of the mean; without it such an order makes
    BLEU 0 (sacrebleu floors log 0 at -9999999999). No match at all gives 0.
    """
    sys_len, ref_len = stats[0], stats[1]
    matches, totals = stats[2:2 + max_order], stats[2 + max_order:]
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    else:
        bp = 1.0
    if not any(matches):
        return 0.0
    precisions = [0.0] * max_order
    halvings, order = 1.0, max_order
    for n in range(max_order):
        if totals[n] == 0:
            break
        if effective_order:
            order = n + 1
        if matches[n]:
            precisions[n] = 100.0 * matches[n] / totals[n]
        elif smooth == "exp":
            halvings *= 2
            precisions[n] = 100.0 / (halvings * totals[n])
    log_sum = sum(math.log(p) if p > 0 else -9999999999 for p in precisions[:order])
    return bp * math.exp(log_sum / order)


def _check_bleu_options(smooth, tokenize):
    if smooth not in ("exp", "none"):
        raise UserError(f"BLEU smoothing {smooth!r} is not known; use 'exp' (sacrebleu's) or 'none'")
    if tokenize not in ("13a", "none"):
        raise UserError(f"BLEU tokenizer {tokenize!r} is not known; use '13a' or 'none'")


def bleu(hyps, refs, *, max_order=4, smooth="exp", tokenize="13a", lowercase=False) -> float:
    """Corpus BLEU, 0..100, equal to ``sacrebleu.corpus_bleu(hyps, streams).score``.

    Matches and totals are summed over all segments before the precisions are formed (corpus
    level, not a mean of sentence scores). ``refs[i]``: a string or a list of strings; the
    mapping to sacrebleu's reference streams is in this module's docstring. An empty corpus
    scores 0 (nothing matched).

        >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]), 6)
        100.0
    """
    _check_bleu_options(smooth, tokenize)
    refs = _as_ref_lists(hyps, refs, "bleu")
    total = [0] * (2 + 2 * max_order)
    for hyp, rs in zip(hyps, refs):
        seg = _bleu_segment_stats(hyp, rs, max_order, tokenize, lowercase)
        total = [a + b for a, b in zip(total, seg)]
    return _bleu_from_stats(total, max_order, smooth, effective_order=False)


def sentence_bleu(hyp, refs, *, max_order=4, smooth="exp", tokenize="13a", lowercase=False) -> float:
    """One sentence's BLEU, 0..100, equal to ``sacrebleu.sentence_bleu(hyp, refs).score``.

    Same as ``bleu`` on a one-line corpus except for sacrebleu's sentence default
    ``use_effective_order=True``: n-gram orders longer than the hypothesis are dropped from the
    geometric mean instead of zeroing it. ``refs``: a string or a list of strings.
    """
    _check_bleu_options(smooth, tokenize)
    (rs,) = _as_ref_lists([hyp], [refs], "sentence_bleu")
    stats = _bleu_segment_stats(hyp, rs, max_order, tokenize, lowercase)
    return _bleu_from_stats(stats, max_order, smooth, effective_order=True)


# ----------------------------------------------------------------------------- chrF (sacrebleu)

def _char_ngrams(text, max_order):
    text = "".join(text.split())  # whitespace is not part of any character n-gram
    return [Counter(text[i:i + n] for i in range(len(text) - n + 1)) for n in range(1, max_order + 1)]


def _chrf_score(stats, max_order, beta):
    """chrF (0..100) from per-order [hyp, ref, match] counts.

    Precision and recall are averaged over the orders where both hypothesis and reference have
    n-grams (sacrebleu's default, not its eps smoothing), then
    F_beta = (1 + beta^2) P R / (beta^2 P + R).
    """
    avg_p = avg_r = 0.0
    orders = 0
    for n in range(max_order):
        n_hyp, n_ref, n_match = stats[3 * n:3 * n + 3]
        if n_hyp > 0 and n_ref > 0:
            avg_p += n_match / n_hyp
            avg_r += n_match / n_ref
            orders += 1
    if orders == 0:
        return 0.0
    avg_p, avg_r = avg_p / orders, avg_r / orders
    b2 = beta ** 2
    if avg_p + avg_r == 0:
        return 0.0
    return 100 * (1 + b2) * avg_p * avg_r / (b2 * avg_p + avg_r)


def chrf(hyps, refs, *, char_order=6, beta=2) -> float:
    """Corpus chrF, 0..100, equal to ``sacrebleu.corpus_chrf(hyps, streams).score``.

    Per segment, the reference with the best segment chrF is kept (the first on a tie); its
    [hyp, ref, match] character n-gram counts are summed over the corpus, then scored once.
    A hypothesis n-gram only counts when the reference has n-grams of that order.
    """
    refs = _as_ref_lists(hyps, refs, "chrf")
    total = [0] * (3 * char_order)
    for hyp, rs in zip(hyps, refs):
        hyp_grams = _char_ngrams(hyp, char_order)
        best, best_f = None, -1.0
        for r in rs:
            stats = []
            for h, g in zip(hyp_grams, _char_ngrams(r, char_order)):
                match = sum(min(c, g[k]) for k, c in h.items() if k in g)
                stats += [sum(h.values()) if g else 0, sum(g.values()), match]
            f = _chrf_score(stats, char_order, beta)
            if f > best_f:
                best, best_f = stats, f
        total = [a + b for a, b in zip(total, best)]
    return _chrf_score(total, char_order, beta)


# ----------------------------------------------------------------------------- ROUGE (rouge-score)

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def _rouge_tokens(text):
    """rouge-score's default tokenizer: lowercase, keep runs of [a-z0-9], drop everything else."""
    return _ROUGE_TOKEN.findall(text.lower())


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _rouge_n(target, pred, n):
    """F of clipped n-gram overlap: P = overlap / #pred n-grams, R = overlap / #target n-grams."""
    t, p = _ngrams(target, n), _ngrams(pred, n)
    overlap = sum(min(c, p[g]) for g, c in t.items())
    return _f1(overlap / max(sum(p.values()), 1), overlap / max(sum(t.values()), 1))


def _lcs_length(a, b):
    """Length of the longest common subsequence, one DP row at a time: O(len(a) len(b))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def _rouge_l(target, pred):
    """F of the LCS: P = LCS / len(pred), R = LCS / len(target); 0 when either is empty."""
    if not target or not pred:
        return 0.0
    lcs = _lcs_length(target, pred)
    return _f1(lcs / len(pred), lcs / len(target))


def rouge(hyps, refs) -> dict:
    """{"rouge1", "rouge2", "rougeL"}: mean over pairs of rouge-score's F-measures (0..1).

    Per pair, equal to ``RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref, hyp)``'s
    ``fmeasure``; with several references, ``score_multi``: for each ROUGE type separately the
    reference with the highest F (the first on a tie). An empty corpus gives zeros.
    """
    refs = _as_ref_lists(hyps, refs, "rouge")
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, rs in zip(hyps, refs):
        pred = _rouge_tokens(hyp)
        targets = [_rouge_tokens(r) for r in rs]
        sums["rouge1"] += max(_rouge_n(t, pred, 1) for t in targets)
        sums["rouge2"] += max(_rouge_n(t, pred, 2) for t in targets)
        sums["rougeL"] += max(_rouge_l(t, pred) for t in targets)
    return {k: v / len(hyps) if hyps else 0.0 for k, v in sums.items()}


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per token, in nats); inf when that overflows."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------- Texygen BLEU

def _words(sentences):
    return [s.split() if isinstance(s, str) else list(s) for s in sentences]


def _texygen_bleu(hyp, clip, ref_len, n):
    """NLTK ``sentence_bleu(refs, hyp, (1/n,)*n, SmoothingFunction().method1)`` from precomputed
    reference statistics.

    p_k = clipped matches / max(1, #hyp k-grams), with a zero numerator replaced by 0.1
    (method 1); BLEU = BP * exp(sum_k log(p_k) / n); 0 when no unigram matches; BP = 1 if the
    hypothesis is longer than the closest reference, 0 if empty, else exp(1 - r / c).
    ``clip(gram, count)`` is the gram's largest count in any one reference (``count``: its count
    in the hypothesis, which self-BLEU needs to leave the hypothesis out).
    """
    logs = []
    for k in range(1, n + 1):
        grams = _ngrams(hyp, k)
        matched = sum(min(c, clip(g, c)) for g, c in grams.items())
        if k == 1 and matched == 0:
            return 0.0
        denominator = max(1, sum(grams.values()))
        logs.append((1.0 / n) * math.log(matched / denominator if matched else 0.1 / denominator))
    c = len(hyp)
    bp = 1.0 if c > ref_len else math.exp(1 - ref_len / c)
    return bp * math.exp(math.fsum(logs))


def bleu_against(samples, references, n=4) -> float:
    """Texygen's BLEU-n (0..1): each sample's smoothed sentence BLEU against the whole reference
    set, averaged over samples. Sentences are split on whitespace (lists of tokens also work).

    Equal to averaging NLTK's ``sentence_bleu(references, sample, weights=(1/n,)*n,
    smoothing_function=SmoothingFunction().method1)``, but computed once per reference set:
    the clip of each n-gram (its largest count in any one reference) and the sorted reference
    lengths are precomputed, so each sample costs O(its length) instead of O(all references).
    1,000 samples against 10,000 references take about a second, not NLTK's many minutes.
    """
    samples, references = _words(samples), _words(references)
    if not samples or not references:
        raise UserError("bleu_against needs at least one sample and one reference sentence")
    clip = {}
    for ref in references:
        for k in range(1, n + 1):
            for g, c in _ngrams(ref, k).items():
                if c > clip.get(g, 0):
                    clip[g] = c
    lengths = sorted(set(map(len, references)))

    def closest(h):
        # nearest length on either side of h in the sorted unique lengths; shorter on a tie
        i = bisect.bisect_left(lengths, h)
        return _closest(h, lengths[max(i - 1, 0):i + 1])

    return sum(_texygen_bleu(s, lambda g, _: clip.get(g, 0), closest(len(s)), n)
               for s in samples) / len(samples)


def self_bleu(samples, n=4) -> float:
    """Texygen's self-BLEU-n (0..1): each sample's BLEU-n against all the *other* samples,
    averaged (lower = more diverse). As Texygen's parallel ``get_bleu``, which leaves the sample
    itself out; its fast path also keeps only the first 500 samples: pass ``samples[:500]`` for that.

    The clip "largest count in any other sample" comes from each n-gram's best count, how many
    samples reach it, and the runner-up count: a sample holding the unique best sees the
    runner-up, every other sample sees the best. Lengths work the same way, so the whole is
    O(total tokens), not O(samples^2).
    """
    samples = _words(samples)
    if len(samples) < 2:
        raise UserError("self_bleu needs at least two samples (each is scored against the others)")
    best = {}  # gram -> [best count, how many samples have it, runner-up count]
    for s in samples:
        for k in range(1, n + 1):
            for g, c in _ngrams(s, k).items():
                b = best.setdefault(g, [0, 0, 0])
                if c > b[0]:
                    b[:] = [c, 1, b[0]]
                elif c == b[0]:
                    b[1] += 1
                elif c > b[2]:
                    b[2] = c
    length_counts = Counter(map(len, samples))
    lengths = sorted(length_counts)

    def clip(g, mine):
        b = best[g]
        return b[2] if (mine == b[0] and b[1] == 1) else b[0]

    total = 0.0
    for s in samples:
        h = len(s)
        if length_counts[h] > 1:
            ref_len = h
        else:
            i = lengths.index(h)
            ref_len = _closest(h, lengths[max(i - 1, 0):i] + lengths[i + 1:i + 2])
        total += _texygen_bleu(s, clip, ref_len, n)
    return total / len(samples)

