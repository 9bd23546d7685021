"""Recurrent layers as fused ops: one ``Function`` runs a whole layer-direction over time.

A recurrence unrolled on the tape would be T x (a matmul, a slice per gate, a few elementwise
ops) nodes, each saving its own arrays. Here the forward loops over time itself and saves only
what the backward needs; the backward walks time in reverse (backpropagation through time,
written by hand). Per layer-direction and sequence:

    XW = X @ W_ih + b          one matmul for all T steps: (T*B, n_in) @ (n_in, G*H)
    for each step t:           hw = h_prev @ W_hh (BLAS, as W_hh^T h_prev^T), then the gate math
                               (kernels/rnn.py)
    backward, t reversed:      the gate math's backward gives da_t = dL/d(pre-activations);
                               the recurrence gradient dL/dh_prev = da_t @ W_hh^T (BLAS)
    then, over all steps at once (one matmul each, A = the stacked da_t, (T*B, G*H)):
        dL/dX = A @ W_ih^T,   dL/dW_ih = X^T A,   dL/dW_hh = H_prev^T A,   dL/db = sum_rows A.

Shapes: T time, B batch, n_in input features, H hidden size, G gates. Inputs are time-major,
x (T, B, n_in); h0, c0 (B, H) or None (zeros); W_ih (n_in, G*H), W_hh (H, G*H), b_ih, b_hh
(G*H,) or None -- scratchlm's (n_in, n_out) layout, PyTorch's names and gate order. ``reverse``
runs time backwards (the second direction of a bidirectional layer); out[t] is always the
state at time t. The output of RNN and GRU is out (T, B, H) and h_n is its last-processed row;
LSTM's is out and c_n stacked as (T + 1, B, H), so one op still has one output.
"""
from __future__ import annotations

from .. import backend
from ..kernels import rnn as rnn_kernels
from ..tensor import Function


# ---------------------------------------------------------------------- shared pieces

def _input_projection(x, w_ih, bias):
    """x (T, B, n_in) -> (rows (T*B, n_in), XW (T, B, G*H) = x @ W_ih + bias) in one matmul."""
    T, B, n_in = x.shape
    rows = backend.xp.ascontiguousarray(x).reshape(T * B, n_in)
    xw = rows @ w_ih                                                  # (T*B, G*H), fresh
    if bias is not None:
        xw += bias
    return rows, xw.reshape(T, B, -1)


def _states(T, B, H, initial, dtype, reverse):
    """A (T+1, B, H) buffer for a state sequence and two views of it indexed by time t:
    ``current[t]`` = the state after step t, ``previous[t]`` = the state step t reads.
    Forward: buffer = [s0, s_0 .. s_{T-1}]; reverse: [s_0 .. s_{T-1}, s0], s0 the initial state."""
    xp = backend.xp
    buffer = xp.empty((T + 1, B, H), dtype=dtype)
    start = T if reverse else 0
    buffer[start] = 0 if initial is None else initial
    if reverse:
        return buffer, buffer[:T], buffer[1:]
    return buffer, buffer[1:], buffer[:T]


def _times(T, reverse, backward=False):
    """The order the steps run in: forward in time, or reversed (and reversed again for BPTT)."""
    ascending = reverse == backward
    return range(T) if ascending else range(T - 1, -1, -1)


def _transposed(w_hh):
    """W_hh^T laid out contiguously, (G*H, H): the recurrent matrix as both time loops want it.
    BLAS (OpenBLAS, one thread, B=32, H=256, float32, measured here) forms a step's product
    ~1.35x faster as hw^T = W_hh^T h^T (the big matrix as the left operand) than as h @ W_hh,
    and da @ W_hh^T ~1.45x faster from this copy than from the transposed view."""
    return backend.xp.ascontiguousarray(w_hh.T)


def _run_forward(T, reverse, previous_h, w_hh, step):
    """The time loop: hw = h_prev @ W_hh, then ``step(t, hw)`` (the gate math, reading hw (B, G*H)).
    The product is formed as hw^T = W_hh^T h_prev^T into one reused (G*H, B) buffer, hw its
    transposed view. Returns W_hh^T (contiguous) for the backward, or None for T = 1 (decoding one
    token: a single product, where copying W_hh^T would cost more than it saves)."""
    xp = backend.xp
    if T == 1:
        step(0, previous_h[0] @ w_hh)                                 # (B, G*H)
        return None
    w_hh_t = _transposed(w_hh)                                        # (G*H, H)
    hw_t = xp.empty((w_hh.shape[1], previous_h.shape[1]), dtype=previous_h.dtype)
    for t in _times(T, reverse):
        xp.matmul(w_hh_t, previous_h[t].T, out=hw_t)                  # (G*H, B)
        step(t, hw_t.T)
    return w_hh_t


def _run_backward(T, reverse, da_h, w_hh, w_hh_t, rec, step, need_last):
    """BPTT: ``step(t)`` fills da_h[t] using rec = dL/dh_t from the future, then
    rec = da_h[t] @ W_hh^T. With ``need_last``, rec ends as dL/dh0 (else its last product is skipped).
    ``w_hh_t``: the forward's contiguous W_hh^T, or None (then made here)."""
    xp = backend.xp
    if w_hh_t is None:
        w_hh_t = _transposed(w_hh)
    times = list(_times(T, reverse, backward=True))
    for k, t in enumerate(times):
        step(t)
        if k + 1 < len(times) or need_last:
            xp.matmul(da_h[t], w_hh_t, out=rec)                       # (B, H)


def _weight_gradients(rows, previous_h, w_ih, da_x, da_h, b_ih, b_hh):
    """dx, dW_ih, dW_hh, db_ih, db_hh from the stacked pre-activation gradients, one matmul each.
    da_x (T, B, G*H) reaches x @ W_ih + b_ih, da_h reaches h_prev @ W_hh + b_hh (equal except GRU)."""
    T, B, GH = da_x.shape
    ax, ah = da_x.reshape(T * B, GH), da_h.reshape(T * B, GH)
    dx = (ax @ w_ih.T).reshape(T, B, -1)                              # (T, B, n_in)
    dw_ih = rows.T @ ax                                               # (n_in, G*H)
    dw_hh = previous_h.reshape(T * B, -1).T @ ah                      # (H, G*H)
    db_ih = None if b_ih is None else ax.sum(axis=0)
    db_hh = None if b_hh is None else (db_ih if da_h is da_x and db_ih is not None else ah.sum(axis=0))
    return dx, dw_ih, dw_hh, db_ih, db_hh


def _bias_sum(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


# ---------------------------------------------------------------------- the ops

class RNNLayer(Function):
    """Elman RNN, one direction:  h_t = act(a_t),  a_t = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh,
    act = tanh or relu.

    Backward: with g_t = dL/dh_t (from the output) + da_{t+1} W_hh^T (through the next step),
        da_t = g_t * act'(a_t),   act' = 1 - h_t^2 (tanh) or [h_t > 0] (relu),
    both from the output alone. The two biases only ever appear summed, so they are added to XW
    once and get the same gradient sum_t da_t.
    Saved: the input rows, the state buffer h_0..h_T (T+1, B, H) and the forward's W_hh^T.
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", reverse=False):
        T, B, _ = x.shape
        H = w_hh.shape[0]
        relu = nonlinearity == "relu"
        kernels = rnn_kernels.step_kernels(x)
        rows, xw = _input_projection(x, w_ih, _bias_sum(b_ih, b_hh))    # (T, B, H)
        buffer, out, previous = _states(T, B, H, h0, x.dtype, reverse)
        w_hh_t = _run_forward(T, reverse, previous, w_hh,
                              lambda t, hw: kernels.rnn_forward_step(xw[t], hw, out[t], relu))
        saved = (rows, out, previous, w_ih, w_hh, w_hh_t, b_ih, b_hh, h0 is not None, relu, reverse)
        return out, saved

    @staticmethod
    def backward(g, saved):
        rows, out, previous, w_ih, w_hh, w_hh_t, b_ih, b_hh, has_h0, relu, reverse = saved
        xp = backend.xp
        T, B, H = out.shape
        kernels = rnn_kernels.step_kernels(out)
        g = xp.ascontiguousarray(g)
        da = xp.empty((T, B, H), dtype=out.dtype)
        rec = xp.zeros((B, H), dtype=out.dtype)
        _run_backward(T, reverse, da, w_hh, w_hh_t, rec,
                      lambda t: kernels.rnn_backward_step(g[t], rec, out[t], da[t], relu), has_h0)
        dx, dw_ih, dw_hh, db_ih, db_hh = _weight_gradients(rows, previous, w_ih, da, da, b_ih, b_hh)
        return dx, (rec if has_h0 else None), dw_ih, dw_hh, db_ih, db_hh


class LSTMLayer(Function):
    """LSTM (Hochreiter & Schmidhuber 1997, with forget gate), one direction, PyTorch's equations:

        [a_i, a_f, a_g, a_o] = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh       (B, 4H), gate order i f g o
        i = s(a_i),  f = s(a_f),  g = tanh(a_g),  o = s(a_o)                s = sigmoid
        c_t = f * c_{t-1} + i * g,      h_t = o * tanh(c_t).

    Backward. Let gh = dL/dh_t = (from the output) + da_{t+1} W_hh^T, and gc = dL/dc_t arriving
    from step t+1 (f_{t+1} * its gc; for t = T the gradient of c_n). h_t depends on c_t, so
        gc_total = gc + gh * o * (1 - tanh(c_t)^2)
        do = gh * tanh(c_t),  di = gc_total * g,  dg = gc_total * i,  df = gc_total * c_{t-1},
        dL/dc_{t-1} = gc_total * f,
    and through the activations (s' = s (1 - s), tanh' = 1 - tanh^2, from the saved outputs):
        da_i = di i (1-i),  da_f = df f (1-f),  da_g = dg (1 - g^2),  da_o = do o (1-o).
    Both biases enter only as b_ih + b_hh: added to XW once, both get sum_t da_t.
    Saved: input rows, the activated gates (T, B, 4H), the h and c buffers (T+1, B, H) each, and
    tanh(c_t) (T, B, H): storing it costs B*H per step, recomputing it would put a transcendental
    back into the backward's otherwise purely arithmetic step. The gates are written over XW (the
    pre-activations, dead once a step has read them), and the forward's contiguous W_hh^T (4H, H)
    is kept for the backward's products.
    """

    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=False):
        xp = backend.xp
        T, B, _ = x.shape
        H = w_hh.shape[0]
        kernels = rnn_kernels.step_kernels(x)
        rows, xw = _input_projection(x, w_ih, _bias_sum(b_ih, b_hh))    # (T, B, 4H)
        _, out, previous = _states(T, B, H, h0, x.dtype, reverse)
        c_buffer, c, c_previous = _states(T, B, H, c0, x.dtype, reverse)
        gates = xw     # the activated gates overwrite their pre-activations (the step reads xw[t] first)
        tanh_c = xp.empty((T, B, H), dtype=x.dtype)
        w_hh_t = _run_forward(T, reverse, previous, w_hh,
                              lambda t, hw: kernels.lstm_forward_step(xw[t], hw, c_previous[t], gates[t], c[t],
                                                                      tanh_c[t], out[t]))
        c_n = c_buffer[0 if reverse else T]
        y = xp.concatenate([out, c_n[None]], axis=0)                  # (T+1, B, H): out, then c_n
        saved = (rows, out, previous, tanh_c, c_previous, gates, w_ih, w_hh, w_hh_t, b_ih, b_hh,
                 h0 is not None, c0 is not None, reverse)
        return y, saved

    @staticmethod
    def backward(g, saved):
        rows, out, previous, tanh_c, c_previous, gates, w_ih, w_hh, w_hh_t, b_ih, b_hh, has_h0, has_c0, reverse = saved
        xp = backend.xp
        T, B, H = out.shape
        kernels = rnn_kernels.step_kernels(out)
        g = xp.ascontiguousarray(g)
        g_out, dc = g[:T], g[T].copy()                                # dc: dL/dc, walked back in place
        da = xp.empty((T, B, 4 * H), dtype=out.dtype)
        rec = xp.zeros((B, H), dtype=out.dtype)
        _run_backward(T, reverse, da, w_hh, w_hh_t, rec,
                      lambda t: kernels.lstm_backward_step(g_out[t], rec, dc, gates[t], c_previous[t], tanh_c[t], da[t]),
                      has_h0)
        dx, dw_ih, dw_hh, db_ih, db_hh = _weight_gradients(rows, previous, w_ih, da, da, b_ih, b_hh)
        return dx, (rec if has_h0 else None), (dc if has_c0 else None), dw_ih, dw_hh, db_ih, db_hh


class GRULayer(Function):
    """GRU (Cho et al. 2014), one direction, PyTorch's equations (gate order r, z, n):

        r = s(x W_ir + b_ir + h W_hr + b_hr),      z = s(x W_iz + b_iz + h W_hz + b_hz)
        n = tanh(x W_in + b_in + r * hn),          hn = h W_hn + b_hn
        h_t = (1 - z) * n + z * h_{t-1}            (h = h_{t-1} above)

    Backward, with gh = dL/dh_t = (from the output) + (through step t+1: its da_h W_hh^T plus
    its z * gh, the direct path):
        dn = gh (1 - z),   dz = gh (h_{t-1} - n),   direct dL/dh_{t-1} += gh z
        da_n = dn (1 - n^2)          (pre-activation of n: x W_in + b_in + r hn)
        dr = da_n hn,   da_r = dr r (1-r),   da_z = dz z (1-z)
    b_hn sits inside r * (.), so the x side and the h side get different gradients:
        x side da_x = [da_r, da_z, da_n]      -> dW_ih, db_ih, dx
        h side da_h = [da_r, da_z, da_n * r]  -> dW_hh, db_hh, and da_h W_hh^T into h_{t-1}.
    b_hr, b_hz are added to XW once; b_hn is added per step to hn.
    Saved: input rows, activated gates (T, B, 3H, written over XW), hn (T, B, H), the h buffer
    (T+1, B, H), the forward's W_hh^T.
    """

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=False):
        xp = backend.xp
        T, B, _ = x.shape
        H = w_hh.shape[0]
        kernels = rnn_kernels.step_kernels(x)
        rows, xw = _input_projection(x, w_ih, b_ih)                   # (T, B, 3H)
        b_hn = None
        if b_hh is not None:
            xw[:, :, :2 * H] += b_hh[:2 * H]                          # b_hr, b_hz: outside r * (.)
            b_hn = b_hh[2 * H:]
        _, out, previous = _states(T, B, H, h0, x.dtype, reverse)
        gates = xw     # the activated gates overwrite their pre-activations (the step reads xw[t] first)
        hn = xp.empty((T, B, H), dtype=x.dtype)
        w_hh_t = _run_forward(T, reverse, previous, w_hh,
                              lambda t, hw: kernels.gru_forward_step(xw[t], hw, b_hn, previous[t], gates[t], hn[t],
                                                                     out[t]))
        saved = (rows, out, previous, gates, hn, w_ih, w_hh, w_hh_t, b_ih, b_hh, h0 is not None, reverse)
        return out, saved

    @staticmethod
    def backward(g, saved):
        rows, out, previous, gates, hn, w_ih, w_hh, w_hh_t, b_ih, b_hh, has_h0, reverse = saved
        xp = backend.xp
        T, B, H = out.shape
        kernels = rnn_kernels.step_kernels(out)
        g = xp.ascontiguousarray(g)
        da_x = xp.empty((T, B, 3 * H), dtype=out.dtype)
        da_h = xp.empty((T, B, 3 * H), dtype=out.dtype)
        rec = xp.zeros((B, H), dtype=out.dtype)
        direct = xp.zeros((B, H), dtype=out.dtype)
        _run_backward(T, reverse, da_h, w_hh, w_hh_t, rec,
                      lambda t: kernels.gru_backward_step(g[t], rec, direct, previous[t], gates[t], hn[t],
                                                          da_x[t], da_h[t]),
                      has_h0)
        dx, dw_ih, dw_hh, db_ih, db_hh = _weight_gradients(rows, previous, w_ih, da_x, da_h, b_ih, b_hh)
        return dx, (rec + direct if has_h0 else None), dw_ih, dw_hh, db_ih, db_hh
