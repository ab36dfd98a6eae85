"""Autoregressive text generation: greedy, temperature, top-k, top-p, end-of-text stopping.

The book's `generate_text_simple` / `generate` (chapters 4 and 5), with the whole decode loop
compiled once per (batch, prompt length, new tokens) shape, in two forms:

- cached (default when prompt + new tokens fit the context): the prompt is prefilled once into a
  preallocated key/value cache, then each step feeds one token and attends to the cache
  (`_decode_cached`). Batches of prompts of different lengths are left-padded: padding slots are
  masked out of attention and each row's positions start at 0 at its first real token.
- uncached (`use_cache=False`, or when the sequence outgrows the context window): each step runs
  the model on the last `context_length` tokens, the book's cropping, read with a fixed-size
  `dynamic_slice` (`_decode_window`).
Both are a `lax.while_loop`; rows that emit `eos_id` stop (the rest of the row is `eos_id`) and the
loop ends once every row has stopped. Both give the same tokens (tested).
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from .config import GPTConfig, resolve_dtype
from .layout import is_stacked, unstack_layers
from .model import GPT, init_cache
from .precision import _transposed_copy, is_low_precision

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


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _decode_window(params, prompt_bt, key, temperature, top_k, top_p, eos_id, *, config: GPTConfig, max_new_tokens: int):
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


_STREAM_HANDLER: list = [None]  # the host function io_callback forwards to (set per call)


def _emit(tokens_b, step) -> np.ndarray:
    """Hand a step's tokens to the host handler; its answer (rows to stop now) goes back in."""
    tokens_b = np.asarray(tokens_b)
    stop = _STREAM_HANDLER[0](tokens_b, int(step)) if _STREAM_HANDLER[0] is not None else None
    return np.zeros(tokens_b.shape, bool) if stop is None else np.asarray(stop, bool).reshape(tokens_b.shape)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "return_logits", "stream"))
def _decode_cached(params, prompt_bp, pad_b, key, temperature, top_k, top_p, eos_id, *, config: GPTConfig,
                   max_new_tokens: int, return_logits: bool = False, stream: bool = False):
    """Prefill the left-padded prompts once, then decode one token per step against the KV cache.

    prompt_bp: (b, P) ids, row r real from column pad_b[r] on. Returns new tokens (b, N) and, with
    `return_logits`, the logits each token was drawn from (b, N, V).
    """
    b, p = prompt_bp.shape
    n = max_new_tokens
    model = GPT(config)
    slots_s = jnp.arange(p + n)
    visible_bs = slots_s[None, :] >= pad_b[:, None]  # padding slots are never attended to
    pad = jnp.where(eos_id >= 0, eos_id, 0).astype(jnp.int32)

    # prefill: slot j holds prompt column j; query i sees slots j <= i that are not padding
    positions_bp = jnp.maximum(jnp.arange(p)[None, :] - pad_b[:, None], 0)
    mask_bps = visible_bs[:, None, :] & (slots_s[None, None, :] <= jnp.arange(p)[None, :, None])
    logits_bpv, cache = model.apply(params, prompt_bp, positions_bt=positions_bp,
                                    cache=init_cache(config, b, p + n), cache_index=0, mask_bts=mask_bps)
    logits_bv = logits_bpv[:, -1]

    tokens_bn = jnp.full((b, n), pad, jnp.int32)
    all_logits = jnp.zeros((b, n, logits_bv.shape[-1]), logits_bv.dtype) if return_logits else None

    def cond(state):
        i, _, _, done_b, _, _, _ = state
        return (i < n) & ~jnp.all(done_b)

    def body(state):
        i, tokens_bn, logits_bv, done_b, cache, key, all_logits = state
        key, sub = jax.random.split(key)
        next_b = jnp.where(done_b, pad, sample_next(sub, logits_bv, temperature, top_k, top_p))
        tokens_bn = tokens_bn.at[:, i].set(next_b)
        if return_logits:
            all_logits = all_logits.at[:, i].set(logits_bv)
        if stream:
            done_b = done_b | jax.experimental.io_callback(_emit, jax.ShapeDtypeStruct((b,), jnp.bool_), next_b, i,
                                                           ordered=True)
        done_b = done_b | ((eos_id >= 0) & (next_b == eos_id))
        slot = p + i  # where this token's key/value go
        mask_b1s = (visible_bs & (slots_s[None, :] <= slot))[:, None, :]
        logits_b1v, cache = model.apply(params, next_b[:, None], positions_bt=(slot - pad_b)[:, None],
                                        cache=cache, cache_index=slot, mask_bts=mask_b1s)
        return i + 1, tokens_bn, logits_b1v[:, 0], done_b, cache, key, all_logits

    state = (jnp.int32(0), tokens_bn, logits_bv, jnp.zeros((b,), bool), cache, key, all_logits)
    _, tokens_bn, _, _, _, _, all_logits = jax.lax.while_loop(cond, body, state)
    return tokens_bn, all_logits


def _decoding_copy(tree, dtype):
    """`tree` with every dense "kernel" (…, k, n) replaced by "kernel_nk" (…, n, k), transposed and
    cast to `dtype`, and every "embedding" table cast to `dtype`: the dtype the dense layers and
    embeddings cast them to at every call anyway (the tied head included), so a bf16 model reads
    half the bytes and converts nothing."""
    if not isinstance(tree, dict):
        return tree
    # precision's 3-D transpose: 2.5× XLA CPU's plain one (6.8 against 16.7 ms for a 768×3072 kernel)
    return {("kernel_nk" if key == "kernel" else key): (_transposed_copy(value).astype(dtype) if key == "kernel"
                                                        else value.astype(dtype) if key == "embedding"
                                                        else _decoding_copy(value, dtype))
            for key, value in tree.items()}


# its own program: the outputs are real (n, k) arrays
_make_decoding_copy = jax.jit(_decoding_copy, static_argnums=1)
_LAST_CONVERSION: list = []  # [(weak references to the input leaves, (dtype, transposed), the converted tree)]: at most one


def decode_params(params, config: Optional[GPTConfig] = None):
    """The parameters as decoding reads them fastest on this backend; run them with
    `config.replace(scan_layers=False)`.

    Always GPT-2's per-block layout: a scanned model's stacked blocks are unstacked (decoding loops
    over the layers with a per-layer cache; slicing the stacked weights inside the loop ran at less
    than half the speed). On CPU (`xla_tuning.transposed_decode_kernels`) every dense kernel is
    also replaced by its transposed copy "kernel_nk", which `precision.Dense` contracts over its
    minor axis — the same function. With a bf16/f16 compute dtype (`config`) the copy and the
    embedding tables are stored in it: the mixed-precision layer and the embeddings round them to
    that dtype at every call anyway, so the values are identical and the decode loop reads half the
    bytes.
    `generate`/`generate_batch` call this on every call; the last conversion is kept while its
    input arrays live, so decoding the same parameters again costs nothing (a transposed copy of
    gpt2-small's kernels takes ~0.3 s and 340 MB). A tree that already holds "kernel_nk", or
    needs nothing, is returned as is.
    """
    from . import xla_tuning

    transpose = xla_tuning.transposed_decode_kernels()
    if _holds_nk(params) or not (transpose or is_stacked(params)):
        return params
    dtype = resolve_dtype(config) if config is not None and is_low_precision(resolve_dtype(config)) else jnp.float32
    key = (jnp.dtype(dtype), transpose)
    leaves = jax.tree.leaves(params)
    if _LAST_CONVERSION:
        refs, last_key, converted = _LAST_CONVERSION[0]
        if last_key == key and len(refs) == len(leaves) and all(r() is leaf for r, leaf in zip(refs, leaves)):
            return converted
    _LAST_CONVERSION.clear()  # drop the old copy before making a new one
    converted = unstack_layers(params)
    if transpose:
        converted = _make_decoding_copy(converted, jnp.dtype(dtype))
    try:
        entry = ([weakref.ref(leaf) for leaf in leaves], key, converted)
        _LAST_CONVERSION.append(entry)
        # free the copy with the parameters: when the first input leaf dies, forget this conversion
        weakref.finalize(leaves[0], _forget_conversion, id(entry))
    except TypeError:  # leaves that cannot be weakly referenced (NumPy arrays): no caching
        _LAST_CONVERSION.clear()
    return converted


def _forget_conversion(entry_id: int) -> None:
    if _LAST_CONVERSION and id(_LAST_CONVERSION[0]) == entry_id:
        _LAST_CONVERSION.clear()


def _holds_nk(tree) -> bool:
    return isinstance(tree, dict) and any(key == "kernel_nk" or _holds_nk(value) for key, value in tree.items())


def _check_sampling(config: GPTConfig, max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _sampling_args(seed, temperature, top_k, top_p, eos_id):
    return (jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k or 0),
            jnp.float32(top_p if top_p is not None else 1.0), jnp.int32(-1 if eos_id is None else eos_id))


def generate_batch(
    params,
    config: GPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    eos_id: Optional[int] = None,
    on_token: Optional[Callable[[np.ndarray, int], Optional[np.ndarray]]] = None,
    return_logits: bool = False,
    pad_to: Optional[int] = None,
):
    """Continue prompts of different lengths together (left-padded, KV-cached).

    Returns the new tokens of each prompt (a list per prompt, cut at `eos_id`), and with
    `return_logits` also the (b, N, V) logits they were drawn from. `on_token(tokens_b, step)` is
    called from inside the compiled loop as each step's tokens are produced (for streaming); it may
    return a (b,) bool array of rows to stop now (a client that left, a stop string), and the
    loop ends once every row has stopped. One decode with `on_token` at a time per process.
    `pad_to` left-pads the prompts to at least that length, so callers that bucket prompt lengths
    reuse one compiled program per bucket.
    Prompt + new tokens must fit the context window (a clear error otherwise).
    """
    _check_sampling(config, max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(max(len(p) for p in prompts), pad_to or 0)
    if longest + max_new_tokens > config.context_length:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context window "
            f"({config.context_length}) of the cached decoder: shorten the prompt or generate fewer tokens"
        )
    prompt_bp = np.zeros((len(prompts), longest), np.int32)
    pad_b = np.array([longest - len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        prompt_bp[r, pad_b[r]:] = p
    if prompt_bp.max() >= config.vocab_size or prompt_bp.min() < 0:
        raise ValueError(f"prompt ids must lie in [0, {config.vocab_size})")
    if max_new_tokens == 0:
        return ([[] for _ in prompts], None) if return_logits else [[] for _ in prompts]
    params, config = decode_params(params, config), config.replace(scan_layers=False)
    _STREAM_HANDLER[0] = on_token
    try:
        tokens_bn, logits = _decode_cached(
            params, jnp.asarray(prompt_bp), jnp.asarray(pad_b), *_sampling_args(seed, temperature, top_k, top_p, eos_id),
            config=config, max_new_tokens=int(max_new_tokens), return_logits=return_logits, stream=on_token is not None,
        )
        tokens_bn = np.asarray(tokens_bn)
    finally:
        _STREAM_HANDLER[0] = None
    new = [trim_at_eos(row, eos_id) for row in tokens_bn]
    return (new, np.asarray(logits)) if return_logits else new


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
    use_cache: bool = True,
) -> np.ndarray:
    """Continue each row of `prompt_bt` (ints, shape (b, t0)) by up to `max_new_tokens` tokens.

    Returns (b, t0 + max_new_tokens) int32. With `eos_id`, a row that emits it stops, and the rest
    of that row is `eos_id`. Prompts longer than the context are fine: only the last
    `context_length` tokens are seen. The KV cache is used when prompt + new tokens fit the
    context window; beyond it (or with `use_cache=False`) each step recomputes the window.
    """
    prompt_bt = np.asarray(prompt_bt, dtype=np.int32)
    if prompt_bt.ndim == 1:
        prompt_bt = prompt_bt[None]
    if prompt_bt.ndim != 2 or prompt_bt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, length) array of ids, got shape {prompt_bt.shape}")
    _check_sampling(config, max_new_tokens, temperature, top_k, top_p)
    if prompt_bt.min() < 0 or prompt_bt.max() >= config.vocab_size:
        raise ValueError(f"prompt ids must lie in [0, {config.vocab_size}), got [{prompt_bt.min()}, {prompt_bt.max()}]")
    if max_new_tokens == 0:
        return prompt_bt
    sampling = _sampling_args(seed, temperature, top_k, top_p, eos_id)
    params, config = decode_params(params, config), config.replace(scan_layers=False)
    if use_cache and prompt_bt.shape[1] + max_new_tokens <= config.context_length:
        pad_b = jnp.zeros((prompt_bt.shape[0],), jnp.int32)
        new_bn, _ = _decode_cached(params, jnp.asarray(prompt_bt), pad_b, *sampling, config=config,
                                   max_new_tokens=int(max_new_tokens))
        return np.concatenate([prompt_bt, np.asarray(new_bn)], axis=1)
    out = _decode_window(params, jnp.asarray(prompt_bt), *sampling, config=config, max_new_tokens=int(max_new_tokens))
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
