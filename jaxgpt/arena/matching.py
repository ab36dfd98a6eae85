"""Matched budgets: each variant's MLP width chosen so its parameters (or training FLOPs per token)
equal the baseline's as closely as a multiple of 8 allows.

Both quantities are affine in the MLP's hidden width, so two evaluations give the line and the
width; the achieved figure is then measured, not assumed. The reference vocabulary is the first
task's. A variant that sets `mlp_hidden` itself keeps it (matching would overwrite its point).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.nn.model import GPT, cross_entropy, param_counts

WIDTH_STEP = 8


def stored_params(config) -> int:
    counts = param_counts(config)
    return counts["total_tied" if config.tie_embeddings else "total"]


def train_flops_per_token(config, length: int) -> float:
    """FLOPs of one forward + backward pass on one sequence of `length`, per token, by XLA's cost
    analysis of the compiled program (the formula 6N misses what variants add inside attention)."""
    from jaxgpt.train.metrics import compiled_flops

    model = GPT(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32)))
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(p, x):
        return cross_entropy(model.apply(p, x), x)

    flops = compiled_flops(jax.jit(jax.grad(loss)), params, ids)
    if flops is None:
        raise RuntimeError("this JAX backend gives no cost analysis: match = 'flops' cannot be measured here")
    return flops / length


def match_widths(sweep) -> dict[str, dict]:
    """The sweep's variants with `mlp_hidden` set to match the baseline's parameters or FLOPs."""
    vocab = sweep.task(next(iter(sweep.tasks))).vocab_size
    length = sweep.train["length"]
    measure = stored_params if sweep.match == "params" else lambda c: train_flops_per_token(c, length)
    target = measure(sweep.model_config(sweep.baseline, vocab))
    variants = {}
    for name, changes in sweep.variants.items():
        if name == sweep.baseline or "mlp_hidden" in changes:
            variants[name] = changes
            continue
        config = sweep.model_config(name, vocab)
        lo, hi = WIDTH_STEP, 8 * config.emb_dim
        f_lo, f_hi = measure(config.replace(mlp_hidden=lo)), measure(config.replace(mlp_hidden=hi))
        width = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo)
        width = max(WIDTH_STEP, int(round(width / WIDTH_STEP)) * WIDTH_STEP)
        variants[name] = {**changes, "mlp_hidden": width}
    return variants
