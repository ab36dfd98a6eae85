"""Attention, following the book's chapter 3 step by step, then the multi-head layer GPT uses.

1. `simplified_self_attention`: no weights; scores are dot products of the inputs themselves.
2. `SelfAttention`: trainable W_query / W_key / W_value, scaled dot-product.
3. `CausalAttention`: the same with a causal mask applied before the softmax and dropout on the
   attention weights.
4. `MultiHeadAttention`: fused QKV projection, heads, output projection with bias. Its core is an
   attention backend chosen by name (`ATTENTION_BACKENDS`): `naive` (explicit einsums and mask, the
   reference inside JAX) or `xla` (`jax.nn.dot_product_attention`, which XLA lowers to fused kernels
   and, on GPUs, to cuDNN flash attention when asked).

Axis letters: b batch, t query positions, s key positions, n heads, h head dim, d model dim.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def simplified_self_attention(x_td: Array) -> tuple[Array, Array, Array]:
    """The book's section 3.3: scores x·xᵀ, weights softmax(scores), context weights·x.

    Returns (scores_tt, weights_tt, context_td).
    """
    scores_tt = x_td @ x_td.T
    weights_tt = jax.nn.softmax(scores_tt, axis=-1)
    context_td = weights_tt @ x_td
    return scores_tt, weights_tt, context_td


def causal_mask(t: int, s: Optional[int] = None) -> Array:
    """Boolean (t, s) mask, True where query i may attend to key j (j <= i + s - t)."""
    s = t if s is None else s
    return jnp.tril(jnp.ones((t, s), dtype=bool), k=s - t)


def masked_softmax(scores: Array, mask: Optional[Array]) -> Array:
    """Softmax over the last axis in at least float32, with masked-out entries exactly zero."""
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


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


# --- attention backends: (q_btnh, k_bsnh, v_bsnh) -> out_btnh --------------------------------
# `mask_bts` (True = may attend) replaces the default causal mask when given: it is how cached
# decoding and left-padded batches say which cache slots each query sees.

DropoutFn = Callable[[Array], Array]


def naive_attention(q_btnh: Array, k_bsnh: Array, v_bsnh: Array, *, mask_bts: Optional[Array] = None,
                    dropout: Optional[DropoutFn] = None) -> Array:
    """Explicit scaled dot-product attention; causal unless `mask_bts` says otherwise."""
    t, s, h = q_btnh.shape[1], k_bsnh.shape[1], q_btnh.shape[-1]
    scores_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh) / jnp.sqrt(h).astype(q_btnh.dtype)
    mask = causal_mask(t, s) if mask_bts is None else mask_bts[:, None]
    weights_bnts = masked_softmax(scores_bnts, mask)
    if mask_bts is not None:  # a query with no visible key (a padding row) gets zeros, not NaN
        weights_bnts = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights_bnts, 0.0)
    if dropout is not None:
        weights_bnts = dropout(weights_bnts)
    return jnp.einsum("bnts,bsnh->btnh", weights_bnts.astype(v_bsnh.dtype), v_bsnh)


def xla_attention(q_btnh: Array, k_bsnh: Array, v_bsnh: Array, *, mask_bts: Optional[Array] = None,
                  dropout: Optional[DropoutFn] = None) -> Array:
    """`jax.nn.dot_product_attention` (fused by XLA; no dropout on the weights)."""
    if dropout is not None:
        raise ValueError("the 'xla' attention backend has no attention dropout; use 'naive' or 'auto'")
    if mask_bts is not None:
        return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask_bts[:, None])
    if q_btnh.shape[1] != k_bsnh.shape[1]:
        raise ValueError("the 'xla' backend needs an explicit mask when queries and keys differ in length")
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, is_causal=True)


ATTENTION_BACKENDS: dict[str, Callable[..., Array]] = {
    "naive": naive_attention,
    "xla": xla_attention,
}


class MultiHeadAttention(nn.Module):
    """Causal multi-head attention with a fused QKV projection (`c_attn`) and output projection (`c_proj`).

    Parameter names follow GPT-2's, so Hugging Face weights map one to one. With `kv_cache`
    ({"k", "v"}: (b, S, n, h) each) the new keys and values are written at `cache_index` and the
    queries attend to the cache under `mask_bts`; the updated cache is returned with the output.
    """

    n_heads: int
    drop_rate: float = 0.0
    qkv_bias: bool = False
    impl: str = "naive"  # a key of ATTENTION_BACKENDS
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02  # GPT-2 scales residual projections by 1/sqrt(2 * n_layers)

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, kv_cache: Optional[dict] = None,
                 cache_index: Optional[Array] = None, mask_bts: Optional[Array] = None):
        b, t, d = x_btd.shape
        h = d // self.n_heads
        init = nn.initializers.normal(0.02)
        qkv_bt3d = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=init, name="c_attn")(x_btd)
        q_btnh, k_btnh, v_btnh = (a.reshape(b, t, self.n_heads, h) for a in jnp.split(qkv_bt3d, 3, axis=-1))

        if kv_cache is not None:
            k_bsnh = jax.lax.dynamic_update_slice_in_dim(kv_cache["k"], k_btnh.astype(kv_cache["k"].dtype), cache_index, 1)
            v_bsnh = jax.lax.dynamic_update_slice_in_dim(kv_cache["v"], v_btnh.astype(kv_cache["v"].dtype), cache_index, 1)
            kv_cache = {"k": k_bsnh, "v": v_bsnh}
            k_btnh, v_btnh = k_bsnh.astype(q_btnh.dtype), v_bsnh.astype(q_btnh.dtype)

        dropout = None
        if self.drop_rate > 0.0 and not deterministic:
            dropout = lambda w: nn.Dropout(self.drop_rate, name="attn_drop")(w, deterministic=False)  # noqa: E731
        if self.impl not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.impl!r}; known: {sorted(ATTENTION_BACKENDS)}")
        out_btnh = ATTENTION_BACKENDS[self.impl](q_btnh, k_btnh, v_btnh, mask_bts=mask_bts, dropout=dropout)

        out_btd = out_btnh.reshape(b, t, d)
        out_btd = nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std), name="c_proj")(out_btd)
        return out_btd if kv_cache is None else (out_btd, kv_cache)
