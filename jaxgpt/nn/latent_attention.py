"""Multi-head latent attention (MLA, DeepSeek-V2 2024): keys and values from a shared low-rank latent.

Each token is compressed once to a latent c = x·W_down of `latent_dim` numbers, and the keys and
values of all heads are expanded from it (k = c·W_k, v = c·W_v). The KV cache stores only the
latent (and positions): latent_dim numbers per token and layer instead of 2·heads·head_dim.
Decoding re-expands the cached latents each step; DeepSeek's "absorbed" form (folding W_k into the
queries and W_v into the output projection) would avoid that and is a speed-up, not a different
function. Because the keys are expanded before positions are applied, RoPE works here directly
(DeepSeek's decoupled RoPE key exists only for the absorbed form).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.attention import ATTENTION_BACKENDS, head_counts, sow_attention_insides, write_at
from jaxgpt.nn.dense import Dense
from jaxgpt.nn.positions import alibi_slopes, apply_rope

Array = jax.Array


class LatentAttention(nn.Module):
    n_heads: int
    latent_dim: int
    n_kv_heads: Optional[int] = None
    drop_rate: float = 0.0
    qkv_bias: bool = False
    impl: str = "naive"
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02
    position: str = "learned"
    rope_base: float = 10000.0
    window: Optional[int] = None

    @staticmethod
    def empty_cache(config, batch: int, length: int, dtype) -> dict:
        return {"latent": jnp.zeros((batch, length, config.latent_dim), dtype), "pos": jnp.zeros((batch, length), jnp.int32)}

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 kv_cache: Optional[dict] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None):
        b, t, d, n, m, h, pos_bt = head_counts(x_btd, self.n_heads, self.n_kv_heads, positions_bt)
        dense = lambda width, name, bias=self.qkv_bias, std=0.02: Dense(  # noqa: E731
            width, use_bias=bias, dtype=self.dtype, kernel_init=nn.initializers.normal(std), name=name)
        q_btnh = dense(n * h, "c_q")(x_btd).reshape(b, t, n, h)
        latent_btr = dense(self.latent_dim, "c_kv_down")(x_btd)  # (b, t, r): all the cache keeps

        k_pos_bs = pos_bt
        if kv_cache is not None:
            write = lambda cache, new: write_at(cache, new, cache_index, 1)  # noqa: E731
            kv_cache = {"latent": write(kv_cache["latent"], latent_btr), "pos": write(kv_cache["pos"], pos_bt)}
            latent_btr, k_pos_bs = kv_cache["latent"].astype(x_btd.dtype), kv_cache["pos"]
        s = latent_btr.shape[1]
        k_bsmh = dense(m * h, "c_k_up")(latent_btr).reshape(b, s, m, h)
        v_bsmh = dense(m * h, "c_v_up")(latent_btr).reshape(b, s, m, h)
        if self.position == "rope":
            q_btnh, k_bsmh = apply_rope(q_btnh, pos_bt, self.rope_base), apply_rope(k_bsmh, k_pos_bs, self.rope_base)

        dropout = None
        if self.drop_rate > 0.0 and not deterministic:
            dropout = lambda w: nn.Dropout(self.drop_rate, name="attn_drop")(w, deterministic=False)  # noqa: E731
        slopes_n = alibi_slopes(n) if self.position == "alibi" else None
        kw = dict(q_pos_bt=pos_bt, k_pos_bs=k_pos_bs, mask_bts=mask_bts, window=self.window, slopes_n=slopes_n)
        sow_attention_insides(self, q_btnh, k_bsmh, v_bsmh, **kw)  # when "intermediates" is mutable
        out_btnh = ATTENTION_BACKENDS[self.impl](q_btnh, k_bsmh, v_bsmh, **kw, dropout=dropout)
        self.sow("intermediates", "context", out_btnh.reshape(b, t, n * h))
        out_btd = dense(d, "c_proj", bias=True, std=self.out_init_std)(out_btnh.reshape(b, t, d))
        return out_btd if kv_cache is None else (out_btd, kv_cache)
