"""Choosing the next token from logits: greedy, temperature, top-k, top-p (the book's chapter 5).

`sample_rows` (settings and key per row: the server's continuous batching) and `sample_next`
(shared settings: the decode loops of `jaxgpt.inference.generate`) run inside compiled code; their
settings are traced values, so changing them does not recompile. `jaxgpt.reference.sampling` is
the NumPy reference of the filters and the distribution they leave.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _order_keys(x_bv: Array) -> Array:
    """uint32 keys that sort as the float32 values do (the sign bit flipped for positives, every
    bit for negatives), so a threshold can be searched over exactly, bit by bit. -0.0 becomes 0.0
    first (equal values must get equal keys)."""
    x_bv = x_bv.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x_bv == 0, jnp.float32(0), x_bv), jnp.uint32)
    return jnp.where(bits >> 31 == 0, bits | jnp.uint32(1 << 31), ~bits)


def _smallest_key(keys_bv: Array, holds) -> Array:
    """Per row, the smallest key t with `holds(t)` (b,) true, for a predicate that is false below
    some key and true from it on, and true at the row's largest key: 32 bisection steps."""
    lo_b, hi_b = jnp.min(keys_bv, axis=-1), jnp.max(keys_bv, axis=-1)

    def step(_, bounds):
        lo_b, hi_b = bounds
        mid_b = lo_b + (hi_b - lo_b) // 2
        ok_b = holds(mid_b)
        return jnp.where(ok_b, lo_b, mid_b + 1), jnp.where(ok_b, mid_b, hi_b)

    return jax.lax.fori_loop(0, 32, step, (lo_b, hi_b))[1]


def _filter_top_k_top_p(scaled_bv: Array, top_k, top_p) -> Array:
    """Logits outside the top-k / top-p set become -inf; top_k and top_p are scalars or per row (b,).

    top-k keeps the logits ≥ the k-th largest (ties at the k-th value all stay: the book's rule);
    top-p then keeps the values v whose strictly larger tokens hold less than p of the probability
    (the smallest set, in order of probability, that reaches p, with its ties). Both thresholds
    are found by bisection over the values' bit patterns (exact, 32 steps of one pass over the
    vocabulary each) instead of sorting the vocabulary: XLA's CPU sort of 8 × 50,257 logits takes
    149 ms, the bisection 8 ms (`docs/serving.md`). Each search runs only when some row uses it.
    """
    b, v = scaled_bv.shape
    keys_bv = _order_keys(scaled_bv)
    k_b = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, v), v), (b,))
    p_b = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))

    def kth_largest(keys_bv):  # smallest t with fewer than k keys above it: the k-th largest value
        return _smallest_key(keys_bv, lambda t_b: jnp.sum(keys_bv > t_b[:, None], axis=-1) < k_b)

    kth_b = jax.lax.cond(jnp.any(k_b < v), kth_largest, lambda k: jnp.min(k, axis=-1), keys_bv)
    scaled_bv = jnp.where(keys_bv < kth_b[:, None], -jnp.inf, scaled_bv)

    def nucleus_cutoff(keys_bv):  # smallest t whose strictly larger tokens hold less than p
        probs_bv = jax.nn.softmax(scaled_bv, axis=-1)
        return _smallest_key(keys_bv, lambda t_b: jnp.sum(jnp.where(keys_bv > t_b[:, None], probs_bv, 0.0), -1) < p_b)

    cutoff_b = jax.lax.cond(jnp.any(p_b < 1.0), nucleus_cutoff, lambda k: jnp.min(k, axis=-1), keys_bv)
    cutoff_b = jnp.where(p_b < 1.0, cutoff_b, jnp.min(keys_bv, axis=-1))  # p = 1 keeps every token
    return jnp.where(keys_bv < cutoff_b[:, None], -jnp.inf, scaled_bv)


def sample_next(key: Array, logits_bv: Array, temperature, top_k, top_p) -> Array:
    """One token per row with shared settings: `sample_rows` with the rows' keys split from `key`.

    temperature 0 → argmax; top_k 0 and top_p 1 switch those filters off. All three are traced
    values, so changing them does not recompile.
    """
    b = logits_bv.shape[0]
    row = lambda x, dtype: jnp.broadcast_to(jnp.asarray(x, dtype), (b,))  # noqa: E731
    return sample_rows(jax.random.split(key, b), logits_bv, row(temperature, jnp.float32), row(top_k, jnp.int32),
                       row(top_p, jnp.float32))


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

    temperature 0 → argmax; top_k 0 and top_p 1 switch those filters off (`_filter_top_k_top_p`).
    A row's draw depends only on its key and its logits, never on the other rows, so a seeded
    request samples the same text whichever requests share its batch. The filters run only when
    some sampled row filters, and nothing random is drawn when every row is greedy (`lax.cond` on
    the whole batch). A draw is by inverse CDF: one uniform number per row against the cumulative
    probabilities (a Gumbel-noise categorical draw costs one random number per vocabulary entry:
    10 ms a step for 8 rows of 50,257 on this CPU).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    scaled_bv = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]
    filtering = jnp.any(((top_k_b > 0) | (top_p_b < 1.0)) & (temperature_b > 0))
    scaled_bv = jax.lax.cond(filtering, lambda x: _filter_top_k_top_p(x, top_k_b, top_p_b), lambda x: x, scaled_bv)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    def sampled(scaled_bv):  # inverse CDF: one uniform number per row, not a vocabulary's worth of noise
        probs_bv = jax.nn.softmax(scaled_bv, axis=-1)
        cdf_bv = jnp.cumsum(probs_bv, axis=-1)
        u_b = jax.vmap(lambda key: jax.random.uniform(key))(keys_b) * cdf_bv[:, -1]
        draws_b = jnp.minimum(jnp.sum(cdf_bv <= u_b[:, None], axis=-1), scaled_bv.shape[-1] - 1)
        return jnp.where(temperature_b > 0, draws_b.astype(jnp.int32), greedy_b)

    return jax.lax.cond(jnp.any(temperature_b > 0), sampled, lambda _: greedy_b, scaled_bv)
