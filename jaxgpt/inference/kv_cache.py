"""The decoding cache: one entry per layer, shaped by the layer's attention kind.

The cache is decoding's business, not the model's: the model reads and returns whatever cache it
is given (`GPT.__call__(..., cache=...)`); this module allocates it, in the dtype that decoding on
this backend reads fastest (`xla_tuning.decode_cache_dtype`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax

from jaxgpt.config import GPTConfig, resolve_dtype
from jaxgpt.registry import attention_kind


def init_cache(config: GPTConfig, batch: int, length: int) -> list:
    """An empty decoding cache, one dict per layer, shaped by the layer's attention kind
    (`AttentionKind.empty_cache`): softmax attention {"k", "v": (batch, kv_heads, length, head_dim),
    "pos": (batch, length)} (a local layer: a ring of its window's length); latent attention
    {"latent": (batch, length, latent_dim), "pos"}; linear attention its recurrent state."""
    kind, dtype = attention_kind(config.attention), resolve_dtype(config)
    return [kind.empty_cache(config, batch, length, dtype, config.layer_window(i)) for i in range(config.n_layers)]


def kv_cache_bytes(config: GPTConfig, length: int, batch: int = 1) -> int:
    """Bytes the decoding cache of `length` tokens occupies, computed from `init_cache` itself (so
    docs and experiments report what decoding allocates on this backend)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, length))
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def kv_cache_bytes_per_token(config: GPTConfig, length: Optional[int] = None) -> float:
    """Cache bytes per token at `length` tokens (default: the context length). Constant for softmax
    and latent attention; for linear attention the fixed state is spread over the tokens."""
    length = length or config.context_length
    return kv_cache_bytes(config, length) / length
