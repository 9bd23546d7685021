"""What a run needs before its first step, read and checked without writing anything: the
config against the backend, on ``--resume`` the saved run (same model, same architecture, a
``max_iters`` beyond the saved iteration, an intact metrics file, the same corpus by sha256), the
corpus, the tokenizer (built, or the run's), and the task that hands out batches.
``scratchlm.train.train`` calls ``prepare_run`` inside the run guard's validation step, so a refused
call leaves the run folder as it was.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from scratchlm import backend
from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.runs import read_run_config


def prepare_run(config, run_dir, corpus, tokenizer, resume, progress, cache_dir, model, model_config) -> dict:
    """The checks and the data of ``train``, reading only: nothing in ``run_dir`` is written."""
    from scratchlm.checkpoint import read_json
    from scratchlm.data import REGISTRY, load_corpus
    from scratchlm.models.registry import DEFAULT_MODEL, get_family, run_model
    from scratchlm.runs import read_metrics
    from scratchlm.tasks import make_task, split_sizes
    from scratchlm.tokenizers import load as load_tokenizer, make_tokenizer
    config.validate()
    try:
        backend.use_backend(config.backend)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    if resume:
        header = read_run_config(run_dir)
        saved = TrainConfig.from_dict(header["train"], where=f"{run_dir}/config.json")
        family, saved_model = run_model(header, where=f"{run_dir}/config.json")
        if model is not None and model != family.name:
            raise UserError(f"{run_dir} holds a {family.name} run, not {model}; --resume keeps the run's model")
        if model_config and family.config_class is not None:
            saved_dict = saved_model.to_dict()
            for key, value in model_config.items():
                if saved_dict.get(key) != value:
                    raise UserError(f"--resume cannot change the architecture ({key}: {saved_dict.get(key)!r} "
                                    f"in the run, {value!r} now); start a new run instead")
        keys = TrainConfig.MODEL_KEYS if family.config_class is None else ("block_size",)
        changed = [k for k in keys if getattr(saved, k) != getattr(config, k)]
        if changed:
            raise UserError(f"--resume cannot change the architecture ({changed[0]}: {getattr(saved, changed[0])!r} "
                            f"in the run, {getattr(config, changed[0])!r} now); start a new run instead")
        model, model_config = family.name, (None if family.config_class is None else saved_model)
        state = read_json(run_dir / "trainer.json")
        iteration = state.get("iteration") if isinstance(state, dict) else None
        if isinstance(iteration, int) and config.max_iters <= iteration:
            raise UserError(f"the run is at iteration {iteration}; --iters (max_iters, now {config.max_iters}) "
                            f"must be larger to train on, e.g. --iters {max(2 * iteration, iteration + 1)}")
        read_metrics(run_dir / "metrics.jsonl")            # a damaged file is refused before anything changes
        if corpus is None:
            corpus = header["data"].get("corpus")
            if (isinstance(corpus, str) and corpus not in REGISTRY and not Path(corpus).expanduser().exists()):
                raise UserError(f"this run's corpus {corpus} is not there any more (moved, or a relative path "
                                f"from another folder); pass --corpus PATH")
        tokenizer = header["data"].get("tokenizer", tokenizer)         # the run's spec, not the default
        tok = load_tokenizer(run_dir / "tokenizer.json")
    else:
        model = get_family(model or DEFAULT_MODEL).name
        own_command = {"classify": f"scratchlm classify --model {model}", "pairs": "scratchlm translate train"}
        if get_family(model).data in own_command:      # labelled sentences or sentence pairs, not a corpus
            raise UserError(f"model {model} trains on its own data; use {own_command[get_family(model).data]}")
        if corpus is None:
            raise UserError("no corpus given; pass --corpus NAME|PATH (e.g. --corpus pydoc)")
    text = corpus if hasattr(corpus, "text") else load_corpus(corpus)
    if getattr(text, "skipped", None):            # a note, not an error: the rest of the folder is used
        print(f"note: skipped {len(text.skipped)} file(s) of {text.source}: {'; '.join(text.skipped)}",
              file=sys.stderr)
    if resume and header["data"].get("corpus_sha256") not in (None, text.sha256):
        raise UserError(f"the corpus {text.name!r} differs from the one this run was trained on "
                        f"(sha256 {text.sha256[:12]}.. vs {header['data']['corpus_sha256'][:12]}..)")
    if not resume:
        tok = make_tokenizer(tokenizer, text.text, progress=bool(progress))
        _note_smaller_vocabulary(tokenizer, tok)
    task = make_task(text, tok, cache_dir=cache_dir)
    data_info = {"corpus": _corpus_spec(corpus, text), "corpus_name": text.name, "corpus_sha256": text.sha256,
                 "tokenizer": tokenizer, "split": getattr(text, "split", None), "splits": list(task.splits),
                 **split_sizes(task)}
    return {"tok": tok, "task": task, "data_info": data_info, "model": model, "model_config": model_config}


def _note_smaller_vocabulary(spec: str, tok) -> None:
    """``bpe:N`` on a small corpus runs out of pairs to merge before N tokens: say what it got."""
    from scratchlm.tokenizers import DEFAULT_BPE_VOCAB
    kind, _, arg = spec.strip().lower().partition(":")
    if kind == "bpe":
        asked = int(arg) if arg else DEFAULT_BPE_VOCAB
        if tok.vocab_size < asked:
            print(f"note: --tokenizer {spec} asked for {asked:,} tokens; this corpus has pairs to merge for only "
                  f"{tok.vocab_size:,}, so the vocabulary is {tok.vocab_size:,}", file=sys.stderr)


def _corpus_spec(corpus, text) -> str:
    """What config.json records to find the corpus again: a registered name as is, a path resolved
    (so ``--resume`` works from any folder)."""
    from scratchlm.data import REGISTRY
    if isinstance(corpus, str) and corpus in REGISTRY:
        return corpus
    if isinstance(corpus, (str, os.PathLike)):
        return str(Path(corpus).expanduser().resolve())
    return str(getattr(corpus, "source", text.name))


class _RandomIdsTokenizer:
    """What the Trainer needs of a tokenizer when the data is random ids: a size and a save()."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def save(self, path) -> None:
        import json
        Path(path).write_text(json.dumps({"type": "random-ids", "vocab_size": self.vocab_size}))


def random_tokens_trainer(config, vocab_size: int, run_dir, seed: int = 0):
    """A Trainer whose data is a stream of uniformly random token ids, for timing its steps: the
    speed of ``Trainer.train_step`` does not depend on the text (``scratchlm bench`` and
    bench/train.py). ``run_dir`` gets the run's files, as any run's; pass a temporary folder."""
    import numpy as np
    from types import SimpleNamespace
    from scratchlm.train import Trainer
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=1_000_000).astype(dtype)
    return Trainer(config, _RandomIdsTokenizer(vocab_size), SimpleNamespace(train=tokens, val=tokens), run_dir,
                   progress=False)
