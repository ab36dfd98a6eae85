"""The decoding copy of the weights: the parameters laid out as decoding on this backend reads them fastest.

Everything backend-specific about decoding lives here and in `jaxgpt.xla_tuning`, not in the
model: the copy holds the same function in another layout, and the model runs whatever it is given.
- Always GPT-2's per-block layout: a scanned model's stacked blocks are unstacked (decoding loops
  over the layers with a per-layer cache; slicing the stacked weights inside the loop ran at less
  than half the speed).
- On CPU (`xla_tuning.transposed_decode_kernels`) every dense kernel is replaced by its (n, k)
  transpose under `DECODING_KERNEL`, which `jaxgpt.nn.dense.Dense` contracts over its minor axis,
  and a tied head gets an "lm_head" entry holding the embedding table itself as its (n, k) kernel
  (the same array, no copy), so the head runs the same fast few-row product.
- With a bf16/f16 compute dtype the copy and the embedding tables are stored in it: the
  mixed-precision layer and the embeddings round them to that dtype at every call anyway, so the
  values are identical and the decode loop reads half the bytes.
A transposed copy of gpt2-small's kernels takes ~0.3 s and 340 MB: convert once per set of
weights (`jaxgpt.inference.generate.Decoder` does), not per call.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxgpt import xla_tuning
from jaxgpt.config import GPTConfig, is_low_precision, resolve_dtype
from jaxgpt.nn.dense import DECODING_KERNEL, _transposed_copy
from jaxgpt.nn.layout import is_stacked, unstack_layers
from jaxgpt.nn.moe import MOE_PARAM_GROUPS


def _decoding_copy(tree, dtype):
    """`tree` with every dense "kernel" (…, k, n) replaced by `DECODING_KERNEL` (…, n, k), transposed
    and cast to `dtype`, and every "embedding" table cast to `dtype`. A mixture of experts' router
    and expert weights (`jaxgpt.nn.moe.MOE_PARAM_GROUPS`) are not `Dense` layers: kept as they are."""
    if not isinstance(tree, dict):
        return tree
    # precision's 3-D transpose: 2.5× XLA CPU's plain one (6.8 against 16.7 ms for a 768×3072 kernel)
    return {(DECODING_KERNEL if key == "kernel" else key): (value if key in MOE_PARAM_GROUPS
                                                            else _transposed_copy(value).astype(dtype) if key == "kernel"
                                                            else value.astype(dtype) if key == "embedding"
                                                            else _decoding_copy(value, dtype))
            for key, value in tree.items()}


# its own program: the outputs are real (n, k) arrays
_make_decoding_copy = jax.jit(_decoding_copy, static_argnums=1)


def holds_decoding_copy(tree) -> bool:
    """Whether `tree` is already a decoding copy (it holds transposed kernels)."""
    return isinstance(tree, dict) and any(key == DECODING_KERNEL or holds_decoding_copy(value)
                                          for key, value in tree.items())


def decode_params(params, config: Optional[GPTConfig] = None):
    """The decoding copy of `params` (see the module docstring); run it with
    `config.replace(scan_layers=False)`. A tree that already is one, or needs nothing on this
    backend, is returned as is."""
    transpose = xla_tuning.transposed_decode_kernels()
    if holds_decoding_copy(params) or not (transpose or is_stacked(params)):
        return params
    dtype = resolve_dtype(config) if config is not None and is_low_precision(resolve_dtype(config)) else jnp.float32
    converted = unstack_layers(params)
    if not transpose:
        return converted
    converted = _make_decoding_copy(converted, jnp.dtype(dtype))
    wrapped = "params" in converted
    tree = converted["params"] if wrapped else converted
    if "lm_head" not in tree:  # a tied head: the (v, d) table is already the (n, k) layout
        tree = {**tree, "lm_head": {DECODING_KERNEL: tree["wte"]["embedding"]}}
    return {"params": tree} if wrapped else tree
