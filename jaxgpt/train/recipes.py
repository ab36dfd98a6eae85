"""Training recipes: a model preset and the train settings that go with it, by name.

`jaxgpt train --recipe NAME` starts from a recipe (default: "default"); `--preset`, the flags and
`--set` change it from there. `TrainConfig()`'s own defaults are the classic GPT-2 recipe (AdamW,
warmup + cosine), which library callers and tests keep getting; the command line's default is the
best recipe measured here (docs/reproductions.md, "The main job").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxgpt.config import ConfigError, GPTConfig, get_preset
from jaxgpt.train.config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    about: str
    preset: str
    train: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        "the `small` preset trained with Muon on its hidden matrices (AdamW on the rest) for 400 steps, which "
        "take about the wall time of gpt2-classic's 600 (docs/reproductions.md)",
        "small", train={"optimizer": "muon", "max_steps": 400}),
    "speedrun": Recipe(
        "tinyshakespeare (character level) to validation loss 1.88 fast on a small CPU: nanoGPT's CPU recipe (4 "
        "layers, 4 heads, 128 wide, context 64, batch 12) with what the ablation in docs/training.md kept: Muon (3 "
        "Newton-Schulz steps), untied head, zero-initialised projections, QK-norm, logit soft-cap 30, a 700-step "
        "schedule and RMSNorm",
        "tiny", model={"tie_embeddings": False, "zero_init_proj": True, "qk_norm": True, "logit_softcap": 30.0,
                       "norm": "rmsnorm"},
        train={"data": "tinyshakespeare", "tokenizer": "char", "batch_size": 12, "max_steps": 700,
               "optimizer": "muon", "muon_ns_steps": 3, "schedule": "cosine", "lr": 1e-3, "min_lr": 1e-4,
               "warmup_steps": 100, "beta2": 0.99, "weight_decay": 0.1, "decay_embeddings": True, "log_every": 50,
               "eval_every": 100}),
    "gpt2-classic": Recipe("the book's GPT-2 recipe: the `small` preset, AdamW, linear warmup + cosine decay",
                           "small"),
}


def recipe_configs(name: str) -> tuple[GPTConfig, TrainConfig]:
    """(model config, train config) of recipe `name`; a clear error for an unknown one."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    return get_preset(recipe.preset, **recipe.model), TrainConfig(**recipe.train)
