"""``scratchlm eval``: a run's loss over a WHOLE split -- every token scored once, not a sample.

    from scratchlm.evaluate import evaluate_run
    report = evaluate_run("runs/names-lstm", split="test")   # also written to runs/names-lstm/eval.json
    report["loss"], report["perplexity"], report["bits_per_token"]

The training log's val_loss is a mean over ``eval_iters`` random batches: cheap, and fine for
watching a run, but it is an estimate. This is the figure to report: the summed negative
log-likelihood of every predicted token of the split divided by their number,

    loss = -(1/N) sum_i log p(t_i | context_i)        (nats per token)
    perplexity = exp(loss),   bits per token = loss / ln 2

For a document corpus (``names``) each document is scored from its boundary token to its closing
boundary, padding excluded: makemore's per-character loss over the split. For a token stream the
split is cut into consecutive windows of block_size tokens, each scored from its own start (so the
first tokens of a window see a short context). For a char-level run a token is a character, and
bits per token are bits per character.
"""
from __future__ import annotations

import math
from pathlib import Path

from scratchlm import backend
from scratchlm.errors import UserError


def whole_split_loss(model, task, split: str, batch_size: int, block_size: int) -> tuple[float, int]:
    """(mean loss per predicted token, number of predicted tokens) over every example of ``split``."""
    from scratchlm.tensor import no_grad
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for batch, n in task.whole_split(split, batch_size, block_size):
                loss = task.loss(model, batch)                     # mean over the batch's n targets
                total += float(backend.to_numpy(loss.data)) * n
                count += n
    finally:
        model.train(was_training)
    return total / count, count


def evaluate_run(run_dir, split: str = "val", batch_size: int | None = None, write: bool = True,
                 log=print) -> dict:
    """Score ``split`` of the run in ``run_dir``; writes ``eval.json`` there (with ``write``). A
    translation run also gives ``log`` its BLEU, chrF, ROUGE-L and exact-match line (greedy and
    beam 4; ``log=None``: silent)."""
    from scratchlm.checkpoint import read_json, write_json_atomic
    from scratchlm.data import load_corpus
    from scratchlm.metrics import perplexity
    from scratchlm.runs import load_model
    from scratchlm.tasks import make_task
    run_dir = Path(run_dir)
    from scratchlm.runs import read_run_config
    if read_run_config(run_dir).get("model") == "seq2seq":                 # translation: BLEU & co.
        from scratchlm.pairs import evaluate_translation
        return evaluate_translation(run_dir, split, batch_size, write, log=log)
    if (run_dir / "best.safetensors").exists() and "label_names" in read_json(run_dir / "config.json").get("data", {}):
        raise UserError(f"{run_dir} is a classifier run: its test-split accuracy, precision, recall and F1 are in "
                        f"{run_dir / 'eval.json'} (written by scratchlm classify); label text with "
                        f"scratchlm classify --run {run_dir} \"TEXT\"")
    model, tokenizer, header = load_model(run_dir)
    data, train = header["data"], header["train"]
    splits = data.get("splits", ["train", "val"])
    if split not in splits:
        raise UserError(f"run {run_dir} was trained on {data.get('corpus_name', '?')!r}, which has no {split!r} "
                        f"split (it has {', '.join(splits)}); corpora with a fixed split, such as names, have "
                        f"a test split; use --split val")
    corpus = load_corpus(data["corpus"])
    if data.get("corpus_sha256") not in (None, corpus.sha256):
        raise UserError(f"the corpus {data['corpus']!r} differs from the one run {run_dir} was trained on; "
                        f"evaluate with the original file")
    task = make_task(corpus, tokenizer)
    block_size = int(train.get("block_size", 64))
    batch_size = batch_size or max(32, int(train.get("batch_size", 32)))
    loss, count = whole_split_loss(model, task, split, batch_size, block_size)
    report = {"run": str(run_dir), "model": header["model"] if isinstance(header["model"], str) else "gpt",
              "split": split, "corpus": data.get("corpus_name"), "tokens": count, "loss": loss,
              "perplexity": perplexity(loss), "bits_per_token": loss / math.log(2)}
    if data.get("tokenizer") == "char":
        report["bits_per_char"] = report["bits_per_token"]
    if write:
        path = run_dir / "eval.json"
        previous = read_json(path) if path.exists() else {}
        results = previous if isinstance(previous, dict) else {}
        results[split] = report                              # one entry per split evaluated
        write_json_atomic(path, results)
    return report
