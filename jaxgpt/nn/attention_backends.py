"""Attention backends: (q_btnh, k_bsmh, v_bsmh) -> out_btnh, each a plain function with one contract.

`naive` (explicit einsums and mask: the reference inside JAX), `xla` (`jax.nn.dot_product_attention`,
which XLA lowers to fused kernels and, on GPUs, to cuDNN flash attention) and, for a decode step
over a heads-major cache, `cached_query_attention`. The tiled `blockwise` backend is in
`jaxgpt.nn.blockwise` (it falls back to `naive_attention` here); the registry of backends by name,
`ATTENTION_BACKENDS`, is in `jaxgpt.nn.attention`.

Axis letters: b batch, t query positions, s key positions, n query heads, m key/value heads,
g query heads per key/value head, h head dim.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def causal_mask(t: int, s: Optional[int] = None) -> Array:
    """Boolean (t, s) mask, True where query i may attend to key j (j <= i + s - t)."""
    s = t if s is None else s
    return jnp.tril(jnp.ones((t, s), dtype=bool), k=s - t)


def masked_softmax(scores: Array, mask: Optional[Array], sinks_n: Optional[Array] = None) -> Array:
    """Softmax over the last axis in at least float32, with masked-out entries exactly zero.

    `sinks_n` (scores (b, n, t, s) only): one learned logit per head that joins every row's
    softmax as an extra entry with no value (an attention sink, as gpt-oss): the weights of the
    real keys then sum to less than one, and a head can attend to nothing."""
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    if sinks_n is None:
        return jax.nn.softmax(scores, axis=-1)
    sink_bnt1 = jnp.broadcast_to(jnp.asarray(sinks_n, scores.dtype)[None, :, None, None], (*scores.shape[:-1], 1))
    return jax.nn.softmax(jnp.concatenate([scores, sink_bnt1], axis=-1), axis=-1)[..., :-1]


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
# - `sinks_n` adds one learned logit per head to every softmax, with no value (`masked_softmax`);
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


def alibi_bias(q_pos_bt: Array, k_pos_bs: Array, slopes_n: Array, dtype=jnp.float32) -> Array:
    """ALiBi's additive score bias (b, n, t, s): -slope_n · (q_pos - k_pos), in `dtype`."""
    delta_bts = (q_pos_bt[:, :, None] - k_pos_bs[:, None, :]).astype(dtype)
    return -jnp.asarray(slopes_n, dtype)[None, :, None, None] * delta_bts[:, None]


def attention_scores(q_btnh: Array, k_bsmh: Array) -> Array:
    """The scaled scores q·k / sqrt(h) (b, n, t, s), before any bias or mask."""
    b, t, n, h = q_btnh.shape
    m = k_bsmh.shape[2]
    q_btmgh = q_btnh.reshape(b, t, m, n // m, h)  # query head i = (kv head i // g, member i % g)
    scores_bmgts = jnp.einsum("btmgh,bsmh->bmgts", q_btmgh, k_bsmh) / jnp.sqrt(h).astype(q_btnh.dtype)
    return scores_bmgts.reshape(b, n, t, -1)


def attention_weights(q_btnh: Array, k_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                      mask_bts: Optional[Array] = None, window: Optional[int] = None,
                      slopes_n: Optional[Array] = None, sinks_n: Optional[Array] = None) -> Array:
    """The softmax attention weights (b, n, t, s) — what `jaxgpt attention-map` draws."""
    return weights_from_scores(attention_scores(q_btnh, k_bsmh), q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs,
                               mask_bts=mask_bts, window=window, slopes_n=slopes_n, sinks_n=sinks_n)


def weights_from_scores(scores_bnts: Array, *, q_pos_bt: Array, k_pos_bs: Array, mask_bts: Optional[Array],
                         window: Optional[int], slopes_n: Optional[Array], sinks_n: Optional[Array] = None) -> Array:
    """Scaled scores (b, n, t, s) -> attention weights: ALiBi bias, visibility mask, softmax."""
    if slopes_n is not None:
        acc = jnp.promote_types(scores_bnts.dtype, jnp.float32)
        scores_bnts = scores_bnts.astype(acc) + alibi_bias(q_pos_bt, k_pos_bs, slopes_n, acc)
    visible_b1ts = visible_keys(q_pos_bt, k_pos_bs, mask_bts, window)[:, None]
    weights_bnts = masked_softmax(scores_bnts, visible_b1ts, sinks_n)
    # a query that sees no key at all (a padding row) gets zeros, not NaN
    return jnp.where(jnp.any(visible_b1ts, axis=-1, keepdims=True), weights_bnts, 0.0)


def naive_attention(q_btnh: Array, k_bsmh: Array, v_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                    mask_bts: Optional[Array] = None, window: Optional[int] = None,
                    slopes_n: Optional[Array] = None, sinks_n: Optional[Array] = None,
                    dropout: Optional[DropoutFn] = None) -> Array:
    """Explicit scaled dot-product attention: all scores (b, n, t, s), mask, softmax, weighted sum."""
    b, t, n, h = q_btnh.shape
    m = k_bsmh.shape[2]
    weights_bnts = attention_weights(q_btnh, k_bsmh, q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs, mask_bts=mask_bts,
                                     window=window, slopes_n=slopes_n, sinks_n=sinks_n)
    if dropout is not None:
        weights_bnts = dropout(weights_bnts)
    weights_bmgts = weights_bnts.reshape(b, m, n // m, t, -1).astype(v_bsmh.dtype)
    return jnp.einsum("bmgts,bsmh->btmgh", weights_bmgts, v_bsmh).reshape(b, t, n, h)


def xla_attention(q_btnh: Array, k_bsmh: Array, v_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                  mask_bts: Optional[Array] = None, window: Optional[int] = None,
                  slopes_n: Optional[Array] = None, sinks_n: Optional[Array] = None,
                  dropout: Optional[DropoutFn] = None) -> Array:
    """`jax.nn.dot_product_attention` (fused by XLA, cuDNN on GPUs; no dropout on the weights).

    The fused op has no sink logit: with `sinks_n` (and for float64) this is the naive backend."""
    if dropout is not None:
        raise ValueError("the 'xla' attention backend has no attention dropout; use 'naive' or 'auto'")
    if q_btnh.dtype == jnp.float64 or sinks_n is not None:  # XLA's fused attention computes float64 in float32
        return naive_attention(q_btnh, k_bsmh, v_bsmh, q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs, mask_bts=mask_bts,
                               window=window, slopes_n=slopes_n, sinks_n=sinks_n)
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
                           slopes_n: Optional[Array] = None, sinks_n: Optional[Array] = None) -> Array:
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
    weights_bnts = weights_from_scores(scores_bmgs.reshape(b, n, 1, s), q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs,
                                        mask_bts=mask_bts, window=window, slopes_n=slopes_n, sinks_n=sinks_n)
    weights_bmgs = weights_bnts.reshape(b, m, n // m, s).astype(q_btnh.dtype)  # rounded to q's dtype, as ever
    out_bmgh = jnp.einsum("bmgs,bmsh->bmgh", weights_bmgs.astype(v_bmsh.dtype), v_bmsh)
    return out_bmgh.astype(q_btnh.dtype).reshape(b, 1, n, h)
