"""The multi-head attention layer GPT uses, with the research variants as options.

`MultiHeadAttention`: fused QKV projection, heads, output projection with bias; grouped-query /
multi-query heads, sliding windows, rotary and ALiBi positions. Its core is an attention backend
chosen by name (`ATTENTION_BACKENDS`): `naive`, `xla` (`jaxgpt.nn.attention_backends`) or
`blockwise` (tiles and an online softmax: memory linear in length, `jaxgpt.nn.blockwise`). The
book's step-by-step classes are in `jaxgpt.nn.attention_book`.

Axis letters: b batch, t query positions, s key positions, n query heads, m key/value heads,
g query heads per key/value head, h head dim, d model dim.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.attention_backends import (
    attention_scores, cached_query_attention, naive_attention, weights_from_scores, xla_attention,
)
from jaxgpt.nn.blockwise import blockwise_attention
from jaxgpt.nn.dense import Dense
from jaxgpt.nn.differential import DifferentialCore, halves_as_heads
from jaxgpt.nn.norms import RMSNorm
from jaxgpt.nn.positions import alibi_slopes, apply_rope

Array = jax.Array

ATTENTION_BACKENDS: dict[str, Callable[..., Array]] = {
    "naive": naive_attention,
    "xla": xla_attention,
    "blockwise": blockwise_attention,
}


def head_counts(x_btd: Array, n_heads: int, n_kv_heads: Optional[int], positions_bt: Optional[Array],
                head_dim: Optional[int] = None):
    """What every attention layer starts from: (b, t, d, n, m, h, pos_bt), positions 0..t-1 by
    default, h = d / n unless the model sets its own head width."""
    b, t, d = x_btd.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t)[None], (b, t)) if positions_bt is None else positions_bt
    return b, t, d, n_heads, n_kv_heads or n_heads, head_dim or d // n_heads, pos_bt


def fused_qkv(x_btd: Array, n: int, m: int, h: int, *, use_bias: bool, dtype) -> tuple[Array, Array, Array]:
    """One projection `c_attn` of (n + 2m)·h columns (GPT-2's layout when m = n), split into
    q (b, t, n, h), k and v (b, t, m, h). Call it from inside a layer's compact `__call__`."""
    b, t = x_btd.shape[:2]
    qkv_bte = Dense((n + 2 * m) * h, use_bias=use_bias, dtype=dtype, kernel_init=nn.initializers.normal(0.02),
                       name="c_attn")(x_btd)
    qkv_bte = qkv_bte.astype(dtype or qkv_bte.dtype)  # a mixed-precision Dense returns f32: attend in `dtype`
    return (qkv_bte[..., : n * h].reshape(b, t, n, h), qkv_bte[..., n * h:(n + m) * h].reshape(b, t, m, h),
            qkv_bte[..., (n + m) * h:].reshape(b, t, m, h))


def sow_attention_insides(module: nn.Module, q_btnh: Array, k_bsmh: Array, v_bsmh: Array, *, q_scale=None,
                          **visibility) -> None:
    """Record what happens inside attention when "intermediates" is mutable (attention maps,
    `jaxgpt numerics`): q, k, v as they enter the scores, in the reference's (b, heads, t, h) layout,
    the scaled scores (b, n, t, s) and the weights ("attention_weights"). `q_scale` is a factor the
    layer folded into q for the backends (the reference applies it to the scores instead)."""
    if not module.is_mutable_collection("intermediates"):
        return
    q_unscaled = q_btnh if q_scale is None else q_btnh / jnp.asarray(q_scale, q_btnh.dtype)
    for name, a in (("q", q_unscaled), ("k", k_bsmh), ("v", v_bsmh)):
        module.sow("intermediates", name, a.transpose(0, 2, 1, 3))
    scores_bnts = attention_scores(q_btnh, k_bsmh)
    module.sow("intermediates", "scores", scores_bnts)
    module.sow("intermediates", "attention_weights", weights_from_scores(scores_bnts, **visibility))


def write_at(cache: Array, new: Array, index, axis: int) -> Array:
    """`new` written into `cache` from `index` along `axis` (batch is axis 0): one index for every
    row, or a (b,) vector of indices, one per row (continuous batching: each slot at its own column)."""
    new = new.astype(cache.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, index, axis)
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis - 1))(cache, new, index)


def slice_at(x: Array, index, size: int, axis: int) -> Array:
    """x[..., index:index+size, ...] along `axis` (batch is axis 0), `index` shared or per row (b,)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_slice_in_dim(x, index, size, axis)
    return jax.vmap(lambda r, i: jax.lax.dynamic_slice_in_dim(r, i, size, axis - 1))(x, index)


def _ring_attend_and_write(ring: dict, k_btmh: Array, v_btmh: Array, pos_bt: Array, cache_index, mask_bts: Array):
    """Keys/values a local layer attends to when its cache is a ring of W slots, and the new ring.

    The queries see the ring as it was (the W columns before this chunk) plus the chunk itself;
    `mask_bts` (over all cache columns) says which of those columns they may see, the window rule
    applies on top. Then the chunk's last min(t, W) tokens overwrite the slots `column % W`.
    Returns (k_bsmh, v_bsmh, k_pos_bs, mask_bts, ring) with s = W + t.
    """
    b, t = pos_bt.shape
    w = ring["k"].shape[1]
    col_bw = ring["col"]
    ring_visible_btw = jnp.take_along_axis(mask_bts, jnp.broadcast_to(jnp.maximum(col_bw, 0)[:, None], (b, t, w)), axis=2)
    ring_visible_btw = ring_visible_btw & (col_bw >= 0)[:, None, :]
    chunk_visible_btt = slice_at(mask_bts, cache_index, t, axis=2)
    k_bsmh = jnp.concatenate([ring["k"].astype(k_btmh.dtype), k_btmh], axis=1)
    v_bsmh = jnp.concatenate([ring["v"].astype(v_btmh.dtype), v_btmh], axis=1)
    k_pos_bs = jnp.concatenate([ring["pos"], pos_bt], axis=1)
    visible_bts = jnp.concatenate([ring_visible_btw, chunk_visible_btt], axis=2)

    keep = min(t, w)  # static
    cols_bk = jnp.reshape(cache_index, (-1, 1)) + t - keep + jnp.arange(keep)  # one row, or one per row
    slots_bk = jnp.broadcast_to(cols_bk % w, (b, keep))
    rows_b1 = jnp.arange(b)[:, None]
    put = lambda old, new: old.at[rows_b1, slots_bk].set(new.astype(old.dtype))  # noqa: E731
    ring = {"k": put(ring["k"], k_btmh[:, t - keep:]), "v": put(ring["v"], v_btmh[:, t - keep:]),
            "pos": put(ring["pos"], pos_bt[:, t - keep:]), "col": put(ring["col"], jnp.broadcast_to(cols_bk, (b, keep)))}
    return k_bsmh, v_bsmh, k_pos_bs, visible_bts, ring


class MultiHeadAttention(nn.Module):
    """Causal attention with n query heads and m key/value heads (m = n: multi-head; 1: multi-query;
    in between: grouped-query), one fused projection `c_attn` (n + 2m heads wide) and `c_proj`.

    With m = n the parameters are GPT-2's, so Hugging Face weights map one to one. `position`
    "rope" rotates queries and keys, "alibi" biases the scores (see `jaxgpt.nn.positions`); `window`
    makes the layer local. With `kv_cache` ({"k", "v"}: (b, m, S, h), "pos": (b, S)) the new keys,
    values and their positions are written at `cache_index`, the queries attend to the cache under
    `mask_bts`, and the updated cache is returned with the output.
    """

    n_heads: int
    n_kv_heads: Optional[int] = None  # None: as many as query heads
    drop_rate: float = 0.0
    qkv_bias: bool = False
    impl: str = "naive"  # a key of ATTENTION_BACKENDS
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02  # GPT-2 scales residual projections by 1/sqrt(2 * n_layers)
    position: str = "learned"  # "rope" and "alibi" act here; "learned"/"none" need nothing
    rope_base: float = 10000.0
    window: Optional[int] = None  # sliding-window (local) attention over this many positions
    # the options of today's families (docs/families.md); the defaults are GPT-2's
    head_dim: Optional[int] = None  # per-head width (default d / n)
    out_bias: bool = True  # bias of c_proj
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE ("q_norm", "k_norm")
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # the qk-norms multiply by (1 + scale) (Gemma)
    query_scale: Optional[float] = None  # multiplies q·k (default 1/sqrt(h))
    rope_scaling: Optional[tuple] = None  # Llama 3's (factor, low, high, original context)
    # the arena's variants (docs/attention_variants.md)
    gate: bool = False  # out ⊙ sigmoid(x W_gate) per head before c_proj (Qiu et al. 2025, "c_gate")
    sink: bool = False  # a learned logit per head ("sinks") in every softmax, with no value
    differential: bool = False  # two softmax maps from q/k halves, subtracted (jaxgpt.nn.differential)

    @staticmethod
    def empty_cache(config, batch: int, length: int, dtype, window: Optional[int] = None) -> dict:
        """{"k", "v", "pos"} for `length` slots; a local layer whose window is shorter gets a ring of
        `window` slots instead, with "col": the cache column each slot holds (-1: empty)."""
        slots = length if window is None else min(window, length)
        if slots < length:  # a ring, token-major (b, W, m, h)
            shape = (batch, slots, config.kv_heads, config.head_dim)
        else:  # heads-major (b, m, S, h): what a decode step's attention reads in place
            shape = (batch, config.kv_heads, slots, config.head_dim)
        cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "pos": jnp.zeros((batch, slots), jnp.int32)}
        if slots < length:
            cache["col"] = jnp.full((batch, slots), -1, jnp.int32)
        return cache

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 kv_cache: Optional[dict] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None):
        b, t, d, n, m, h, pos_bt = head_counts(x_btd, self.n_heads, self.n_kv_heads, positions_bt, self.head_dim)
        q_btnh, k_btmh, v_btmh = fused_qkv(x_btd, n, m, h, use_bias=self.qkv_bias, dtype=self.dtype)
        if self.qk_norm:
            norm = lambda name: RMSNorm(self.norm_eps, self.norm_unit_offset, self.dtype, name=name)  # noqa: E731
            q_btnh, k_btmh = norm("q_norm")(q_btnh), norm("k_norm")(k_btmh)
        if self.position == "rope":
            rotate = lambda a: apply_rope(a, pos_bt, self.rope_base, self.rope_scaling)  # noqa: E731
            if self.differential:  # each half of a head is rotated as a head of its own
                rotate = lambda a, r=rotate: r(halves_as_heads(a)).reshape(a.shape)  # noqa: E731
            q_btnh, k_btmh = rotate(q_btnh), rotate(k_btmh)
        q_scale = None if self.query_scale is None else self.query_scale * math.sqrt(h)
        if q_scale is not None:  # the backends divide by sqrt(h): fold the wanted scale into q
            q_btnh = q_btnh * jnp.asarray(q_scale, q_btnh.dtype)

        k_pos_bs = pos_bt
        if kv_cache is not None and "col" in kv_cache:  # a local layer's ring of the last `window` tokens
            k_btmh, v_btmh, k_pos_bs, mask_bts, kv_cache = _ring_attend_and_write(
                kv_cache, k_btmh, v_btmh, pos_bt, cache_index, mask_bts)
        elif kv_cache is not None:  # heads-major (b, m, S, h): the new tokens' keys/values go in at cache_index
            write = lambda cache, new, axis: write_at(cache, new, cache_index, axis)  # noqa: E731
            kv_cache = {"k": write(kv_cache["k"], k_btmh.transpose(0, 2, 1, 3), 2),
                        "v": write(kv_cache["v"], v_btmh.transpose(0, 2, 1, 3), 2),
                        "pos": write(kv_cache["pos"], pos_bt, 1)}
            k_bmsh, v_bmsh = kv_cache["k"], kv_cache["v"]  # a decode step reads them in the cache's dtype
            k_btmh = k_bmsh.transpose(0, 2, 1, 3).astype(q_btnh.dtype)  # (b, S, m, h); unused by a decode step
            v_btmh = v_bmsh.transpose(0, 2, 1, 3).astype(q_btnh.dtype)
            k_pos_bs = kv_cache["pos"]

        dropout = None
        if self.drop_rate > 0.0 and not deterministic:
            dropout = lambda w: nn.Dropout(self.drop_rate, name="attn_drop")(w, deterministic=False)  # noqa: E731
        if self.impl not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.impl!r}; known: {sorted(ATTENTION_BACKENDS)}")
        slopes_n = alibi_slopes(n) if self.position == "alibi" else None
        kw = dict(q_pos_bt=pos_bt, k_pos_bs=k_pos_bs, mask_bts=mask_bts, window=self.window, slopes_n=slopes_n)
        if self.sink:
            kw["sinks_n"] = self.param("sinks", nn.initializers.zeros_init(), (n,), jnp.float32)
        if self.differential:
            attend = lambda q, k, v: ATTENTION_BACKENDS[self.impl](q, k, v, **kw, dropout=dropout)  # noqa: E731
            out_btnh = DifferentialCore(self.norm_eps, self.dtype, name="diff")(q_btnh, k_btmh, v_btmh, attend)
        elif kv_cache is not None and "col" not in kv_cache and t == 1 and self.impl == "xla":  # a decode step
            sow_attention_insides(self, q_btnh, k_btmh, v_btmh, q_scale=q_scale, **kw)
            out_btnh = cached_query_attention(q_btnh, k_bmsh, v_bmsh, **kw)
        else:
            sow_attention_insides(self, q_btnh, k_btmh, v_btmh, q_scale=q_scale, **kw)
            out_btnh = ATTENTION_BACKENDS[self.impl](q_btnh, k_btmh, v_btmh, **kw, dropout=dropout)
        if self.gate:  # a per-head, per-channel sigmoid gate computed from the layer's input
            gate_btnh = Dense(n * h, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                              name="c_gate")(x_btd).reshape(b, t, n, h)
            out_btnh = out_btnh * jax.nn.sigmoid(gate_btnh.astype(jnp.float32)).astype(out_btnh.dtype)
        self.sow("intermediates", "context", out_btnh.reshape(b, t, n * h))  # when mutable (numerics)

        out_btd = Dense(d, use_bias=self.out_bias, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std),
                        name="c_proj")(out_btnh.reshape(b, t, n * h))  # (b, t, n·h) -> (b, t, d)
        return out_btd if kv_cache is None else (out_btd, kv_cache)
