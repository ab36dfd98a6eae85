"""Gated DeltaNet (Yang et al. 2025): linear attention whose state is updated by the gated delta
rule, chunked for training and recurrent for decoding (`jaxgpt.nn.gated_deltanet`)."""

from __future__ import annotations

from jaxgpt.registry import AttentionKind, register_attention


def layer(cfg, *, impl: str, dtype, out_init_std: float, window):
    from jaxgpt.nn.gated_deltanet import GatedDeltaNet

    return GatedDeltaNet(cfg.n_heads, cfg.qkv_bias, dtype, out_init_std, cfg.ln_eps, name="attn")


def empty_cache(cfg, batch: int, length: int, dtype, window):
    from jaxgpt.nn.gated_deltanet import GatedDeltaNet

    return GatedDeltaNet.empty_cache(cfg, batch, length, dtype)


def reference(x, attn, cfg, layer_index: int, record):
    from jaxgpt.reference.gated_deltanet import gated_deltanet

    return gated_deltanet(x, **attn, n_heads=cfg.n_heads, norm_eps=cfg.ln_eps, record=record)


KIND = register_attention(AttentionKind(
    name="gated_deltanet", summary="Gated DeltaNet: linear attention with the gated delta rule",
    layer=layer, empty_cache=empty_cache, reference=reference, positions=("learned", "none"), windows=False,
    grouped_kv=False))
