"""Models built from scratchlm.nn: ``from scratchlm.models import GPT, GPTConfig``."""
from .gpt import GPT, GPTConfig, ModelArgumentError, normalize_gpt2_keys, sample_next_token
from .rnn import MLPLM, RNNLM, BigramLM, BigramLMConfig, MLPLMConfig, RNNLMConfig

__all__ = ["GPT", "GPTConfig", "ModelArgumentError", "normalize_gpt2_keys", "sample_next_token",
           "BigramLM", "BigramLMConfig", "MLPLM", "MLPLMConfig", "RNNLM", "RNNLMConfig"]
