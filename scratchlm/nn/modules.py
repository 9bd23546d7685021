"""Modules: parameters and sub-modules with names, and the layers of a GPT built from them.

A ``Module`` is an object whose attributes include ``Parameter`` s (tensors to train) and other
modules. Nothing is registered by hand: the attributes themselves are the registry, walked in
the order they were assigned, so ``named_parameters()`` of a GPT reads
``transformer.wte.weight, transformer.wpe.weight, transformer.h.0.ln_1.weight, ...`` -- the
names of the Hugging Face GPT-2 checkpoint, which is why GPT-2 weights load without a lookup
table. Attributes whose name starts with ``_`` are private and not walked.

    >>> import scratchlm as sl, scratchlm.nn as nn
    >>> layer = nn.Linear(3, 2)
    >>> [(name, p.shape) for name, p in layer.named_parameters()]
    [('weight', (3, 2)), ('bias', (2,))]
    >>> layer(sl.tensor([[1.0, 2.0, 3.0]])).shape
    (1, 2)

Shapes: B batch, T time (sequence), C channels (n_embd), H heads, D = C / H per head,
V vocabulary.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

from .. import backend
from ..errors import UserError
from ..tensor import Tensor
from . import functional as F


class Parameter(Tensor):
    """A tensor that a module trains: always ``requires_grad=True``; floats in the default dtype."""

    def __init__(self, data, requires_grad: bool = True):
        data = data.data if isinstance(data, Tensor) else data
        super().__init__(backend.to_device(data), requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class FlatStorage:
    """Parameters and their gradients as views into one contiguous array per dtype, as llm.c keeps
    ``params_memory`` and ``grads_memory``.

    Each parameter's ``.data`` becomes a view of ``data[dtype]`` and its gradient slot a view of
    ``grad[dtype]`` at the same offsets. So an optimizer step, clipping, and an all-reduce can each
    be one pass over one array instead of one per parameter. Names, shapes, ties and
    ``state_dict`` are unchanged (they are views); ``.grad`` keeps its meaning: None until a
    backward writes the slot (then ``.grad`` *is* the slot), None again after ``zero_grad``, which
    therefore costs nothing -- a stale slot is never read, because the first backward copies.

        params      [ w0 (C, 4C) | w1 (4C, C) | ... | b0 (4C,) | ln.weight (C,) | ... ]  data["float32"]
        grads       [ dw0        | dw1        | ... | db0      | dln.weight     | ... ]  grad["float32"]
        p._flat     (storage, dtype name, start, stop)
    """

    def __init__(self, params):
        xp = backend.xp
        self.params = list(params)
        self.data: dict[str, object] = {}
        self.grad: dict[str, object] = {}
        sizes: dict[str, int] = {}
        for p in self.params:
            sizes[p.dtype.name] = sizes.get(p.dtype.name, 0) + p.size
        for name, total in sizes.items():
            self.data[name] = xp.empty(total, dtype=name)
            self.grad[name] = xp.zeros(total, dtype=name)
        offsets = dict.fromkeys(sizes, 0)
        for p in self.params:
            name, start = p.dtype.name, offsets[p.dtype.name]
            stop = offsets[name] = start + p.size
            view = self.data[name][start:stop].reshape(p.shape)
            view[...] = p.data
            p.data, p._grad_slot, p._flat = view, self.grad[name][start:stop].reshape(p.shape), (self, name, start, stop)
            p.grad = None

    def segment(self, params):
        """(dtype name, start, stop) if ``params`` are consecutive in one buffer, in this order; else None."""
        spans = [getattr(p, "_flat", None) for p in params]
        if not spans or any(span is None or span[0] is not self for span in spans):
            return None
        for before, after in zip(spans, spans[1:]):
            if after[1] != before[1] or after[2] != before[3]:
                return None
        return spans[0][1], spans[0][2], spans[-1][3]

    def fill_missing_grads(self) -> None:
        """Give every parameter without a gradient a zero one in its slot, so that the whole flat
        gradient buffer is defined (before an all-reduce, which every rank must enter alike)."""
        for p in self.params:
            if p.grad is None:
                p._grad_slot[...] = 0
                p.grad = p._grad_slot
            elif p.grad is not p._grad_slot:
                p._grad_slot[...] = p.grad
                p.grad = p._grad_slot

    def all_grads_in_slots(self, params=None) -> bool:
        return all(p.grad is p._grad_slot for p in (self.params if params is None else params))


# The one place that draws initial weights. NumPy's generator on the host, then moved to the
# backend: the same seed gives the same weights on the CPU and on the GPU.
_init_rng = np.random.default_rng(0)


def seed_init(seed: int) -> None:
    """Seed the generator that layers draw their default initial weights from."""
    global _init_rng
    _init_rng = np.random.default_rng(seed)


_init_deferred = False


class deferred_init:
    """Within this block, layers allocate zeros instead of drawing weights: for a model that
    draws its own initialisation afterwards (GPT), so a 124M model is not drawn twice."""

    def __enter__(self):
        global _init_deferred
        self.previous, _init_deferred = _init_deferred, True

    def __exit__(self, *exc):
        global _init_deferred
        _init_deferred = self.previous


def _draw(shape, std: float = None, bound: float = None, rng=None) -> Parameter:
    """A Parameter of ``shape`` drawn from N(0, std^2) or U(-bound, bound) (float64 draw, then cast)."""
    if _init_deferred:
        return Parameter(backend.xp.zeros(shape, dtype=backend.get_default_dtype()))
    rng = rng or _init_rng
    values = rng.normal(0.0, std, size=shape) if std is not None else rng.uniform(-bound, bound, size=shape)
    return Parameter(values)


# Set by ``record_outputs``: a function called with (module, output) after every module call.
_output_recorder: Callable | None = None


class record_outputs:
    """Context manager: call ``fn(module, output)`` after each module's forward (used by summary)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __enter__(self):
        global _output_recorder
        self.previous, _output_recorder = _output_recorder, self.fn
        return self

    def __exit__(self, *exc):
        global _output_recorder
        _output_recorder = self.previous


class Module:
    """Base class of every layer and model: a tree of named parameters and sub-modules."""

    training: bool = True

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if _output_recorder is not None:
            _output_recorder(self, out)
        return out

    # ------------------------------------------------------------- walking the tree
    def _public_items(self):
        return ((name, value) for name, value in vars(self).items() if not name.startswith("_"))

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        return ((name, v) for name, v in self._public_items() if isinstance(v, Module))

    def children(self) -> Iterator["Module"]:
        return (module for _, module in self.named_children())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module (named ``prefix``) and every descendant, depth first, in assignment order."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        return (module for _, module in self.named_modules())

    def _named_parameters_all(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every (name, parameter), a tied parameter once under each of its names."""
        for name, value in self._public_items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Parameter):
                yield full, value
            elif isinstance(value, Module):
                yield from value._named_parameters_all(full)

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """(name, parameter) pairs; a tied parameter appears once, under its first name."""
        seen = set()
        for name, p in self._named_parameters_all():
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def parameters(self) -> list[Parameter]:
        """The distinct parameters (the tied wte / lm_head weight is one of them), in order."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def zero_grad(self) -> None:
        """Drop every gradient (None, as PyTorch >= 2.0): the next backward starts afresh."""
        for p in self.parameters():
            p.grad = None

    def flatten_(self, groups=None) -> "FlatStorage":
        """Move every parameter into flat storage (see ``FlatStorage``), laid out group by group
        (``groups``: lists of parameters, e.g. the optimizer's param groups, so that each group is
        one contiguous run), then any parameter not named in them, in ``parameters()`` order.
        Values, names, shapes and ties are unchanged; returns the storage (also ``self._flat``)."""
        order, seen = [], set()
        for p in [q for group in (groups or []) for q in group] + self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                order.append(p)
        self._flat = FlatStorage(order)
        return self._flat

    # ------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "Module":
        """Set ``training`` on this module and every descendant (dropout is active only in training)."""
        for module in self.modules():
            module.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """name -> the live backend array of that parameter (not a copy); a tied parameter appears
        under each of its names, pointing at the same array (``lm_head.weight`` is
        ``transformer.wte.weight``), as in PyTorch."""
        return {name: p.data for name, p in self._named_parameters_all()}

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> tuple[list, list]:
        """Copy ``state_dict``'s arrays into this module's parameters, in place.

        Returns (missing, unexpected) key lists like PyTorch. A tied parameter counts as present
        if any of its names is given. ``strict=True`` refuses both; a shape mismatch is always
        refused. Every check runs before anything is copied, so a refused load changes nothing.
        Values may be NumPy or backend arrays or Tensors, of any float dtype: each is converted to
        the parameter's dtype and backend.
        """
        named = list(self._named_parameters_all())
        own = dict(named)
        unexpected = [key for key in state_dict if key not in own]
        given_ids = {id(p) for name, p in named if name in state_dict}
        missing = [name for name, p in named if id(p) not in given_ids]
        if strict and (missing or unexpected):
            problems = []
            if missing:
                problems.append(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            if unexpected:
                problems.append(f"unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
            raise UserError(f"state dict does not fit {type(self).__name__}: {'; '.join(problems)}; "
                            f"is it a checkpoint of another architecture or configuration?")
        values = {}
        for key, value in state_dict.items():
            if key not in own:
                continue
            value = value.data if isinstance(value, Tensor) else value
            if tuple(value.shape) != own[key].shape:
                raise UserError(f"size mismatch for {key!r}: the state dict has shape {tuple(value.shape)}, "
                                f"the model has {own[key].shape}; is it a checkpoint of another configuration?")
            values[key] = value
        for key, value in values.items():
            param = own[key]
            if not backend.is_gpu():
                value = backend.to_numpy(value)   # a CuPy array cannot be read by NumPy directly
            param.data[...] = backend.to_device(value, param.dtype)
        return missing, unexpected

    # ------------------------------------------------------------- printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("] + (["  " + self.extra_repr()] if self.extra_repr() else [])
        for name, child in children:
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    """Modules in a list, named "0", "1", ... (``transformer.h.0``, ``transformer.h.1``, ...)."""

    def __init__(self, modules=()):
        self._length = 0
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> None:
        setattr(self, str(self._length), module)
        self._length += 1

    def __getitem__(self, i: int) -> Module:
        return getattr(self, str(range(self._length)[i]))

    def __len__(self):
        return self._length

    def __iter__(self):
        return (self[i] for i in range(self._length))


class ModuleDict(Module):
    """Modules by name, in insertion order (``transformer = ModuleDict(wte=..., h=..., ln_f=...)``)."""

    def __init__(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)

    def __getitem__(self, name: str) -> Module:
        return dict(self.named_children())[name]

    def __contains__(self, name: str) -> bool:
        return name in dict(self.named_children())


# ====================================================================== layers

class Linear(Module):
    """y = x @ W + b, with W stored (n_in, n_out) as in GPT-2's Conv1D (no transpose on load).

    x: (..., n_in) -> y: (..., n_out). The leading axes are flattened to one (N = B*T rows)
    before the product, so the backward forms dL/dW = x^T g as one (n_in, N) @ (N, n_out)
    product instead of a (B, n_in, n_out) stack summed afterwards.
    Default init as PyTorch: U(-1/sqrt(n_in), 1/sqrt(n_in)) for W and b; a GPT re-initialises.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True, rng=None):
        self.n_in, self.n_out = n_in, n_out
        bound = 1.0 / math.sqrt(n_in)
        self.weight = _draw((n_in, n_out), bound=bound, rng=rng)
        self.bias = _draw((n_out,), bound=bound, rng=rng) if bias else None

    def forward(self, x: Tensor, add_bias: bool = True) -> Tensor:
        """``add_bias=False``: x @ W only, for a caller that adds the bias in a fused op after it."""
        return F.linear(x, self.weight, self.bias if add_bias else None)   # (..., n_in) @ (n_in, n_out) + (n_out,)

    def extra_repr(self):
        return f"{self.n_in}, {self.n_out}, bias={self.bias is not None}"


class Embedding(Module):
    """A table of V vectors of size C: idx (...) int -> rows (..., C). Init N(0, 1) as PyTorch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _draw((num_embeddings, embedding_dim), std=1.0, rng=rng)

    def forward(self, idx) -> Tensor:
        return F.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the last axis (C) to mean 0, variance 1, then scale by ``weight`` (ones) and
    shift by ``bias`` (zeros; absent when ``bias=False``, as nanoGPT's option)."""

    def __init__(self, normalized_shape: int, bias: bool = True, eps: float = 1e-5):
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = Parameter(np.ones(normalized_shape))
        self.bias = Parameter(np.zeros(normalized_shape)) if bias else None

    def forward(self, x: Tensor, residual: Tensor | None = None):
        """layer_norm(x); with ``residual``, (s, layer_norm(s)) for s = x + residual, one fused op
        (the residual stream and the next sublayer's input)."""
        if residual is None:
            return F.layer_norm(x, self.weight, self.bias, self.eps)
        return F.add_layer_norm(x, residual, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"({self.normalized_shape},), eps={self.eps}, bias={self.bias is not None}"


class Dropout(Module):
    """Zero elements with probability p while training (and scale the rest by 1/(1-p)); identity
    in eval mode. Draws from the backend's default generator (``sl.manual_seed``)."""

    def __init__(self, p: float = 0.0):
        if not 0.0 <= p < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class GELU(Module):
    """The GELU activation; GPT-2 used the tanh approximation, so that is the default here."""

    def __init__(self, approximate: str = "tanh"):
        self.approximate = approximate

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """gelu(x), or gelu(x + bias) as one fused op."""
        if bias is None:
            return F.gelu(x, approximate=self.approximate)
        return F.bias_gelu(x, bias, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class MLP(Module):
    """The feed-forward half of a block: expand to 4C, GELU, project back, dropout.
    (B, T, C) -> (B, T, 4C) -> (B, T, C)."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True):
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = GELU("tanh")
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = Dropout(dropout)

    # c_fc's bias added inside the GELU op (F.bias_gelu): one kernel launch fewer on a GPU. On the
    # CPU Linear already adds its bias in place into the product's fresh output, and the fused op's
    # separate add measured ~7% slower there (nano-cpu shapes), so "auto" fuses on the GPU only.
    fuse_bias_gelu = "auto"        # "auto", True or False

    def forward(self, x: Tensor) -> Tensor:
        fuse = backend.is_gpu() if self.fuse_bias_gelu == "auto" else self.fuse_bias_gelu
        if fuse and self.c_fc.bias is not None:
            h = self.gelu(self.c_fc(x, add_bias=False), bias=self.c_fc.bias)   # (B, T, 4C)
        else:
            h = self.gelu(self.c_fc(x))                                       # (B, T, 4C)
        return self.dropout(self.c_proj(h))                                   # (B, T, C)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with one fused q, k, v projection.

    Each position attends to itself and earlier positions only; the mask lives inside
    ``F.scaled_dot_product_attention`` (exact -inf, never a finite constant). Dropout is applied
    to the output projection only: the fused attention op has no dropout on the attention
    probabilities (nanoGPT's ``attn_dropout``); with the usual dropout=0 the two agree.

    Decoding with a KV cache (``scratchlm.generate.LayerKVCache``, inference only): ``cache``
    holds this layer's keys and values of the positions already seen. ``cache.append(k, v)``
    stores the new ones and returns all of them, (B, H, Tk, D). The T new queries sit at the last
    T of the Tk positions: an empty cache is a prefill (T == Tk, the causal mask as without a
    cache), a filled one takes one new token (it sees every key: no mask) or a chunk of a prompt
    (query i sees keys 0 .. Tk - T + i: the causal mask aligned bottom-right), so a long prompt can
    be prefilled a chunk at a time.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        if n_embd % n_head:
            raise UserError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = F.split(self.c_attn(x), 3, axis=2)             # 3 x (B, T, C)
        q = q.reshape(B, T, H, D).transpose(1, 2)                # (B, H, T, D)
        k = k.reshape(B, T, H, D).transpose(1, 2)                # (B, H, T, D)
        v = v.reshape(B, T, H, D).transpose(1, 2)                # (B, H, T, D)
        if cache is not None:
            k, v = cache.append(k, v)                            # (B, H, Tk, D): the past and these T
        # query i sits at position Tk - T + i (causal, bottom-right aligned); one new query sees
        # every key, so it needs no mask
        y = F.scaled_dot_product_attention(q, k, v, causal=T > 1)     # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)                   # heads side by side again
        return self.resid_dropout(self.c_proj(y))                # (B, T, C)

    def extra_repr(self):
        return f"n_head={self.n_head}"


class Block(Module):
    """A transformer block, pre-LayerNorm (GPT-2): x + attn(ln_1(x)), then + mlp(ln_2(x)).
    The residual stream x (B, T, C) passes through untouched; each half adds to it."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        self.ln_1 = LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache)    # cache: this layer's KV cache or None
        x = x + self.mlp(self.ln_2(x))
        return x

    def forward_chained(self, x: Tensor, h: Tensor, next_norm: "LayerNorm", cache=None):
        """The block inside a stack, each residual add fused with the layer norm that follows it:
        (x, h = ln_1(x)) -> (x', next_norm(x')), next_norm the next block's ln_1 or the final ln_f.
        The same function as ``forward`` followed by ``next_norm``, with two ops fewer."""
        x, h = self.ln_2(x, residual=self.attn(h, cache=cache))   # x + attn(h); ln_2 of it (B, T, C) x 2
        return next_norm(x, residual=self.mlp(h))                 # x + mlp(h); next_norm of it


class SinusoidalPositionalEncoding(Module):
    """The fixed positions of "Attention Is All You Need" (no parameters):

        PE[pos, 2i] = sin(pos / 10000^(2i/C)),    PE[pos, 2i+1] = cos(pos / 10000^(2i/C)).

    Each pair of channels is a rotation at its own frequency, so PE[pos + k] is a linear
    function of PE[pos]. ``forward(pos)`` returns the rows for integer positions (..., C),
    a constant tensor (no gradient).
    """

    def __init__(self, max_len: int, n_embd: int):
        self.max_len, self.n_embd = max_len, n_embd
        pos = np.arange(max_len)[:, None]                               # (T, 1)
        even = np.arange(0, n_embd, 2)                                  # the 2i
        angle = pos / 10000.0 ** (even / n_embd)                        # (T, ceil(C/2))
        table = np.zeros((max_len, n_embd))
        table[:, 0::2] = np.sin(angle)
        table[:, 1::2] = np.cos(angle[:, : n_embd // 2])
        self._table_host = table
        self._table, self._table_key = None, None   # the backend copy, for (backend, dtype)

    def forward(self, pos) -> Tensor:
        key = (backend.get_backend(), backend.get_default_dtype())
        if self._table_key != key:
            self._table, self._table_key = backend.to_device(self._table_host, key[1]), key
        pos = pos.data if isinstance(pos, Tensor) else backend.to_device(pos)
        return Tensor(self._table[pos])                                 # (..., C)

    def extra_repr(self):
        return f"{self.max_len}, {self.n_embd}"
