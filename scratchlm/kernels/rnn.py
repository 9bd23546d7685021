"""The per-step gate math of the recurrent layers: the reference, Numba kernels, and dispatch.

A recurrent layer's time loop (scratchlm/ops/rnn.py) does two things per step: one matrix product
h_prev @ W_hh, which stays in BLAS, and the elementwise gate math around it, which is here. Each
function works on one time step of a batch and writes into arrays the caller allocated once for
the whole sequence (no allocation per step):

Shapes: B batch, H hidden size, G gates (RNN 1, LSTM 4 in the order i, f, g, o, GRU 3 in the
order r, z, n -- PyTorch's). xw (B, G*H) = x_t @ W_ih + biases (precomputed for every t at once);
hw (B, G*H) = h_prev @ W_hh.

rnn_forward_step(xw, hw, h_out, relu)                          h = act(xw + hw)
rnn_backward_step(dout, rec, h, da_out, relu)                  da = (dout + rec) act'(.)
lstm_forward_step(xw, hw, c_prev, gates_out, c_out, tanh_c_out, h_out)   gates_out: activated i, f, g, o
lstm_backward_step(dout, rec, dc, gates, c_prev, tanh_c, da_out)   dc: in dL/dc_t, out dL/dc_{t-1}
gru_forward_step(xw, hw, b_hn, h_prev, gates_out, hn_out, h_out)
    gates_out: activated r, z, n; hn_out = h_prev @ W_hn + b_hn (kept for the backward)
gru_backward_step(dout, rec, direct, h_prev, gates, hn, dax_out, dah_out)
    direct: in z dL/dh from the step after, out the same for this step

In the backward, ``dout`` (B, H) is the gradient arriving at h_t from the layer's output and
``rec`` (B, H) = da_{t+1} @ W_hh^T the gradient arriving through the next step's recurrence; the
step adds them. ``da_out`` (B, G*H) is dL/d(pre-activations), from which the op forms every weight
gradient with one matmul over all steps. The math is derived in scratchlm/ops/rnn.py.

``step_kernels(array)`` gives the rung for ``array`` as an object with these six functions:
Numba for NumPy float arrays, the reference otherwise. There is no CUDA rung: on CuPy the
reference runs (its handful of elementwise ops per step on ``backend.xp``).
"""
from __future__ import annotations

import types

import numpy as np

from scratchlm import backend
from scratchlm.kernels import njit, pick
from scratchlm.kernels.attention import _exp_shifted as exp_shifted


# ============================================================== 1. reference (the truth)

def _sigmoid(a):
    """1 / (1 + exp(-a)) written as 0.5 (1 + tanh(a/2)): the same value, and no overflow warning
    for a large negative a in float32."""
    return 0.5 * (1.0 + backend.xp.tanh(0.5 * a))


def rnn_forward_step_reference(xw, hw, h_out, relu):
    a = xw + hw                                                       # (B, H)
    h_out[...] = backend.xp.maximum(a, 0) if relu else backend.xp.tanh(a)


def rnn_backward_step_reference(dout, rec, h, da_out, relu):
    dh = dout + rec                                                   # (B, H)
    # act'(a) from the output alone: tanh' = 1 - h^2; relu' = [h > 0]
    da_out[...] = dh * (h > 0) if relu else dh * (1.0 - h * h)


def lstm_forward_step_reference(xw, hw, c_prev, gates_out, c_out, tanh_c_out, h_out):
    H = c_prev.shape[1]
    a = xw + hw                                                       # (B, 4H)
    gates_out[:, :2 * H] = _sigmoid(a[:, :2 * H])                     # i, f
    gates_out[:, 2 * H:3 * H] = backend.xp.tanh(a[:, 2 * H:3 * H])    # g
    gates_out[:, 3 * H:] = _sigmoid(a[:, 3 * H:])                     # o
    i, f, g, o = (gates_out[:, k * H:(k + 1) * H] for k in range(4))
    c_out[...] = f * c_prev + i * g                                   # (B, H)
    tanh_c_out[...] = backend.xp.tanh(c_out)                          # kept for the backward
    h_out[...] = o * tanh_c_out                                       # (B, H)


def lstm_backward_step_reference(dout, rec, dc, gates, c_prev, tanh_c, da_out):
    H = tanh_c.shape[1]
    i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
    dh = dout + rec                                                   # (B, H)
    dc_total = dc + dh * o * (1.0 - tanh_c * tanh_c)                  # dL/dc_t, both paths
    da_out[:, :H] = dc_total * g * i * (1.0 - i)
    da_out[:, H:2 * H] = dc_total * c_prev * f * (1.0 - f)
    da_out[:, 2 * H:3 * H] = dc_total * i * (1.0 - g * g)
    da_out[:, 3 * H:] = dh * tanh_c * o * (1.0 - o)
    dc[...] = dc_total * f                                            # dL/dc_{t-1}


def gru_forward_step_reference(xw, hw, b_hn, h_prev, gates_out, hn_out, h_out):
    H = h_prev.shape[1]
    gates_out[:, :2 * H] = _sigmoid(xw[:, :2 * H] + hw[:, :2 * H])    # r, z
    hn_out[...] = hw[:, 2 * H:] if b_hn is None else hw[:, 2 * H:] + b_hn
    r, z = gates_out[:, :H], gates_out[:, H:2 * H]
    gates_out[:, 2 * H:] = backend.xp.tanh(xw[:, 2 * H:] + r * hn_out)   # n
    n = gates_out[:, 2 * H:]
    h_out[...] = n + z * (h_prev - n)                                 # (1 - z) n + z h_prev


def gru_backward_step_reference(dout, rec, direct, h_prev, gates, hn, dax_out, dah_out):
    H = h_prev.shape[1]
    r, z, n = (gates[:, k * H:(k + 1) * H] for k in range(3))
    dh = dout + rec + direct                                          # (B, H)
    da_n = dh * (1.0 - z) * (1.0 - n * n)
    da_r = da_n * hn * r * (1.0 - r)
    da_z = dh * (h_prev - n) * z * (1.0 - z)
    dax_out[:, :H] = da_r
    dax_out[:, H:2 * H] = da_z
    dax_out[:, 2 * H:] = da_n
    dah_out[:, :2 * H] = dax_out[:, :2 * H]
    dah_out[:, 2 * H:] = da_n * r                                     # W_hn h sits inside r * (.)
    direct[...] = dh * z


REFERENCE = types.SimpleNamespace(
    rnn_forward_step=rnn_forward_step_reference, rnn_backward_step=rnn_backward_step_reference,
    lstm_forward_step=lstm_forward_step_reference, lstm_backward_step=lstm_backward_step_reference,
    gru_forward_step=gru_forward_step_reference, gru_backward_step=gru_backward_step_reference)


# ============================================================== 2. Numba (CPU)
# One pass over the cells of a step, row by row; serial (a step is B*G*H elements: too little work
# to hand to another thread, and the BLAS product around it already uses the cores).
# Transcendentals: libm's expf/tanhf called one element at a time do not vectorise and cost ~7x
# NumPy's SIMD loops (measured here: an LSTM step at B=32, H=256 took 1.66 ms with math.exp and
# math.tanh against 0.22 ms for the reference). So each row's pre-activations are gathered into a
# scratch row and go through kernels/attention.py's branch-free exp (float32; math.exp for
# float64) in one sweep, and
#     sigmoid(a) = 1 / (1 + exp(-a)),    tanh(a) = 2 sigmoid(2a) - 1 = 2 / (1 + exp(-2a)) - 1.
# Constants are typed like the data (a float64 literal would turn float32 arithmetic into float64).

@njit(cache=True, error_model="numpy")
def _constants(like):
    """0, 1, 2 in ``like``'s dtype, and whether the fast float32 exp applies."""
    k = np.empty(3, dtype=like.dtype)
    k[0], k[1], k[2] = 0.0, 1.0, 2.0
    return k[0], k[1], k[2], like.itemsize == 4


@njit(cache=True, error_model="numpy")
def _rnn_forward_step_numba(xw, hw, h_out, relu):
    B, H = h_out.shape
    zero, one, two, fast = _constants(xw)
    e = np.empty(H, dtype=xw.dtype)
    bits = np.empty(H, dtype=np.int32)
    for b in range(B):
        if relu:
            for j in range(H):
                h_out[b, j] = max(xw[b, j] + hw[b, j], zero)
            continue
        for j in range(H):
            e[j] = -two * (xw[b, j] + hw[b, j])
        exp_shifted(e, H, zero, fast, bits)                           # exp(-2a)
        for j in range(H):
            h_out[b, j] = two / (one + e[j]) - one                    # tanh(a)


@njit(cache=True, error_model="numpy")
def _rnn_backward_step_numba(dout, rec, h, da_out, relu):
    B, H = h.shape
    zero, one, _, _ = _constants(h)
    for b in range(B):
        for j in range(H):
            dh = dout[b, j] + rec[b, j]
            hj = h[b, j]
            if relu:
                da_out[b, j] = dh if hj > zero else zero
            else:
                da_out[b, j] = dh * (one - hj * hj)


@njit(cache=True, error_model="numpy")
def _lstm_forward_step_numba(xw, hw, c_prev, gates_out, c_out, tanh_c_out, h_out):
    B, H = c_prev.shape
    zero, one, two, fast = _constants(xw)
    e = np.empty(4 * H, dtype=xw.dtype)
    bits = np.empty(4 * H, dtype=np.int32)
    for b in range(B):
        for j in range(4 * H):
            e[j] = -(xw[b, j] + hw[b, j])
        for j in range(2 * H, 3 * H):
            e[j] *= two                                               # g: tanh needs exp(-2a)
        exp_shifted(e, 4 * H, zero, fast, bits)
        for j in range(4 * H):
            gates_out[b, j] = one / (one + e[j])                      # sigmoid; for g: sigmoid(2a)
        for j in range(2 * H, 3 * H):
            gates_out[b, j] = two * gates_out[b, j] - one             # g = tanh(a)
        for j in range(H):
            c = gates_out[b, H + j] * c_prev[b, j] + gates_out[b, j] * gates_out[b, 2 * H + j]
            c_out[b, j] = c
            e[j] = -two * c
        exp_shifted(e, H, zero, fast, bits)
        for j in range(H):
            tanh_c = two / (one + e[j]) - one
            tanh_c_out[b, j] = tanh_c
            h_out[b, j] = gates_out[b, 3 * H + j] * tanh_c


@njit(cache=True, error_model="numpy")
def _lstm_backward_step_numba(dout, rec, dc, gates, c_prev, tanh_c, da_out):
    B, H = tanh_c.shape
    _, one, _, _ = _constants(tanh_c)
    for b in range(B):
        for j in range(H):
            i = gates[b, j]
            f = gates[b, H + j]
            g = gates[b, 2 * H + j]
            o = gates[b, 3 * H + j]
            t = tanh_c[b, j]
            dh = dout[b, j] + rec[b, j]
            dc_total = dc[b, j] + dh * o * (one - t * t)
            da_out[b, j] = dc_total * g * i * (one - i)
            da_out[b, H + j] = dc_total * c_prev[b, j] * f * (one - f)
            da_out[b, 2 * H + j] = dc_total * i * (one - g * g)
            da_out[b, 3 * H + j] = dh * t * o * (one - o)
            dc[b, j] = dc_total * f


@njit(cache=True, error_model="numpy")
def _gru_forward_step_numba(xw, hw, b_hn, h_prev, gates_out, hn_out, h_out):
    B, H = h_prev.shape
    zero, one, two, fast = _constants(xw)
    e = np.empty(2 * H, dtype=xw.dtype)
    bits = np.empty(2 * H, dtype=np.int32)
    for b in range(B):
        for j in range(2 * H):
            e[j] = -(xw[b, j] + hw[b, j])
        exp_shifted(e, 2 * H, zero, fast, bits)
        for j in range(2 * H):
            gates_out[b, j] = one / (one + e[j])                      # r, z
        for j in range(H):
            hn = hw[b, 2 * H + j] + b_hn[j]
            hn_out[b, j] = hn
            e[j] = -two * (xw[b, 2 * H + j] + gates_out[b, j] * hn)
        exp_shifted(e, H, zero, fast, bits)
        for j in range(H):
            n = two / (one + e[j]) - one
            gates_out[b, 2 * H + j] = n
            h_out[b, j] = n + gates_out[b, H + j] * (h_prev[b, j] - n)


@njit(cache=True, error_model="numpy")
def _gru_backward_step_numba(dout, rec, direct, h_prev, gates, hn, dax_out, dah_out):
    B, H = h_prev.shape
    _, one, _, _ = _constants(h_prev)
    for b in range(B):
        for j in range(H):
            r = gates[b, j]
            z = gates[b, H + j]
            n = gates[b, 2 * H + j]
            dh = dout[b, j] + rec[b, j] + direct[b, j]
            da_n = dh * (one - z) * (one - n * n)
            da_r = da_n * hn[b, j] * r * (one - r)
            da_z = dh * (h_prev[b, j] - n) * z * (one - z)
            dax_out[b, j] = da_r
            dax_out[b, H + j] = da_z
            dax_out[b, 2 * H + j] = da_n
            dah_out[b, j] = da_r
            dah_out[b, H + j] = da_z
            dah_out[b, 2 * H + j] = da_n * r
            direct[b, j] = dh * z


def _gru_forward_step_numba_entry(xw, hw, b_hn, h_prev, gates_out, hn_out, h_out):
    if b_hn is None:   # Numba wants a concrete array: zeros stand in for an absent bias
        b_hn = np.zeros(h_prev.shape[1], dtype=h_prev.dtype)
    _gru_forward_step_numba(xw, hw, b_hn, h_prev, gates_out, hn_out, h_out)


NUMBA = types.SimpleNamespace(
    rnn_forward_step=_rnn_forward_step_numba, rnn_backward_step=_rnn_backward_step_numba,
    lstm_forward_step=_lstm_forward_step_numba, lstm_backward_step=_lstm_backward_step_numba,
    gru_forward_step=_gru_forward_step_numba_entry, gru_backward_step=_gru_backward_step_numba)


# ============================================================== dispatch

def step_kernels(array):
    """The six step functions for ``array``'s rung: Numba for NumPy float32/float64, else the
    reference (also on CuPy: no CUDA rung here, see the module docstring)."""
    if pick(array) == "numba" and array.dtype in (np.float32, np.float64):
        return NUMBA
    return REFERENCE
