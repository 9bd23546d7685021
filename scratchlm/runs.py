"""The run folder: what ``scratchlm train`` writes, and reading it back to resume or to sample.

A run folder holds everything needed to continue it or sample from it, and nothing is pickled:

    config.json            {"model": family name, "model_config": its config, "train": TrainConfig,
                            "data": corpus + tokenizer spec + split sizes}; the older layout
                            {"model": GPTConfig, ...} reads as a GPT run
    tokenizer.json         the tokenizer, as JSON
    model.safetensors      the weights (Hugging Face GPT-2 names); metadata: iteration
    optimizer.safetensors  AdamW moments (exp_avg, exp_avg_sq) per parameter; metadata: iteration
    trainer.json           iteration, best val loss, seed, sampler, optimizer scalars (lr, step counts)
    metrics.jsonl          one JSON object per line: {"kind": "train", "iter", "train_loss", "lr", ...}
                           and, at each eval, {"kind": "eval", "iter", "train_loss", "val_loss", "perplexity"}
    loss.png               the loss curves (when matplotlib is installed)

    from scratchlm.runs import load_model
    model, tokenizer, header = load_model("runs/nano")    # weights loaded, eval mode

The byte formats (safetensors, atomic JSON) live in ``scratchlm.checkpoint``; this module knows
which file holds what, and refuses a folder whose files disagree.
"""
from __future__ import annotations

import json
from pathlib import Path

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError

RUN_FORMAT = "scratchlm.run/1"
TRAINER_FORMAT = "scratchlm.trainer/1"
RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors", "trainer.json")


def write_run_header(run_dir: Path, config: TrainConfig, model_config, tokenizer, data: dict,
                     model: str = "gpt") -> None:
    """config.json and tokenizer.json, when a run starts (config.json again on resume: new max_iters...).
    ``model`` is the family name (``scratchlm.models.registry``), ``model_config`` its config object."""
    from scratchlm.checkpoint import write_json_atomic
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(run_dir / "tokenizer.json")
    write_json_atomic(run_dir / "config.json", {"format": RUN_FORMAT, "model": model,
                                                "model_config": model_config.to_dict(),
                                                "train": config.to_dict(), "data": data})


def read_run_config(run_dir) -> dict:
    from scratchlm.checkpoint import read_json
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; pass the folder scratchlm train wrote (--out)")
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; train one with scratchlm train --out {run_dir}")
    header = read_json(run_dir / "config.json")
    if not isinstance(header, dict) or header.get("format") != RUN_FORMAT:
        raise UserError(f"{run_dir}/config.json is not a scratchlm run config (format "
                        f"{header.get('format') if isinstance(header, dict) else None!r}, expected {RUN_FORMAT!r})")
    if not isinstance(header.get("model"), (dict, str)):
        raise UserError(f"{run_dir}/config.json lacks its 'model' section; the file is damaged")
    for key in ("train", "data"):
        if not isinstance(header.get(key), dict):
            raise UserError(f"{run_dir}/config.json lacks its {key!r} section; the file is damaged")
    return header


def model_config_of(run_dir, header: dict):
    """(model family, its config object) of a run (``registry.run_model``: the old layout reads as
    the GPT); a damaged "model" section is an error naming config.json."""
    from scratchlm.models.registry import run_model
    try:
        return run_model(header, where=f"{Path(run_dir) / 'config.json'}")
    except (UserError, TypeError) as exc:
        raise UserError(f"{Path(run_dir) / 'config.json'} is damaged: {exc}") from None


def save_checkpoint(run_dir: Path, model, optimizer, state: dict) -> None:
    """Weights, optimizer moments, then trainer.json -- each file atomic, trainer.json last.

    Every file carries the iteration; ``load_checkpoint`` refuses a set whose iterations differ (a
    save that died half-way), so a folder is either the old checkpoint or the new one in effect.
    """
    from scratchlm.checkpoint import save_safetensors, write_json_atomic
    tag = {"iteration": str(state["iteration"])}
    save_safetensors(run_dir / "model.safetensors", model.state_dict(), metadata=tag)
    scalars, arrays = optimizer.state_dict()
    save_safetensors(run_dir / "optimizer.safetensors", arrays, metadata=tag)
    write_json_atomic(run_dir / "trainer.json", {**state, "optimizer": scalars})


def load_weights(run_dir: Path, model) -> int:
    """Load model.safetensors into ``model``; returns the iteration it was saved at."""
    from scratchlm.checkpoint import load_safetensors
    tensors, metadata = load_safetensors(run_dir / "model.safetensors")
    try:
        model.load_state_dict(tensors, strict=True)
    except UserError as exc:
        raise UserError(f"{run_dir}/model.safetensors does not fit this model: {exc}") from None
    return _iteration_tag(metadata, run_dir / "model.safetensors")


def _iteration_tag(metadata: dict, where) -> int:
    try:
        return int(metadata["iteration"])
    except (KeyError, ValueError):
        raise UserError(f"{where} has no iteration in its metadata; it was not saved by scratchlm train") from None


def load_checkpoint(run_dir: Path, model, optimizer) -> dict:
    """Restore model and optimizer from ``run_dir``; returns trainer.json's state."""
    from scratchlm.checkpoint import load_safetensors, read_json
    state = read_json(run_dir / "trainer.json")
    if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
        raise UserError(f"{run_dir}/trainer.json is not a scratchlm trainer state; the run folder is damaged")
    iteration = state.get("iteration")
    if not isinstance(iteration, int) or not isinstance(state.get("optimizer"), dict):
        raise UserError(f"{run_dir}/trainer.json lacks its iteration or optimizer state; the file is damaged")
    model_iteration = load_weights(run_dir, model)
    arrays, metadata = load_safetensors(run_dir / "optimizer.safetensors")
    optimizer_iteration = _iteration_tag(metadata, run_dir / "optimizer.safetensors")
    if not model_iteration == optimizer_iteration == iteration:
        raise UserError(f"{run_dir} holds files of different iterations (model {model_iteration}, optimizer "
                        f"{optimizer_iteration}, trainer {iteration}): a save was cut short; start a new run")
    optimizer.load_state_dict(state["optimizer"], arrays)
    return state


# How long a reader waits for a save in progress to finish (model.safetensors renamed, trainer.json
# not yet): a save takes milliseconds to seconds, so this is generous.
CONSISTENT_READ_TIMEOUT_S = 10.0


def read_consistent(run_dir: Path, model, timeout_s: float = CONSISTENT_READ_TIMEOUT_S) -> dict | None:
    """Load model.safetensors into ``model`` so that it matches trainer.json; returns trainer.json's
    state (None for a folder without one: a bare model).

    A training saves model.safetensors, then optimizer.safetensors, then trainer.json, each by an
    atomic rename, each tagged with the iteration. A reader that lands between two renames sees
    the model of iteration k+1 and the trainer state of k: it reads both again until the tags
    agree (every file it read is whole; only the set can be mixed) -- but only while a writer
    holds the folder's lock. With no writer (or still after ``timeout_s``) the save was cut short
    (the process was killed between two renames); the model file is whole, so it is used, with a
    note on stderr.
    """
    import sys
    import time
    from scratchlm.checkpoint import read_json
    from scratchlm.runguard import writer_active
    deadline = time.monotonic() + timeout_s
    while True:
        trainer = run_dir / "trainer.json"
        state = read_json(trainer) if trainer.exists() else None
        iteration = load_weights(run_dir, model)
        saved = state.get("iteration") if isinstance(state, dict) else None
        if saved is None or saved == iteration:
            return state
        if not writer_active(run_dir) or time.monotonic() > deadline:
            print(f"note: {run_dir}: model.safetensors is of iteration {iteration}, trainer.json of {saved} "
                  f"(a save was cut short); using the model", file=sys.stderr)
            return state
        time.sleep(0.05)


def load_model(run_dir, seed: int = 0):
    """(model, tokenizer, run config) of a saved run, weights loaded, in eval mode -- for sampling.
    Any model family (config.json names it; ``scratchlm.models.registry``). The run config gains
    ``"iteration"``: that of the weights (see ``read_consistent``)."""
    from scratchlm.models.registry import build_model
    from scratchlm.tokenizers import load as load_tokenizer
    run_dir = Path(run_dir)
    header = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    family, model_config = model_config_of(run_dir, header)
    model = build_model(family.name, model_config, seed=seed)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise UserError(f"{run_dir}: the model has {model.config.vocab_size} tokens but tokenizer.json has "
                        f"{tokenizer.vocab_size}; the files come from different runs")
    state = read_consistent(run_dir, model)
    header = {**header, "iteration": state.get("iteration") if isinstance(state, dict) else None}
    model.eval()
    return model, tokenizer, header


# ================================================================ metrics and the loss plot

def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl. A cut-off last line (the process died mid-write) is dropped;
    a bad line elsewhere means the file was edited or damaged: a UserError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    # split the bytes, not the text: one line of bad UTF-8 is that line's problem, like bad JSON
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not UTF-8 JSON; repair or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            raise UserError(f"{path} line {number} is not a metrics record (no integer 'iter'); repair or delete it")
        records.append(record)
    return records


def keep_metrics_before(path: Path, iteration: int) -> list[dict]:
    """On resume: drop lines logged after the checkpoint (they will be logged again, identically)."""
    kept = [m for m in read_metrics(path)
            if m["iter"] < iteration or (m["iter"] == iteration and m.get("kind") == "eval")]
    from scratchlm.checkpoint import atomic_write_bytes
    atomic_write_bytes(path, "".join(json.dumps(m) + "\n" for m in kept).encode("utf-8"))
    return kept


def plot_losses(run_dir: Path) -> str:
    """Write loss.png (train loss per iteration, eval train/val losses); returns a one-line note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss.png skipped: matplotlib is not installed (pip install 'scratchlm[plot]')"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    train = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["iter"] for m in train], [m["train_loss"] for m in train], lw=0.8, alpha=0.5, label="train (batch)")
    if evals:
        ax.plot([m["iter"] for m in evals], [m["train_loss"] for m in evals], "o-", label="train (eval)")
        ax.plot([m["iter"] for m in evals], [m["val_loss"] for m in evals], "o-", label="val")
    ax.set(xlabel="iteration", ylabel="cross-entropy loss (nats/token)", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    return f"wrote {run_dir / 'loss.png'}"
