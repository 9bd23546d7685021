"""Optimizers (SGD, Adam, AdamW, RMSprop), learning-rate schedules, and gradient clipping.

A parameter is anything with ``.data`` (a backend array, updated IN PLACE so that every other
reference to it -- the model, a tied weight -- sees the step) and ``.grad`` (a backend array, or
None: that parameter is skipped this step). Every update follows PyTorch's equations, in its
order of operations, so a PyTorch user gets the trajectory they expect.

    >>> import numpy as np
    >>> class P:                      # a stand-in parameter; nn.Parameter is the real one
    ...     def __init__(self, data): self.data, self.grad = data, None
    >>> w = P(np.array([1.0, -2.0]))
    >>> opt = SGD([w], lr=0.1)
    >>> w.grad = np.array([0.5, 0.5]); opt.step(); w.data
    array([ 0.95, -2.05])
    >>> opt.zero_grad(); w.grad is None
    True

Param groups work as in PyTorch: pass dicts ``{"params": [...], **overrides}`` to give some
parameters other hyperparameters (the usual one: no weight decay on biases and LayerNorm gains).
A scheduler sets ``group["lr"]`` before each step.

Saving and resuming (``state_dict`` / ``load_state_dict``) -- the format of optimizer.safetensors:

    scalars (JSON-able dict, saved as JSON, e.g. in trainer.json or the safetensors metadata):
        {"format": "scratchlm.optim/1",
         "type": "AdamW",
         "param_groups": [{"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1e-08,
                           "weight_decay": 0.1, "params": [0, 1, 2]},      # flat parameter indices
                          {"lr": 0.0006, ..., "weight_decay": 0.0, "params": [3, 4]}],
         "state": {"0": {"step": 12}, "1": {"step": 12}, ...}}           # per-parameter scalars
    arrays (dict of host NumPy copies, saved with save_safetensors):
        {"state.0.exp_avg": (C, 3C) array, "state.0.exp_avg_sq": ..., "state.1.exp_avg": ...}

Parameter i is the i-th parameter over the groups in order, as in PyTorch. Floats survive JSON
exactly (Python writes the shortest repr that reads back to the same double), so a resumed run
continues bit for bit.

Flat storage (``Module.flatten_``, parameters and gradients as views of one array per dtype): when
a group's parameters are one consecutive run of the buffers and each has its gradient in its slot,
``step`` makes ONE ``_update`` call over the run (one AdamW kernel call per group instead of one
per parameter), with the state arrays flat too; ``self.state[i]`` then holds views of them, so
``state_dict`` and its format are unchanged. Every update is elementwise, so the flat step gives
the same bits as the per-parameter one. Anything else (a parameter without a gradient, state
loaded from a file) falls back to, or is regathered from, the per-parameter form.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np

from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.kernels import adamw as adamw_kernel

FORMAT = "scratchlm.optim/1"


def _host_copy(array) -> np.ndarray:
    """A NumPy snapshot of a backend array that later in-place updates do not change."""
    return array.copy() if isinstance(array, np.ndarray) else backend.to_numpy(array)


class Optimizer:
    """Holds param groups and per-parameter state; subclasses write ``_update`` for one parameter.

    ``self.state[i]`` is the state of the i-th parameter (flat index over the groups): a dict of
    Python scalars (e.g. ``step``) and backend arrays (e.g. ``exp_avg``), created on its first step.
    """

    # names of array state every parameter with state must have (checked when loading)
    _required_arrays: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict[str, Any]):
        self.defaults = dict(defaults)
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict[str, Any]] = []
        self._params: list = []          # every parameter, flat, in group order: index i <-> state[i]
        self._index_of_group: list[list[int]] = []
        seen: set[int] = set()
        for group in groups:
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError("param groups must all be dicts with a 'params' list (or pass plain parameters)")
            unknown = set(group) - set(self.defaults) - {"params"}
            if unknown:
                raise TypeError(f"{type(self).__name__} has no hyperparameter(s) {sorted(unknown)}")
            members = list(group["params"])
            indices = []
            for p in members:
                if id(p) in seen:
                    raise ValueError("a parameter appears twice in the optimizer's param groups")
                seen.add(id(p))
                indices.append(len(self._params))
                self._params.append(p)
            self.param_groups.append({**self.defaults, **group, "params": members})
            self._index_of_group.append(indices)
        self.state: dict[int, dict[str, Any]] = {}
        # group index -> (its flat state, the per-parameter dicts of views made from it)
        self._flat_state: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    def zero_grad(self) -> None:
        """Forget every gradient (grad = None): the next backward writes fresh ones (PyTorch >= 2.0)."""
        for p in self._params:
            p.grad = None

    def step(self, closure: Callable[[], Any] | None = None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss if one is given."""
        loss = closure() if closure is not None else None
        for g, (group, indices) in enumerate(zip(self.param_groups, self._index_of_group)):
            if self._step_flat(g, group, indices):
                continue
            for i, p in zip(indices, group["params"]):
                if p.grad is None:
                    continue
                if i not in self.state:
                    self.state[i] = self._init_state(p, group)
                self._update(p.data, p.grad, group, self.state[i])
        return loss

    def _init_state(self, p, group) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------ flat storage: one update per group

    def _step_flat(self, g: int, group: dict, indices: list[int]) -> bool:
        """Update group ``g`` with one ``_update`` over its run of the flat buffers; False (nothing
        done) when the group is not one run, a gradient is not in its slot, or the parameters'
        states differ (then the per-parameter loop runs)."""
        params = group["params"]
        span = getattr(params[0], "_flat", None) if params else None
        if span is None:
            return False
        storage = span[0]
        run = storage.segment(params)
        if run is None or not storage.all_grads_in_slots(params):
            return False
        dtype, start, stop = run
        data, grad = storage.data[dtype][start:stop], storage.grad[dtype][start:stop]
        flat = self._flat_state_of(g, indices, data, group)
        if flat is None:
            return False
        self._update(data, grad, group, flat)
        self._share_flat_state(g, indices, params, flat)
        return True

    def _flat_state_of(self, g, indices, data, group) -> dict[str, Any] | None:
        """The flat state of group ``g``: fresh, the one shared last step (if no per-parameter
        step touched it since), or gathered (copied) from equal per-parameter states; else None."""
        states = [self.state.get(i) for i in indices]
        if all(state is None for state in states):
            return self._init_state(_FlatRun(data), group)
        if any(state is None for state in states):
            return None
        cached = self._flat_state.get(g)
        if cached is not None and all(state is made for state, made in zip(states, cached[1])) \
                and all(_scalars(state) == _scalars(cached[0]) and state.keys() == cached[0].keys()
                        for state in states):
            return cached[0]
        first = states[0]
        if any(_scalars(state) != _scalars(first) or state.keys() != first.keys() for state in states):
            return None
        xp = backend.xp
        return {name: value if _is_scalar(value) else xp.concatenate([state[name].reshape(-1) for state in states])
                for name, value in first.items()}

    def _share_flat_state(self, g, indices, params, flat) -> None:
        """Point ``self.state[i]`` at views of the flat state (so ``state_dict`` sees it per parameter)."""
        cached = self._flat_state.get(g)
        if cached is not None and cached[0] is flat and all(made.keys() == flat.keys() for made in cached[1]):
            for made in cached[1]:
                made.update(_scalars(flat))
            return
        made, offset = [], 0
        for i, p in zip(indices, params):
            made.append({name: value if _is_scalar(value) else value[offset:offset + p.size].reshape(p.shape)
                         for name, value in flat.items()})
            self.state[i] = made[-1]
            offset += p.size
        self._flat_state[g] = (flat, made)

    def _update(self, data, grad, group, state) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ saving and resuming

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(scalars, arrays): JSON-able hyperparameters and step counts, and host copies of every
        state array keyed ``state.{i}.{name}``. See the module docstring for the format."""
        groups = []
        for group, indices in zip(self.param_groups, self._index_of_group):
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            groups.append({**entry, "params": list(indices)})
        scalars: dict[str, Any] = {"format": FORMAT, "type": type(self).__name__,
                                   "param_groups": groups, "state": {}}
        arrays: dict[str, np.ndarray] = {}
        for i, state in sorted(self.state.items()):
            scalars["state"][str(i)] = {}
            for name, value in state.items():
                if isinstance(value, (bool, int, float)):
                    scalars["state"][str(i)][name] = value
                else:
                    arrays[f"state.{i}.{name}"] = _host_copy(value)
        return scalars, arrays

    def load_state_dict(self, scalars: dict[str, Any], arrays: dict[str, Any]) -> None:
        """Restore hyperparameters, step counts and moments saved by ``state_dict`` (copies them).

        A checkpoint from another optimizer type or another model is a ``UserError`` naming the
        first thing that does not fit."""
        name = type(self).__name__
        if scalars.get("format") != FORMAT:
            raise UserError(f"optimizer state has format {scalars.get('format')!r}, expected {FORMAT!r}; "
                            "it was not saved by scratchlm.optim")
        if scalars.get("type") != name:
            raise UserError(f"optimizer state was saved by {scalars.get('type')}, this run uses {name}; "
                            "use the same optimizer or start the optimizer afresh")
        saved_groups, saved_state = scalars.get("param_groups"), scalars.get("state")
        if (not isinstance(saved_groups, list) or not isinstance(saved_state, dict)
                or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups)
                or not all(isinstance(e, dict) and i.isdigit() for i, e in saved_state.items())):
            raise UserError("optimizer state lacks well-formed param_groups/state entries; the file is damaged")
        if [len(g["params"]) for g in saved_groups] != [len(ix) for ix in self._index_of_group]:
            raise UserError(f"optimizer state has groups of sizes {[len(g['params']) for g in saved_groups]}, "
                            f"this model's are {[len(ix) for ix in self._index_of_group]}; "
                            "the checkpoint belongs to a different model")

        state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in saved_state.items()}
        if any(not 0 <= i < len(self._params) for i in state):
            raise UserError(f"optimizer state names parameter {max(state)}, this model has {len(self._params)}; "
                            "the checkpoint belongs to a different model")
        xp = backend.xp
        for key, array in arrays.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in state:
                raise UserError(f"optimizer state has an unexpected array {key!r}; "
                                "the checkpoint belongs to a different optimizer")
            i = int(parts[1])
            param_data = self._params[i].data
            if tuple(array.shape) != tuple(param_data.shape):
                raise UserError(f"optimizer state {key} has shape {tuple(array.shape)} but parameter {i} has "
                                f"shape {tuple(param_data.shape)}; the checkpoint belongs to a different model")
            state[i][parts[2]] = xp.array(array, dtype=param_data.dtype)   # a fresh copy we own
        for i, entry in state.items():
            missing = [n for n in self._required_arrays if n not in entry]
            if missing:
                raise UserError(f"optimizer state of parameter {i} lacks {missing}; re-save the checkpoint")

        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(value, list) else value
        self.state = state
        self._flat_state = {}           # regathered from the loaded arrays at the next step


class _FlatRun:
    """Stands for a group's run of the flat buffer where ``_init_state`` expects a parameter."""

    def __init__(self, data):
        self.data = data


def _is_scalar(value) -> bool:
    return isinstance(value, (bool, int, float))


def _scalars(state: dict) -> dict:
    return {name: value for name, value in state.items() if _is_scalar(value)}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

        g <- g + wd * p                              (weight decay as an L2 term in the loss)
        b <- g on the first step, else momentum * b + g
        g <- g + momentum * b if nesterov else b     (when momentum != 0)
        p <- p - lr * g
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        _check(lr >= 0, f"SGD learning rate must be >= 0, got {lr}")
        _check(momentum >= 0, f"SGD momentum must be >= 0, got {momentum}")
        _check(weight_decay >= 0, f"SGD weight_decay must be >= 0, got {weight_decay}")
        _check(not nesterov or momentum > 0, "Nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _init_state(self, p, group):
        return {}           # the momentum buffer is created from the first gradient

    def _update(self, data, grad, group, state):
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        if wd != 0:
            grad = grad + wd * data
        if momentum != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = backend.xp.array(grad, copy=True)
            else:
                buffer = state["momentum_buffer"]
                buffer *= momentum
                buffer += grad
            buffer = state["momentum_buffer"]
            grad = grad + momentum * buffer if group["nesterov"] else buffer
        data -= lr * grad


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight decay is L2, added to the gradient.

        g  <- g + wd * p
        m  <- beta1 * m + (1 - beta1) * g
        v  <- beta2 * v + (1 - beta2) * g * g
        p  <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    That is p - lr * m_hat / (sqrt(v_hat) + eps); t counts this parameter's updates from 1.
    (With L2 decay the decay term passes through m and v and is rescaled by them -- the reason
    AdamW exists.)
    """
    _required_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        _check(lr >= 0, f"{type(self).__name__} learning rate must be >= 0, got {lr}")
        _check(len(betas) == 2 and all(0 <= b < 1 for b in betas),
               f"{type(self).__name__} betas must be two numbers in [0, 1), got {betas}")
        _check(eps >= 0, f"{type(self).__name__} eps must be >= 0, got {eps}")
        _check(weight_decay >= 0, f"{type(self).__name__} weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _init_state(self, p, group):
        xp = backend.xp
        return {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}

    def _update(self, data, grad, group, state):
        xp = backend.xp
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state["step"] += 1
        t = state["step"]
        if wd != 0:
            grad = grad + wd * data
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += ((1.0 - beta2) * grad) * grad
        step_size = lr / (1.0 - beta1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + eps
        data -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): the decay shrinks p directly.

        p  <- p * (1 - lr * wd)
        m, v, p updated as in Adam, with g not touched by the decay

    The update runs in ``scratchlm.kernels.adamw.step`` (fused Numba kernel on the CPU).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _update(self, data, grad, group, state):
        beta1, beta2 = group["betas"]
        state["step"] += 1
        adamw_kernel.step(data, grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2,
                          group["eps"], group["weight_decay"], state["step"])


class RMSprop(Optimizer):
    """RMSprop (Hinton's lecture 6e), PyTorch's non-centered form.

        g  <- g + wd * p
        s  <- alpha * s + (1 - alpha) * g * g
        d  <- sqrt(s) + eps
        b  <- momentum * b + g / d;  p <- p - lr * b      (momentum > 0)
        p  <- p - lr * g / d                              (momentum == 0)
    """
    _required_arrays = ("square_avg",)

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        _check(lr >= 0, f"RMSprop learning rate must be >= 0, got {lr}")
        _check(0 <= alpha <= 1, f"RMSprop alpha must be in [0, 1], got {alpha}")
        _check(eps >= 0, f"RMSprop eps must be >= 0, got {eps}")
        _check(momentum >= 0, f"RMSprop momentum must be >= 0, got {momentum}")
        _check(weight_decay >= 0, f"RMSprop weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    def _init_state(self, p, group):
        xp = backend.xp
        state = {"step": 0, "square_avg": xp.zeros_like(p.data)}
        if group["momentum"] > 0:
            state["momentum_buffer"] = xp.zeros_like(p.data)
        return state

    def _update(self, data, grad, group, state):
        xp = backend.xp
        lr, alpha, eps, momentum, wd = (group["lr"], group["alpha"], group["eps"], group["momentum"],
                                        group["weight_decay"])
        state["step"] += 1
        if wd != 0:
            grad = grad + wd * data
        square_avg = state["square_avg"]
        square_avg *= alpha
        square_avg += ((1.0 - alpha) * grad) * grad
        denom = xp.sqrt(square_avg) + eps
        if momentum > 0:
            if "momentum_buffer" not in state:          # momentum switched on by a loaded group
                state["momentum_buffer"] = xp.zeros_like(data)
            buffer = state["momentum_buffer"]
            buffer *= momentum
            buffer += grad / denom
            data -= lr * buffer
        else:
            data -= lr * (grad / denom)


# ================================================================ learning-rate schedules

def constant_lr(lr: float) -> Callable[[int], float]:
    """it -> lr, the same at every iteration."""
    def schedule(it: int) -> float:
        return lr
    return schedule


def cosine_with_warmup(max_lr: float, warmup_iters: int, decay_iters: int,
                       min_lr: float) -> Callable[[int], float]:
    """it -> lr: nanoGPT's ``get_lr`` -- linear warmup, cosine decay, then a floor.

        it <  warmup_iters:                 max_lr * (it + 1) / (warmup_iters + 1)
        warmup_iters <= it <= decay_iters:  min_lr + 0.5 (1 + cos(pi r)) (max_lr - min_lr),
                                            r = (it - warmup_iters) / (decay_iters - warmup_iters)
        it >  decay_iters:                  min_lr

    The warmup counts from it + 1 so that iteration 0 does not waste a step at lr = 0; it reaches
    max_lr exactly at ``warmup_iters`` (r = 0) and min_lr exactly at ``decay_iters`` (r = 1).
    """
    _check(warmup_iters >= 0, f"warmup_iters must be >= 0, got {warmup_iters}")
    _check(decay_iters >= warmup_iters,
           f"lr_decay_iters ({decay_iters}) must be >= warmup_iters ({warmup_iters}); raise lr_decay_iters")

    def schedule(it: int) -> float:
        if it < warmup_iters:
            return max_lr * (it + 1) / (warmup_iters + 1)
        if it >= decay_iters:           # (== decay_iters gives min_lr on the cosine too; also avoids 0/0)
            return min_lr
        decay_ratio = (it - warmup_iters) / (decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))       # 1 -> 0
        return min_lr + coeff * (max_lr - min_lr)
    return schedule


# ================================================================ gradient clipping

def clip_grad_norm_(params: Iterable, max_norm: float, as_array: bool = False):
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

        norm = sqrt(sum over every grad g of sum(g * g))
        if norm > max_norm:  g <- g * max_norm / (norm + 1e-6)   for every g

    Returns the norm before clipping as a Python float (for logging), or with ``as_array=True``
    as a 0-d backend array: then nothing leaves the device (no host sync), which is what a GPU
    training step wants. A NaN or infinite norm is returned as it is and nothing is scaled: the
    caller decides whether to skip the step. Parameters whose grad is None are ignored.
    """
    xp = backend.xp
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return xp.zeros((), dtype=xp.float64) if as_array else 0.0
    # Per-grad sums of squares are combined on the device. vdot is one BLAS call per grad (no g*g
    # temporary; on a GPU one launch instead of two, which matters at ~150 parameters per step).
    squares = xp.stack([xp.vdot(g.ravel(), g.ravel()) for g in grads]).astype(xp.float64)
    total_norm = xp.sqrt(xp.sum(squares))
    # The decision "clip or not" is made on the device too: the factor is 1 (an exact no-op)
    # below max_norm and for a non-finite norm.
    clips = xp.isfinite(total_norm) & (total_norm > max_norm)
    factor = xp.where(clips, max_norm / (total_norm + 1e-6), 1.0)
    storage = getattr(params[0], "_flat", (None,))[0]
    if storage is not None and {id(p) for p in params} == {id(p) for p in storage.params} \
            and storage.all_grads_in_slots():
        for buffer in storage.grad.values():        # flat storage: one pass over each gradient buffer
            buffer *= factor.astype(buffer.dtype)
    else:
        for g in grads:
            g *= factor.astype(g.dtype)
    return total_norm if as_array else float(total_norm)
