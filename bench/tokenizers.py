"""Byte-level BPE: training time, encode throughput and compression, scratchlm vs HF tokenizers.

    python bench/tokenizers.py [CORPUS] [--vocab 512 1024 4096] [--repeats 3]

CORPUS is a text file or a registered corpus name (default: ../shared/corpora/tinyshakespeare.txt
next to the repository). For every vocabulary size it trains scratchlm's ByteLevelBPE, then
encodes the whole corpus with a fresh tokenizer (cold word cache) and again (warm cache), and
checks that decoding gives the corpus back. When Hugging Face ``tokenizers`` is importable the
same is done with its ByteLevel BPE in the same run (same special token, GPT-2 byte alphabet,
no prefix space) and the table shows ours / theirs as ratios. HF trains with several threads
(``RAYON_NUM_THREADS``); both encode one string on one thread.

Prints a table and writes bench/results/tokenizers.json. Times are the best of ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This file is called tokenizers.py: drop its own folder from the path, or "import tokenizers"
# (Hugging Face's) would import this script.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from scratchlm.data import load_corpus                          # noqa: E402
from scratchlm.tokenizers import ByteLevelBPE, from_dict        # noqa: E402

DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def best_of(repeats, fn):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_scratchlm(text, vocab_size, repeats):
    n_bytes = len(text.encode("utf-8"))
    train_s, tok = best_of(repeats, lambda: ByteLevelBPE.train(text, vocab_size))
    d = tok.to_dict()
    # Cold: a fresh tokenizer has an empty word cache; warm: the same one encoding again.
    cold_s, ids = best_of(repeats, lambda: from_dict(d).encode(text))
    warm_tok = from_dict(d)
    warm_tok.encode(text)
    warm_s, _ = best_of(repeats, lambda: warm_tok.encode(text))
    decode_s, decoded = best_of(repeats, lambda: tok.decode(ids))
    return {"pieces": [tok.token_bytes[i] for i in ids],
            "train_s": train_s, "encode_MBps": n_bytes / cold_s / 1e6,
            "encode_warm_MBps": n_bytes / warm_s / 1e6, "decode_MBps": n_bytes / decode_s / 1e6,
            "tokens": len(ids), "bytes_per_token": n_bytes / len(ids),
            "vocab_size": tok.vocab_size, "round_trip": decoded == text}


def bench_hf(text, vocab_size, repeats):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    n_bytes = len(text.encode("utf-8"))
    lines = text.splitlines(keepends=True)

    def train():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(lines, trainer)
        return tok

    train_s, tok = best_of(repeats, train)
    serialized = tok.to_str()
    cold_s, encoding = best_of(repeats, lambda: Tokenizer.from_str(serialized).encode(text))
    ids = encoding.ids
    # HF's usual fast path: many short strings in parallel threads (not comparable one-to-one).
    batch_s, _ = best_of(repeats, lambda: Tokenizer.from_str(serialized).encode_batch(lines))
    decode_s, decoded = best_of(repeats, lambda: tok.decode(ids))
    from scratchlm.tokenizers.bpe import readable_to_bytes
    return {"pieces": [readable_to_bytes(t) for t in encoding.tokens],
            "train_s": train_s, "encode_MBps": n_bytes / cold_s / 1e6,
            "encode_batch_lines_MBps": n_bytes / batch_s / 1e6,
            "decode_MBps": n_bytes / decode_s / 1e6, "tokens": len(ids),
            "bytes_per_token": n_bytes / len(ids), "vocab_size": tok.get_vocab_size(),
            "round_trip": decoded == text}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="?", default=str(DEFAULT_CORPUS),
                        help="text file, folder or registered corpus name")
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tokenizers.json"))
    args = parser.parse_args(argv)

    corpus = load_corpus(args.corpus)
    text = corpus.text
    try:
        import tokenizers as hf
        hf_version = hf.__version__
    except ImportError:
        hf_version = None
    print(f"corpus {corpus.name}: {len(text.encode('utf-8')):,} bytes, sha256 {corpus.sha256[:16]}..; "
          f"{os.cpu_count()} CPUs; HF tokenizers: {hf_version or 'not installed'}")

    rows = []
    for vocab_size in args.vocab:
        row = {"vocab": vocab_size, "scratchlm": bench_scratchlm(text, vocab_size, args.repeats)}
        ours_pieces = row["scratchlm"].pop("pieces")
        if hf_version:
            row["hf"] = bench_hf(text, vocab_size, args.repeats)
            # Same segmentation = the same byte strings, token by token (ids are numbered differently).
            row["same_tokens_as_hf"] = ours_pieces == row["hf"].pop("pieces")
        rows.append(row)

    header = (f"{'vocab':>6} | {'train s':>8} {'enc MB/s':>9} {'warm MB/s':>9} {'B/tok':>6} {'rt':>3}")
    if hf_version:
        header += (f" || {'HF train s':>10} {'HF enc MB/s':>11} {'HF batch MB/s':>13} {'HF B/tok':>8} | "
                   f"{'train x':>8} {'enc x':>6} {'same':>5}")
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row["scratchlm"]
        line = (f"{row['vocab']:>6} | {s['train_s']:>8.2f} {s['encode_MBps']:>9.2f} "
                f"{s['encode_warm_MBps']:>9.2f} {s['bytes_per_token']:>6.3f} {'ok' if s['round_trip'] else 'NO':>3}")
        if "hf" in row:
            h = row["hf"]
            row["ratios"] = {"train_time_ours_over_hf": s["train_s"] / h["train_s"],
                             "encode_speed_ours_over_hf": s["encode_MBps"] / h["encode_MBps"],
                             "bytes_per_token_ours_over_hf": s["bytes_per_token"] / h["bytes_per_token"]}
            line += (f" || {h['train_s']:>10.2f} {h['encode_MBps']:>11.2f} {h['encode_batch_lines_MBps']:>13.2f} "
                     f"{h['bytes_per_token']:>8.3f} | "
                     f"{row['ratios']['train_time_ours_over_hf']:>8.2f} "
                     f"{row['ratios']['encode_speed_ours_over_hf']:>6.2f} "
                     f"{'yes' if row['same_tokens_as_hf'] else 'no':>5}")
        print(line)
    print("train x = our train time / HF's (lower is better for us); enc x = our encode MB/s / HF's "
          "(higher is better), both encoding the corpus as one string on one thread;\n"
          "warm = our encoder again with its word cache filled; HF batch = HF encode_batch over the "
          "lines, multi-threaded; rt = decode(encode(corpus)) == corpus;\n"
          "same = both split the corpus into exactly the same byte strings")

    result = {"corpus": corpus.name, "corpus_bytes": len(text.encode("utf-8")), "sha256": corpus.sha256,
              "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "hf_tokenizers": hf_version, "repeats": args.repeats, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    if not all(r["scratchlm"]["round_trip"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
