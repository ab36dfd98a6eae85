"""The optimizer: AdamW with a decay mask, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import jax
import optax

from jaxgpt.train.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `min_lr` at `decay_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_decay_steps, cfg.warmup_steps + 1), end_value=cfg.min_lr,
    )


def decay_mask(params, decay_embeddings: bool = False):
    """True for parameters that get weight decay: matrices (kernels, LoRA's A and B), and
    embeddings if asked. Biases and LayerNorm scales/biases never decay; wte/wpe decay only with
    `decay_embeddings`."""

    def wants_decay(path, leaf) -> bool:
        names = [getattr(k, "key", str(k)) for k in path]
        if "embedding" in names:
            return decay_embeddings
        return names[-1] in ("kernel", "lora_A", "lora_B")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def adamw(learning_rate, *, weight_decay: float, grad_clip: float = 0.0, decay_embeddings: bool = False,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """clip_by_global_norm (when `grad_clip` > 0) → AdamW with weight decay on `decay_mask`'s leaves:
    what pretraining and finetuning both optimise with."""
    opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=lambda params: decay_mask(params, decay_embeddings))
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def build_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Pretraining's optimizer: `adamw` on the warmup + cosine schedule, with the run's betas and clipping."""
    return adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                 decay_embeddings=cfg.decay_embeddings, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
