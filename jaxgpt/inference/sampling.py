"""Choosing the next token from logits: greedy, temperature, top-k, top-p (the book's chapter 5).

`sample_next` runs inside the compiled decode loops (`jaxgpt.inference.generate`); its settings
are traced values, so changing them does not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _filter_top_k_top_p(scaled_bv: Array, top_k, top_p) -> Array:
    """Logits outside the top-k / top-p set become -inf (one descending sort serves both)."""
    v = scaled_bv.shape[-1]
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.broadcast_to(k - 1, (sorted_bv.shape[0], 1)), axis=-1)
    scaled_bv = jnp.where(scaled_bv < kth_b1, -jnp.inf, scaled_bv)

    sorted_bv = jnp.where(jnp.arange(v) < k, sorted_bv, -jnp.inf)  # the same filter, in sorted order
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    keep_bv = (jnp.cumsum(probs_bv, axis=-1) - probs_bv) < top_p  # mass before this token < p
    keep_bv = keep_bv.at[:, 0].set(True)
    cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled_bv < cutoff_b1, -jnp.inf, scaled_bv)


def sample_next(key: Array, logits_bv: Array, temperature, top_k, top_p) -> Array:
    """One token per row. temperature 0 → argmax; top_k 0 and top_p 1 switch those filters off.

    top-k keeps the logits ≥ the k-th largest (the book's rule); top-p then keeps the smallest set
    of the remaining tokens, in order of probability, whose probabilities sum to at least p.
    All three are traced values, so changing them does not recompile; `lax.cond` skips the
    vocabulary sort (milliseconds per token at 50k ids) when no filter is on, and all sampling
    when decoding greedily.
    """
    logits_bv = logits_bv.astype(jnp.float32)

    def sampled(_):
        scaled_bv = logits_bv / jnp.maximum(temperature, 1e-6)
        filtering = (top_k > 0) | (top_p < 1.0)
        scaled_bv = jax.lax.cond(filtering, lambda x: _filter_top_k_top_p(x, top_k, top_p), lambda x: x, scaled_bv)
        return jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)

    def greedy(_):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sampled, greedy, None)


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sampling_args(seed, temperature, top_k, top_p, eos_id):
    return (jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k or 0),
            jnp.float32(top_p if top_p is not None else 1.0), jnp.int32(-1 if eos_id is None else eos_id))


def sample_rows(keys_b: Array, logits_bv: Array, temperature_b: Array, top_k_b: Array, top_p_b: Array) -> Array:
    """One token per row, each row with its own settings and its own key (continuous batching).

    The rules are `sample_next`'s, row by row: temperature 0 → argmax; top_k 0 and top_p 1 switch
    those filters off. A row's draw depends only on its key and its logits, never on the other
    rows, so a seeded request samples the same text whichever requests share its batch. The
    vocabulary sort runs only when some row filters (`lax.cond` on the whole batch).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    scaled_bv = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]
    filtering = jnp.any((top_k_b > 0) | (top_p_b < 1.0))
    scaled_bv = jax.lax.cond(filtering, lambda x: _filter_top_k_top_p(x, top_k_b[:, None], top_p_b[:, None]),
                             lambda x: x, scaled_bv)
    sampled_b = jax.vmap(lambda key, row_v: jax.random.categorical(key, row_v))(keys_b, scaled_bv)
    return jnp.where(temperature_b > 0, sampled_b, jnp.argmax(logits_bv, axis=-1)).astype(jnp.int32)
