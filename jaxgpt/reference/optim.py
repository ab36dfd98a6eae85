"""The NumPy reference's AdamW step, as `jaxgpt.train.optimizer` builds it in Optax."""

from __future__ import annotations

import numpy as np

# --- the optimizer -----------------------------------------------------------------------------------

def tree_map(fn, *trees, path=()):
    """fn(path, *leaves) over nested dicts of arrays (path: the tuple of keys)."""
    if isinstance(trees[0], dict):
        return {k: tree_map(fn, *(t[k] for t in trees), path=path + (k,)) for k in trees[0]}
    return fn(path, *trees)


def tree_leaves(tree) -> list:
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in tree_leaves(tree[k])]
    return [tree]


def decays(path, decay_embeddings=False) -> bool:
    """The weight-decay mask of `jaxgpt.optim.decay_mask`: kernels, and embeddings if asked."""
    return decay_embeddings if "embedding" in path else path[-1] == "kernel"


def adamw_init(params):
    zeros = lambda path, p: np.zeros_like(p)  # noqa: E731
    return {"step": 0, "mu": tree_map(zeros, params), "nu": tree_map(zeros, params)}


def adamw_step(params, grads, state, lr, *, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
               grad_clip=1.0, decay_embeddings=False):
    """One step of `jaxgpt.optim.build_optimizer` as Optax computes it: clip by global norm,
    bias-corrected Adam moments, decoupled weight decay on the masked parameters, all times `lr`
    (the schedule's value at this step). Returns (params, state)."""
    if grad_clip > 0:
        norm = np.sqrt(sum(np.sum(g**2) for g in tree_leaves(grads)))
        factor = min(1.0, grad_clip / norm) if norm > 0 else 1.0
        grads = tree_map(lambda _, g: g * factor, grads)
    t = state["step"] + 1
    mu = tree_map(lambda _, m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
    nu = tree_map(lambda _, v, g: b2 * v + (1 - b2) * g**2, state["nu"], grads)

    def update(path, p, m, v):
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if decays(path, decay_embeddings):
            u = u + weight_decay * p
        return p - lr * u

    return tree_map(update, params, mu, nu), {"step": t, "mu": mu, "nu": nu}
