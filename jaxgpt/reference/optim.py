"""The NumPy reference's optimizer steps (AdamW, Muon, schedule-free AdamW), as `jaxgpt.train.optimizer`
builds them in Optax."""

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
    """The weight-decay mask of `jaxgpt.train.optimizer.decay_mask`: kernels, and embeddings if asked."""
    return decay_embeddings if "embedding" in path else path[-1] == "kernel"


def adamw_init(params):
    zeros = lambda path, p: np.zeros_like(p)  # noqa: E731
    return {"step": 0, "mu": tree_map(zeros, params), "nu": tree_map(zeros, params)}


def clip_by_global_norm(grads, grad_clip: float):
    """The gradients scaled so that their global norm is at most `grad_clip` (0: unchanged)."""
    if grad_clip <= 0:
        return grads
    norm = np.sqrt(sum(np.sum(g**2) for g in tree_leaves(grads)))
    factor = min(1.0, grad_clip / norm) if norm > 0 else 1.0
    return tree_map(lambda _, g: g * factor, grads)


def adamw_step(params, grads, state, lr, *, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
               grad_clip=1.0, decay_embeddings=False):
    """One step of `jaxgpt.train.optimizer.build_optimizer` as Optax computes it: clip by global norm,
    bias-corrected Adam moments, decoupled weight decay on the masked parameters, all times `lr`
    (the schedule's value at this step). Returns (params, state)."""
    grads = clip_by_global_norm(grads, grad_clip)
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
    grads = clip_by_global_norm(grads, grad_clip)
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


# --- schedule-free AdamW -----------------------------------------------------------------------------

def schedule_free_init(params):
    """z starts at the parameters; no averaging weight yet."""
    zeros = lambda path, p: np.zeros_like(p)  # noqa: E731
    return {"step": 0, "z": tree_map(lambda _, p: p.copy(), params), "nu": tree_map(zeros, params),
            "weight_sum": 0.0, "max_lr": 0.0}


def schedule_free_eval(params, state, b1=0.9):
    """The averaged parameters x = (y - (1 - β1)·z)/β1 that a schedule-free run is evaluated at."""
    return tree_map(lambda _, y, z: (y - (1 - b1) * z) / b1, params, state["z"])


def schedule_free_adamw_step(params, grads, state, lr_fn, *, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                             grad_clip=1.0, decay_embeddings=False):
    """One step of `jaxgpt.train.optimizer.schedule_free_adamw` (Defazio et al. 2024) at the
    gradient point y = `params`: clip; Adam's bias-corrected second moment without momentum, plus
    decoupled decay at y on the masked leaves, moves z by -lr·u; the average x moves towards the new
    z with weight c = lr_max²/Σ lr_max² (lr_max the largest lr so far); y = β1·x + (1-β1)·z.
    `lr_fn(t)` is the schedule: as Optax does, the step itself uses lr_fn(t) (t counted from 0) and
    the averaging weight lr_fn(t + 1). Returns (params, state)."""
    grads = clip_by_global_norm(grads, grad_clip)
    t = state["step"]
    lr_step, lr_weight = lr_fn(t), lr_fn(t + 1)
    nu = tree_map(lambda _, v, g: b2 * v + (1 - b2) * g**2, state["nu"], grads)

    def z_update(path, z, y, g, v):
        u = g / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
        if decays(path, decay_embeddings):
            u = u + weight_decay * y
        return z - lr_step * u

    z_new = tree_map(z_update, state["z"], params, grads, nu)
    max_lr = max(state["max_lr"], lr_weight)
    weight_sum = state["weight_sum"] + max_lr**2
    c = max_lr**2 / weight_sum if weight_sum > 0 else 0.0
    x_prev = schedule_free_eval(params, state, b1)
    x = tree_map(lambda _, xp, z: (1 - c) * xp + c * z, x_prev, z_new)
    y = tree_map(lambda _, xi, z: b1 * xi + (1 - b1) * z, x, z_new)
    return y, {"step": t + 1, "z": z_new, "nu": nu, "weight_sum": weight_sum, "max_lr": max_lr}
