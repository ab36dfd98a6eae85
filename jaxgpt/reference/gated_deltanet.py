"""The NumPy reference of Gated DeltaNet (jaxgpt.nn.gated_deltanet): the recurrence token by token,
its hand-written backward (back-propagation through time), and the whole layer.

Shapes: q, k, v [b, n, t, h]; g (log α) and beta [b, n, t]; the state S [b, n, h_k, h_v].
"""

from __future__ import annotations

import numpy as np

from jaxgpt.reference.layers import linear, rms_norm, silu
from jaxgpt.reference.moe import sigmoid


def gated_delta_rule(q, k, v, g, beta):  # -> out [b, n, t, h_v]
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t, α = exp(g), S_0 = 0."""
    b, n, t, h = q.shape
    state = np.zeros((b, n, h, v.shape[-1]))
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for i in range(t):
        kt, vt, a, bt = k[:, :, i], v[:, :, i], np.exp(g[:, :, i])[..., None, None], beta[:, :, i][..., None, None]
        state = a * (state - bt * kt[..., :, None] * np.einsum("bnk,bnkv->bnv", kt, state)[..., None, :]) \
            + bt * kt[..., :, None] * vt[..., None, :]
        out[:, :, i] = np.einsum("bnk,bnkv->bnv", q[:, :, i], state)
    return out


def gated_delta_rule_backward(dout, q, k, v, g, beta):  # dout [b, n, t, h_v] -> dq, dk, dv, dg, dbeta
    """Back-propagation through time. With P_t = α_t (I − β_t k_t k_tᵀ) (symmetric) and
    S_t = P_t S_{t−1} + β_t k_t v_tᵀ: dS_{t−1} = P_t dS_t, dP_t = dS_t S_{t−1}ᵀ, and the gradients
    of α, β, k from P_t and from the write β k vᵀ."""
    b, n, t, h = q.shape
    states = [np.zeros((b, n, h, v.shape[-1]))]
    for i in range(t):  # the forward states S_0 … S_t
        kt, a, bt = k[:, :, i], np.exp(g[:, :, i])[..., None, None], beta[:, :, i][..., None, None]
        proj = np.eye(h) - bt * kt[..., :, None] * kt[..., None, :]
        states.append(a * proj @ states[-1] + bt * kt[..., :, None] * v[:, :, i][..., None, :])
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dg, dbeta = np.zeros_like(g), np.zeros_like(beta)
    ds = np.zeros_like(states[0])  # dL/dS_t flowing back from later tokens
    for i in reversed(range(t)):
        qt, kt, vt, dot = q[:, :, i], k[:, :, i], v[:, :, i], dout[:, :, i]
        a, bt = np.exp(g[:, :, i]), beta[:, :, i]
        s_prev, s_now = states[i], states[i + 1]
        dq[:, :, i] = np.einsum("bnkv,bnv->bnk", s_now, dot)
        ds = ds + qt[..., :, None] * dot[..., None, :]  # o_t = S_tᵀ q_t
        # the write β k vᵀ
        dv[:, :, i] = bt[..., None] * np.einsum("bnkv,bnk->bnv", ds, kt)
        dk[:, :, i] = bt[..., None] * np.einsum("bnkv,bnv->bnk", ds, vt)
        dbeta[:, :, i] = np.einsum("bnk,bnkv,bnv->bn", kt, ds, vt)
        # the transition P_t S_{t−1}
        dp = ds @ np.swapaxes(s_prev, -1, -2)  # [b, n, h, h]
        proj = np.eye(h) - bt[..., None, None] * kt[..., :, None] * kt[..., None, :]
        dg[:, :, i] = a * np.sum(dp * proj, axis=(-2, -1))  # dα · α
        dbeta[:, :, i] -= a * np.einsum("bnk,bnkl,bnl->bn", kt, dp, kt)
        dk[:, :, i] -= (a * bt)[..., None] * np.einsum("bnkl,bnl->bnk", dp + np.swapaxes(dp, -1, -2), kt)
        ds = (a[..., None, None] * proj) @ ds
    return dq, dk, dv, dg, dbeta


def _heads(a, n):  # [b, t, n·h] -> [b, n, t, h]
    b, t, f = a.shape
    return a.reshape(b, t, n, f // n).transpose(0, 2, 1, 3)


def softplus(x):
    return np.logaddexp(0.0, x)


def gated_deltanet(x, c_attn, c_beta, c_alpha, A_log, o_norm, c_gate, c_proj, n_heads, norm_eps=1e-5, record=None,
                   **unused):
    """The whole layer, [b, t, d] -> [b, t, d]: projections, L2-normalised q/k, gates, the
    recurrence, the per-head RMSNorm and SiLU output gate, the output projection."""
    n = n_heads
    qkv = linear(x, **c_attn)
    h = qkv.shape[-1] // (3 * n)
    q, k, v = (_heads(qkv[..., i * n * h:(i + 1) * n * h], n) for i in range(3))
    l2 = lambda a: a / np.sqrt(np.sum(a * a, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
    q, k = l2(q) / np.sqrt(h), l2(k)
    beta = sigmoid(linear(x, **c_beta)).transpose(0, 2, 1)  # [b, n, t]
    g = (-np.exp(A_log)[None, :, None] * softplus(linear(x, **c_alpha).transpose(0, 2, 1)))
    o = rms_norm(gated_delta_rule(q, k, v, g, beta), o_norm["scale"], norm_eps)  # [b, n, t, h]
    o = o * silu(_heads(linear(x, **c_gate), n))
    b, _, t, _ = o.shape
    return linear(o.transpose(0, 2, 1, 3).reshape(b, t, n * h), **c_proj)
