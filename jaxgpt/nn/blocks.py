"""The transformer block (the book's chapter 4): the attention layer (its kind's, from
`jaxgpt.registry.ATTENTION`), MLP and norms a config selects, and the blocks run as pure functions
of their parameters (scanned or rematerialised).

Parameter names follow GPT-2's (ln_1, attn, ln_2, mlp with c_fc/c_proj), so Hugging Face weights
and the NumPy reference (`jaxgpt.reference`) address the same tree.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.nn.mlp import MLP
from jaxgpt.nn.moe import MoE, moe_stats
from jaxgpt.nn.norms import norm_layer
from jaxgpt.registry import attention_kind

Array = jax.Array


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x))); with
    `post_norms` (Gemma 3) each branch's output is normalised again before it is added."""

    config: GPTConfig
    attn_impl: str
    dtype: jnp.dtype
    window: Optional[int] = None  # this layer's sliding window (None: global)
    moe: bool = False  # a mixture-of-experts MLP (jaxgpt.nn.moe) instead of the dense one

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 kv_cache: Optional[dict] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None):
        cfg = self.config
        out_std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layers)  # (normal(0): zeros)
        norm = lambda name: norm_layer(cfg, name, self.dtype)  # noqa: E731
        post = (lambda name, y: norm(name)(y)) if cfg.post_norms else (lambda name, y: y)  # noqa: E731
        drop = nn.Dropout(cfg.drop_rate)

        attn = attention_kind(cfg.attention).layer(cfg, impl=self.attn_impl, dtype=self.dtype, out_init_std=out_std,
                                                   window=self.window)
        attn_out = attn(norm("ln_1")(x_btd), deterministic=deterministic, positions_bt=positions_bt,
                        kv_cache=kv_cache, cache_index=cache_index, mask_bts=mask_bts)
        if kv_cache is not None:
            attn_out, kv_cache = attn_out
        x_btd = x_btd + drop(post("ln_post_attn", attn_out), deterministic=deterministic)
        if self.moe:
            moe = MoE(cfg.moe_experts, cfg.moe_top_k, cfg.expert_hidden, kind=cfg.mlp, router=cfg.moe_router,
                      renormalize=cfg.moe_renormalize, capacity_factor=cfg.moe_capacity_factor,
                      shared_hidden=cfg.moe_shared_experts * cfg.expert_hidden, shared_bias=cfg.mlp_bias,
                      dtype=self.dtype, out_init_std=out_std, name="mlp")
            mlp = lambda h_btd: moe(h_btd, deterministic=deterministic)  # noqa: E731
        else:
            mlp = MLP(hidden=cfg.hidden_dim, kind=cfg.mlp, use_bias=cfg.mlp_bias, dtype=self.dtype,
                      out_init_std=out_std, name="mlp")
        x_btd = x_btd + drop(post("ln_post_mlp", mlp(norm("ln_2")(x_btd))), deterministic=deterministic)
        return x_btd if kv_cache is None else (x_btd, kv_cache)


REMAT_POLICY_FNS = {
    "full": None,  # jax.checkpoint's default: keep only the block's input
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_stacked_blocks(key: Array, cfg: GPTConfig, impl: str, dtype) -> dict:
    """Initial parameters of all blocks in the scanned layout: one Block init per layer key, vmapped."""
    block = Block(cfg, attn_impl=impl, dtype=dtype, window=cfg.layer_window(0), moe=cfg.is_moe_layer(0), parent=None)
    x_btd = jnp.zeros((1, 1, cfg.emb_dim), jnp.float32)
    init_one = lambda k: block.init({"params": k}, x_btd, positions_bt=jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
    return jax.vmap(init_one)(jax.random.split(key, cfg.n_layers))


def run_blocks(cfg: GPTConfig, layers, x_btd: Array, *, impl: str, dtype, positions_bt: Array,
               dropout_key: Optional[Array], cache: Optional[list] = None, cache_index: Optional[Array] = None,
               mask_bts: Optional[Array] = None, new_cache: Optional[list] = None,
               moe_out: Optional[list] = None) -> Array:
    """The transformer blocks as pure functions of their parameters (`GPTConfig.scan_layers`, `.remat`).

    `layers` is a list of per-block trees (GPT-2 layout) or, with `scan_layers`, one tree whose
    leaves carry a leading layer axis. Training and scoring run that stacked tree through one
    `lax.scan` (XLA compiles one block body whatever the depth); cached decoding, whose cache is a
    per-layer list, loops over layer slices and appends each layer's new cache to `new_cache`.
    `remat` wraps the block in `jax.checkpoint` with the configured policy. Layer i's dropout key is
    `split(dropout_key, n_layers)[i]` in every form, so scanned and unrolled runs agree. The MoE
    layers' statistics (`jaxgpt.nn.moe.moe_stats`, leading layer axis) are appended to `moe_out`.
    """
    blocks = {}

    def layer(kind, x_btd, params, key, kv_cache=None):
        if kind not in blocks:  # one unbound Block per distinct (window, moe) (all layers alike under scan)
            blocks[kind] = Block(cfg, attn_impl=impl, dtype=dtype, window=kind[0], moe=kind[1], parent=None)
        rngs = None if key is None else {"dropout": key}
        out = blocks[kind].apply({"params": params}, x_btd, deterministic=key is None, positions_bt=positions_bt,
                                 kv_cache=kv_cache, cache_index=cache_index, mask_bts=mask_bts, rngs=rngs,
                                 mutable=["moe"] if kind[1] else False)
        return (out[0], moe_stats(out[1])) if kind[1] else (out, None)

    if cfg.remat != "none" and cache is None:
        layer = jax.checkpoint(layer, static_argnums=(0,), policy=REMAT_POLICY_FNS[cfg.remat],
                               prevent_cse=not cfg.scan_layers)  # scan already keeps XLA from merging recomputation
    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)
    kind_of = lambda i: (cfg.layer_window(i), cfg.is_moe_layer(i))  # noqa: E731
    if cfg.scan_layers and cache is None:
        def step(x_btd, params_and_key):
            params, key = params_and_key
            return layer(kind_of(0), x_btd, params, key)

        x_btd, stats = jax.lax.scan(step, x_btd, (layers, keys))
        if stats is not None and moe_out is not None:
            moe_out.append(jax.tree.map(lambda a: a[:, 0], stats))  # (L, 1, …) -> (L, …)
        return x_btd
    for i in range(cfg.n_layers):
        params = jax.tree.map(lambda a: a[i], layers) if cfg.scan_layers else layers[i]
        key = None if keys is None else keys[i]
        if cache is None:
            x_btd, stats = layer(kind_of(i), x_btd, params, key)
        else:
            (x_btd, layer_cache), stats = layer(kind_of(i), x_btd, params, key, cache[i])
            new_cache.append(layer_cache)
        if stats is not None and moe_out is not None:
            moe_out.append(stats)
    return x_btd
