"""The NumPy reference of two of the arena's softmax variants, forward and hand-written backward:
attention sinks and the output gate (Qiu et al. 2025). Differential attention (Ye et al. 2024) is
in `jaxgpt.reference.attention`, beside the attention it is made of.

Shapes: q [b, n, t, h], k and v [b, n, s, h] (heads already repeated for grouped queries),
mask [t, s] (True: may attend), x [b, t, d].
"""

from __future__ import annotations

import numpy as np

from jaxgpt.reference.layers import linear, softmax, softmax_backward
from jaxgpt.reference.moe import sigmoid



# --- attention sinks: one learned logit per head in every softmax, with no value ---------------------

def sink_softmax(scores, sinks):  # [b, n, t, s], [n] -> [b, n, t, s]: the real keys' weights (sum < 1)
    sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], scores.shape[:-1] + (1,))
    return softmax(np.concatenate([scores, sink], axis=-1))[..., :-1]


def sink_attention(q, k, v, sinks, mask, scale=None):  # -> [b, n, t, h]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ np.swapaxes(k, -1, -2) * scale
    return sink_softmax(np.where(mask, scores, -np.inf), sinks) @ v


def sink_attention_backward(dout, q, k, v, sinks, mask, scale=None):  # dout [b, n, t, h] -> dq, dk, dv, dsinks [n]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.where(mask, q @ np.swapaxes(k, -1, -2) * scale, -np.inf)
    sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], scores.shape[:-1] + (1,))
    w_full = softmax(np.concatenate([scores, sink], axis=-1))  # [b, n, t, s + 1]
    w = w_full[..., :-1]
    dv = np.swapaxes(w, -1, -2) @ dout
    dw_full = np.concatenate([dout @ np.swapaxes(v, -1, -2), np.zeros(sink.shape)], axis=-1)  # the sink has no value
    dscores_full = softmax_backward(dw_full, w_full)
    dscores = dscores_full[..., :-1] * scale
    return dscores @ k, np.swapaxes(dscores, -1, -2) @ q, dv, dscores_full[..., -1].sum(axis=(0, 2))


# --- the output gate: context ⊙ sigmoid(x W_gate), per head and channel ------------------------------

def gate_values(x, c_gate, n_heads):  # [b, t, d] -> [b, n, t, h]
    g = sigmoid(linear(x, **c_gate))
    b, t, nh = g.shape
    return g.reshape(b, t, n_heads, nh // n_heads).transpose(0, 2, 1, 3)


def gate_backward(dout, context, x, c_gate, n_heads):  # out = context ⊙ gate -> dcontext, dx, {"c_gate"}
    g = gate_values(x, c_gate, n_heads)
    dcontext = dout * g
    dpre = dout * context * g * (1.0 - g)  # [b, n, t, h] through the sigmoid
    b, n, t, h = dpre.shape
    dpre_btf = dpre.transpose(0, 2, 1, 3).reshape(b, t, n * h)
    dx = dpre_btf @ c_gate["kernel"].T
    return dcontext, dx, {"c_gate": {"kernel": np.einsum("btd,btf->df", x, dpre_btf)}}
