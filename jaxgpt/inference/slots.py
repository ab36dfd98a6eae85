"""The compiled half of continuous batching: a KV cache of fixed decoding slots, chunked prefill
into one slot, and one decoding step for all slots.

Each slot owns one row of the cache (`init_cache(config, slots, context)`: every layer kind, full
softmax keys/values, a local layer's ring, a latent cache, a linear-attention state). A slot's row
is written from column 0: its tokens sit at columns 0, 1, … with positions equal to columns, so no
padding. The decoding step runs the model once on a (slots, 1) batch with a per-row `cache_index`
(each slot writes its token at its own column, `nn.attention.write_at`); rows never mix, so a
row's logits do not depend on what the other slots hold. Only the rows marked active keep what the
step wrote: a free slot, or one whose prompt is half prefilled, comes out of the step bit for bit as
it went in, whatever its cache kind (columns, a ring, a latent cache, a recurrent state). (A first version ran the model under
`jax.vmap` over the slots; it gave the same tokens, and its slow step, 17 ms for 8 slots of the
`small` preset, turned out to come from sampling, not from vmap: see `sampling.sample_rows`.
One batched call was kept as the plainer program.)

Prefill writes a prompt in exact chunks whose lengths are powers of two up to `prefill_chunk`
(a 37-token prompt with chunk 16: 16 + 16 + 4 + 1), so padding never reaches a ring or a
recurrent state, and the compiled prefill shapes are log2(prefill_chunk) + 1, all compiled at
start-up with the step.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.kv_cache import init_cache
from jaxgpt.inference.sampling import sample_rows
from jaxgpt.nn.model import GPT

Array = jax.Array


def chunk_lengths(n_tokens: int, prefill_chunk: int) -> list[int]:
    """The exact prefill chunks of an `n_tokens` prompt: full chunks, then the remainder's binary digits."""
    full, rest = divmod(n_tokens, prefill_chunk)
    return [prefill_chunk] * full + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def _row(cache_s, slot):
    """Slot `slot`'s row of every cache leaf, as a batch of one."""
    return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, 0), cache_s)


def _put_row(cache_s, row, slot):
    return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), slot, 0), cache_s, row)


def _prefill(params, cache_s, slot, tokens_1c, start, *, config: GPTConfig):
    """Write a chunk of a prompt at columns start … start+c-1 of `slot`; the logits of its last token.
    At start 0 the slot's row is emptied first (a new request: a ring's columns and a linear
    state must not keep the previous occupant's)."""
    length, c = config.context_length, tokens_1c.shape[1]
    empty = init_cache(config, 1, length)
    row = jax.tree.map(lambda old, new: jnp.where(start == 0, new.astype(old.dtype), old), _row(cache_s, slot), empty)
    cols_c = start + jnp.arange(c)
    mask_1cs = jnp.arange(length)[None, None, :] <= cols_c[None, :, None]
    logits_1cv, row = GPT(config).apply(params, tokens_1c, positions_bt=cols_c[None], cache=row, cache_index=start,
                                        mask_bts=mask_1cs)
    return _put_row(cache_s, row, slot), logits_1cv[0, -1]


def _step(params, cache_s, active_s, tokens_s, cols_s, seeds_s, counts_s, temperature_s, top_k_s, top_p_s, *,
          config: GPTConfig):
    """Every active slot writes its last token at its column and samples its next one (per-row
    settings; row r's key is fold_in(key(seed_r), count_r): its own, whatever the other rows are).
    Inactive rows compute too (one program for any occupancy), but their cache rows are kept as
    they were, so a prompt between two prefill chunks is never written over."""
    length = config.context_length
    mask_s1s = (jnp.arange(length)[None, :] <= cols_s[:, None])[:, None, :]
    logits_s1v, written_s = GPT(config).apply(params, tokens_s[:, None], positions_bt=cols_s[:, None], cache=cache_s,
                                              cache_index=cols_s, mask_bts=mask_s1s)
    cache_s = jax.tree.map(lambda old, new: jnp.where(active_s.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
                           cache_s, written_s)
    return cache_s, sample_rows(row_keys(seeds_s, counts_s), logits_s1v[:, 0], temperature_s, top_k_s, top_p_s)


def row_keys(seeds_b: Array, counts_b: Array) -> Array:
    """Row r's sampling key for its token number counts_b[r]: fold_in(key(seed), count)."""
    return jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(seeds_b, counts_b)


# compiled once per (config, shapes) for every SlotDecoder of the process; the cache is donated
# (updated in place)
_prefill_jit = jax.jit(_prefill, static_argnames=("config",), donate_argnums=(1,))
_step_jit = jax.jit(_step, static_argnames=("config",), donate_argnums=(1,))


@jax.jit
def _first_token(logits_v, seed, temperature, top_k, top_p):
    one = lambda x, dtype: jnp.asarray(x, dtype)[None]  # noqa: E731
    keys = row_keys(one(seed, jnp.uint32), one(0, jnp.uint32))
    return sample_rows(keys, logits_v[None], one(temperature, jnp.float32), one(top_k, jnp.int32),
                       one(top_p, jnp.float32))[0]


class SlotDecoder:
    """`slots` rows of KV cache and the compiled prefill and step over them (one thread uses it)."""

    def __init__(self, params, config: GPTConfig, slots: int, prefill_chunk: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
        self.params, self.config, self.slots = params, config, slots
        self.prefill_chunk = min(prefill_chunk, 1 << (config.context_length.bit_length() - 1))
        self.cache = init_cache(config, slots, config.context_length)
        self._prefill = partial(_prefill_jit, config=config)
        self._step = partial(_step_jit, config=config)

    def compile_all(self) -> None:
        """Run every prefill shape and the step once (on slot 0), so no request waits for a compile."""
        size = 1
        while size <= self.prefill_chunk:  # through the same methods as serving (same argument types)
            logits_v = self.prefill(0, [0] * size, 0)
            size *= 2
        self.first_token(logits_v, 0, 1.0, 0, 1.0)
        zeros = np.zeros(self.slots, np.int32)
        self.step(np.zeros(self.slots, bool), zeros, zeros, zeros.astype(np.uint32), zeros.astype(np.uint32), np.ones(self.slots, np.float32),
                  zeros, np.ones(self.slots, np.float32))

    def prefill(self, slot: int, tokens: list, start: int) -> Array:
        """Write `tokens` (a power-of-two length ≤ prefill_chunk) at columns start… of `slot`; the
        last token's logits (V,)."""
        self.cache, logits_v = self._prefill(self.params, self.cache, np.int32(slot),
                                             jnp.asarray([tokens], jnp.int32), np.int32(start))
        return logits_v

    @staticmethod
    def first_token(logits_v: Array, seed: int, temperature: float, top_k: int, top_p: float) -> int:
        """A new row's first token (its key: fold_in(key(seed), 0))."""
        return int(_first_token(logits_v, np.uint32(seed), np.float32(temperature), np.int32(top_k), np.float32(top_p)))

    def step(self, active_s, tokens_s, cols_s, seeds_s, counts_s, temperature_s, top_k_s, top_p_s) -> np.ndarray:
        """One decoding step for the slots where `active_s` (bool, (slots,)) is set; the others'
        cache rows are left as they are and their sampled tokens mean nothing."""
        self.cache, next_s = self._step(self.params, self.cache, np.asarray(active_s, bool), tokens_s, cols_s,
                                        seeds_s, counts_s, temperature_s, top_k_s, top_p_s)
        return np.asarray(next_s)
