"""Normalisation layers, chosen by `GPTConfig.norm`: GPT-2's LayerNorm or RMSNorm (Llama, Qwen3,
Gemma 3 — the last with Gemma's `(1 + scale)` convention, `norm_unit_offset`).

Both compute in at least float32 (float64 under x64) and return the compute dtype, as Flax's
LayerNorm does. Parameter names: LayerNorm {"scale", "bias"}, RMSNorm {"scale"}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig

Array = jax.Array


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · scale, or · (1 + scale) with `unit_offset` (scale starts at 0)."""

    eps: float = 1e-6
    unit_offset: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros_init() if self.unit_offset else nn.initializers.ones_init()
        scale_d = self.param("scale", init, (x.shape[-1],), jnp.float32)
        acc = jnp.promote_types(x.dtype, jnp.float32)
        x_acc = x.astype(acc)
        y = x_acc * jax.lax.rsqrt(jnp.mean(x_acc * x_acc, axis=-1, keepdims=True) + self.eps)
        gain = (1.0 + scale_d.astype(acc)) if self.unit_offset else scale_d.astype(acc)
        return (y * gain).astype(self.dtype)


def norm_layer(cfg: GPTConfig, name: str, dtype) -> nn.Module:
    """The configured normalisation of a block or of the final hidden states."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(eps=cfg.ln_eps, unit_offset=cfg.norm_unit_offset, dtype=dtype, name=name)
    return nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name=name)
