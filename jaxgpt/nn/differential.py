"""Differential attention (Ye et al. 2024, "Differential Transformer").

Each head splits its query and key in two halves and attends twice with the same values:
    out = RMSNorm(softmax(q1·k1ᵀ/√(h/2)) v − λ · softmax(q2·k2ᵀ/√(h/2)) v) · (1 − λ_init),
λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, learned per layer. The difference cancels the attention
both maps give to irrelevant context ("attention noise"). λ_init is the constant 0.8: the paper's
ablation finds it as good as its depth-dependent schedule, and a constant keeps the layers identical
(so `scan_layers` still applies).

Each half runs through the configured backend unchanged: it is zero-padded back to the head width h
(zeros add nothing to q·k) and the query scaled by √2, so the backend's 1/√h becomes 1/√(h/2).
Every backend, window, ALiBi bias, sink and cache therefore works as for plain attention; the price
is score products over h instead of h/2.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.norms import RMSNorm

Array = jax.Array
LAMBDA_INIT = 0.8


def halves_as_heads(x_btnh: Array) -> Array:
    """(b, t, n, h) -> (b, t, 2n, h/2): each half of a head as a head of its own (for RoPE)."""
    b, t, n, h = x_btnh.shape
    return x_btnh.reshape(b, t, 2 * n, h // 2)


def _padded_half(x_btnh: Array, which: int, scale: float = 1.0) -> Array:
    half = x_btnh.shape[-1] // 2
    part = x_btnh[..., which * half:(which + 1) * half] * jnp.asarray(scale, x_btnh.dtype)
    return jnp.concatenate([part, jnp.zeros_like(part)], axis=-1)


class DifferentialCore(nn.Module):
    """(q_btnh, k_bsmh, v_bsmh, attend) -> out_btnh, where `attend(q, k, v)` is the layer's backend
    with its visibility, bias and sink arguments already bound."""

    norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q_btnh: Array, k_bsmh: Array, v_bsmh: Array, attend: Callable[..., Array]) -> Array:
        half = q_btnh.shape[-1] // 2
        init = nn.initializers.normal(0.1)
        lq1, lk1, lq2, lk2 = (self.param(name, init, (half,), jnp.float32)
                              for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
        lam = jnp.exp(jnp.sum(lq1 * lk1)) - jnp.exp(jnp.sum(lq2 * lk2)) + LAMBDA_INIT
        out1_btnh = attend(_padded_half(q_btnh, 0, math.sqrt(2.0)), _padded_half(k_bsmh, 0), v_bsmh)
        out2_btnh = attend(_padded_half(q_btnh, 1, math.sqrt(2.0)), _padded_half(k_bsmh, 1), v_bsmh)
        acc = jnp.promote_types(out1_btnh.dtype, jnp.float32)
        diff_btnh = out1_btnh.astype(acc) - lam.astype(acc) * out2_btnh.astype(acc)
        normed_btnh = RMSNorm(self.norm_eps, False, self.dtype, name="sub_norm")(diff_btnh.astype(out1_btnh.dtype))
        return normed_btnh * jnp.asarray(1.0 - LAMBDA_INIT, normed_btnh.dtype)
