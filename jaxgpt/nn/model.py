"""The GPT model (the book's chapter 4) as functional Flax Linen modules.

`GPT(config).init(key, ids)` gives a plain parameter pytree {"params": {...}} whose names follow
GPT-2's (wte, wpe, h_0 … h_{L-1} with ln_1/attn/ln_2/mlp, ln_f, lm_head), and
`GPT(config).apply(params, ids)` gives float32 logits. The NumPy reference (`jaxgpt.reference`)
takes the very same pytree. The blocks are in `jaxgpt.nn.blocks`; decoding's cache in
`jaxgpt.inference.kv_cache`.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig, resolve_attn_impl, resolve_dtype
from jaxgpt.nn.blocks import Block, init_stacked_blocks, run_blocks
from jaxgpt.nn.dense import Dense, logits_from_embedding
from jaxgpt.nn.mlp import GATED
from jaxgpt.nn.norms import norm_layer

Array = jax.Array


class GPT(nn.Module):
    """GPT-2 style decoder: token + learned position embeddings, blocks, final LayerNorm, head.

    `GPT(cfg).apply(params, idx_bt)` -> logits_btv. For cached decoding pass `cache` (from
    `init_cache`), the slot `cache_index` where these tokens go, their `positions_bt`, and
    `mask_bts` (which cache slots each token sees); then it returns (logits_btv, new_cache).
    `return_hidden=True` returns the final-LayerNorm hidden states x_btd instead of logits.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, idx_bt: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 cache: Optional[list] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None, return_hidden: bool = False):
        cfg = self.config
        b, t = idx_bt.shape
        if t > cfg.context_length:
            raise ValueError(
                f"input of {t} tokens is longer than the model's context_length {cfg.context_length}; "
                "crop it (generation does this for you)"
            )
        dtype = resolve_dtype(cfg)
        impl = resolve_attn_impl(cfg, attention_dropout=cfg.drop_rate > 0 and not deterministic)
        init = nn.initializers.normal(0.02)
        emb_init = nn.initializers.normal(cfg.emb_init_std)

        wte = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=emb_init, dtype=dtype, name="wte")
        positions_bt = jnp.broadcast_to(jnp.arange(t)[None], (b, t)) if positions_bt is None else positions_bt
        x_btd = wte(idx_bt)
        if cfg.emb_scale:  # Gemma: sqrt(d), rounded to the compute dtype as Gemma does
            x_btd = x_btd * jnp.asarray(math.sqrt(cfg.emb_dim), x_btd.dtype)
        if cfg.position == "learned":  # the other schemes act inside attention (jaxgpt.nn.positions)
            wpe = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=emb_init, dtype=dtype, name="wpe")
            x_btd = x_btd + wpe(positions_bt)
        self.sow("intermediates", "embed", x_btd)  # when "intermediates" is mutable (jaxgpt.numerics)
        x_btd = nn.Dropout(cfg.drop_rate)(x_btd, deterministic=deterministic)

        functional = cfg.scan_layers or (cfg.remat != "none" and cache is None and not self.is_initializing())
        new_cache = [] if cache is not None else None
        moe_out: list = []  # the functional path's MoE statistics, sown below as the blocks would
        if cfg.scan_layers:  # one tree "h", each leaf (n_layers, ...) (jaxgpt.nn.layout)
            if not self.is_initializing() and "h_0" in self.variables.get("params", {}):
                raise ValueError("this config has scan_layers=True but the parameters are in GPT-2's layout "
                                 "(h_0 … h_{L-1}); convert them with jaxgpt.nn.layout.stack_layers(params)")
            layers = (self.param("h", init_stacked_blocks, cfg, impl, dtype) if self.is_initializing()
                      else self.variables["params"]["h"])  # as given: decoding may hold kernel_nk copies
        elif functional:  # rematerialised blocks: the same parameters, read as plain trees
            layers = [self.variables["params"][f"h_{i}"] for i in range(cfg.n_layers)]
        if functional:
            dropout_key = None if deterministic or cfg.drop_rate == 0 else self.make_rng("dropout")
            x_btd = run_blocks(cfg, layers, x_btd, impl=impl, dtype=dtype, positions_bt=positions_bt,
                               dropout_key=dropout_key, cache=cache, cache_index=cache_index, mask_bts=mask_bts,
                               new_cache=new_cache, moe_out=moe_out)
            for stats in moe_out if not self.is_initializing() else ():
                self.sow("moe", "blocks", stats)
        for i in range(0 if functional else cfg.n_layers):
            block = Block(cfg, attn_impl=impl, dtype=dtype, window=cfg.layer_window(i), moe=cfg.is_moe_layer(i),
                          name=f"h_{i}")
            if cache is None:
                x_btd = block(x_btd, deterministic=deterministic, positions_bt=positions_bt)
            else:
                x_btd, layer_cache = block(x_btd, deterministic=deterministic, positions_bt=positions_bt,
                                           kv_cache=cache[i], cache_index=cache_index, mask_bts=mask_bts)
                new_cache.append(layer_cache)

        x_btd = norm_layer(cfg, "ln_f", dtype)(x_btd)
        if return_hidden:  # the final hidden states, for heads other than the LM head (classification)
            return x_btd
        # a decoding copy of tied weights may carry the head as its own "lm_head" (jaxgpt.inference.decoding_copy)
        head_given = not self.is_initializing() and "lm_head" in self.variables.get("params", {})
        if cfg.tie_embeddings and not head_given:
            logits_btv = logits_from_embedding(x_btd, wte.embedding, dtype)
        else:
            logits_btv = Dense(cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=init, name="lm_head")(x_btd)
        logits_btv = logits_btv.astype(jnp.promote_types(dtype, jnp.float32))  # f32, or f64 under x64
        if cfg.logit_softcap is not None:
            logits_btv = cfg.logit_softcap * jnp.tanh(logits_btv / cfg.logit_softcap)
        return logits_btv if cache is None else (logits_btv, new_cache)


def init_params(config: GPTConfig, seed: int = 0) -> dict:
    """Freshly initialised parameters {"params": …} (float32)."""
    dummy = jnp.zeros((1, min(8, config.context_length)), dtype=jnp.int32)
    return jax.jit(GPT(config).init)(jax.random.key(seed), dummy)


def param_shapes(config: GPTConfig) -> dict:
    """The parameter pytree as `ShapeDtypeStruct`s, without allocating anything."""
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda k, x: GPT(config).init(k, x), jax.random.key(0), dummy)


def count_params(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def param_counts(config: GPTConfig) -> dict[str, int]:
    """The book's two numbers: all parameters with a separate output head, and with it tied to wte;
    and `active`: the parameters one token's forward pass uses (the model's own head choice; for a
    mixture of experts, k of the E routed experts of each MoE layer)."""
    total = count_params(param_shapes(config.replace(tie_embeddings=False)))
    counts = {"total": total, "total_tied": total - config.vocab_size * config.emb_dim}
    stored = counts["total_tied" if config.tie_embeddings else "total"]
    return {**counts, "active": stored - inactive_expert_params(config)}


def inactive_expert_params(config: GPTConfig) -> int:
    """Routed-expert parameters a token does not use: (E − k) experts' weights in every MoE layer."""
    if config.moe_experts is None:
        return 0
    per_expert = (3 if config.mlp in GATED else 2) * config.emb_dim * config.expert_hidden
    n_moe = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    return n_moe * (config.moe_experts - config.moe_top_k) * per_expert


def cross_entropy(logits_btv: Array, targets_bt: Array, ignore_index: int = -100) -> Array:
    """Mean next-token cross-entropy over the targets that are not `ignore_index`.

    (A hand-written one-pass VJP of softmax − one-hot was tried and measured no faster on the
    gpt2-small step: XLA already fuses autodiff's passes well enough; docs/performance.md.)"""
    valid_bt = targets_bt != ignore_index
    safe_bt = jnp.where(valid_bt, targets_bt, 0)
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.promote_types(logits_btv.dtype, jnp.float32)), axis=-1)
    nll_bt = -jnp.take_along_axis(logp_btv, safe_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_bt * valid_bt) / jnp.maximum(jnp.sum(valid_bt), 1)
