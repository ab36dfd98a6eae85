"""Attention weights of any model for one prompt, and their picture (`jaxgpt attention-map`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPT


def attention_maps(params, config: GPTConfig, ids: Sequence[int]) -> np.ndarray:
    """(layers, heads, t, t) attention weights of the prompt `ids`, as each attention layer sows them."""
    _, state = GPT(config).apply(params, jnp.asarray([list(ids)]), mutable=["intermediates"])
    inter = state["intermediates"]
    return np.stack([np.asarray(inter[f"h_{i}"]["attn"]["attention_weights"][0][0]) for i in range(config.n_layers)])


def plot_attention_maps(maps_lnts: np.ndarray, tokens: Sequence[str], out: Path, *,
                        layers: Optional[Sequence[int]] = None, title: str = "") -> Path:
    """A grid of heat maps, one row per layer and one column per head (query down, key across)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(maps_lnts.shape[0])) if layers is None else list(layers)
    n_heads, t = maps_lnts.shape[1], maps_lnts.shape[2]
    cell = 1.6 if t <= 24 else 2.2
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(cell * n_heads + 1, cell * len(layers) + 1), squeeze=False)
    labels = [repr(tok)[1:-1][:8] for tok in tokens]
    for r, layer in enumerate(layers):
        for head in range(n_heads):
            ax = axes[r][head]
            ax.imshow(maps_lnts[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
                if t <= 24:
                    ax.set_yticks(range(t), labels, fontsize=5)
            if r == len(layers) - 1 and t <= 24:
                ax.set_xticks(range(t), labels, fontsize=5, rotation=90)
    fig.suptitle(title or "attention weights (row: query, column: key)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
