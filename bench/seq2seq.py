"""Translation on eng-fra: scratchlm's Seq2SeqTransformer against the same model in plain PyTorch.

    python bench/seq2seq.py --threads 1            # the eng-fra-seq2seq preset, both sides, one after the other
    python bench/seq2seq.py --iters 300 --skip-torch
    # the two sides at once, as two processes, then their table:
    python bench/seq2seq.py --threads 1 --skip-torch & python bench/seq2seq.py --threads 1 --torch-only; wait
    python bench/seq2seq.py --table

Both sides train the same architecture (shared word vocabulary, embeddings scaled by sqrt(C),
sinusoidal positions, torch.nn.Transformer post-LN, tied head), with the same recipe (AdamW,
decayed matrices only, cosine schedule with warmup, grad clip, label smoothing, dropout), on the
same batches (the PairTask sampler's, drawn from (seed, step)), for the same iterations. scratchlm
trains through the shared Trainer (a run folder in a temp dir). Printed per side: ms/iter
(median of the logged windows), dev and test BLEU for greedy and beam 4 (alpha 0.6; every
distinct source sentence against all its references), chrF and exact match on test, and decode
sentences/s on test, and train wall and CPU (user+sys) seconds. The PyTorch side decodes with
its own greedy and beam search written in torch (``torch_search``: the same rules, vectorised over
sentences, recomputing the decoder over the prefix each step) through the same batching and the
same metric code (scratchlm.metrics); scratchlm decodes with its KV cache. On a shared machine use
``--threads 1``: torch with 2 threads on 2 busy cores spins and runs ~10x slower.
Writes bench/results/seq2seq.json (--torch-only: seq2seq-torch.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def _threads_from_argv(default: int = 2) -> int:
    """--threads N, read before NumPy loads: BLAS fixes its thread count at import."""
    for i, arg in enumerate(sys.argv[:-1]):
        if arg == "--threads" and sys.argv[i + 1].isdigit():
            return int(sys.argv[i + 1])
    return default


for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, str(_threads_from_argv()))

import numpy as np  # noqa: E402


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ================================================================ the PyTorch twin

def torch_twin(config, seed: int):
    """The same model as Seq2SeqTransformer (shared vocabulary, sinusoidal positions) in torch.nn."""
    import math

    import torch
    import torch.nn as tnn

    class Twin(tnn.Module):
        def __init__(self, c):
            super().__init__()
            torch.manual_seed(seed)
            self.c = c
            self.embed = tnn.Embedding(c.vocab_size, c.d_model)
            tnn.init.normal_(self.embed.weight, std=1 / math.sqrt(c.d_model))
            pos = np.arange(c.max_len)[:, None] / 10000.0 ** (np.arange(0, c.d_model, 2) / c.d_model)
            table = np.zeros((c.max_len, c.d_model))
            table[:, 0::2], table[:, 1::2] = np.sin(pos), np.cos(pos[:, :c.d_model // 2])
            self.register_buffer("pe", torch.tensor(table, dtype=torch.float32))
            self.drop = tnn.Dropout(c.dropout)
            self.transformer = tnn.Transformer(c.d_model, c.nhead, c.num_encoder_layers, c.num_decoder_layers,
                                               c.dim_feedforward, c.dropout, c.activation, batch_first=True,
                                               norm_first=c.norm_first)

        def embed_ids(self, ids):
            return self.drop(self.embed(ids) * math.sqrt(self.c.d_model) + self.pe[:ids.shape[1]])

        def encode(self, src):
            pad = src == 0
            return self.transformer.encoder(self.embed_ids(src), src_key_padding_mask=pad), pad

        def decode(self, tgt_in, memory, pad):
            T = tgt_in.shape[1]
            mask = torch.triu(torch.ones((T, T), dtype=torch.bool), diagonal=1)
            h = self.transformer.decoder(self.embed_ids(tgt_in), memory, tgt_mask=mask,
                                         tgt_key_padding_mask=tgt_in == 0, memory_key_padding_mask=pad)
            return h @ self.embed.weight.T

        def forward(self, src, tgt_in, tgt_out):
            memory, pad = self.encode(src)
            logits = self.decode(tgt_in, memory, pad)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1),
                                                     ignore_index=0, label_smoothing=float(self.c.label_smoothing))

    return Twin(config)


def torch_search(twin, config):
    """The twin's own decoding, in torch: ``search(ids (B, S), beam, alpha, max_len)`` -> B token
    lists (</s> removed), for ``scratchlm.translate.decode(search=...)``. The encoder runs once; the
    decoder recomputes the whole prefix every step (no cache: these sentences are short). The rules
    are scratchlm.translate's: <pad> and <s> never produced; greedy stops when every row has
    produced </s>; beam search ranks live hypotheses by log P(Y|X), takes the 2K best extensions,
    finishes those ending in </s> among the first K with s(Y) = log P / ((5+|Y|)/6)^alpha (|Y|
    counts </s>), keeps the first K others live, stops a sentence at K finished hypotheses or
    none live, and finishes the live ones as they are at max_len. Vectorised over sentences here
    (scratchlm's loops over them), so the two implementations check each other."""
    import torch

    from scratchlm.models.seq2seq import BOS, EOS, PAD

    def next_log_probs(prefix, memory, pad):                                   # (N, V) float64
        z = twin.decode(prefix, memory, pad)[:, -1, :].double()
        z[:, [PAD, BOS]] = -math.inf
        return torch.log_softmax(z, dim=-1)

    def strip(tokens):
        tokens = [int(t) for t in tokens]
        return tokens[:tokens.index(EOS)] if EOS in tokens else tokens

    def greedy(src, memory, pad, max_len):
        B = src.shape[0]
        prefix = torch.full((B, 1), BOS, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(max_len):
            next_tokens = next_log_probs(prefix, memory, pad).argmax(dim=1)
            next_tokens[done] = PAD
            prefix = torch.cat([prefix, next_tokens[:, None]], dim=1)
            done |= next_tokens == EOS
            if bool(done.all()):
                break
        return [strip(row[1:]) for row in prefix]

    def beam_search(src, memory, pad, K, alpha, max_len):
        B = src.shape[0]
        memory, pad = memory.repeat_interleave(K, dim=0), pad.repeat_interleave(K, dim=0)    # (BK, S, C)
        prefix = torch.full((B * K, 1), BOS, dtype=torch.long)                               # (BK, t)
        scores = torch.full((B, K), -math.inf, dtype=torch.float64)
        scores[:, 0] = 0.0
        finished = [[] for _ in range(B)]                              # (s(Y), tokens) per sentence
        active = torch.ones(B, dtype=torch.bool)
        base = torch.arange(B)[:, None] * K                                                  # (B, 1)
        for t in range(1, max_len + 1):
            log_p = next_log_probs(prefix, memory, pad)                                      # (BK, V)
            V = log_p.shape[1]
            candidates = (scores.reshape(B * K, 1) + log_p).reshape(B, K * V)
            top, index = candidates.topk(2 * K, dim=1)                                       # (B, 2K), sorted
            beam_of, token = index // V, index % V
            ends = (token == EOS) & torch.isfinite(top)
            lp = ((5.0 + t) / 6.0) ** alpha
            for b, r in (ends[:, :K] & active[:, None]).nonzero().tolist():
                finished[b].append((float(top[b, r]) / lp, prefix[base[b, 0] + beam_of[b, r], 1:]))
            live = torch.argsort(ends.int(), dim=1, stable=True)[:, :K]                     # first K not ending
            rows = (base + beam_of.gather(1, live)).reshape(-1)
            new_scores = top.gather(1, live)
            new_tokens = token.gather(1, live)
            new_scores[ends.gather(1, live) | ~active[:, None]] = -math.inf
            new_tokens[~torch.isfinite(new_scores)] = PAD
            prefix = torch.cat([prefix[rows], new_tokens.reshape(-1, 1)], dim=1)
            scores = new_scores
            counts = torch.tensor([len(f) for f in finished])
            active &= (counts < K) & torch.isfinite(scores).any(dim=1)
            if t == max_len:                                           # cut: finish the live ones
                for b, k in (torch.isfinite(scores) & active[:, None]).nonzero().tolist():
                    finished[b].append((float(scores[b, k]) / lp, prefix[b * K + k, 1:]))
            if not bool(active.any()):
                break
        return [strip(max(hyps, key=lambda h: h[0])[1]) if hyps else [] for hyps in finished]

    def search(ids, beam, alpha, max_len):
        with torch.no_grad():
            src = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            memory, pad = twin.encode(src)
            max_len = max_len or config.max_len
            if beam == 1:
                return greedy(src, memory, pad, max_len)
            return beam_search(src, memory, pad, int(beam), alpha, max_len)

    return search


def train_torch(task, train_config, model_config, threads: int):
    import torch

    from scratchlm.optim import cosine_with_warmup
    torch.set_num_threads(threads)
    c = train_config
    twin = torch_twin(model_config, c.seed)
    matrices = [p for p in twin.parameters() if p.ndim >= 2]
    others = [p for p in twin.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": c.weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=c.learning_rate, betas=(c.beta1, c.beta2),
                            eps=1e-8)
    schedule = cosine_with_warmup(c.learning_rate, c.warmup_iters, c.lr_decay_iters, c.min_lr)
    sampler = task.sampler("train", c.batch_size, 0, seed=c.seed)
    times = []
    twin.train()
    for it in range(c.max_iters):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = schedule(it)
        src, tgt_in, tgt_out = (torch.as_tensor(np.asarray(a)) for a in sampler.batch(it))
        loss = twin(src, tgt_in, tgt_out)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), c.grad_clip)
        opt.step()
        times.append(time.perf_counter() - start)
    twin.eval()
    return twin, 1000 * statistics.median(times), float(loss.detach())


# ================================================================ scoring

def score(model, task, beam: int, split: str, search=None):
    t0 = time.perf_counter()
    result = task.scores(model, split, beam=beam, search=search)
    result["seconds"] = time.perf_counter() - t0
    result["sentences_per_s"] = result["sentences"] / result["seconds"]
    result.pop("examples")
    return result


def twin_column(task, train_config, config, threads: int) -> dict:
    """Train the PyTorch twin and score it (its own torch decoding, scratchlm's metrics)."""
    t0, c0 = time.perf_counter(), time.process_time()
    twin, ms, last = train_torch(task, train_config, config, threads)
    out = {"ms_per_iter": ms, "train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
           "iters": train_config.max_iters, "final_train_loss": last, "parameters": sum(p.numel() for p in
                                                                                        twin.parameters())}
    search = torch_search(twin, config)
    for split in ("val", "test"):
        for beam in (1, 4):
            out[f"{split}_beam{beam}"] = score(None, task, beam, split, search)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=positive_int, help="training iterations (default: the preset's)")
    parser.add_argument("--tokenizer", choices=["char", "word"], default="word",
                        help="default word (the eng-fra default: see the README)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="BLAS/Numba threads and torch threads, both sides (default 2; 1 on a busy machine)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-only", action="store_true", help="only the PyTorch side (the same data and config)")
    parser.add_argument("--table", action="store_true",
                        help="print the table of bench/results/seq2seq.json and seq2seq-torch.json (the two sides "
                             "run as separate processes) and stop")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset override")
    parser.add_argument("--out", metavar="DIR", help="keep scratchlm's run folder there (default: a temp dir)")
    args = parser.parse_args(argv)

    from scratchlm.commands.translate import train_translation
    from scratchlm.pairs import PairTask, load_pairs
    from scratchlm.runs import load_model, read_metrics
    sets = list(args.set) + [f"tokenizer={args.tokenizer}"]
    results = {"tokenizer": args.tokenizer, "sets": args.set}
    if args.table:
        for name in ("seq2seq.json", "seq2seq-torch.json"):
            path = ROOT / "bench" / "results" / name
            if path.exists():
                saved = json.loads(path.read_text())
                results.update({k: v for k, v in saved.items() if k in ("scratchlm", "torch")})
                print(f"{name}: load average {saved.get('machine', {}).get('loadavg')}")
        print_table(results)
        return 0
    if args.torch_only:
        return torch_only(args, sets, results)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        run = train_translation("eng-fra", Path(args.out or Path(tmp) / "run"), sets, iters=args.iters, progress=False,
                                log=lambda *a: None)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        model, vocab, header = load_model(run.run_dir)
        train_lines = [m for m in read_metrics(Path(run.run_dir) / "metrics.jsonl") if m.get("kind") == "train"]
        from scratchlm.config import TrainConfig
        train_config = TrainConfig.from_dict(header["train"])
    data = load_pairs("eng-fra")
    task = PairTask(data, vocab, max_len=model.config.max_len)
    ours = {"ms_per_iter": statistics.median(m["ms_per_iter"] for m in train_lines[5:] or train_lines),
            "train_s": train_s, "train_cpu_s": train_cpu_s, "iters": run.iteration,
            "final_train_loss": train_lines[-1]["train_loss"],
            "parameters": model.num_parameters()}
    for split in ("val", "test"):
        for beam in (1, 4):
            ours[f"{split}_beam{beam}"] = score(model, task, beam, split)
    results["scratchlm"] = ours
    results["config"] = {"train": header["train"], "model": header["model_config"]}
    if not args.skip_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: the PyTorch column is skipped")
        else:
            results["torch"] = twin_column(task, train_config, model.config, args.threads)
    print_table(results)
    out = ROOT / "bench" / "results" / "seq2seq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results["machine"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def torch_only(args, sets, results) -> int:
    """The PyTorch column alone: the data, vocabulary and config ``translate train`` would build."""
    from scratchlm.commands.translate import _split_data_keys
    from scratchlm.models.registry import get_family, resolve_config
    from scratchlm.models.seq2seq import Seq2SeqConfig
    from scratchlm.pairs import PairTask, load_pairs
    from scratchlm.tokenizers.pairs import PairVocab
    data_keys, rest = _split_data_keys(sets)
    train_config, model_dict = resolve_config(get_family("seq2seq"), "eng-fra", None, rest)
    if args.iters:
        train_config = train_config.with_value("max_iters", args.iters, where="--iters")
    data = load_pairs("eng-fra")
    train = data.splits["train"]
    vocab = PairVocab.from_texts([p.source for p in train] + [p.target for p in train], data_keys["tokenizer"])
    task = PairTask(data, vocab)
    config = Seq2SeqConfig.from_dict({"max_len": task.needed_len(), **model_dict, "vocab_size": vocab.vocab_size})
    results["torch"] = twin_column(task, train_config, config, args.threads)
    print_table(results)
    out = ROOT / "bench" / "results" / "seq2seq-torch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results["machine"] = {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def print_table(results):
    sides = [s for s in ("scratchlm", "torch") if s in results]
    rows = [("train ms/iter (median)", lambda r: f"{r['ms_per_iter']:.1f}"),
            ("train seconds (wall)", lambda r: f"{r['train_s']:.0f}"),
            ("train seconds (CPU, user+sys)", lambda r: f"{r['train_cpu_s']:.0f}"),
            ("iterations", lambda r: f"{r['iters']}"),
            ("final train loss", lambda r: f"{r['final_train_loss']:.3f}")]
    for split in ("val", "test"):
        for beam in (1, 4):
            name = "greedy" if beam == 1 else "beam 4"
            rows.append((f"{split} BLEU {name}", lambda r, k=f"{split}_beam{beam}": f"{r[k]['bleu']:.2f}"))
    rows += [("test chrF greedy / beam 4", lambda r: f"{r['test_beam1']['chrf']:.2f} / {r['test_beam4']['chrf']:.2f}"),
             ("test exact match greedy / beam 4", lambda r: f"{100 * r['test_beam1']['exact_match']:.1f}% / "
                                                           f"{100 * r['test_beam4']['exact_match']:.1f}%"),
             ("test decode sent/s greedy", lambda r: f"{r['test_beam1']['sentences_per_s']:.1f}"),
             ("test decode sent/s beam 4", lambda r: f"{r['test_beam4']['sentences_per_s']:.1f}")]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  " + "  ".join(f"{s:>16}" for s in sides) + ("  ratio" if len(sides) == 2 else ""))
    for label, cell in rows:
        cells = [cell(results[s]) for s in sides]
        ratio = ""
        if len(sides) == 2 and label.startswith("train ms"):
            ratio = f"  {results['scratchlm']['ms_per_iter'] / results['torch']['ms_per_iter']:.2f}x"
        print(f"{label:{width}}  " + "  ".join(f"{c:>16}" for c in cells) + ratio)


if __name__ == "__main__":
    sys.exit(main())
