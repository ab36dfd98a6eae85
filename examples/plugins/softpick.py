"""Softpick attention as a jaxgpt plugin, written outside the package as a user would.

Softpick (Zuhri et al. 2025) replaces softmax's normalisation by a rectified one:

    softpick(s)_j = ReLU(e^{s_j} − 1) / (Σ_i |e^{s_i} − 1| + ε)

so a head can give every key zero weight (no attention sink is needed) and weights need not sum to
one. Scores are q·k/√h over the causal (or given) mask; masked keys count in neither sum.

Use it with `--plugin examples/plugins/softpick.py --set model.attention=softpick` on `train`,
`generate`, `eval`, `serve`, `numerics`, `arena` and `variant-check`. What the registry needs is
all here: the Flax layer (with its decoding cache), the empty cache, and the NumPy float64
reference, forward and hand-written backward.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.nn.attention import write_at
from jaxgpt.nn.dense import Dense
from jaxgpt.reference.layers import keep, linear, linear_backward
from jaxgpt.registry import AttentionKind, register_attention

EPS = 1e-6


# --- JAX ------------------------------------------------------------------------------------------

def softpick_weights(s_bnts, visible_bts):
    """Softpick over the last axis where `visible`; computed shifted by m = max(max s, 0), which
    multiplies both sums by e^{-m} (≤ 1): no overflow, same weights."""
    s_bnts = s_bnts.astype(jnp.promote_types(s_bnts.dtype, jnp.float32))  # float32, or float64 under x64
    visible = visible_bts[:, None]
    m = jnp.maximum(jnp.max(jnp.where(visible, s_bnts, -jnp.inf), axis=-1, keepdims=True), 0.0)
    u = jnp.where(visible, jnp.exp(s_bnts - m) - jnp.exp(-m), 0.0)  # (e^s − 1)·e^{−m}
    return jnp.maximum(u, 0.0) / (jnp.sum(jnp.abs(u), axis=-1, keepdims=True) + EPS * jnp.exp(-m))


class SoftpickAttention(nn.Module):
    n_heads: int
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02

    @staticmethod
    def empty_cache(cfg, batch: int, length: int, dtype, window=None) -> dict:
        shape = (batch, length, cfg.n_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    @nn.compact
    def __call__(self, x_btd, *, deterministic: bool = True, positions_bt=None, kv_cache: Optional[dict] = None,
                 cache_index=None, mask_bts=None):
        b, t, d = x_btd.shape
        n = self.n_heads
        h = d // n
        qkv_btf = Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                        name="c_attn")(x_btd)
        q_btnh, k_btnh, v_btnh = (a.reshape(b, t, n, h) for a in jnp.split(qkv_btf, 3, axis=-1))
        if kv_cache is None:
            visible_bts = jnp.tril(jnp.ones((t, t), bool))[None] if mask_bts is None else mask_bts
        else:  # this chunk's keys and values at their columns; the mask says what each query sees
            kv_cache = {"k": write_at(kv_cache["k"], k_btnh, cache_index, 1),
                        "v": write_at(kv_cache["v"], v_btnh, cache_index, 1)}
            k_btnh, v_btnh, visible_bts = kv_cache["k"], kv_cache["v"], mask_bts
        s_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_btnh.astype(q_btnh.dtype)) / jnp.sqrt(h).astype(q_btnh.dtype)
        w_bnts = softpick_weights(s_bnts, visible_bts)
        out_btd = jnp.einsum("bnts,bsnh->btnh", w_bnts, v_btnh.astype(w_bnts.dtype)).reshape(b, t, d)
        out_btd = Dense(d, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std),
                        name="c_proj")(out_btd.astype(x_btd.dtype))
        return out_btd if kv_cache is None else (out_btd, kv_cache)


# --- NumPy float64 reference ---------------------------------------------------------------------

def _heads(a, n):  # [b, t, n·h] -> [b, n, t, h]
    b, t, f = a.shape
    return a.reshape(b, t, n, f // n).transpose(0, 2, 1, 3)


def _merge(a):  # [b, n, t, h] -> [b, t, n·h]
    b, n, t, h = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, n * h)


def softpick(s, visible):  # [.., t, s], [t, s] -> [.., t, s]
    u = np.where(visible, np.expm1(s), 0.0)
    return np.maximum(u, 0.0) / (np.abs(u).sum(-1, keepdims=True) + EPS)


def softpick_backward(dw, s, visible):  # dL/dw -> dL/ds: e^s/D · (1[u>0]·dw − sign(u)·Σ dw·w)
    u = np.where(visible, np.expm1(s), 0.0)
    denom = np.abs(u).sum(-1, keepdims=True) + EPS
    w = np.maximum(u, 0.0) / denom
    return np.where(visible, np.exp(s) / denom * ((u > 0) * dw - np.sign(u) * (dw * w).sum(-1, keepdims=True)), 0.0)


def _forward(x, c_attn, c_proj, n):
    q, k, v = (_heads(a, n) for a in np.split(linear(x, **c_attn), 3, axis=-1))  # [b, n, t, h]
    t = x.shape[1]
    visible = np.tril(np.ones((t, t), bool))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])  # [b, n, t, t]
    w = softpick(s, visible)
    return q, k, v, s, visible, w, _merge(w @ v)


def reference(x, attn, cfg, layer_index: int, record=keep):  # [b, t, d] -> [b, t, d]
    *_, context = _forward(x, attn["c_attn"], attn["c_proj"], cfg.n_heads)
    return linear(record("context", context), **attn["c_proj"])


def reference_backward(dout, x, attn, cfg, layer_index: int):  # -> dx, {c_attn, c_proj}
    n = cfg.n_heads
    q, k, v, s, visible, w, context = _forward(x, attn["c_attn"], attn["c_proj"], n)
    dcontext, g_proj = linear_backward(dout, context, attn["c_proj"]["kernel"], "bias" in attn["c_proj"])
    dctx = _heads(dcontext, n)  # [b, n, t, h]
    dw, dv = dctx @ v.transpose(0, 1, 3, 2), w.transpose(0, 1, 3, 2) @ dctx
    ds = softpick_backward(dw, s, visible) / np.sqrt(q.shape[-1])
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    dqkv = np.concatenate([_merge(a) for a in (dq, dk, dv)], axis=-1)
    dx, g_attn = linear_backward(dqkv, x, attn["c_attn"]["kernel"], "bias" in attn["c_attn"])
    return dx, {"c_attn": g_attn, "c_proj": g_proj}


# --- the registration ----------------------------------------------------------------------------

register_attention(AttentionKind(
    name="softpick", summary="softpick attention: rectified softmax, ReLU(e^s − 1) / Σ|e^s − 1| (Zuhri et al. 2025)",
    layer=lambda cfg, *, impl, dtype, out_init_std, window: SoftpickAttention(
        cfg.n_heads, cfg.qkv_bias, dtype, out_init_std, name="attn"),
    empty_cache=lambda cfg, batch, length, dtype, window: SoftpickAttention.empty_cache(cfg, batch, length, dtype),
    reference=reference, reference_backward=reference_backward,
    positions=("learned", "none"), windows=False, grouped_kv=False))
