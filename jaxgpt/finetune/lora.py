"""LoRA: low-rank adapters on a frozen model (the book's appendix E), as a pure function of pytrees.

An adapted dense layer computes x·(W + s·A·B) with A (in, r), B (r, out) and the scale
s = alpha / r — the LoRA paper's convention. (The book multiplies by `alpha` alone; its rank-16,
alpha-16 setting is s = 16, i.e. alpha = 256 here.) A is drawn as the book draws it
(`kaiming_uniform_(A, a=sqrt(5))` on an (in, r) tensor: U(-1/sqrt(r), 1/sqrt(r))) and B is zero,
so a fresh adapter leaves the model exactly as it was.

The adapters live in their own pytree that mirrors the model's module paths,
`{"h_0": {"attn": {"c_attn": {"lora_A", "lora_B"}}}, …}`, and `merge_lora` folds them into the
weights before the forward pass. The model code therefore knows nothing about LoRA, every
attention variant gets it for free, and the merged tree is what export writes. The cost of merging
instead of running x·A·B beside x·W is that backpropagation forms the full gradient of each adapted
W (one extra matmul of the same size as the layer's own weight gradient) — negligible next to the
forward and backward passes of the sequence for the model sizes this runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxgpt.config import ConfigError

# Which dense layers each target name adapts, as predicates on the module path (tuple of names).
LORA_TARGETS = {
    "qkv": lambda path: len(path) >= 2 and path[-2] == "attn" and path[-1] != "c_proj",  # Q/K/V projections
    "attn_out": lambda path: path[-2:] == ("attn", "c_proj"),
    "mlp": lambda path: len(path) >= 2 and path[-2] == "mlp",
    "head": lambda path: path[-1] in ("lm_head", "head"),
}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    targets: tuple[str, ...] = field(default=("qkv", "attn_out", "mlp", "head"))

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets must be a non-empty subset of {sorted(LORA_TARGETS)}, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(rank=d["rank"], alpha=d["alpha"], targets=tuple(d["targets"]))


def adapted_layers(params: dict, cfg: LoRAConfig) -> list[tuple[str, ...]]:
    """Module paths of the dense layers (2-D `kernel`s) that `cfg.targets` select, in tree order."""
    flat = traverse_util.flatten_dict(params)
    paths = [k[:-1] for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 2]
    chosen = [p for p in paths if any(LORA_TARGETS[t](p) for t in cfg.targets)]
    if not chosen:
        raise ConfigError(f"LoRA targets {list(cfg.targets)} match no dense layer of this model")
    return chosen


def init_lora(params: dict, cfg: LoRAConfig, key: jax.Array) -> dict:
    """Fresh adapters for the selected layers of `params` (a model's inner params dict)."""
    flat = traverse_util.flatten_dict(params)
    lora = {}
    layers = adapted_layers(params, cfg)
    for layer_key, path in zip(jax.random.split(key, len(layers)), layers):
        d_in, d_out = flat[path + ("kernel",)].shape
        bound = 1.0 / math.sqrt(cfg.rank)
        lora[path + ("lora_A",)] = jax.random.uniform(layer_key, (d_in, cfg.rank), jnp.float32, -bound, bound)
        lora[path + ("lora_B",)] = jnp.zeros((cfg.rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(lora)


def merge_lora(params: dict, lora: dict, scale: float) -> dict:
    """`params` with every adapted kernel replaced by W + scale·A·B (the other leaves untouched)."""
    flat = dict(traverse_util.flatten_dict(params))
    adapters = traverse_util.flatten_dict(lora)
    for path in {k[:-1] for k in adapters}:
        a_ir, b_ro = adapters[path + ("lora_A",)], adapters[path + ("lora_B",)]
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = kernel + (scale * (a_ir @ b_ro)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)
