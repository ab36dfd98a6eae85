"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024): linear attention with the gated delta rule.

Each head keeps a state S (h × h, keys × values). A token first decays the state by α ∈ (0, 1)
(the gate: Mamba 2's forgetting) and then *replaces* what S stored under its key by its value
(the delta rule, a step of online regression with rate β ∈ (0, 1)):

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,        o_t = S_tᵀ q_t

with q, k L2-normalised (q also scaled by 1/√h), β = σ(x W_β), α = exp(−exp(A) · softplus(x W_α + b)).
The output is RMS-normalised per head and gated by SiLU(x W_g), as in the paper (its short
convolutions are left out).

- recurrent form (`delta_step`, decoding): one token at a time; the cache is S, constant in length;
- chunked parallel form (`delta_chunked`, training and prefill): within a chunk of C tokens the
  pseudo-values U = T⁻¹ β ⊙ (V − γ ⊙ K S₀), T = I + strictly-lower(β_i γ_i/γ_j k_i·k_j), come from
  one triangular solve (the WY/UT form), so a chunk costs matrix products; chunks pass S along a
  `lax.scan`. γ_i is the product of the α up to token i within the chunk.

The NumPy reference (`jaxgpt.reference.gated_deltanet`) runs the recurrence token by token, so the
parity test also proves the two forms equal.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.nn.attention import fused_qkv, head_counts, slice_at
from jaxgpt.nn.dense import Dense
from jaxgpt.nn.norms import RMSNorm

Array = jax.Array
CHUNK = 32  # tokens per chunk of the parallel form


def l2_normalise(x: Array, eps: float = 1e-6) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def delta_step(state_bnkv: Array, q_bnh: Array, k_bnh: Array, v_bnh: Array, g_bn: Array, beta_bn: Array):
    """One token of the recurrence: (new state, o_bnh)."""
    alpha_bn11 = jnp.exp(g_bn)[..., None, None]
    decayed_bnkv = alpha_bn11 * state_bnkv
    u_bnv = beta_bn[..., None] * (v_bnh - jnp.einsum("bnk,bnkv->bnv", k_bnh, decayed_bnkv))
    state_bnkv = decayed_bnkv + k_bnh[..., :, None] * u_bnv[..., None, :]
    return state_bnkv, jnp.einsum("bnk,bnkv->bnv", q_bnh, state_bnkv)


def _chunk(state_bnkv: Array, q_bnch, k_bnch, v_bnch, g_bnc, beta_bnc):
    """One chunk of the parallel form from the state before it: (state after it, o_bnch)."""
    c = q_bnch.shape[2]
    cum_bnc = jnp.cumsum(g_bnc, axis=-1)  # log γ_i
    lower_cc = jnp.tril(jnp.ones((c, c), bool))
    log_ratio_bncc = jnp.where(lower_cc, cum_bnc[..., :, None] - cum_bnc[..., None, :], -jnp.inf)
    ratio_bncc = jnp.exp(log_ratio_bncc)  # γ_i / γ_j for j <= i, else 0
    strict_cc = lower_cc & ~jnp.eye(c, dtype=bool)
    kk_bncc = jnp.einsum("bnik,bnjk->bnij", k_bnch, k_bnch)
    t_bncc = jnp.eye(c, dtype=q_bnch.dtype) + jnp.where(strict_cc, beta_bnc[..., :, None] * ratio_bncc * kk_bncc, 0.0)
    gamma_bnc1 = jnp.exp(cum_bnc)[..., None]
    rhs_bncv = beta_bnc[..., None] * (v_bnch - gamma_bnc1 * jnp.einsum("bnck,bnkv->bncv", k_bnch, state_bnkv))
    u_bncv = jax.lax.linalg.triangular_solve(t_bncc, rhs_bncv, left_side=True, lower=True, unit_diagonal=True)
    qk_bncc = jnp.einsum("bnik,bnjk->bnij", q_bnch, k_bnch) * ratio_bncc
    o_bncv = gamma_bnc1 * jnp.einsum("bnck,bnkv->bncv", q_bnch, state_bnkv) + qk_bncc @ u_bncv
    to_end_bnc1 = jnp.exp(cum_bnc[..., -1:] - cum_bnc)[..., None]  # γ_C / γ_j
    state_bnkv = jnp.exp(cum_bnc[..., -1])[..., None, None] * state_bnkv + jnp.einsum(
        "bnck,bncv->bnkv", k_bnch * to_end_bnc1, u_bncv)
    return state_bnkv, o_bncv


def delta_chunked(state_bnkv: Array, q_btnh, k_btnh, v_btnh, g_btn, beta_btn, chunk: int = CHUNK):
    """The whole sequence in chunks: (final state, o_btnh). Padding to whole chunks uses β = 0 and
    log α = 0 (a token that changes nothing)."""
    b, t, n, h = q_btnh.shape
    c = min(chunk, t)
    pad = -t % c

    def to_chunks(a):  # (b, t, n, ...) -> (nc, b, n, c, ...), zero-padded to whole chunks
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, -1, c, *a.shape[2:]).swapaxes(0, 1).swapaxes(2, 3)

    xs = (to_chunks(q_btnh), to_chunks(k_btnh), to_chunks(v_btnh), to_chunks(g_btn[..., None])[..., 0],
          to_chunks(beta_btn[..., None])[..., 0])
    state_bnkv, o_chunks = jax.lax.scan(lambda s, x: _chunk(s, *x), state_bnkv, xs)
    o_btnh = o_chunks.swapaxes(2, 3).swapaxes(0, 1).reshape(b, -1, n, o_chunks.shape[-1])[:, :t]
    return state_bnkv, o_btnh


def _inverse_softplus(y):
    return y + np.log(-np.expm1(-y))


class GatedDeltaNet(nn.Module):
    n_heads: int
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02
    norm_eps: float = 1e-5

    @staticmethod
    def empty_cache(config, batch: int, length: int, dtype) -> dict:
        h = config.head_dim
        return {"state": jnp.zeros((batch, config.n_heads, h, h), jnp.promote_types(dtype, jnp.float32))}

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 kv_cache: Optional[dict] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None):
        b, t, d, n, _, h, _ = head_counts(x_btd, self.n_heads, None, positions_bt)
        q_btnh, k_btnh, v_btnh = fused_qkv(x_btd, n, n, h, use_bias=self.qkv_bias, dtype=self.dtype)
        acc = jnp.promote_types(x_btd.dtype, jnp.float32)
        q_btnh = l2_normalise(q_btnh.astype(acc)) / jnp.sqrt(jnp.asarray(h, acc))
        k_btnh, v_btnh = l2_normalise(k_btnh.astype(acc)), v_btnh.astype(acc)
        init = nn.initializers.normal(0.02)
        beta_btn = jax.nn.sigmoid(Dense(n, use_bias=False, dtype=self.dtype, kernel_init=init, name="c_beta")(x_btd)
                                  .astype(acc))
        dt_bias = lambda key, shape, dtype=jnp.float32: jnp.asarray(_inverse_softplus(np.geomspace(1e-3, 0.1, shape[0])), dtype)  # noqa: E731
        a_log_n = self.param("A_log", lambda key, shape: jnp.log(jnp.linspace(1.0, 16.0, shape[0])), (n,))
        pre_btn = Dense(n, use_bias=True, dtype=self.dtype, kernel_init=init, bias_init=dt_bias, name="c_alpha")(x_btd)
        g_btn = -jnp.exp(a_log_n.astype(acc)) * jax.nn.softplus(pre_btn.astype(acc))  # log α ≤ 0

        if kv_cache is None:
            _, o_btnh = delta_chunked(jnp.zeros((b, n, h, h), acc), q_btnh, k_btnh, v_btnh, g_btn, beta_btn)
        else:  # a padding token changes nothing: β = 0, α = 1
            real_bt = jnp.diagonal(slice_at(mask_bts, cache_index, t, axis=2), axis1=1, axis2=2)
            beta_btn, g_btn = beta_btn * real_bt[..., None], g_btn * real_bt[..., None]
            if t == 1:  # decoding: the recurrent form
                state, o_bnh = delta_step(kv_cache["state"], q_btnh[:, 0], k_btnh[:, 0], v_btnh[:, 0], g_btn[:, 0],
                                          beta_btn[:, 0])
                o_btnh = o_bnh[:, None]
            else:  # a prompt: the chunked form from the cached state
                state, o_btnh = delta_chunked(kv_cache["state"], q_btnh, k_btnh, v_btnh, g_btn, beta_btn)
            kv_cache = {"state": state}
        o_btnh = RMSNorm(self.norm_eps, False, self.dtype, name="o_norm")(o_btnh.astype(self.dtype))
        gate_btnh = Dense(n * h, use_bias=False, dtype=self.dtype, kernel_init=init, name="c_gate")(x_btd).reshape(b, t, n, h)
        o_btnh = o_btnh * jax.nn.silu(gate_btnh.astype(acc)).astype(o_btnh.dtype)
        out_btd = Dense(d, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std),
                        name="c_proj")(o_btnh.reshape(b, t, n * h))
        return out_btd if kv_cache is None else (out_btd, kv_cache)
