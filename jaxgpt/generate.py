"""Autoregressive text generation: greedy, temperature, top-k, top-p, end-of-text stopping.

The book's `generate_text_simple` / `generate` (chapters 4 and 5), with the whole decode loop
compiled once per (batch, prompt length, new tokens) shape: a `lax.while_loop` over a preallocated
token buffer. Each step runs the model on the last `context_length` tokens (the book's cropping),
read with a fixed-size `dynamic_slice`, so no step retraces. Rows that emit `eos_id` stop (their
remaining positions are filled with `eos_id`); the loop ends early once every row has stopped.
This path recomputes the window each step; the KV-cache decoder lives in its own module.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import GPTConfig
from .model import GPT

Array = jax.Array


def sample_next(key: Array, logits_bv: Array, temperature, top_k, top_p) -> Array:
    """One token per row. temperature 0 → argmax; top_k 0 and top_p 1 switch those filters off.

    top-k keeps the logits ≥ the k-th largest (the book's rule); top-p then keeps the smallest set
    of the remaining tokens, in order of probability, whose probabilities sum to at least p.
    All three are traced values, so changing them does not recompile.
    """
    v = logits_bv.shape[-1]
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = jnp.argmax(logits_bv, axis=-1)

    scaled_bv = logits_bv / jnp.maximum(temperature, 1e-6)
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth_b1 = jnp.take_along_axis(sorted_bv, jnp.broadcast_to(k - 1, (sorted_bv.shape[0], 1)), axis=-1)
    scaled_bv = jnp.where(scaled_bv < kth_b1, -jnp.inf, scaled_bv)

    ranks_v = jnp.arange(v)
    sorted_bv = jnp.where(ranks_v < k, sorted_bv, -jnp.inf)  # the same filter, in sorted order
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    keep_bv = (jnp.cumsum(probs_bv, axis=-1) - probs_bv) < top_p  # mass before this token < p
    keep_bv = keep_bv.at[:, 0].set(True)
    cutoff_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    scaled_bv = jnp.where(scaled_bv < cutoff_b1, -jnp.inf, scaled_bv)

    sampled_b = jax.random.categorical(key, scaled_bv, axis=-1)
    return jnp.where(temperature > 0, sampled_b, greedy_b).astype(jnp.int32)


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _decode(params, prompt_bt, key, temperature, top_k, top_p, eos_id, *, config: GPTConfig, max_new_tokens: int):
    b, t0 = prompt_bt.shape
    total = t0 + max_new_tokens
    window = min(config.context_length, total)
    pad = jnp.where(eos_id >= 0, eos_id, 0).astype(jnp.int32)
    buf_bT = jnp.concatenate([prompt_bt, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
    model = GPT(config)

    def cond(state):
        i, _, done_b, _ = state
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(state):
        i, buf_bT, done_b, key = state
        pos = t0 + i  # tokens known so far
        start = jnp.maximum(pos - window, 0)
        x_bw = jax.lax.dynamic_slice(buf_bT, (0, start), (b, window))
        logits_bwv = model.apply(params, x_bw, deterministic=True)
        logits_bv = jax.lax.dynamic_index_in_dim(logits_bwv, pos - 1 - start, axis=1, keepdims=False)
        key, sub = jax.random.split(key)
        next_b = sample_next(sub, logits_bv, temperature, top_k, top_p)
        next_b = jnp.where(done_b, pad, next_b)
        buf_bT = jax.lax.dynamic_update_slice(buf_bT, next_b[:, None], (0, pos))
        done_b = done_b | ((eos_id >= 0) & (next_b == eos_id))
        return i + 1, buf_bT, done_b, key

    state = (jnp.int32(0), buf_bT, jnp.zeros((b,), bool), key)
    _, buf_bT, _, _ = jax.lax.while_loop(cond, body, state)
    return buf_bT


def generate(
    params,
    config: GPTConfig,
    prompt_bt,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    eos_id: Optional[int] = None,
) -> np.ndarray:
    """Continue each row of `prompt_bt` (ints, shape (b, t0)) by up to `max_new_tokens` tokens.

    Returns (b, t0 + max_new_tokens) int32. With `eos_id`, a row that emits it stops, and the rest
    of that row is `eos_id`. Prompts longer than the context are fine: only the last
    `context_length` tokens are seen.
    """
    prompt_bt = np.asarray(prompt_bt, dtype=np.int32)
    if prompt_bt.ndim == 1:
        prompt_bt = prompt_bt[None]
    if prompt_bt.ndim != 2 or prompt_bt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, length) array of ids, got shape {prompt_bt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_bt.min() < 0 or prompt_bt.max() >= config.vocab_size:
        raise ValueError(f"prompt ids must lie in [0, {config.vocab_size}), got [{prompt_bt.min()}, {prompt_bt.max()}]")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens == 0:
        return prompt_bt
    out = _decode(
        params, jnp.asarray(prompt_bt), jax.random.key(seed),
        jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(top_p if top_p is not None else 1.0),
        jnp.int32(-1 if eos_id is None else eos_id),
        config=config, max_new_tokens=int(max_new_tokens),
    )
    return np.asarray(out)


def trim_at_eos(ids: Sequence[int], eos_id: Optional[int], start: int = 0) -> list[int]:
    """ids[start:] up to (not including) the first `eos_id`."""
    ids = [int(i) for i in ids[start:]]
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def generate_text(params, config: GPTConfig, tokenizer, prompt: str, max_new_tokens: int, **sampling) -> str:
    """Prompt text in, prompt + continuation text out (stopping at the tokenizer's end-of-text)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot_id]  # an empty prompt starts from end-of-text, as GPT-2 does
    out = generate(params, config, np.array([ids]), max_new_tokens, eos_id=tokenizer.eot_id, **sampling)
    return tokenizer.decode(ids) + tokenizer.decode(trim_at_eos(out[0], tokenizer.eot_id, start=len(ids)))
