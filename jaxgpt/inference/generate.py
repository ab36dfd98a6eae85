"""Autoregressive text generation: greedy, temperature, top-k, top-p, end-of-text stopping.

The book's `generate_text_simple` / `generate` (chapters 4 and 5), with the whole decode loop
compiled once per (batch, prompt length, new tokens) shape, in two forms:

- cached (default when prompt + new tokens fit the context): the prompt is prefilled once into a
  preallocated key/value cache (`jaxgpt.inference.kv_cache`), then each step feeds one token and
  attends to the cache (`_decode_cached`). Batches of prompts of different lengths are
  left-padded: padding slots are masked out of attention and each row's positions start at 0 at
  its first real token.
- uncached (`use_cache=False`, or when the sequence outgrows the context window): each step runs
  the model on the last `context_length` tokens, the book's cropping, read with a fixed-size
  `dynamic_slice` (`_decode_window`).
Both are a `lax.while_loop`; rows that emit `eos_id` stop (the rest of the row is `eos_id`) and the
loop ends once every row has stopped. Both give the same tokens (tested).

`Decoder(params, config)` holds one set of weights in their decoding copy
(`jaxgpt.inference.decoding_copy`) and decodes with them as often as asked; `generate`,
`generate_batch` and `generate_text` are one-call conveniences that build one. Nothing here keeps
state between calls at module level.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Callable, Optional, Sequence

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.decoding_copy import decode_params
from jaxgpt.inference.kv_cache import init_cache
from jaxgpt.inference.sampling import check_sampling, sample_next, sampling_args
from jaxgpt.nn.model import GPT

Array = jax.Array
_CACHED_STATIC = ("config", "max_new_tokens", "return_logits", "emit")
WINDOW_CHUNK = 256  # new tokens per compiled call of the sliding-window decoder


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


def _decode_cached(params, prompt_bp, pad_b, key, temperature, top_k, top_p, eos_id, *, config: GPTConfig,
                   max_new_tokens: int, return_logits: bool = False, emit: Optional[Callable] = None):
    """Prefill the left-padded prompts once, then decode one token per step against the KV cache.

    prompt_bp: (b, P) ids, row r real from column pad_b[r] on. Returns new tokens (b, N) and, with
    `return_logits`, the logits each token was drawn from (b, N, V). `emit(tokens_b, step)`, when
    given, is called on the host with each step's tokens and answers which rows to stop now.
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
        if emit is not None:
            done_b = done_b | jax.experimental.io_callback(emit, jax.ShapeDtypeStruct((b,), jnp.bool_), next_b, i,
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


# Without streaming, one compiled program per shape for every caller.
_decode_cached_jit = jax.jit(_decode_cached, static_argnames=_CACHED_STATIC)


class Decoder:
    """One set of weights ready to decode: their decoding copy, made once, and this decoder's own
    compiled streaming program (its host callback reports to this object, not to a global)."""

    def __init__(self, params, config: GPTConfig) -> None:
        self.config = config.replace(scan_layers=False)
        self.params = decode_params(params, config)
        self._on_token: Optional[Callable] = None
        self._stream_lock = threading.Lock()  # one streaming decode at a time per decoder

        def streaming(*args, **kwargs):
            return _decode_cached(*args, emit=self._emit, **kwargs)

        self._decode_streaming = jax.jit(streaming, static_argnames=_CACHED_STATIC[:-1])

    def _emit(self, tokens_b, step) -> np.ndarray:
        """Hand a step's tokens to the caller's `on_token`; its answer (rows to stop now) goes back in."""
        tokens_b = np.asarray(tokens_b)
        stop = self._on_token(tokens_b, int(step)) if self._on_token is not None else None
        return np.zeros(tokens_b.shape, bool) if stop is None else np.asarray(stop, bool).reshape(tokens_b.shape)

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                       top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                       eos_id: Optional[int] = None,
                       on_token: Optional[Callable[[np.ndarray, int], Optional[np.ndarray]]] = None,
                       return_logits: bool = False, pad_to: Optional[int] = None):
        """Continue prompts of different lengths together (left-padded, KV-cached).

        Returns the new tokens of each prompt (a list per prompt, cut at `eos_id`), and with
        `return_logits` also the (b, N, V) logits they were drawn from. `on_token(tokens_b, step)`
        is called from inside the compiled loop as each step's tokens are produced (for
        streaming); it may return a (b,) bool array of rows to stop now (a client that left, a stop
        string), and the loop ends once every row has stopped. `pad_to` left-pads the prompts to at
        least that length, so callers that bucket prompt lengths reuse one compiled program per
        bucket. Prompt + new tokens must fit the context window (a clear error otherwise).
        """
        config = self.config
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        prompt_bp, pad_b = _left_padded(prompts, max(max((len(p) for p in prompts), default=0), pad_to or 0), config)
        if prompt_bp.shape[1] + max_new_tokens > config.context_length:
            raise ValueError(
                f"prompt of {prompt_bp.shape[1]} tokens + {max_new_tokens} new tokens exceeds the context window "
                f"({config.context_length}) of the cached decoder: shorten the prompt or generate fewer tokens"
            )
        if max_new_tokens == 0:
            return ([[] for _ in prompts], None) if return_logits else [[] for _ in prompts]
        args = (self.params, jnp.asarray(prompt_bp), jnp.asarray(pad_b),
                *sampling_args(seed, temperature, top_k, top_p, eos_id))
        static = dict(config=config, max_new_tokens=int(max_new_tokens), return_logits=return_logits)
        if on_token is None:
            tokens_bn, logits = _decode_cached_jit(*args, **static)
        else:
            with self._stream_lock:
                self._on_token = on_token
                try:
                    tokens_bn, logits = self._decode_streaming(*args, **static)
                    tokens_bn = np.asarray(tokens_bn)
                finally:
                    self._on_token = None
        new = [trim_at_eos(row, eos_id) for row in np.asarray(tokens_bn)]
        return (new, np.asarray(logits)) if return_logits else new

    def generate(self, prompt_bt, max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0, eos_id: Optional[int] = None,
                 use_cache: bool = True) -> np.ndarray:
        """Continue each row of `prompt_bt` (ints, shape (b, t0)) by up to `max_new_tokens` tokens.

        Returns (b, t0 + max_new_tokens) int32. With `eos_id`, a row that emits it stops, and the
        rest of that row is `eos_id`. Prompts longer than the context are fine: only the last
        `context_length` tokens are seen. The KV cache is used when prompt + new tokens fit the
        context window; beyond it (or with `use_cache=False`) each step recomputes the window.
        """
        prompt_bt = self._checked_prompt(prompt_bt)
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if max_new_tokens == 0:
            return prompt_bt
        if use_cache and prompt_bt.shape[1] + max_new_tokens <= self.config.context_length:
            pad_b = jnp.zeros((prompt_bt.shape[0],), jnp.int32)
            new_bn, _ = _decode_cached_jit(self.params, jnp.asarray(prompt_bt), pad_b,
                                           *sampling_args(seed, temperature, top_k, top_p, eos_id),
                                           config=self.config, max_new_tokens=int(max_new_tokens))
            return np.concatenate([prompt_bt, np.asarray(new_bn)], axis=1)
        chunks = self.window_chunks(prompt_bt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, eos_id=eos_id)
        return np.concatenate([prompt_bt, *chunks], axis=1)

    def window_chunks(self, prompt_bt, max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, seed: int = 0, eos_id: Optional[int] = None):
        """The sliding-window decoder (no cache; the book's cropping), yielding the new tokens
        (b, ≤ `WINDOW_CHUNK`) chunk by chunk: memory does not grow with `max_new_tokens`, and a
        caller can show text as it is made. Rows that emitted `eos_id` continue as `eos_id`."""
        prompt_bt = self._checked_prompt(prompt_bt)
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        tail_bt, done_b = prompt_bt[:, -self.config.context_length:], np.zeros(prompt_bt.shape[0], bool)
        for i, start in enumerate(range(0, max_new_tokens, WINDOW_CHUNK)):
            n = min(WINDOW_CHUNK, max_new_tokens - start)
            key, *rest = sampling_args(seed, temperature, top_k, top_p, eos_id)
            key = key if i == 0 else jax.random.fold_in(key, i)  # chunk 0 draws what one whole call drew
            out = np.asarray(_decode_window(self.params, jnp.asarray(tail_bt), key, *rest, config=self.config,
                                            max_new_tokens=n))
            new_bn = out[:, tail_bt.shape[1]:]
            if eos_id is not None:  # within a chunk the decoder pads a stopped row with eos; across chunks, here
                new_bn = np.where(done_b[:, None], eos_id, new_bn)
                done_b = done_b | (new_bn == eos_id).any(axis=1)
            yield new_bn
            if done_b.all():
                if start + n < max_new_tokens:
                    yield np.full((len(done_b), max_new_tokens - start - n), eos_id, np.int32)
                return
            tail_bt = np.concatenate([tail_bt, new_bn], axis=1)[:, -self.config.context_length:]

    def _checked_prompt(self, prompt_bt) -> np.ndarray:
        prompt_bt = np.asarray(prompt_bt, dtype=np.int32)
        if prompt_bt.ndim == 1:
            prompt_bt = prompt_bt[None]
        if prompt_bt.ndim != 2 or prompt_bt.shape[1] == 0:
            raise ValueError(f"prompt must be a non-empty (batch, length) array of ids, got shape {prompt_bt.shape}")
        if prompt_bt.min() < 0 or prompt_bt.max() >= self.config.vocab_size:
            raise ValueError(f"prompt ids must lie in [0, {self.config.vocab_size}), "
                             f"got [{prompt_bt.min()}, {prompt_bt.max()}]")
        return prompt_bt


def _left_padded(prompts: Sequence[Sequence[int]], length: int, config: GPTConfig) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_bp, pad_b): the prompts right-aligned in a (b, length) array, and each row's padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    prompt_bp = np.zeros((len(prompts), length), np.int32)
    pad_b = np.array([length - len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        prompt_bp[r, pad_b[r]:] = p
    if prompt_bp.max() >= config.vocab_size or prompt_bp.min() < 0:
        raise ValueError(f"prompt ids must lie in [0, {config.vocab_size})")
    return prompt_bp, pad_b


def generate_batch(params, config: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs):
    """`Decoder(params, config).generate_batch(prompts, max_new_tokens, **kwargs)`: for one call;
    build a `Decoder` to decode the same weights repeatedly (it keeps their decoding copy)."""
    return Decoder(params, config).generate_batch(prompts, max_new_tokens, **kwargs)


def generate(params, config: GPTConfig, prompt_bt, max_new_tokens: int, **kwargs) -> np.ndarray:
    """`Decoder(params, config).generate(prompt_bt, max_new_tokens, **kwargs)` (see `Decoder.generate`)."""
    return Decoder(params, config).generate(prompt_bt, max_new_tokens, **kwargs)


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
