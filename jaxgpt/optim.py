"""The optimizer: AdamW with a decay mask, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from .train_config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `min_lr` at `decay_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_decay_steps, cfg.warmup_steps + 1), end_value=cfg.min_lr,
    )


def decay_mask(params, decay_embeddings: bool = False):
    """True for parameters that get weight decay: matrices (kernels), and embeddings if asked.

    Biases and LayerNorm scales/biases never decay; wte/wpe decay only with `decay_embeddings`.
    """

    def wants_decay(path, leaf) -> bool:
        names = [getattr(k, "key", str(k)) for k in path]
        if "embedding" in names:
            return decay_embeddings
        return names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm → AdamW(schedule, betas, eps, masked weight decay)."""
    adamw = optax.adamw(
        lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg.decay_embeddings),
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
