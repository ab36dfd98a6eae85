"""Multi-head latent attention (DeepSeek-V2): keys and values expanded from one shared latent of
`latent_dim` per token, which is all the decoding cache keeps (`jaxgpt.nn.latent_attention`)."""

from __future__ import annotations

from jaxgpt.registry import AttentionKind, register_attention


def layer(cfg, *, impl: str, dtype, out_init_std: float, window):
    from jaxgpt.nn.latent_attention import LatentAttention

    return LatentAttention(n_heads=cfg.n_heads, latent_dim=cfg.latent_dim, n_kv_heads=cfg.n_kv_heads,
                           qkv_bias=cfg.qkv_bias, dtype=dtype, out_init_std=out_init_std, drop_rate=cfg.drop_rate,
                           impl=impl, position=cfg.position, rope_base=cfg.rope_base_of_window(window), window=window,
                           name="attn")


def empty_cache(cfg, batch: int, length: int, dtype, window):
    from jaxgpt.nn.latent_attention import LatentAttention

    return LatentAttention.empty_cache(cfg, batch, length, dtype)


def reference(x, attn, cfg, layer_index: int, record):
    from jaxgpt.reference.attention import latent_attention

    return latent_attention(x, **attn, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, position=cfg.position,
                            rope_base=cfg.layer_rope_base(layer_index), window=cfg.layer_window(layer_index),
                            record=record)


def _needs_latent(cfg):
    return None if cfg.latent_dim is not None else "latent_dim (attention 'mla' needs the latent's width)"


KIND = register_attention(AttentionKind(
    name="mla", summary="multi-head latent attention: the cache keeps one latent per token",
    layer=layer, empty_cache=empty_cache, reference=reference, options=frozenset({"latent_dim"}),
    impls=("naive", "xla", "blockwise"), check=_needs_latent, example=(("latent_dim", 16), ("position", "rope"))))
