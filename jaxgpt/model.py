"""The GPT model (the book's chapter 4) as functional Flax Linen modules.

`GPT(config).init(key, ids)` gives a plain parameter pytree {"params": {...}} whose names follow
GPT-2's (wte, wpe, h_0 … h_{L-1} with ln_1/attn/ln_2/mlp, ln_f, lm_head), and
`GPT(config).apply(params, ids)` gives float32 logits. The NumPy reference (`jaxgpt.reference`)
takes the very same pytree.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import MultiHeadAttention
from .latent_attention import LatentAttention
from .linear_attention import LinearAttention
from .config import GPTConfig, resolve_attn_impl, resolve_dtype
from . import xla_tuning
from .precision import Dense, logits_from_embedding

Array = jax.Array


# The attention layers a config can select (`GPTConfig.attention`). Each takes
# (x_btd, *, deterministic, positions_bt, kv_cache, cache_index, mask_bts) and has
# `empty_cache(config, batch, length, dtype)`; see docs/attention_variants.md to add one.
ATTENTION_LAYERS = {"softmax": MultiHeadAttention, "mla": LatentAttention, "linear": LinearAttention}


def attention_layer(cfg: GPTConfig, *, impl: str, dtype, out_init_std: float, window: Optional[int]) -> nn.Module:
    """The configured attention layer of one block (named "attn", as GPT-2's)."""
    common = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, qkv_bias=cfg.qkv_bias, dtype=dtype,
                  out_init_std=out_init_std, name="attn")
    if cfg.attention == "linear":
        return LinearAttention(**common)
    softmax_options = dict(drop_rate=cfg.drop_rate, impl=impl, position=cfg.position, rope_base=cfg.rope_base,
                           window=window)
    if cfg.attention == "mla":
        return LatentAttention(latent_dim=cfg.latent_dim, **common, **softmax_options)
    return MultiHeadAttention(**common, **softmax_options)


class MLP(nn.Module):
    """Position-wise feed-forward: d -> ratio*d, GELU (tanh approximation), -> d."""

    hidden: int
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        d = x_btd.shape[-1]
        x_btf = Dense(self.hidden, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02), name="c_fc")(x_btd)
        x_btf = nn.gelu(x_btf, approximate=True)
        return Dense(d, dtype=self.dtype, kernel_init=nn.initializers.normal(self.out_init_std), name="c_proj")(x_btf)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + drop(attn(ln_1(x))), then x + drop(mlp(ln_2(x)))."""

    config: GPTConfig
    attn_impl: str
    dtype: jnp.dtype
    window: Optional[int] = None  # this layer's sliding window (None: global)

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True, positions_bt: Optional[Array] = None,
                 kv_cache: Optional[dict] = None, cache_index: Optional[Array] = None,
                 mask_bts: Optional[Array] = None):
        cfg = self.config
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        ln = lambda name: nn.LayerNorm(epsilon=cfg.ln_eps, dtype=self.dtype, name=name)  # noqa: E731
        drop = nn.Dropout(cfg.drop_rate)

        attn = attention_layer(cfg, impl=self.attn_impl, dtype=self.dtype, out_init_std=out_std, window=self.window)
        attn_out = attn(ln("ln_1")(x_btd), deterministic=deterministic, positions_bt=positions_bt,
                        kv_cache=kv_cache, cache_index=cache_index, mask_bts=mask_bts)
        if kv_cache is not None:
            attn_out, kv_cache = attn_out
        x_btd = x_btd + drop(attn_out, deterministic=deterministic)
        mlp = MLP(hidden=cfg.mlp_ratio * cfg.emb_dim, dtype=self.dtype, out_init_std=out_std, name="mlp")
        x_btd = x_btd + drop(mlp(ln("ln_2")(x_btd)), deterministic=deterministic)
        return x_btd if kv_cache is None else (x_btd, kv_cache)


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
        if cfg.position == "learned":  # the other schemes act inside attention (jaxgpt.positions)
            wpe = nn.Embed(cfg.context_length, cfg.emb_dim, embedding_init=emb_init, dtype=dtype, name="wpe")
            x_btd = x_btd + wpe(positions_bt)
        x_btd = nn.Dropout(cfg.drop_rate)(x_btd, deterministic=deterministic)

        functional = cfg.scan_layers or (cfg.remat != "none" and cache is None and not self.is_initializing())
        new_cache = [] if cache is not None else None
        if cfg.scan_layers:  # one tree "h", each leaf (n_layers, ...) (jaxgpt.layout)
            if not self.is_initializing() and "h_0" in self.variables.get("params", {}):
                raise ValueError("this config has scan_layers=True but the parameters are in GPT-2's layout "
                                 "(h_0 … h_{L-1}); convert them with jaxgpt.layout.stack_layers(params)")
            layers = (self.param("h", init_stacked_blocks, cfg, impl, dtype) if self.is_initializing()
                      else self.variables["params"]["h"])  # as given: decoding may hold kernel_nk copies
        elif functional:  # rematerialised blocks: the same parameters, read as plain trees
            layers = [self.variables["params"][f"h_{i}"] for i in range(cfg.n_layers)]
        if functional:
            dropout_key = None if deterministic or cfg.drop_rate == 0 else self.make_rng("dropout")
            x_btd = run_blocks(cfg, layers, x_btd, impl=impl, dtype=dtype, positions_bt=positions_bt,
                               dropout_key=dropout_key, cache=cache, cache_index=cache_index, mask_bts=mask_bts,
                               new_cache=new_cache)
        for i in range(0 if functional else cfg.n_layers):
            block = Block(cfg, attn_impl=impl, dtype=dtype, window=cfg.layer_window(i), name=f"h_{i}")
            if cache is None:
                x_btd = block(x_btd, deterministic=deterministic, positions_bt=positions_bt)
            else:
                x_btd, layer_cache = block(x_btd, deterministic=deterministic, positions_bt=positions_bt,
                                           kv_cache=cache[i], cache_index=cache_index, mask_bts=mask_bts)
                new_cache.append(layer_cache)

        x_btd = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_f")(x_btd)
        if return_hidden:  # the final hidden states, for heads other than the LM head (classification)
            return x_btd
        if cfg.tie_embeddings:
            decoding_layout = cache is not None and xla_tuning.transposed_decode_kernels()
            logits_btv = logits_from_embedding(x_btd, wte.embedding, dtype, decoding_layout)
        else:
            logits_btv = Dense(cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=init, name="lm_head")(x_btd)
        logits_btv = logits_btv.astype(jnp.promote_types(dtype, jnp.float32))  # f32, or f64 under x64
        return logits_btv if cache is None else (logits_btv, new_cache)


REMAT_POLICY_FNS = {
    "full": None,  # jax.checkpoint's default: keep only the block's input
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_stacked_blocks(key: Array, cfg: GPTConfig, impl: str, dtype) -> dict:
    """Initial parameters of all blocks in the scanned layout: one Block init per layer key, vmapped."""
    block = Block(cfg, attn_impl=impl, dtype=dtype, window=cfg.layer_window(0), parent=None)
    x_btd = jnp.zeros((1, 1, cfg.emb_dim), jnp.float32)
    init_one = lambda k: block.init({"params": k}, x_btd, positions_bt=jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
    return jax.vmap(init_one)(jax.random.split(key, cfg.n_layers))


def run_blocks(cfg: GPTConfig, layers, x_btd: Array, *, impl: str, dtype, positions_bt: Array,
               dropout_key: Optional[Array], cache: Optional[list] = None, cache_index: Optional[Array] = None,
               mask_bts: Optional[Array] = None, new_cache: Optional[list] = None) -> Array:
    """The transformer blocks as pure functions of their parameters (`GPTConfig.scan_layers`, `.remat`).

    `layers` is a list of per-block trees (GPT-2 layout) or, with `scan_layers`, one tree whose
    leaves carry a leading layer axis. Training and scoring run that stacked tree through one
    `lax.scan` (XLA compiles one block body whatever the depth); cached decoding, whose cache is a
    per-layer list, loops over layer slices and appends each layer's new cache to `new_cache`.
    `remat` wraps the block in `jax.checkpoint` with the configured policy. Layer i's dropout key is
    `split(dropout_key, n_layers)[i]` in every form, so scanned and unrolled runs agree.
    """
    blocks = {}

    def layer(window, x_btd, params, key, kv_cache=None):
        if window not in blocks:  # one unbound Block per distinct window (all layers alike under scan)
            blocks[window] = Block(cfg, attn_impl=impl, dtype=dtype, window=window, parent=None)
        rngs = None if key is None else {"dropout": key}
        return blocks[window].apply({"params": params}, x_btd, deterministic=key is None, positions_bt=positions_bt,
                                    kv_cache=kv_cache, cache_index=cache_index, mask_bts=mask_bts, rngs=rngs)

    if cfg.remat != "none" and cache is None:
        layer = jax.checkpoint(layer, static_argnums=(0,), policy=REMAT_POLICY_FNS[cfg.remat],
                               prevent_cse=not cfg.scan_layers)  # scan already keeps XLA from merging recomputation
    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)
    if cfg.scan_layers and cache is None:
        def step(x_btd, params_and_key):
            params, key = params_and_key
            return layer(cfg.layer_window(0), x_btd, params, key), None

        x_btd, _ = jax.lax.scan(step, x_btd, (layers, keys))
        return x_btd
    for i in range(cfg.n_layers):
        params = jax.tree.map(lambda a: a[i], layers) if cfg.scan_layers else layers[i]
        key = None if keys is None else keys[i]
        if cache is None:
            x_btd = layer(cfg.layer_window(i), x_btd, params, key)
        else:
            x_btd, layer_cache = layer(cfg.layer_window(i), x_btd, params, key, cache[i])
            new_cache.append(layer_cache)
    return x_btd


def init_cache(config: GPTConfig, batch: int, length: int) -> list:
    """An empty decoding cache, one dict per layer, shaped by the layer's kind: softmax attention
    {"k", "v": (batch, kv_heads, length, head_dim), "pos": (batch, length)} (a local layer: a ring of
    its window's length, see `MultiHeadAttention.empty_cache`); latent attention
    {"latent": (batch, length, latent_dim), "pos"}; linear attention its recurrent state."""
    layer, dtype = ATTENTION_LAYERS[config.attention], resolve_dtype(config)
    if config.attention == "softmax":  # local layers keep only their window (a ring)
        dtype = xla_tuning.decode_cache_dtype(dtype)  # float32 for a bf16 model on CPU
        return [layer.empty_cache(config, batch, length, dtype, config.layer_window(i)) for i in range(config.n_layers)]
    return [layer.empty_cache(config, batch, length, dtype) for _ in range(config.n_layers)]


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
    """The book's two numbers: all parameters with a separate output head, and with it tied to wte."""
    total = count_params(param_shapes(config.replace(tie_embeddings=False)))
    return {"total": total, "total_tied": total - config.vocab_size * config.emb_dim}


def cross_entropy(logits_btv: Array, targets_bt: Array, ignore_index: int = -100) -> Array:
    """Mean next-token cross-entropy over the targets that are not `ignore_index`.

    (A hand-written one-pass VJP of softmax − one-hot was tried and measured no faster on the
    gpt2-small step: XLA already fuses autodiff's passes well enough; docs/performance.md.)"""
    valid_bt = targets_bt != ignore_index
    safe_bt = jnp.where(valid_bt, targets_bt, 0)
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.promote_types(logits_btv.dtype, jnp.float32)), axis=-1)
    nll_bt = -jnp.take_along_axis(logp_btv, safe_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_bt * valid_bt) / jnp.maximum(jnp.sum(valid_bt), 1)
