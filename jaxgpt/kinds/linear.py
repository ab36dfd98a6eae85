"""Causal linear attention (Katharopoulos et al. 2020, φ = elu + 1): a recurrent state of fixed
size instead of a growing cache (`jaxgpt.nn.linear_attention`)."""

from __future__ import annotations

from jaxgpt.registry import AttentionKind, register_attention


def layer(cfg, *, impl: str, dtype, out_init_std: float, window):
    from jaxgpt.nn.linear_attention import LinearAttention

    return LinearAttention(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, qkv_bias=cfg.qkv_bias, dtype=dtype,
                           out_init_std=out_init_std, name="attn")


def empty_cache(cfg, batch: int, length: int, dtype, window):
    from jaxgpt.nn.linear_attention import LinearAttention

    return LinearAttention.empty_cache(cfg, batch, length, dtype)


def reference(x, attn, cfg, layer_index: int, record):
    from jaxgpt.reference.attention import linear_attention

    return linear_attention(x, **attn, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, record=record)


KIND = register_attention(AttentionKind(
    name="linear", summary="causal linear attention (elu + 1 features): a fixed-size recurrent state",
    layer=layer, empty_cache=empty_cache, reference=reference, positions=("learned", "none"), windows=False))
