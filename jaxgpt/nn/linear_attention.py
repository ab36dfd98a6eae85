"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): a non-softmax family.

The softmax similarity exp(q·k) is replaced by a feature map φ(q)·φ(k) with φ(x) = elu(x) + 1 > 0:

    out_i = φ(q_i)ᵀ Σ_{j≤i} φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_{j≤i} φ(k_j)

- parallel form (training): the masked (t × t) matrix φ(Q)φ(K)ᵀ, as attention without softmax;
- recurrent form (decoding): a state S = Σ φ(k) vᵀ (h × h per head) and z = Σ φ(k) (h per head),
  updated once per token. The cache is that state: constant size, whatever the length.
Positions come from the learned table (or none): windows, ALiBi and RoPE are softmax-attention ideas
and are refused for this family.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.attention import fused_qkv, head_counts, slice_at
from jaxgpt.nn.dense import Dense

Array = jax.Array


def feature_map(x: Array) -> Array:
    """φ(x) = elu(x) + 1, positive everywhere, computed in at least float32 (float64 stays float64)."""
    return jax.nn.elu(x.astype(jnp.promote_types(x.dtype, jnp.float32))) + 1.0


def chunk_sums(q_btnh: Array, k_btmh: Array, v_btmh: Array, visible_btt: Array) -> tuple[Array, Array, Array]:
    """The parallel form's pieces over the visible pairs of one chunk: the weights
    a = φ(q)·φ(k) (b, n, t, s), the numerator Σ a·v (b, t, n, h) and the denominator Σ a (b, t, n).
    m key/value heads are shared by n/m query heads."""
    n, m = q_btnh.shape[2], k_btmh.shape[2]
    k_btnh, v_btnh = jnp.repeat(k_btmh, n // m, axis=2), jnp.repeat(v_btmh, n // m, axis=2)
    a_bnts = jnp.einsum("btnh,bsnh->bnts", feature_map(q_btnh), feature_map(k_btnh)) * visible_btt[:, None]
    num_btnh = jnp.einsum("bnts,bsnh->btnh", a_bnts, v_btnh.astype(a_bnts.dtype))
    return a_bnts, num_btnh, jnp.sum(a_bnts, axis=-1).transpose(0, 2, 1)


def normalise(num_btnh: Array, den_btn: Array) -> Array:
    return num_btnh / jnp.maximum(den_btn, 1e-6)[..., None]


class LinearAttention(nn.Module):
    n_heads: int
    n_kv_heads: Optional[int] = None
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02

    @staticmethod
    def empty_cache(config, batch: int, length: int, dtype) -> dict:
        m, h = config.kv_heads, config.head_dim
        acc = jnp.promote_types(dtype, jnp.float32)  # the state sums many terms: at least float32
        return {"state": jnp.zeros((batch, m, h, h), acc), "norm": jnp.zeros((batch, m, h), acc)}

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 kv_cache: Optional[dict] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None):
        b, t, d, n, m, h, _ = head_counts(x_btd, self.n_heads, self.n_kv_heads, positions_bt)
        q_btnh, k_btmh, v_btmh = fused_qkv(x_btd, n, m, h, use_bias=self.qkv_bias, dtype=self.dtype)

        if kv_cache is None:
            a_bnts, num_btnh, den_btn = chunk_sums(q_btnh, k_btmh, v_btmh, jnp.tril(jnp.ones((t, t), bool))[None])
            out_btnh = normalise(num_btnh, den_btn)
            if self.is_mutable_collection("intermediates"):  # the implied weights φ(q)·φ(k) / Σ, for maps
                self.sow("intermediates", "attention_weights", a_bnts / jnp.sum(a_bnts, -1, keepdims=True))
        else:
            # tokens of this chunk that are real (a padding token does not even see itself)
            real_bt = jnp.diagonal(slice_at(mask_bts, cache_index, t, axis=2), axis1=1, axis2=2)
            visible_btt = jnp.tril(jnp.ones((t, t), bool))[None] & real_bt[:, None, :]
            phi_q_btmgh = feature_map(q_btnh).reshape(b, t, m, n // m, h)
            # what the earlier tokens contribute, from the state; then the chunk itself, in parallel
            num_btnh = jnp.einsum("btmgh,bmhe->btmge", phi_q_btmgh, kv_cache["state"]).reshape(b, t, n, h)
            den_btn = jnp.einsum("btmgh,bmh->btmg", phi_q_btmgh, kv_cache["norm"]).reshape(b, t, n)
            _, chunk_num_btnh, chunk_den_btn = chunk_sums(q_btnh, k_btmh, v_btmh, visible_btt)
            out_btnh = normalise(num_btnh + chunk_num_btnh, den_btn + chunk_den_btn)
            phi_k_btmh = feature_map(k_btmh) * real_bt[:, :, None, None]
            kv_cache = {"state": kv_cache["state"] + jnp.einsum("btmh,btme->bmhe", phi_k_btmh, v_btmh.astype(phi_k_btmh.dtype)),
                        "norm": kv_cache["norm"] + jnp.sum(phi_k_btmh, axis=1)}
        out_btd = out_btnh.astype(x_btd.dtype).reshape(b, t, d)
        out_btd = Dense(d, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std), name="c_proj")(out_btd)
        return out_btd if kv_cache is None else (out_btd, kv_cache)
