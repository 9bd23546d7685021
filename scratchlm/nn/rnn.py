"""Recurrent layers with PyTorch's interface: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``.

    >>> import scratchlm as sl, scratchlm.nn as nn
    >>> lstm = nn.LSTM(8, 16, num_layers=2)                  # batch_first=True by default
    >>> out, (h_n, c_n) = lstm(sl.tensor(np.zeros((4, 5, 8))))
    >>> out.shape, h_n.shape
    ((4, 5, 16), (2, 4, 16))

Each layer and direction is one fused op (scratchlm/ops/rnn.py: the time loop and its hand-written
backward through time). Parameters carry PyTorch's names and gate orders (``weight_ih_l0``,
``bias_hh_l1_reverse``; LSTM i, f, g, o; GRU r, z, n); matrices are stored (n_in, n_out), the
transpose of PyTorch's, so a ``torch.nn.LSTM`` state_dict loads after transposing its 2-D
weights. Init as PyTorch: every parameter U(-1/sqrt(H), 1/sqrt(H)).

Shapes: B batch, T time, C input features, H hidden size, L layers, D directions (1 or 2).
Input (B, T, C) with batch_first (else (T, B, C)); output (B, T, D*H); h_n, c_n (L*D, B, H).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..errors import UserError
from ..ops import rnn as rnn_ops
from ..ops.shape import concatenate, stack
from ..tensor import Tensor
from . import functional as F
from .modules import Module, _draw


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(backend.to_device(x))


class _RecurrentBase(Module):
    """The stack of layers and directions shared by RNN, LSTM and GRU; subclasses name the cell."""

    gates = 1   # G: blocks of H columns in W_ih, W_hh

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, bidirectional: bool = False, rng=None):
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise UserError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        H, G = hidden_size, self.gates
        bound = 1.0 / math.sqrt(H)
        for layer in range(num_layers):
            n_in = input_size if layer == 0 else H * self.num_directions
            for suffix in self._suffixes():
                # the order of PyTorch's state_dict: weight_ih, weight_hh, bias_ih, bias_hh
                setattr(self, f"weight_ih_l{layer}{suffix}", _draw((n_in, G * H), bound=bound, rng=rng))
                setattr(self, f"weight_hh_l{layer}{suffix}", _draw((H, G * H), bound=bound, rng=rng))
                if bias:
                    setattr(self, f"bias_ih_l{layer}{suffix}", _draw((G * H,), bound=bound, rng=rng))
                    setattr(self, f"bias_hh_l{layer}{suffix}", _draw((G * H,), bound=bound, rng=rng))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self):
        return ("", "_reverse") if self.bidirectional else ("",)

    def _weights(self, layer: int, suffix: str):
        get = lambda kind: getattr(self, f"{kind}_l{layer}{suffix}", None)
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

    op = None            # the fused layer op (ops/rnn.py) of the subclass's cell

    def _op_options(self) -> dict:
        return {}

    def _op_inputs(self, h0, c0, layer: int, suffix: str) -> tuple:
        """What the op takes after x: the initial state(s), then W_ih, W_hh, b_ih, b_hh."""
        states = (h0, c0) if self.op is rnn_ops.LSTMLayer else (h0,)
        return (*states, *self._weights(layer, suffix))

    def _run(self, x: Tensor, h0, c0, layer: int, suffix: str):
        """One layer-direction: x (T, B, C) -> (out (T, B, H), h_n (B, H), c_n (B, H) or None)."""
        T = x.shape[0]
        y = self.op.apply(x, *self._op_inputs(h0, c0, layer, suffix), reverse=bool(suffix),
                          **self._op_options())                       # (T, B, H); LSTM (T+1, B, H)
        if self.op is rnn_ops.LSTMLayer:
            return y[:T], _last(y, T, suffix), y[T]
        return y, _last(y, T, suffix), None

    def step_arrays(self, x, h, c=None):
        """One time step for decoding, without the tape: x (B, C), h and c (L, B, H) backend arrays
        (c only for an LSTM) -> (out (B, H), new h, new c). Unidirectional stacks only. The same
        op forwards as ``forward`` (so the same numbers), minus the Tensor bookkeeping that is most
        of a token's cost at batch 1: what lets a language model sample in O(1) per token, fast."""
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}.step_arrays: a bidirectional layer cannot decode step by step")
        data = lambda a: a.data if isinstance(a, Tensor) else a
        x = x[None]                                                    # (1, B, C): time-major
        new_h, new_c = [], []
        for layer in range(self.num_layers):
            inputs = [data(a) for a in self._op_inputs(h[layer], None if c is None else c[layer], layer, "")]
            y, _ = self.op.forward(x, *inputs, **self._op_options())  # (1, B, H); LSTM (2, B, H): h, c
            x = y[:1]
            new_h.append(y[0])
            if c is not None:
                new_c.append(y[1])
        xp = backend.xp
        return x[0], xp.stack(new_h), (xp.stack(new_c) if c is not None else None)

    def _check_state(self, state, B: int, what: str):
        expected = (self.num_layers * self.num_directions, B, self.hidden_size)
        if state is not None and tuple(state.shape) != expected:
            raise ValueError(f"{type(self).__name__}: {what} has shape {tuple(state.shape)}, expected "
                             f"{expected} (num_layers * num_directions, batch, hidden_size)")

    def _forward(self, x, h0, c0):
        x = _as_tensor(x)
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            layout = "(B, T, C)" if self.batch_first else "(T, B, C)"
            raise ValueError(f"{type(self).__name__}: input has shape {x.shape}, expected {layout} "
                             f"with C = input_size = {self.input_size}")
        if self.batch_first:
            x = x.transpose(0, 1)                                      # (T, B, C)
        B = x.shape[1]
        h0 = None if h0 is None else _as_tensor(h0)
        c0 = None if c0 is None else _as_tensor(c0)
        self._check_state(h0, B, "h0")
        self._check_state(c0, B, "c0")
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(self._suffixes()):
                k = layer * self.num_directions + d                    # row of h0 / h_n
                out, h, c = self._run(x, None if h0 is None else h0[k], None if c0 is None else c0[k],
                                      layer, suffix)
                outs.append(out)                                       # (T, B, H)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if len(outs) == 1 else concatenate(outs, axis=2)   # (T, B, D*H)
            if layer + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, self.training)          # between layers only
        out = x.transpose(0, 1) if self.batch_first else x            # (B, T, D*H)
        return out, stack(h_n, axis=0), (stack(c_n, axis=0) if c_n[0] is not None else None)

    def extra_repr(self):
        options = [f"{self.input_size}, {self.hidden_size}"]
        if self.num_layers != 1:
            options.append(f"num_layers={self.num_layers}")
        options += [f"bias={self.bias}", f"batch_first={self.batch_first}"]
        if self.dropout:
            options.append(f"dropout={self.dropout}")
        if self.bidirectional:
            options.append("bidirectional=True")
        return ", ".join(options)


def _last(y: Tensor, T: int, suffix: str) -> Tensor:
    """The final state of a direction: h at time T-1 going forward, at time 0 going in reverse."""
    return y[0] if suffix else y[T - 1]


class RNN(_RecurrentBase):
    """Elman RNN: h_t = tanh(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh) (or relu).
    ``out, h_n = rnn(x, h0=None)``."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = True, dropout: float = 0.0,
                 bidirectional: bool = False, rng=None):
        if nonlinearity not in ("tanh", "relu"):
            raise UserError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, rng)

    op = rnn_ops.RNNLayer

    def _op_options(self):
        return {"nonlinearity": self.nonlinearity}

    def forward(self, x, hx=None):
        out, h_n, _ = self._forward(x, hx, None)
        return out, h_n

    def extra_repr(self):
        return super().extra_repr() + ("" if self.nonlinearity == "tanh" else ", nonlinearity='relu'")


class LSTM(_RecurrentBase):
    """LSTM, gates i, f, g, o: c_t = f c_{t-1} + i g, h_t = o tanh(c_t) (math in ops/rnn.py).
    ``out, (h_n, c_n) = lstm(x, (h0, c0))``; the state may be omitted (zeros)."""

    gates = 4

    op = rnn_ops.LSTMLayer

    def forward(self, x, hx=None):
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError("LSTM: the initial state must be a pair (h0, c0)")
        h0, c0 = (None, None) if hx is None else hx
        out, h_n, c_n = self._forward(x, h0, c0)
        return out, (h_n, c_n)


class GRU(_RecurrentBase):
    """GRU, gates r, z, n: n = tanh(x W_in + b_in + r (h W_hn + b_hn)), h_t = (1 - z) n + z h_{t-1}.
    ``out, h_n = gru(x, h0=None)``."""

    gates = 3

    op = rnn_ops.GRULayer

    def forward(self, x, hx=None):
        out, h_n, _ = self._forward(x, hx, None)
        return out, h_n
