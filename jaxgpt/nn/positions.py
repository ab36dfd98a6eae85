"""How a GPT knows where tokens are: the position schemes selectable by `GPTConfig.position`.

- "learned": GPT-2's table of absolute position embeddings added to the token embeddings (`wpe`).
- "rope": rotary embeddings (Su et al. 2021): queries and keys are rotated by an angle proportional
  to their position, so q·k depends only on the distance between them. `rope_base` sets the
  wavelengths (10,000 in the paper). Pairs are (x[i], x[i + h/2]) — the GPT-NeoX/Llama layout.
- "alibi": no embedding; each head adds -slope·(i - j) to its attention scores (Press et al. 2022),
  slopes a geometric sequence 2^(-8/n), 2^(-16/n), ….
- "none": no position information at all (causal masking alone still leaks some, famously).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

POSITIONS = ("learned", "rope", "alibi", "none")


def llama3_inv_freq(inv_freq, scaling: tuple):
    """Llama 3's frequency scaling, `scaling` = (factor, low_freq_factor, high_freq_factor, original
    context): long wavelengths are divided by the factor, short ones kept, the band between blended."""
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, blended, scaled)


def rope_angles(pos_bt: jax.Array, head_dim: int, base: float, dtype=jnp.float32,
                scaling: Optional[tuple] = None) -> jax.Array:
    """Rotation angles (b, t, h/2): position × base^(-2i/h) for frequency i, in `dtype` (at least
    float32); with `scaling`, the frequencies of Llama 3 (`llama3_inv_freq`)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    return pos_bt.astype(dtype)[..., None] * inv_freq


def apply_rope(x_btnh: jax.Array, pos_bt: jax.Array, base: float, scaling: Optional[tuple] = None) -> jax.Array:
    """Rotate each (x[i], x[i + h/2]) pair of every head by its position's angle; shape unchanged."""
    h = x_btnh.shape[-1]
    acc = jnp.promote_types(x_btnh.dtype, jnp.float32)  # float32 for bf16/f32, float64 under x64
    angles_bt1f = rope_angles(pos_bt, h, base, acc, scaling)[:, :, None, :]
    cos, sin = jnp.cos(angles_bt1f), jnp.sin(angles_bt1f)
    x1, x2 = x_btnh[..., : h // 2].astype(acc), x_btnh[..., h // 2:].astype(acc)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_btnh.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (float32 NumPy: a constant, not a parameter).

    For a power of two n: 2^(-8k/n), k = 1..n. Otherwise the paper's recipe: the slopes of the
    closest smaller power of two, then every other slope of the next power of two.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (k + 1) for k in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(slopes, np.float32)
