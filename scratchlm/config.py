"""A run's configuration: the ``TrainConfig`` dataclass, ``--set key=value`` overrides and presets.

    from scratchlm.config import TrainConfig, apply_overrides, load_preset
    config = apply_overrides(load_preset("nano-cpu"), ["learning_rate=3e-4", "max_iters=500"])

Keys are nanoGPT's. Every value is converted to its field's type (``"2e3"`` is a fine int, ``"on"``
a fine bool) and checked by ``TrainConfig.validate``; an unknown key or a bad value is a
``UserError`` naming the key (with a did-you-mean) and the fix. A preset is a JSON file in
``scratchlm/presets/`` whose ``"config"`` section overrides ``TrainConfig``'s defaults.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


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
    gradient_accumulation_steps: int = 1  # the total over all ranks (scratchlm.distributed)
    zero_stage: int = 0                   # 1: the optimizer moments sharded across ranks (ZeRO-1)
    ddp_bucket_mb: float = 1.0            # gradient all-reduce buckets, started during the backward; 0: one at the end
    # evaluation, logging, reproducibility, hardware
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    seed: int = 1337
    backend: str = "numpy"                # "numpy" | "cupy"
    dtype: str = "float32"                # "bfloat16": bf16 matmul inputs, fp32 the rest (scratchlm.precision; GPU only)

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
        if self.zero_stage not in (0, 1):
            raise UserError(f"config key zero_stage must be 0 or 1 (ZeRO-1: shard the optimizer moments), "
                            f"got {self.zero_stage}")
        if not self.ddp_bucket_mb >= 0:
            raise UserError(f"config key ddp_bucket_mb must be >= 0 (MB per gradient bucket; 0: one all-reduce "
                            f"after the backward), got {self.ddp_bucket_mb}")
        if self.backend not in ("numpy", "cupy"):
            raise UserError(f"config key backend must be 'numpy' or 'cupy', got {self.backend!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"config key dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.dtype == "bfloat16" and self.backend != "cupy":
            raise UserError("bfloat16 is GPU-only; CPU trains in float32 (drop --set dtype=bfloat16, or train "
                            "on a GPU with --backend cupy)")
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
        return parse_int(value, f"{where}: {key}")
    if kind is float:
        return parse_float(value, f"{where}: {key}")
    if not isinstance(value, str):
        raise UserError(f"{problem}; write a word such as {getattr(TrainConfig, key)!r}")
    return value.strip()


def parse_int(value: Any, what: str, minimum: int | None = None) -> int:
    """The one whole-number parser of the command line and of configs: ``2000``, ``"2000"``,
    ``"2e3"``, ``"2_000"`` are all 2000; ``"2.5"``, ``True``, ``"lots"`` are refused, naming ``what``
    (a flag such as ``--max-new-tokens`` or a config key)."""
    problem = f"{what}={value!r} is not a valid int; write a whole number such as 2000"
    if isinstance(value, bool):
        raise UserError(problem)
    if isinstance(value, int):
        number = value
    else:
        try:
            as_float = float(str(value).strip().replace("_", ""))     # accepts "2000", "2e3", "2_000"
        except ValueError:
            raise UserError(problem) from None
        if not as_float.is_integer():
            raise UserError(problem)
        number = int(as_float)
    if minimum is not None and number < minimum:
        raise UserError(f"{what} must be >= {minimum}, got {number}")
    return number


def parse_float(value: Any, what: str) -> float:
    """The one real-number parser: ``3e-4``, ``"0.8"``; NaN and infinities are refused."""
    problem = f"{what}={value!r} is not a valid float"
    if isinstance(value, bool):
        raise UserError(f"{problem}; write a number such as 3e-4")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise UserError(f"{problem}; write a number such as 3e-4") from None
    if not math.isfinite(number):
        raise UserError(f"{problem}; write a finite number")
    return number


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
    """The preset's TrainConfig (preset values are overrides of TrainConfig's defaults). GPT presets
    only: another family's preset goes through ``scratchlm.models.registry.resolve_config``."""
    data = read_preset(name)
    if data.get("model", "gpt") != "gpt":
        raise UserError(f"preset {name} is for model {data['model']}, not the GPT; "
                        f"use it with scratchlm train --model {data['model']} --preset {name}")
    return TrainConfig.from_dict(data["config"], where=f"preset {name}")
