"""The model families ``scratchlm train --model NAME`` knows: name -> config, constructor, data, presets.

    from scratchlm.models.registry import get_family, resolve_config, build_model
    family = get_family("lstm")
    train_config, model_dict = resolve_config(family, corpus="names", preset=None, overrides=["n_embd=64"])
    model = build_model("lstm", family.model_config(train_config, model_dict, vocab_size=27), seed=0)

One trainer serves every family (``scratchlm.train``); a family only says how to build its model.

- ``config``: the family's config dataclass (``to_dict`` / ``from_dict``), or None for the GPT,
  whose architecture keys (n_layer, n_head, n_embd, dropout, bias, positional, block_size) have
  always lived in ``TrainConfig`` (nanoGPT's flat key space; presets and old runs rely on it).
- ``data``: which batches it trains on. Every language model says ``"lm"``: batches of token ids
  ``(x, y)`` (B, T), y the next tokens, -100 where a document's padding is (see ``scratchlm.tasks``).
  Classifiers say ``"classify"`` (``scratchlm classify``; ``scratchlm.tasks.Classification``);
  the seq2seq family says ``"pairs"``: (src, tgt_in, tgt_out) batches (``scratchlm.pairs``). The
  families still to come (VAE, GAN) will name their own kind there.
- ``presets``: the preset chosen when ``--preset`` is not given: ``"<corpus>-<model>"`` if such a
  file exists in ``scratchlm/presets`` (e.g. ``names-lstm.json``), else the family's default.

``--set key=value`` (and a preset's ``"config"`` section) is routed by key: a key of the family's
config goes to the model, a training key (optimizer, schedule, eval, data) to ``TrainConfig``;
anything else is refused in one line that names the model and its keys. A key both have goes to
the model (the MLP's ``block_size`` is its context, makemore's name); ``train.KEY`` / ``model.KEY``
choose the side explicitly. The bigram and recurrent configs' ``block_size`` (their training
window) is not a model key: it is copied from ``TrainConfig.block_size`` (``Family.synced``).

A run's ``config.json`` records the family: ``{"model": "lstm", "model_config": {...}, "train":
{...}, "data": {...}}``. Runs written before the registry have ``"model": {GPTConfig}``; they
read as the GPT (``run_model``).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from scratchlm.config import PRESET_DIR, TrainConfig, apply_overrides, field_types, parse_overrides, read_preset
from scratchlm.errors import UserError

DEFAULT_MODEL = "gpt"


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_path: str                   # "module:Class" of the model, imported on first use
    config_path: str | None           # "module:Class" of its config dataclass; None = GPT (TrainConfig keys)
    fixed: dict = field(default_factory=dict)     # config values the family pins (e.g. the LSTM's cell)
    synced: tuple = ()                # model config keys copied from TrainConfig (the training window)
    data: str = "lm"
    default_preset: str | None = None

    # ------------------------------------------------------------ the pieces, imported lazily

    @property
    def model_class(self):
        return _import(self.model_path)

    @property
    def config_class(self):
        return _import(self.config_path) if self.config_path else None

    def config_keys(self) -> list[str]:
        """The keys ``--set`` may give this family's model (vocab_size comes from the tokenizer)."""
        if self.config_class is None:
            return list(TrainConfig.MODEL_KEYS)
        return [f.name for f in dataclasses.fields(self.config_class)      # num_classes: from the labels
                if f.name not in ("vocab_size", "num_classes") and f.name not in self.fixed and f.name not in self.synced]

    def preset_for(self, corpus) -> str | None:
        """``<corpus>-<model>`` when that preset exists, else the family's default (None: the defaults)."""
        if isinstance(corpus, str) and (PRESET_DIR / f"{corpus}-{self.name}.json").is_file():
            return f"{corpus}-{self.name}"
        return self.default_preset

    def model_config(self, train_config: TrainConfig, model_dict: dict, vocab_size: int):
        """The config object the model is built from."""
        if self.config_class is None:
            return train_config.model_config(vocab_size)
        synced = {key: getattr(train_config, key) for key in self.synced}
        return self.config_class.from_dict({**model_dict, **self.fixed, **synced, "vocab_size": vocab_size})


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_RNN = "scratchlm.models.rnn"
_CLS = "scratchlm.models.classifier"
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bigram", "a table of next-token logits per token (what counting bigrams gives)",
           f"{_RNN}:BigramLM", f"{_RNN}:BigramLMConfig", synced=("block_size",)),
    Family("mlp", "Bengio et al. 2003 / makemore: embeddings of the last block_size tokens, tanh layer, softmax",
           f"{_RNN}:MLPLM", f"{_RNN}:MLPLMConfig"),
    Family("rnn", "embedding -> Elman RNN stack -> linear head", f"{_RNN}:RNNLM", f"{_RNN}:RNNLMConfig",
           fixed={"cell": "rnn"}, synced=("block_size",)),
    Family("lstm", "embedding -> LSTM stack -> linear head", f"{_RNN}:RNNLM", f"{_RNN}:RNNLMConfig",
           fixed={"cell": "lstm"}, synced=("block_size",)),
    Family("gru", "embedding -> GRU stack -> linear head", f"{_RNN}:RNNLM", f"{_RNN}:RNNLMConfig",
           fixed={"cell": "gru"}, synced=("block_size",)),
    Family("gpt", "the decoder-only Transformer (GPT-2 layout)", "scratchlm.models.gpt:GPT", None,
           default_preset="nano-cpu"),
    # classifiers (scratchlm classify): labelled sentences, not token streams
    Family("bow", "classifier: bag of embeddings, masked mean/max pooling, linear head",
           f"{_CLS}:BagOfEmbeddings", f"{_CLS}:BagOfEmbeddingsConfig", data="classify", default_preset="sentiment-bow"),
    Family("bilstm", "classifier: bidirectional LSTM over real tokens, pooled or final states",
           f"{_CLS}:BiLSTM", f"{_CLS}:BiLSTMConfig", data="classify", default_preset="sentiment-bilstm"),
    Family("transformer-classifier", "classifier: Transformer encoder, [CLS] token or masked mean pooling",
           f"{_CLS}:TransformerClassifier", f"{_CLS}:TransformerClassifierConfig", data="classify",
           default_preset="sentiment-transformer-classifier"),
    Family("seq2seq", "the encoder-decoder Transformer (translation; scratchlm translate train)",
           "scratchlm.models.seq2seq:Seq2SeqTransformer", "scratchlm.models.seq2seq:Seq2SeqConfig", data="pairs"),
    Family("vae", "sentence VAE (Bowman et al. 2016): LSTM encoder -> Gaussian z -> LSTM decoder",
           "scratchlm.models.vae:SentenceVAE", "scratchlm.models.vae:VAEConfig", synced=("block_size",),
           data="sentences"),
    Family("gan", "SeqGAN: an LSTM LM generator against a CNN discriminator, policy gradient with rollouts",
           "scratchlm.models.gan:SeqGAN", "scratchlm.models.gan:GANConfig", synced=("block_size",),
           data="sentences"),
]}


def get_family(name) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model {name!r}; models: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ================================================================ configs: presets and --set routing

def train_keys(family: Family) -> list[str]:
    """TrainConfig keys this family's runs use (the GPT's architecture keys only for the GPT;
    block_size is a data key for every family: the length of the training windows)."""
    gpt_only = set(TrainConfig.MODEL_KEYS) - {"block_size"}
    return [k for k in field_types() if family.config_class is None or k not in gpt_only]


def route(family: Family, pairs, where: str = "--set") -> tuple[list[str], dict[str, Any]]:
    """Split ``key=value`` pairs into TrainConfig overrides and the family's model overrides.

    A key both have goes to the model (the MLP's block_size: its context k, makemore's name); write
    ``train.block_size`` for the training window then (``model.KEY`` / ``train.KEY`` force a side)."""
    model_keys, training = family.config_keys(), train_keys(family)
    train_pairs, model_values = [], {}
    for key, value in parse_overrides(pairs):
        side, dot, rest = key.partition(".")
        if dot and side in ("train", "model"):
            if side == "train" and rest in training:
                train_pairs.append(f"{rest}={value}")
                continue
            key = rest
        if family.config_class is not None and key in model_keys:
            model_values[key] = value
        elif key in training:
            train_pairs.append(f"{key}={value}")
        else:
            from scratchlm.config import _did_you_mean
            shadowed = [k for k in training if k in model_keys]
            also = f" (train.{shadowed[0]} sets the training one)" if shadowed else ""
            raise UserError(f"{where}: unknown config key {key!r}{_did_you_mean(key, model_keys + training)}; "
                            f"model {family.name} has the model keys {', '.join(model_keys)}{also} and the "
                            f"training keys {', '.join(k for k in training if k not in model_keys)}")
    return train_pairs, model_values


def resolve_config(family: Family, corpus=None, preset: str | None = None, overrides=()) -> tuple[TrainConfig, dict]:
    """(TrainConfig, model overrides dict) for a new run: the preset (given, or chosen by corpus and
    family), then ``--set`` overrides; both routed by ``route``. The model dict is checked by
    building the family's config once (bad values fail here, before anything is written)."""
    preset = preset if preset is not None else family.preset_for(corpus)
    config, model_values = TrainConfig(), {}
    if preset is not None:
        data = read_preset(preset)
        named = data.get("model", DEFAULT_MODEL)
        if named != family.name:
            raise UserError(f"preset {preset!r} is for model {named!r}, not {family.name!r}; "
                            f"pass --model {named} or another --preset")
        train_pairs, model_values = route(family, [f"{k}={_preset_value(v)}" for k, v in data["config"].items()],
                                          where=f"preset {preset}")
        config = apply_overrides(config, train_pairs)
        model_values.update(data.get("model_config", {}))
    train_pairs, more = route(family, overrides)
    config = apply_overrides(config, train_pairs)
    model_values.update(more)
    if family.config_class is not None:
        family.model_config(config, _typed(family, model_values), vocab_size=2)     # validates now
    return config, _typed(family, model_values)


def _preset_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _typed(family: Family, values: dict) -> dict:
    """Model overrides converted to the types of the family's config fields (``"64"`` -> 64)."""
    if family.config_class is None:
        return {}
    from scratchlm.config import _convert
    kinds = {f.name: f.type for f in dataclasses.fields(family.config_class)}
    hints = {"int": int, "float": float, "bool": bool, "str": str}
    out = {}
    for key, value in values.items():
        kind = hints.get(kinds[key], kinds[key]) if isinstance(kinds[key], str) else kinds[key]
        out[key] = _convert(key, value, kind, f"model {family.name}") if kind in (int, float, bool, str) else value
    return out


# ================================================================ building and reading runs

def build_model(family_name: str, model_config, seed: int = 0):
    """The family's model from its config object, parameters drawn from ``seed``."""
    family = get_family(family_name)
    return family.model_class(model_config, seed=seed)


def run_model(header: dict, where: str = "config.json") -> tuple[Family, Any]:
    """(family, model config object) of a run's config.json; the old layout reads as the GPT."""
    model = header.get("model")
    if isinstance(model, dict):                                     # written before the registry
        from scratchlm.models import GPTConfig
        return FAMILIES["gpt"], GPTConfig.from_dict(model)
    if not isinstance(model, str) or not isinstance(header.get("model_config"), dict):
        raise UserError(f"{where} names no model family (\"model\": {model!r}); the file is damaged")
    family = get_family(model)
    if family.config_class is None:
        from scratchlm.models import GPTConfig
        return family, GPTConfig.from_dict(header["model_config"])
    return family, family.config_class.from_dict(header["model_config"])


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: the model's own rule if it has one (the GPT: nanoGPT's), else decay the
    matrices (>= 2-D parameters: Linear and recurrent weights, embeddings) and not the biases."""
    if hasattr(model, "configure_optimizer_groups"):
        return model.configure_optimizer_groups(weight_decay)
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def num_parameters(model) -> int:
    return int(sum(p.size for p in model.parameters()))


def flops_per_token(model) -> int:
    """Training FLOPs per token: the model's own estimate, else 6 N (forward 2N + backward 4N)."""
    if hasattr(model, "flops_per_token"):
        return model.flops_per_token()
    return 6 * num_parameters(model)


def summary_text(model) -> str:
    """The model's own per-layer summary (the GPT's), else one row per parameter and the total."""
    if hasattr(model, "summary"):
        return model.summary(file=None)
    from .summary import parameter_table
    return parameter_table(model, num_parameters(model))