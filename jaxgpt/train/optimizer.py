"""The optimizers: AdamW with a decay mask, Muon on the hidden matrices with AdamW on the rest, or
schedule-free AdamW; warmup + cosine or warmup-stable-decay schedules; global-norm clipping.

Muon (Jordan et al. 2024, modded-nanogpt) replaces each hidden weight matrix's update by the
orthogonalised (Newton–Schulz) Nesterov momentum of its gradient, scaled by sqrt(max(1, out/in));
embeddings, the output head, the MoE router, norms and biases stay on AdamW. Which parameter goes
where is decided by name (`param_groups`) and printed at the start of a run. The Muon step is
Optax's `optax.contrib.scale_by_muon` for the momentum and its normalisation, then our
`newton_schulz` (the same iteration; the whole step is checked against
`jaxgpt.reference.optim.muon_step`); a matrix with leading axes (scanned layers (L, in, out),
experts (E, in, out)) is orthogonalised per matrix. Under pmap each matrix's products run on one
device and a psum shares the results (`orthogonalize_and_scale`: at nanoGPT's shape they were 29 %
of a one-device step's kernel time, and every device repeated them). Under FSDP the products run on
the sharded matrix inside the compiled step, and XLA inserts the gathers they need (both tested
against one device).

Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") needs no decay: the train state's
`params` are the point y where gradients are taken, and the model to evaluate, sample from or export
is the running average x = (y - (1 - β1)·z)/β1 (z lives in the optimizer state). `model_params`
gives x for every optimizer (the parameters themselves when there is no averaging), and a
checkpoint of such a run also holds x as `eval_params` (`checkpoint_tree`), which is what
`jaxgpt.weights.checkpoint.restore_params` reads for inference.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, ScheduleFreeState, scale_by_muon, schedule_free, schedule_free_eval_params

from jaxgpt.train.config import TrainConfig

# parameters that never go to Muon, whatever their shape: the vocabulary-sized matrices (Muon's
# authors keep embeddings and the head on AdamW) and the MoE router (a gate, not a hidden map)
ADAMW_ONLY = ("wte", "wpe", "lm_head", "router")


def lr_schedule(cfg: TrainConfig, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 to `peak` (default `lr`) over `warmup_steps`, then

    - "cosine": cosine to `min_lr` at `decay_steps` (min_lr after it);
    - "wsd" (warmup-stable-decay, trapezoidal): `peak` until the last `decay_fraction` of the steps
      after warmup, then linear to `min_lr` at `decay_steps` (min_lr after it).

    With another `peak` (Muon's), `min_lr` scales with it: the schedule's shape is the same.
    Schedule-free AdamW takes warmup then `peak` to the end, whatever `schedule` says.
    """
    peak = cfg.lr if peak is None else peak
    if cfg.optimizer == "schedule_free_adamw":
        return optax.warmup_constant_schedule(0.0, peak, cfg.warmup_steps)
    end = cfg.min_lr * peak / cfg.lr
    total = max(cfg.total_decay_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=cfg.warmup_steps,
                                                  decay_steps=total, end_value=end)
    decay = round(cfg.decay_fraction * (total - cfg.warmup_steps))
    stable = total - cfg.warmup_steps - decay
    pieces = [optax.linear_schedule(0.0, peak, cfg.warmup_steps), optax.constant_schedule(peak),
              optax.linear_schedule(peak, end, max(decay, 1))]
    return optax.join_schedules(pieces, [cfg.warmup_steps, cfg.warmup_steps + stable])


def _names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def decay_mask(params, decay_embeddings: bool = False):
    """True for parameters that get weight decay: matrices (kernels, LoRA's A and B), and
    embeddings if asked. Biases and LayerNorm scales/biases never decay; wte/wpe decay only with
    `decay_embeddings`."""

    def wants_decay(path, leaf) -> bool:
        names = _names(path)
        if "embedding" in names:
            return decay_embeddings
        return names[-1] in ("kernel", "lora_A", "lora_B")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def param_groups(params):
    """"muon" for the hidden weight matrices (a `kernel` of rank ≥ 2 outside `ADAMW_ONLY`), "adamw"
    for everything else; a tree like `params`."""

    def group(path, leaf) -> str:
        names = _names(path)
        hidden = names[-1] == "kernel" and jnp.ndim(leaf) >= 2 and not set(names) & set(ADAMW_ONLY)
        return "muon" if hidden else "adamw"

    return jax.tree_util.tree_map_with_path(group, params)


def describe_groups(params) -> str:
    """One line per group: how many tensors and parameters, and a few of their names."""
    counts: dict[str, list] = {}
    labels = param_groups(params)
    for (path, leaf), label in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels)):
        counts.setdefault(label, []).append(("/".join(_names(path)[1:]), leaf.size))
    lines = []
    for label, items in sorted(counts.items(), reverse=True):
        names = ", ".join(n for n, _ in items[:3]) + (", …" if len(items) > 3 else "")
        lines.append(f"{label}: {len(items)} tensors, {sum(s for _, s in items):,} parameters ({names})")
    return "; ".join(lines)


def adamw(learning_rate, *, weight_decay: float, grad_clip: float = 0.0, decay_embeddings: bool = False,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """clip_by_global_norm (when `grad_clip` > 0) → AdamW with weight decay on `decay_mask`'s leaves:
    what pretraining and finetuning both optimise with."""
    opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=lambda params: decay_mask(params, decay_embeddings))
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip > 0 else opt


def _matrix_dims(updates):
    """Muon's view of each of its tensors: the last two axes are (in, out), any leading ones are a
    batch of matrices (scanned layers, experts). Masked-out leaves stay masked."""
    return jax.tree.map(lambda x: MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1), updates)


NS_COEFFS = (3.4445, -4.775, 2.0315)  # Optax's (modded-nanogpt's) quintic Newton–Schulz coefficients


def newton_schulz(x, steps: int):
    """`steps` quintic Newton–Schulz iterations X ← aX + (bA + cA²)X, A = XXᵀ, on each trailing
    (in, out) matrix of `x` (already divided by its Frobenius norm), in its wide orientation: the
    iteration Optax's `orthogonalize_via_newton_schulz` runs."""
    a, b, c = (jnp.asarray(k, x.dtype) for k in NS_COEFFS)
    tall = x.shape[-2] > x.shape[-1]
    x = jnp.swapaxes(x, -1, -2) if tall else x
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


def ns_owners(shapes: list[tuple], n_devices: int) -> list[int]:
    """Which device orthogonalises each matrix: the largest Newton–Schulz cost first, each to the
    device with the least work so far (cost ~ batch · min(in, out)² · max(in, out))."""
    cost = [math.prod(s[:-2]) * min(s[-2:]) ** 2 * max(s[-2:]) for s in shapes]
    load, owners = [0] * n_devices, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -cost[i]):
        owners[i] = min(range(n_devices), key=load.__getitem__)
        load[owners[i]] += cost[i]
    return owners


def orthogonalize_and_scale(ns_steps: int, axis_name: Optional[str] = None,
                            n_devices: int = 1) -> optax.GradientTransformation:
    """Muon's Newton–Schulz products on each normalised (…, in, out) update, then its width scaling
    sqrt(max(1, out / in)) (Optax keeps its own `scale_by_shape` private).

    Under pmap (`axis_name`, `n_devices` > 1) every device would otherwise repeat all the products;
    here each matrix is orthogonalised on one device (`ns_owners`), the others skip it
    (`lax.cond`) and contribute exact zeros, and one psum hands every device all the results: each
    device does about 1/n of the products. The owner computes what a single device would."""
    sharded = axis_name is not None and n_devices > 1

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        owners = ns_owners([leaf.shape for leaf in leaves], n_devices) if sharded else [0] * len(leaves)
        ns = lambda u: newton_schulz(u, ns_steps)  # noqa: E731
        orthogonal = [jax.lax.cond(jax.lax.axis_index(axis_name) == owner, ns, jnp.zeros_like, leaf) if sharded
                      else ns(leaf) for leaf, owner in zip(leaves, owners)]
        if sharded:
            orthogonal = jax.lax.psum(orthogonal, axis_name)
        scaled = [u * jnp.sqrt(jnp.maximum(1.0, u.shape[-1] / u.shape[-2])).astype(u.dtype) for u in orthogonal]
        return jax.tree.unflatten(treedef, scaled), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon(cfg: TrainConfig, axis_name: Optional[str] = None, n_devices: int = 1) -> optax.GradientTransformation:
    """clip_by_global_norm → Muon on `param_groups`' "muon" tensors (momentum `muon_momentum`, Nesterov,
    `muon_ns_steps` Newton–Schulz steps, width scaling, decay `muon_weight_decay`, the schedule at
    `muon_lr`) and AdamW on the rest (the run's betas, decay mask and schedule at `lr`).

    Optax's `scale_by_muon` keeps the momentum and normalises it (zero Newton–Schulz steps);
    `orthogonalize_and_scale` runs the products, split over the pmap devices when `axis_name` names
    them. The state's layout is the same either way (checkpoints move between device counts)."""
    muon_tx = optax.chain(
        scale_by_muon(ns_steps=0, beta=cfg.muon_momentum, nesterov=True, weight_dimension_numbers=_matrix_dims),
        orthogonalize_and_scale(cfg.muon_ns_steps, axis_name, n_devices),
        optax.add_decayed_weights(cfg.muon_weight_decay),
        optax.scale_by_learning_rate(lr_schedule(cfg, cfg.muon_lr)),
    )
    adam_tx = optax.adamw(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    tx = optax.partition({"muon": muon_tx, "adamw": adam_tx}, param_groups)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx


def schedule_free_adamw(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm → Optax's `schedule_free` around Adam without momentum (RMS scaling with
    bias correction, decay on `decay_mask`'s leaves at y, warmup then constant `lr`), β1 = `beta1`
    as the interpolation weight. Optax's `schedule_free_adamw` alias is not used: it decays every
    leaf, norms and biases included."""
    lr = lr_schedule(cfg)
    base = optax.chain(
        optax.scale_by_rms(decay=cfg.beta2, eps=cfg.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(cfg.weight_decay, mask=lambda params: decay_mask(params, cfg.decay_embeddings)),
        optax.scale_by_learning_rate(lr),
    )
    tx = schedule_free(base, learning_rate=lr, b1=cfg.beta1)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx) if cfg.grad_clip > 0 else tx


def _schedule_free_state(opt_state) -> ScheduleFreeState | None:
    """The `ScheduleFreeState` inside an optimizer state (chains are tuples), or None."""
    if isinstance(opt_state, ScheduleFreeState):
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        for inner in opt_state:
            found = _schedule_free_state(inner)
            if found is not None:
                return found
    return None


_schedule_free_x = jax.jit(schedule_free_eval_params)


def model_params(state: dict):
    """The parameters to evaluate, sample from and export a train state at: schedule-free's average
    x, else `state["params"]` as they are."""
    found = _schedule_free_state(state["opt_state"])
    return state["params"] if found is None else _schedule_free_x(found, state["params"])


def checkpoint_tree(state: dict) -> dict:
    """What a checkpoint saves of a train state: the state, plus `eval_params` (x) when x differs
    from the trained `params` (schedule-free), so that inference needs no optimizer."""
    if _schedule_free_state(state["opt_state"]) is None:
        return state
    return {**state, "eval_params": model_params(state)}


def checkpoint_abstract(abstract_state: dict) -> dict:
    """`checkpoint_tree` of an abstract state (shapes and shardings: x is shaped like the params)."""
    if _schedule_free_state(abstract_state["opt_state"]) is None:
        return abstract_state
    return {**abstract_state, "eval_params": abstract_state["params"]}


def build_optimizer(cfg: TrainConfig, axis_name: Optional[str] = None, n_devices: int = 1) -> optax.GradientTransformation:
    """Pretraining's optimizer, as `cfg.optimizer` says: `adamw`, `muon` or `schedule_free_adamw`,
    on `lr_schedule`. Under pmap, `axis_name` and `n_devices` let Muon split its products over the
    devices (`orthogonalize_and_scale`); the other optimizers ignore them."""
    if cfg.optimizer == "muon":
        return muon(cfg, axis_name, n_devices)
    if cfg.optimizer == "schedule_free_adamw":
        return schedule_free_adamw(cfg)
    return adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                 decay_embeddings=cfg.decay_embeddings, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
