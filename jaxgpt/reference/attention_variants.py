"""The NumPy reference of the arena's softmax variants, forward and hand-written backward:
attention sinks, the output gate (Qiu et al. 2025) and differential attention (Ye et al. 2024).

Shapes: q [b, n, t, h], k and v [b, n, s, h] (heads already repeated for grouped queries),
mask [t, s] (True: may attend), x [b, t, d].
"""

from __future__ import annotations

import numpy as np

from jaxgpt.reference.layers import linear, rms_norm, rms_norm_backward, softmax, softmax_backward
from jaxgpt.reference.moe import sigmoid

LAMBDA_INIT = 0.8  # differential attention's λ_init (a constant; jaxgpt.nn.differential)


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


# --- differential attention --------------------------------------------------------------------------

def diff_lambda(diff):
    e1 = np.exp(np.sum(diff["lambda_q1"] * diff["lambda_k1"]))
    e2 = np.exp(np.sum(diff["lambda_q2"] * diff["lambda_k2"]))
    return e1 - e2 + LAMBDA_INIT, e1, e2


def differential(q, k, v, attend, diff, eps):  # -> [b, n, t, h]; attend(q_half, k_half, v) -> [b, n, t, h]
    """RMSNorm(attend(q1, k1, v) − λ·attend(q2, k2, v)) · (1 − λ_init), halves of each head's q and k."""
    half = q.shape[-1] // 2
    lam = diff_lambda(diff)[0]
    o1, o2 = attend(q[..., :half], k[..., :half], v), attend(q[..., half:], k[..., half:], v)
    return rms_norm(o1 - lam * o2, diff["sub_norm"]["scale"], eps) * (1.0 - LAMBDA_INIT)


def differential_backward(dout, q, k, v, diff, mask, eps):  # plain causal attention -> dq, dk, dv, {diff grads}
    from jaxgpt.reference.attention import attention, attention_backward

    half = q.shape[-1] // 2
    lam, e1, e2 = diff_lambda(diff)
    (q1, q2), (k1, k2) = (q[..., :half], q[..., half:]), (k[..., :half], k[..., half:])
    o1, o2 = attention(q1, k1, v, mask), attention(q2, k2, v, mask)
    ddiff, g_norm = rms_norm_backward(dout * (1.0 - LAMBDA_INIT), o1 - lam * o2, diff["sub_norm"]["scale"], eps)
    dlam = -np.sum(ddiff * o2)
    dq1, dk1, dv1 = attention_backward(ddiff, q1, k1, v, mask)
    dq2, dk2, dv2 = attention_backward(-lam * ddiff, q2, k2, v, mask)
    grads = {"lambda_q1": dlam * e1 * diff["lambda_k1"], "lambda_k1": dlam * e1 * diff["lambda_q1"],
             "lambda_q2": -dlam * e2 * diff["lambda_k2"], "lambda_k2": -dlam * e2 * diff["lambda_q2"],
             "sub_norm": g_norm}
    return np.concatenate([dq1, dq2], -1), np.concatenate([dk1, dk2], -1), dv1 + dv2, grads
