"""Attention, following the book's chapter 3 step by step, then the multi-head layer GPT uses.

1. `simplified_self_attention`: no weights; scores are dot products of the inputs themselves.
2. `SelfAttention`: trainable W_query / W_key / W_value, scaled dot-product.
3. `CausalAttention`: the same with a causal mask applied before the softmax and dropout on the
   attention weights.
4. `MultiHeadAttention`: fused QKV projection, heads, output projection with bias; and the
   research variants as options of the same layer: grouped-query / multi-query heads, sliding
   windows, rotary and ALiBi positions. Its core is an attention backend chosen by name
   (`ATTENTION_BACKENDS`): `naive` (explicit einsums and mask, the reference inside JAX), `xla`
   (`jax.nn.dot_product_attention`, which XLA lowers to fused kernels and, on GPUs, to cuDNN flash
   attention when asked) or `blockwise` (tiles and an online softmax: memory linear in length).

Axis letters: b batch, t query positions, s key positions, n query heads, m key/value heads,
g query heads per key/value head, h head dim, d model dim.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .precision import Dense

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


# --- attention backends: (q_btnh, k_bsmh, v_bsmh) -> out_btnh --------------------------------
# Every backend takes the same arguments and gives the same result (tested against `naive` and the
# NumPy reference):
# - m key/value heads may be fewer than the n query heads (grouped-query attention): query head i
#   reads key/value head i // (n / m);
# - which keys a query sees is decided from positions: key j is visible to query i when
#   k_pos[j] <= q_pos[i] (causal) and, with a `window`, q_pos[i] - k_pos[j] < window. An explicit
#   `mask_bts` (True = may attend) replaces the causal rule: it is how cached decoding and
#   left-padded batches say which cache slots hold real tokens; the window still applies on top;
# - `slopes_n` adds ALiBi's -slope·(q_pos - k_pos) to the scores of each head;
# - `dropout` (a function on the attention weights) only where the backend can apply it.

DropoutFn = Callable[[Array], Array]


def visible_keys(q_pos_bt: Array, k_pos_bs: Array, mask_bts: Optional[Array] = None,
                 window: Optional[int] = None) -> Array:
    """Boolean (b, t, s): which keys each query may attend to (see the rules above)."""
    delta_bts = q_pos_bt[:, :, None] - k_pos_bs[:, None, :]
    visible = delta_bts >= 0 if mask_bts is None else mask_bts
    if window is not None:
        visible = visible & (delta_bts < window)
    return visible


def alibi_bias(q_pos_bt: Array, k_pos_bs: Array, slopes_n: Array) -> Array:
    """ALiBi's additive score bias (b, n, t, s): -slope_n · (q_pos - k_pos)."""
    delta_bts = (q_pos_bt[:, :, None] - k_pos_bs[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes_n, jnp.float32)[None, :, None, None] * delta_bts[:, None]


def attention_weights(q_btnh: Array, k_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                      mask_bts: Optional[Array] = None, window: Optional[int] = None,
                      slopes_n: Optional[Array] = None) -> Array:
    """The softmax attention weights (b, n, t, s) — what `jaxgpt attention-map` draws."""
    b, t, n, h = q_btnh.shape
    m = k_bsmh.shape[2]
    q_btmgh = q_btnh.reshape(b, t, m, n // m, h)  # query head i = (kv head i // g, member i % g)
    scores_bmgts = jnp.einsum("btmgh,bsmh->bmgts", q_btmgh, k_bsmh) / jnp.sqrt(h).astype(q_btnh.dtype)
    return _weights_from_scores(scores_bmgts.reshape(b, n, t, -1), q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs,
                                mask_bts=mask_bts, window=window, slopes_n=slopes_n)


def _weights_from_scores(scores_bnts: Array, *, q_pos_bt: Array, k_pos_bs: Array, mask_bts: Optional[Array],
                         window: Optional[int], slopes_n: Optional[Array]) -> Array:
    """Scaled scores (b, n, t, s) -> attention weights: ALiBi bias, visibility mask, softmax."""
    if slopes_n is not None:
        scores_bnts = scores_bnts.astype(jnp.float32) + alibi_bias(q_pos_bt, k_pos_bs, slopes_n)
    visible_b1ts = visible_keys(q_pos_bt, k_pos_bs, mask_bts, window)[:, None]
    weights_bnts = masked_softmax(scores_bnts, visible_b1ts)
    # a query that sees no key at all (a padding row) gets zeros, not NaN
    return jnp.where(jnp.any(visible_b1ts, axis=-1, keepdims=True), weights_bnts, 0.0)


def naive_attention(q_btnh: Array, k_bsmh: Array, v_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                    mask_bts: Optional[Array] = None, window: Optional[int] = None,
                    slopes_n: Optional[Array] = None, dropout: Optional[DropoutFn] = None) -> Array:
    """Explicit scaled dot-product attention: all scores (b, n, t, s), mask, softmax, weighted sum."""
    b, t, n, h = q_btnh.shape
    m = k_bsmh.shape[2]
    weights_bnts = attention_weights(q_btnh, k_bsmh, q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs, mask_bts=mask_bts,
                                     window=window, slopes_n=slopes_n)
    if dropout is not None:
        weights_bnts = dropout(weights_bnts)
    weights_bmgts = weights_bnts.reshape(b, m, n // m, t, -1).astype(v_bsmh.dtype)
    return jnp.einsum("bmgts,bsmh->btmgh", weights_bmgts, v_bsmh).reshape(b, t, n, h)


def xla_attention(q_btnh: Array, k_bsmh: Array, v_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                  mask_bts: Optional[Array] = None, window: Optional[int] = None,
                  slopes_n: Optional[Array] = None, dropout: Optional[DropoutFn] = None) -> Array:
    """`jax.nn.dot_product_attention` (fused by XLA, cuDNN on GPUs; no dropout on the weights)."""
    if dropout is not None:
        raise ValueError("the 'xla' attention backend has no attention dropout; use 'naive' or 'auto'")
    plain_causal = mask_bts is None and window is None and slopes_n is None and q_btnh.shape[1] == k_bsmh.shape[1]
    if plain_causal:  # training: positions are 0..t-1 for queries and keys alike
        return jax.nn.dot_product_attention(q_btnh, k_bsmh, v_bsmh, is_causal=True)
    bias = None if slopes_n is None else alibi_bias(q_pos_bt, k_pos_bs, slopes_n).astype(q_btnh.dtype)
    visible_b1ts = visible_keys(q_pos_bt, k_pos_bs, mask_bts, window)[:, None]
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_bsmh, v_bsmh, bias=bias, mask=visible_b1ts)
    seen_bt = jnp.any(visible_b1ts[:, 0], axis=-1)  # rows with no visible key: zeros, as `naive`
    return jnp.where(seen_bt[:, :, None, None], out_btnh, 0.0).astype(q_btnh.dtype)


def cached_query_attention(q_btnh: Array, k_bmsh: Array, v_bmsh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                           mask_bts: Optional[Array] = None, window: Optional[int] = None,
                           slopes_n: Optional[Array] = None) -> Array:
    """A decode step's attention (one query per row) over a heads-major cache (b, m, s, h).

    The same function as `naive_attention` on the transposed cache. Both products have (b, m) as
    their leading batch dimensions and contract the cache's minor (h) or middle (s) axis, so XLA
    reads the cache where it lies; with the cache token-major, as the other backends take it, it
    copied all of it to this layout at every step (0.77 ms per copy per layer at batch 8 on
    gpt2-small here; docs/performance.md).
    A cache wider than q (float32 for a bf16 model on CPU, `xla_tuning.decode_cache_dtype`) holds
    q's dtype's values: both products run in the cache's dtype and are rounded to q's, which is what
    XLA's CPU backend does with a bf16 product, without converting the cache at every step.
    """
    b, t, n, h = q_btnh.shape
    m, s = k_bmsh.shape[1], k_bmsh.shape[2]
    q_bmgh = q_btnh.reshape(b, m, n // m, h).astype(k_bmsh.dtype)  # t = 1; query head i = (kv head i // g, member i % g)
    scores_bmgs = jnp.einsum("bmgh,bmsh->bmgs", q_bmgh, k_bmsh).astype(q_btnh.dtype) / jnp.sqrt(h).astype(q_btnh.dtype)
    weights_bnts = _weights_from_scores(scores_bmgs.reshape(b, n, 1, s), q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs,
                                        mask_bts=mask_bts, window=window, slopes_n=slopes_n)
    weights_bmgs = weights_bnts.reshape(b, m, n // m, s).astype(q_btnh.dtype)  # rounded to q's dtype, as ever
    out_bmgh = jnp.einsum("bmgs,bmsh->bmgh", weights_bmgs.astype(v_bmsh.dtype), v_bmsh)
    return out_bmgh.astype(q_btnh.dtype).reshape(b, 1, n, h)


def blockwise_attention(q_btnh: Array, k_bsmh: Array, v_bsmh: Array, **kwargs) -> Array:
    """Memory-efficient attention in tiles with an online softmax (see `jaxgpt.blockwise`)."""
    from .blockwise import blockwise_attention as impl

    return impl(q_btnh, k_bsmh, v_bsmh, **kwargs)


ATTENTION_BACKENDS: dict[str, Callable[..., Array]] = {
    "naive": naive_attention,
    "xla": xla_attention,
    "blockwise": blockwise_attention,
}


def head_counts(x_btd: Array, n_heads: int, n_kv_heads: Optional[int], positions_bt: Optional[Array]):
    """What every attention layer starts from: (b, t, d, n, m, h, pos_bt), positions 0..t-1 by default."""
    b, t, d = x_btd.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t)[None], (b, t)) if positions_bt is None else positions_bt
    return b, t, d, n_heads, n_kv_heads or n_heads, d // n_heads, pos_bt


def fused_qkv(x_btd: Array, n: int, m: int, h: int, *, use_bias: bool, dtype) -> tuple[Array, Array, Array]:
    """One projection `c_attn` of (n + 2m)·h columns (GPT-2's layout when m = n), split into
    q (b, t, n, h), k and v (b, t, m, h). Call it from inside a layer's compact `__call__`."""
    b, t = x_btd.shape[:2]
    qkv_bte = Dense((n + 2 * m) * h, use_bias=use_bias, dtype=dtype, kernel_init=nn.initializers.normal(0.02),
                       name="c_attn")(x_btd)
    qkv_bte = qkv_bte.astype(dtype or qkv_bte.dtype)  # a mixed-precision Dense returns f32: attend in `dtype`
    return (qkv_bte[..., : n * h].reshape(b, t, n, h), qkv_bte[..., n * h:(n + m) * h].reshape(b, t, m, h),
            qkv_bte[..., (n + m) * h:].reshape(b, t, m, h))


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
    chunk_visible_btt = jax.lax.dynamic_slice_in_dim(mask_bts, cache_index, t, axis=2)
    k_bsmh = jnp.concatenate([ring["k"].astype(k_btmh.dtype), k_btmh], axis=1)
    v_bsmh = jnp.concatenate([ring["v"].astype(v_btmh.dtype), v_btmh], axis=1)
    k_pos_bs = jnp.concatenate([ring["pos"], pos_bt], axis=1)
    visible_bts = jnp.concatenate([ring_visible_btw, chunk_visible_btt], axis=2)

    keep = min(t, w)  # static
    cols_k = cache_index + t - keep + jnp.arange(keep)
    slots_k = cols_k % w
    ring = {"k": ring["k"].at[:, slots_k].set(k_btmh[:, t - keep:].astype(ring["k"].dtype)),
            "v": ring["v"].at[:, slots_k].set(v_btmh[:, t - keep:].astype(ring["v"].dtype)),
            "pos": ring["pos"].at[:, slots_k].set(pos_bt[:, t - keep:]),
            "col": ring["col"].at[:, slots_k].set(jnp.broadcast_to(cols_k, (b, keep)).astype(jnp.int32))}
    return k_bsmh, v_bsmh, k_pos_bs, visible_bts, ring


class MultiHeadAttention(nn.Module):
    """Causal attention with n query heads and m key/value heads (m = n: multi-head; 1: multi-query;
    in between: grouped-query), one fused projection `c_attn` (n + 2m heads wide) and `c_proj`.

    With m = n the parameters are GPT-2's, so Hugging Face weights map one to one. `position`
    "rope" rotates queries and keys, "alibi" biases the scores (see `jaxgpt.positions`); `window`
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
        from .positions import alibi_slopes, apply_rope

        b, t, d, n, m, h, pos_bt = head_counts(x_btd, self.n_heads, self.n_kv_heads, positions_bt)
        q_btnh, k_btmh, v_btmh = fused_qkv(x_btd, n, m, h, use_bias=self.qkv_bias, dtype=self.dtype)
        if self.position == "rope":
            q_btnh, k_btmh = apply_rope(q_btnh, pos_bt, self.rope_base), apply_rope(k_btmh, pos_bt, self.rope_base)

        k_pos_bs = pos_bt
        if kv_cache is not None and "col" in kv_cache:  # a local layer's ring of the last `window` tokens
            k_btmh, v_btmh, k_pos_bs, mask_bts, kv_cache = _ring_attend_and_write(
                kv_cache, k_btmh, v_btmh, pos_bt, cache_index, mask_bts)
        elif kv_cache is not None:  # heads-major (b, m, S, h): the new tokens' keys/values go in at cache_index
            write = lambda cache, new, axis: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                cache, new.astype(cache.dtype), cache_index, axis)
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
        if self.is_mutable_collection("intermediates"):  # asked for the weights (attention maps)
            self.sow("intermediates", "attention_weights", attention_weights(q_btnh, k_btmh, **kw))
        if kv_cache is not None and "col" not in kv_cache and t == 1 and self.impl == "xla":  # a decode step
            out_btnh = cached_query_attention(q_btnh, k_bmsh, v_bmsh, **kw)
        else:
            out_btnh = ATTENTION_BACKENDS[self.impl](q_btnh, k_btmh, v_btmh, **kw, dropout=dropout)

        out_btd = out_btnh.reshape(b, t, d)
        out_btd = Dense(d, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std), name="c_proj")(out_btd)
        return out_btd if kv_cache is None else (out_btd, kv_cache)
