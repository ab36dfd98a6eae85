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


# --- Muon -------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic Newton–Schulz coefficients of modded-nanogpt


def muon_group(path, p) -> bool:
    """Whether `jaxgpt.train.optimizer.param_groups` sends this leaf to Muon: a kernel of rank ≥ 2
    outside the embeddings, the output head and the MoE router."""
    return path[-1] == "kernel" and p.ndim >= 2 and not {"wte", "wpe", "lm_head", "router"} & set(path)


def newton_schulz(g, steps: int = 5, eps: float = 1e-8):
    """Approximately orthogonalise each (in, out) matrix of g (leading axes: a batch of matrices):
    Frobenius-normalise, then `steps` quintic iterations X ← aX + (bA + cA²)X with A = XXᵀ, on the
    wide orientation (rows ≤ columns)."""
    if g.ndim > 2:
        return np.stack([newton_schulz(m, steps, eps) for m in g])
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def muon_init(params):
    zeros = lambda path, p: np.zeros_like(p)  # noqa: E731
    return {"step": 0, "momentum": tree_map(zeros, params), "adam": adamw_init(params)}


def muon_step(params, grads, state, lr, muon_lr, *, momentum=0.95, ns_steps=5, muon_weight_decay=0.0,
              b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0, decay_embeddings=False):
    """One step of `jaxgpt.train.optimizer.muon`: clip by global norm; on Muon's leaves the
    bias-corrected Nesterov momentum m̂ = β·m_t/(1-β^(t+1)) + (1-β)·g/(1-β^t) (m_t the EMA of the
    gradients), orthogonalised, times sqrt(max(1, out/in)), plus decoupled decay, times `muon_lr`;
    on the others `adamw_step` at `lr`. Returns (params, state)."""
    if grad_clip > 0:
        norm = np.sqrt(sum(np.sum(g**2) for g in tree_leaves(grads)))
        factor = min(1.0, grad_clip / norm) if norm > 0 else 1.0
        grads = tree_map(lambda _, g: g * factor, grads)
    t = state["step"] + 1
    mom = tree_map(lambda path, m, g: momentum * m + (1 - momentum) * g if muon_group(path, g) else m,
                   state["momentum"], grads)
    adam_params, adam_state = adamw_step(params, grads, state["adam"], lr, b1=b1, b2=b2, eps=eps,
                                         weight_decay=weight_decay, grad_clip=0.0, decay_embeddings=decay_embeddings)

    def update(path, p, m, g, p_adam):
        if not muon_group(path, p):
            return p_adam
        m_hat = momentum * m / (1 - momentum ** (t + 1)) + (1 - momentum) * g / (1 - momentum**t)
        u = newton_schulz(m_hat, ns_steps) * np.sqrt(max(1.0, p.shape[-1] / p.shape[-2]))
        return p - muon_lr * (u + muon_weight_decay * p)

    new_params = tree_map(update, params, mom, grads, adam_params)
    return new_params, {"step": t, "momentum": mom, "adam": adam_state}
