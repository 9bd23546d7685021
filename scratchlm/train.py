"""The training loop: batches in, loss down, checkpoints out -- and a run that can be resumed exactly.

    from scratchlm.train import TrainConfig, load_preset, train
    config = load_preset("nano-cpu")                      # a TrainConfig
    result = train(config, out_dir="runs/nano", corpus="tinyshakespeare", tokenizer="char")

A run folder holds everything needed to continue it or sample from it, and nothing is pickled:

    config.json            {"model": GPTConfig, "train": TrainConfig, "data": corpus + tokenizer spec}
    tokenizer.json         the tokenizer, as JSON
    model.safetensors      the weights (Hugging Face GPT-2 names); metadata: iteration
    optimizer.safetensors  AdamW moments (exp_avg, exp_avg_sq) per parameter; metadata: iteration
    trainer.json           iteration, best val loss, seed, sampler, optimizer scalars (lr, step counts)
    metrics.jsonl          one JSON object per line: {"kind": "train", "iter", "train_loss", "lr", ...}
                           and, at each eval, {"kind": "eval", "iter", "train_loss", "val_loss", "perplexity"}
    loss.png               the loss curves (when matplotlib is installed)

Why resuming is exact. Everything random in iteration ``it`` is derived from ``(seed, it)``: the
batches come from ``BatchSampler.batch(it * accum + micro)`` (its generator is seeded with the pair)
and dropout draws from a generator re-seeded with ``backend.step_seed(seed, it)`` at the top of
the iteration. So there is no RNG state to save (CuPy's cannot be saved anyway); the model
weights, the optimizer moments and step counts, and the iteration number are the whole state, and
a resumed run computes the same float32 numbers in the same order as an uninterrupted one.

Iteration ``it`` (nanoGPT's order):
    1. every ``eval_interval`` iterations (and at the end): evaluate, log, save a checkpoint;
    2. lr <- schedule(it); for each of ``gradient_accumulation_steps`` micro-batches:
       loss = model(x, y) / accum; loss.backward()          (gradients add up: the mean)
    3. clip the global gradient norm to ``grad_clip``; AdamW step; zero the gradients.
A checkpoint taken "at iteration k" holds the state after k completed iterations.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm import backend
from scratchlm.errors import UserError

RUN_FORMAT = "scratchlm.run/1"
TRAINER_FORMAT = "scratchlm.trainer/1"
PRESET_DIR = Path(__file__).parent / "presets"
RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "optimizer.safetensors", "trainer.json")


# ================================================================ configuration

@dataclass
class TrainConfig:
    """Every knob of a run. Keys are nanoGPT's, so ``--set learning_rate=3e-4`` means what it says there."""
    # data
    batch_size: int = 12
    block_size: int = 64
    # model (GPTConfig; vocab_size comes from the tokenizer)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    positional: str = "learned"           # "learned" | "sinusoidal"
    # AdamW and the learning-rate schedule (linear warmup, cosine decay to min_lr)
    learning_rate: float = 1e-3
    max_iters: int = 2000
    decay_lr: bool = True                 # False: constant learning_rate
    lr_decay_iters: int = 2000
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0                # 0 turns clipping off
    gradient_accumulation_steps: int = 1
    # evaluation, logging, reproducibility, hardware
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    seed: int = 1337
    backend: str = "numpy"                # "numpy" | "cupy"

    MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "positional")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        """A TrainConfig from a dict of (possibly partial) overrides; unknown keys are refused by name."""
        config = cls()
        for key, value in d.items():
            config = config.with_value(key, value, where)
        config.validate()
        return config

    def with_value(self, key: str, value: Any, where: str = "--set") -> "TrainConfig":
        """A copy with ``key`` set to ``value`` (a string is parsed into the field's type)."""
        types = field_types()
        if key not in types:
            raise UserError(f"{where}: unknown config key {key!r}{_did_you_mean(key, types)}; "
                            f"known keys: {', '.join(types)}")
        return dataclasses.replace(self, **{key: _convert(key, value, types[key], where)})

    def validate(self) -> "TrainConfig":
        """Refuse values no run can use, with the key and the fix in one line."""
        positive = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval")
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"config key {key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "seed"):
            if getattr(self, key) < 0:
                raise UserError(f"config key {key} must be >= 0, got {getattr(self, key)}")
        for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"config key {key} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"config key dropout must be in [0, 1), got {self.dropout}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"config key {key} must be in [0, 1), got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                            f"each head gets n_embd / n_head channels; e.g. --set n_head=4")
        if self.decay_lr and self.lr_decay_iters < self.warmup_iters:
            raise UserError(f"lr_decay_iters ({self.lr_decay_iters}) must be >= warmup_iters "
                            f"({self.warmup_iters}); raise lr_decay_iters")
        if self.positional not in ("learned", "sinusoidal"):
            raise UserError(f"config key positional must be 'learned' or 'sinusoidal', got {self.positional!r}")
        if self.backend not in ("numpy", "cupy"):
            raise UserError(f"config key backend must be 'numpy' or 'cupy', got {self.backend!r}")
        return self

    def model_config(self, vocab_size: int):
        """The GPTConfig this run trains (vocab_size from its tokenizer)."""
        from scratchlm.models import GPTConfig
        return GPTConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in self.MODEL_KEYS})


def field_types() -> dict[str, type]:
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: hints[f.type] if isinstance(f.type, str) else f.type for f in dataclasses.fields(TrainConfig)}


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(key: str, value: Any, kind: type, where: str):
    """``value`` (a string from the command line, or a JSON value from a preset) as a ``kind``."""
    problem = f"{where}: {key}={value!r} is not a valid {kind.__name__}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{problem}; write true or false")
    if kind is int:
        if isinstance(value, bool):
            raise UserError(f"{problem}; write a whole number such as 2000")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).strip().replace("_", ""))     # accepts "2000", "2e3", "2_000"
        except ValueError:
            raise UserError(f"{problem}; write a whole number such as 2000") from None
        if not number.is_integer():
            raise UserError(f"{problem}; write a whole number such as 2000")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise UserError(f"{problem}; write a number such as 3e-4")
        try:
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise UserError(f"{problem}; write a number such as 3e-4") from None
        if not math.isfinite(number):
            raise UserError(f"{problem}; write a finite number")
        return number
    if not isinstance(value, str):
        raise UserError(f"{problem}; write a word such as {getattr(TrainConfig, key)!r}")
    return value.strip()


def parse_overrides(pairs) -> list[tuple[str, str]]:
    """``["lr=1", "a=b=c"]`` -> ``[("lr", "1"), ("a", "b=c")]``; a pair without ``=`` is refused."""
    out = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {pair!r} is not key=value; write e.g. --set learning_rate=3e-4")
        out.append((key.strip(), value))
    return out


def apply_overrides(config: TrainConfig, pairs) -> TrainConfig:
    for key, value in parse_overrides(pairs):
        config = config.with_value(key, value, where="--set")
    return config.validate()


# ---------------------------------------------------------------- presets

def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_preset(name: str) -> dict:
    """The preset file: {"description": ..., "vocab_size": typical vocab (for summaries), "config": {...}}."""
    path = PRESET_DIR / f"{name}.json"
    if not name or "/" in name or not path.is_file():
        raise UserError(f"unknown preset {name!r}{_did_you_mean(name, preset_names())}; "
                        f"presets: {', '.join(preset_names())}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_preset(name: str) -> TrainConfig:
    """The preset's TrainConfig (preset values are overrides of TrainConfig's defaults)."""
    return TrainConfig.from_dict(read_preset(name)["config"], where=f"preset {name}")


# ================================================================ the run folder

def write_run_header(run_dir: Path, config: TrainConfig, model_config, tokenizer, data: dict) -> None:
    """config.json and tokenizer.json, when a run starts (config.json again on resume: new max_iters...)."""
    from scratchlm.checkpoint import write_json_atomic
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(run_dir / "tokenizer.json")
    write_json_atomic(run_dir / "config.json", {"format": RUN_FORMAT, "model": model_config.to_dict(),
                                                "train": config.to_dict(), "data": data})


def read_run_config(run_dir) -> dict:
    from scratchlm.checkpoint import read_json
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; train one with scratchlm train --out {run_dir}")
    header = read_json(run_dir / "config.json")
    if not isinstance(header, dict) or header.get("format") != RUN_FORMAT:
        raise UserError(f"{run_dir}/config.json is not a scratchlm run config (format "
                        f"{header.get('format') if isinstance(header, dict) else None!r}, expected {RUN_FORMAT!r})")
    for key in ("model", "train", "data"):
        if not isinstance(header.get(key), dict):
            raise UserError(f"{run_dir}/config.json lacks its {key!r} section; the file is damaged")
    return header


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


def load_model(run_dir, seed: int = 0):
    """(model, tokenizer, run config) of a saved run, weights loaded, in eval mode -- for sampling."""
    from scratchlm.models import GPT, GPTConfig
    from scratchlm.tokenizers import load as load_tokenizer
    run_dir = Path(run_dir)
    header = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model = GPT(GPTConfig.from_dict(header["model"]), seed=seed)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise UserError(f"{run_dir}: the model has {model.config.vocab_size} tokens but tokenizer.json has "
                        f"{tokenizer.vocab_size}; the files come from different runs")
    load_weights(run_dir, model)
    model.eval()
    return model, tokenizer, header


# ================================================================ metrics and plots

def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl. A cut-off last line (the process died mid-write) is dropped;
    a bad line elsewhere means the file was edited or damaged: a UserError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not JSON; repair or delete that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            raise UserError(f"{path} line {number} is not a metrics record (no integer 'iter'); repair or delete it")
        records.append(record)
    return records


def _keep_metrics_before(path: Path, iteration: int) -> list[dict]:
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


def peak_flops() -> float | None:
    """Peak FLOP/s of the device, for MFU: $SCRATCHLM_PEAK_FLOPS, else a table of NVIDIA GPUs, else None.

    GPU peaks are dense float32 (or TF32 tensor-core when CUPY_TF32=1). A CPU's peak depends on
    its vector units and clocks, which we cannot read portably: set SCRATCHLM_PEAK_FLOPS for MFU.
    """
    if os.environ.get("SCRATCHLM_PEAK_FLOPS"):
        return float(os.environ["SCRATCHLM_PEAK_FLOPS"])
    if not backend.is_gpu():
        return None
    name = backend.xp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    tf32 = os.environ.get("CUPY_TF32") == "1"
    table = [("H100 PCIe", 51e12, 378e12), ("H100", 67e12, 495e12), ("H200", 67e12, 495e12),
             ("A100", 19.5e12, 156e12), ("L4", 30e12, 60e12), ("A10", 31e12, 62e12)]
    for key, fp32, tf32_peak in table:
        if key in name:
            return tf32_peak if tf32 else fp32
    return None


# ================================================================ the trainer

class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved (the command exits with 130)."""


class TrainingDiverged(UserError):
    """The loss (or the gradient norm) became NaN or infinite: the run stopped without saving it."""


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag the loop reads between iterations, so the checkpoint it saves
    is never a half-applied optimizer step. A second Ctrl-C interrupts at once (no save)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:          # not the main thread: Ctrl-C stays a plain KeyboardInterrupt
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _quiet_float_errors():
    import numpy as np
    return np.errstate(over="ignore", invalid="ignore")


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    best_val_loss: float | None
    last_val_loss: float | None
    elapsed_s: float


class Trainer:
    """Owns one run: the model, the optimizer, the samplers and the run folder.

    ``Trainer(config, tokenizer, prepared, run_dir).fit()``; see ``train()`` for the usual entry.
    """

    def __init__(self, config: TrainConfig, tokenizer, prepared, run_dir, data_info: dict | None = None,
                 resume: bool = False, progress: bool | None = None, log=print):
        from scratchlm.data import BatchSampler
        from scratchlm.models import GPT
        from scratchlm.optim import AdamW, constant_lr, cosine_with_warmup
        self.config, self.tokenizer, self.run_dir = config, tokenizer, Path(run_dir)
        self.progress, self.log = progress, log
        c = config
        self.model = GPT(c.model_config(tokenizer.vocab_size), seed=c.seed)
        self.params = list(self.model.parameters())
        self.optimizer = AdamW(self.model.configure_optimizer_groups(c.weight_decay), lr=c.learning_rate,
                               betas=(c.beta1, c.beta2), eps=1e-8, weight_decay=c.weight_decay)
        self.schedule = (cosine_with_warmup(c.learning_rate, c.warmup_iters, c.lr_decay_iters, c.min_lr)
                         if c.decay_lr else constant_lr(c.learning_rate))
        self.sampler = BatchSampler(prepared.train, c.batch_size, c.block_size, seed=c.seed, name="train split")
        # Evals draw the same eval_iters batches every time (fixed seeds), so evals are comparable.
        self.eval_samplers = {
            split: BatchSampler(tokens, c.batch_size, c.block_size, seed=c.seed + 1_000_000 + k, name=f"{split} split")
            for k, (split, tokens) in enumerate((("train", prepared.train), ("val", prepared.val)))}
        self.tokens_per_iter = c.batch_size * c.block_size * c.gradient_accumulation_steps
        self.flops_per_iter = self.model.flops_per_token() * self.tokens_per_iter
        self.peak = peak_flops()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.iteration, self.best_val_loss, self.last_val_loss, self.last_saved = 0, None, None, None
        self.evaluated_at: set[int] = set()
        if resume:
            state = load_checkpoint(self.run_dir, self.model, self.optimizer)
            write_run_header(self.run_dir, config, self.model.config, None, data_info or {})   # new max_iters etc.
            self.iteration, self.best_val_loss = state["iteration"], state.get("best_val_loss")
            self.last_val_loss, self.last_saved = state.get("last_val_loss"), state["iteration"]
            kept = _keep_metrics_before(self.metrics_path, self.iteration)
            self.evaluated_at = {m["iter"] for m in kept if m.get("kind") == "eval"}
        else:
            write_run_header(self.run_dir, config, self.model.config, tokenizer, data_info or {})
            self.metrics_path.write_text("", encoding="utf-8")

    # ------------------------------------------------------------ one iteration (the profiled part)

    def train_step(self, it: int) -> tuple[float, float | None, float]:
        """One optimizer step: (mean loss over the micro-batches, gradient norm before clipping, lr)."""
        c, accum = self.config, self.config.gradient_accumulation_steps
        backend.manual_seed(backend.step_seed(c.seed, it))          # dropout's draws for this step
        lr = self.schedule(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(accum):
            x, y = self.sampler.batch(it * accum + micro)           # (B, T), (B, T)
            _, loss = self.model(x, y)
            (loss / accum).backward()                               # grads add up to the mean's
            loss_sum = loss_sum + loss.data                         # stays on the device: no sync
        loss_value = float(loss_sum) / accum                        # the one host sync of the step
        grad_norm = None
        if c.grad_clip > 0:
            from scratchlm.optim import clip_grad_norm_
            grad_norm = clip_grad_norm_(self.params, c.grad_clip)
        if not (math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm))):
            self._diverged(it, loss_value, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss_value, grad_norm, lr

    def evaluate(self, interrupt: _DeferredInterrupt | None = None) -> dict[str, float] | None:
        """Mean loss over the same ``eval_iters`` batches of each split; None if Ctrl-C came meanwhile."""
        from scratchlm.tensor import no_grad
        self.model.eval()
        losses = {}
        try:
            with no_grad():
                for split, sampler in self.eval_samplers.items():
                    total = 0.0
                    for k in range(self.config.eval_iters):
                        if interrupt is not None and interrupt.requested:
                            return None
                        _, loss = self.model(*sampler.batch(k))
                        total = total + loss.data
                    losses[split] = float(total) / self.config.eval_iters
        finally:
            self.model.train()
        return losses

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        c, start = self.config, time.perf_counter()
        bar = self._progress_bar()
        try:
            with _DeferredInterrupt() as interrupt:
                it = self.iteration
                while True:
                    if (it % c.eval_interval == 0 or it == c.max_iters) and it not in self.evaluated_at:
                        losses = self.evaluate(interrupt)
                        if losses is None:
                            break
                        self._log_eval(it, losses, bar)
                        self._save(it)
                    if it >= c.max_iters or interrupt.requested:
                        break
                    t0 = time.perf_counter()
                    # overflow shows up as an inf/NaN loss, which train_step reports with the
                    # iteration; NumPy's RuntimeWarnings about it would only add noise
                    with _quiet_float_errors():
                        loss, grad_norm, lr = self.train_step(it)
                    backend.synchronize()
                    self._log_train(it, loss, grad_norm, lr, time.perf_counter() - t0, bar)
                    it += 1
                    self.iteration = it
                if interrupt.requested:
                    self._save(self.iteration)
                    self._finish_plot()
                    raise TrainingInterrupted(
                        f"interrupted: saved a checkpoint at iteration {self.iteration} in {self.run_dir}; "
                        f"continue with --resume --out {self.run_dir}")
        finally:
            if bar is not None:
                bar.close()
        self._finish_plot()
        return TrainResult(self.run_dir, self.iteration, self.best_val_loss, self.last_val_loss,
                           time.perf_counter() - start)

    # ------------------------------------------------------------ bookkeeping

    def _progress_bar(self):
        if self.progress is False:
            return None
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (logs, CI); lines are printed instead
        bar = tqdm(total=self.config.max_iters, initial=self.iteration, unit="it", dynamic_ncols=True,
                   disable=None if self.progress is None else False)
        return None if bar.disable else bar

    def _write_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _log_train(self, it, loss, grad_norm, lr, seconds, bar) -> None:
        tokens_per_s = self.tokens_per_iter / seconds
        mfu = self.flops_per_iter / seconds / self.peak if self.peak else None
        self._write_metrics({"kind": "train", "iter": it, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                             "ms_per_iter": 1000 * seconds, "tokens_per_s": tokens_per_s, "mfu": mfu})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif it % self.config.log_interval == 0 and self.progress is None:
            mfu_text = f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
            self.log(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, {1000 * seconds:.1f} ms/iter, "
                     f"{tokens_per_s:,.0f} tok/s{mfu_text}")

    def _log_eval(self, it, losses, bar) -> None:
        val = losses["val"]
        self.last_val_loss = val
        if self.best_val_loss is None or val < self.best_val_loss:
            self.best_val_loss = val
        self.evaluated_at.add(it)
        self._write_metrics({"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": val,
                             "perplexity": math.exp(min(val, 700.0)), "lr": self.schedule(it)})
        message = f"iter {it:>5}: train loss {losses['train']:.4f}, val loss {val:.4f}"
        if bar is not None:
            bar.write(message)
        elif self.progress is not False:
            self.log(message)

    def _save(self, it: int) -> None:
        save_checkpoint(self.run_dir, self.model, self.optimizer, {
            "format": TRAINER_FORMAT, "iteration": it, "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss, "seed": self.config.seed, "backend": backend.get_backend(),
            "tokens_seen": it * self.tokens_per_iter, "sampler": self.sampler.state_dict(),
            "rng": "none saved: iteration it draws from backend.step_seed(seed, it) and BatchSampler.batch(step)"})
        self.last_saved = it

    def _diverged(self, it, loss, grad_norm):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        where = (f"the last good checkpoint is {self.run_dir} (iteration {self.last_saved})"
                 if self.last_saved is not None else "no checkpoint was saved yet")
        raise TrainingDiverged(f"{what} at iteration {it}; stopped: {where}; lower learning_rate "
                               f"(now {self.config.learning_rate:g}) or grad_clip, or raise warmup_iters")

    def _finish_plot(self) -> None:
        note = plot_losses(self.run_dir)
        if self.progress is not False:
            self.log(note)


# ================================================================ the entry point

def train(config: TrainConfig, out_dir, corpus=None, tokenizer: str = "char", resume: bool = False,
          progress: bool | None = None, cache_dir=None, overwrite: bool = False, log=print) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run in ``out_dir``; see the module docstring.

    ``corpus`` is a registered name, a path, or a ``Corpus``; on resume it defaults to the run's.
    ``progress``: True/False forces the bar on/off; None shows it on a terminal and prints lines otherwise.
    """
    from scratchlm.data import load_corpus, prepare
    from scratchlm.tokenizers import load as load_tokenizer, make_tokenizer
    config.validate()
    run_dir = Path(out_dir)
    try:
        backend.use_backend(config.backend)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None

    if resume:
        header = read_run_config(run_dir)
        saved = TrainConfig.from_dict(header["train"], where=f"{run_dir}/config.json")
        changed = [k for k in TrainConfig.MODEL_KEYS if getattr(saved, k) != getattr(config, k)]
        if changed:
            raise UserError(f"--resume cannot change the architecture ({changed[0]}: {getattr(saved, changed[0])!r} "
                            f"in the run, {getattr(config, changed[0])!r} now); start a new run instead")
        corpus = corpus if corpus is not None else header["data"].get("corpus")
        tokenizer = header["data"].get("tokenizer", tokenizer)         # the run's spec, not the default
        tok = load_tokenizer(run_dir / "tokenizer.json")
    else:
        if (run_dir / "trainer.json").exists() and not overwrite:
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        if corpus is None:
            raise UserError("no corpus given; pass --corpus NAME|PATH (e.g. --corpus pydoc)")
    text = corpus if hasattr(corpus, "text") else load_corpus(corpus)
    if resume and header["data"].get("corpus_sha256") not in (None, text.sha256):
        raise UserError(f"the corpus {text.name!r} differs from the one this run was trained on "
                        f"(sha256 {text.sha256[:12]}.. vs {header['data']['corpus_sha256'][:12]}..)")
    if not resume:
        tok = make_tokenizer(tokenizer, text.text, progress=bool(progress))
    prepared = prepare(text, tok, cache_dir=cache_dir)
    data_info = {"corpus": corpus if isinstance(corpus, str) else str(getattr(corpus, "source", text.name)),
                 "corpus_name": text.name, "corpus_sha256": text.sha256, "tokenizer": tokenizer,
                 "train_tokens": int(len(prepared.train)), "val_tokens": int(len(prepared.val))}
    trainer = Trainer(config, tok, prepared, run_dir, data_info, resume=resume, progress=progress, log=log)
    if resume and progress is not False:
        log(f"resuming {run_dir} at iteration {trainer.iteration} of {config.max_iters}")
    return trainer.fit()
