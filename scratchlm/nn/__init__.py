"""Layers and the Module machinery: ``import scratchlm.nn as nn`` (ops as functions: ``nn.functional``)."""
from . import functional
from .modules import (GELU, MLP, Block, CausalSelfAttention, Dropout, Embedding, LayerNorm, Linear, Module,
                      ModuleDict, ModuleList, Parameter, SinusoidalPositionalEncoding, deferred_init, record_outputs,
                      seed_init)
from .rnn import GRU, LSTM, RNN
from .transformer import (MultiheadAttention, Transformer, TransformerDecoder, TransformerDecoderLayer,
                          TransformerEncoder, TransformerEncoderLayer)

__all__ = ["Module", "ModuleList", "ModuleDict", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout",
           "GELU", "MLP", "CausalSelfAttention", "Block", "SinusoidalPositionalEncoding", "functional",
           "record_outputs", "seed_init", "deferred_init", "RNN", "LSTM", "GRU",
           "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerDecoder", "Transformer", "RNN", "LSTM", "GRU"]
