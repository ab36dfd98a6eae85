"""Softmax attention (the book's chapter 3 and GPT-2's), with today's options: grouped key/value
heads, RoPE/ALiBi/learned positions, sliding windows (a ring cache), QK-norm, a query scale, a
per-head output gate, sink logits and differential attention (`jaxgpt.nn.attention`)."""

from __future__ import annotations

from jaxgpt.registry import AttentionKind, register_attention

HF_FAMILIES = frozenset({"gpt2", "llama", "qwen3", "gemma3_text", "qwen3_moe", "mixtral"})


def layer(cfg, *, impl: str, dtype, out_init_std: float, window):
    from jaxgpt.nn.attention import MultiHeadAttention

    return MultiHeadAttention(
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, qkv_bias=cfg.qkv_bias, dtype=dtype, out_init_std=out_init_std,
        drop_rate=cfg.drop_rate, impl=impl, position=cfg.position, rope_base=cfg.rope_base_of_window(window),
        window=window, head_dim=cfg.head_size, out_bias=cfg.attn_out_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.ln_eps,
        norm_unit_offset=cfg.norm_unit_offset, query_scale=cfg.query_scale, rope_scaling=cfg.rope_scaling_spec,
        gate=cfg.attn_gate, sink=cfg.attn_sink, differential=cfg.differential, name="attn")


def empty_cache(cfg, batch: int, length: int, dtype, window):
    from jaxgpt import xla_tuning
    from jaxgpt.nn.attention import MultiHeadAttention

    # a local layer keeps only its window (a ring); float32 for a bf16 model on CPU
    return MultiHeadAttention.empty_cache(cfg, batch, length, xla_tuning.decode_cache_dtype(dtype), window)


def reference(x, attn, cfg, layer_index: int, record):
    from jaxgpt.reference.attention import mha

    return mha(x, **attn, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, position=cfg.position,
               rope_base=cfg.layer_rope_base(layer_index), window=cfg.layer_window(layer_index), norm_eps=cfg.ln_eps,
               qk_unit_offset=cfg.norm_unit_offset, query_scale=cfg.query_scale, rope_scaling=cfg.rope_scaling_spec,
               record=record)


def reference_backward(dout, x, attn, cfg, layer_index: int):
    """GPT-2's attention backward (the book's): whole-context heads, learned or no positions."""
    from jaxgpt.reference.attention import mha_backward

    if set(attn) != {"c_attn", "c_proj"} or cfg.n_kv_heads not in (None, cfg.n_heads) or \
            cfg.position not in ("learned", "none") or cfg.layer_window(layer_index) is not None:
        raise NotImplementedError("the hand-written backward covers GPT-2's attention (no options, full heads, "
                                  "learned or no positions, no window)")
    return mha_backward(dout, x, attn["c_attn"], attn["c_proj"], cfg.n_heads)


KIND = register_attention(AttentionKind(
    name="softmax", summary="softmax attention (GPT-2's), with GQA, positions, windows and the softmax options",
    layer=layer, empty_cache=empty_cache, reference=reference, reference_backward=reference_backward,
    options=frozenset({"qk_norm", "head_size", "query_scale", "attn_gate", "attn_sink", "differential"}),
    impls=("naive", "xla", "blockwise"), exports=HF_FAMILIES))
