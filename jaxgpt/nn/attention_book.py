"""Attention as the book's chapter 3 builds it, step by step (the multi-head layer GPT uses is in
`jaxgpt.nn.attention`).

1. `simplified_self_attention`: no weights; scores are dot products of the inputs themselves.
2. `SelfAttention`: trainable W_query / W_key / W_value, scaled dot-product.
3. `CausalAttention`: the same with a causal mask applied before the softmax and dropout on the
   attention weights.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.attention_backends import causal_mask, masked_softmax

Array = jax.Array


def simplified_self_attention(x_td: Array) -> tuple[Array, Array, Array]:
    """The book's section 3.3: scores x·xᵀ, weights softmax(scores), context weights·x.

    Returns (scores_tt, weights_tt, context_td).
    """
    scores_tt = x_td @ x_td.T
    weights_tt = jax.nn.softmax(scores_tt, axis=-1)
    context_td = weights_tt @ x_td
    return scores_tt, weights_tt, context_td


class SelfAttention(nn.Module):
    """The book's SelfAttention_v2: single head, Q/K/V projections of width `d_out`."""

    d_out: int
    qkv_bias: bool = False

    def attention_weights(self, x_btd: Array, mask_tt: Optional[Array] = None):
        q_bte = nn.Dense(self.d_out, use_bias=self.qkv_bias, name="W_query")(x_btd)
        k_bte = nn.Dense(self.d_out, use_bias=self.qkv_bias, name="W_key")(x_btd)
        v_bte = nn.Dense(self.d_out, use_bias=self.qkv_bias, name="W_value")(x_btd)
        scores_btt = jnp.einsum("bte,bse->bts", q_bte, k_bte) / jnp.sqrt(self.d_out)
        return masked_softmax(scores_btt, mask_tt), v_bte

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        weights_btt, v_bte = self.attention_weights(x_btd)
        return weights_btt @ v_bte  # (b, t, d_out)


class CausalAttention(nn.Module):
    """The book's CausalAttention: SelfAttention with a causal mask and dropout on the weights."""

    d_out: int
    drop_rate: float = 0.0
    qkv_bias: bool = False

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True) -> Array:
        t = x_btd.shape[1]
        weights_btt, v_bte = SelfAttention.attention_weights(self, x_btd, causal_mask(t))
        weights_btt = nn.Dropout(self.drop_rate)(weights_btt, deterministic=deterministic)
        return weights_btt @ v_bte  # (b, t, d_out)
