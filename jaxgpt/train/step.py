"""The pure train and eval steps, written once, and the wrappers that compile them per parallel mode.

Train state is a plain dict pytree (what Orbax saves):
    {"step": int32[], "params": {...}, "opt_state": optax state, "rng": uint32 key data}
The dropout key of step s is fold_in(rng, s) (and the device index under pmap), so the whole run
is a pure function of (initial state, batches): this is what makes exact resume possible.

Batches arrive as (micro_batches, rows, T) arrays; the step averages the gradients of its
micro-batches (gradient accumulation with `lax.scan`), and under pmap also across devices
(`lax.pmean`). Since every micro-batch has the same number of tokens, the update equals the one of
the whole global batch at once, whatever the device count or the number of micro-batches.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt import xla_tuning
from jaxgpt.config import resolve_dtype
from jaxgpt.nn.model import GPT, cross_entropy
from jaxgpt.nn.moe import moe_loss, moe_stats, update_balance_bias
from jaxgpt.train.metrics import compiled_flops
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.optimizer import build_optimizer, model_params

Array = jax.Array
PMAP_AXIS = "batch"


def pmap_optimizer(cfg: TrainConfig, n_devices: int) -> optax.GradientTransformation:
    """The optimizer a `ParallelTrainer` over `n_devices` runs: `build_optimizer`'s, with Muon's
    Newton–Schulz products split over the pmap devices when there are several (same state layout)."""
    return build_optimizer(cfg, PMAP_AXIS, n_devices) if n_devices > 1 else build_optimizer(cfg)


def create_state(model: GPT, tx: optax.GradientTransformation, params, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
    }


def make_train_step(model: GPT, tx: optax.GradientTransformation, *, axis_name: Optional[str] = None) -> Callable:
    """The pure step (state, x_mbt, y_mbt) -> (state, metrics); `axis_name` set when run under pmap.

    The loss is `make_loss_and_grad`'s; metrics["loss"] is the cross-entropy alone, as evaluation reports
    it, and an MoE model adds its router metrics (`_moe_metrics`). A sigmoid router's balancing bias
    is moved after the optimizer update (`update_balance_bias`), from the whole batch's counts."""
    cfg = model.config
    grad_fn = make_loss_and_grad(model)

    def train_step(state, x_mbt, y_mbt):
        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))

        n_micro = x_mbt.shape[0]
        if n_micro == 1:
            (_, (loss, stats)), grads = grad_fn(params, x_mbt[0], y_mbt[0], key)
        else:
            def accumulate(grads_sum, micro):
                i, x_bt, y_bt = micro
                (_, aux), grads_i = grad_fn(params, x_bt, y_bt, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, grads_sum, grads_i), aux

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (losses, stats) = jax.lax.scan(accumulate, zeros, (jnp.arange(n_micro), x_mbt, y_mbt))
            grads = jax.tree.map(lambda g: g / n_micro, grads)
            loss, stats = jnp.mean(losses), _merge_micro_stats(stats)

        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
            stats = None if stats is None else _merge_device_stats(stats, axis_name)
        return apply_update(tx, cfg, state, grads, loss, stats)

    return train_step


def make_multi_step(train_step: Callable) -> Callable:
    """(state, x_kmbt, y_kmbt) -> (state, metrics with a leading K axis): K steps of `train_step` in
    one `lax.scan`, one batch each, so that one compiled call (one dispatch, one host round trip)
    makes K optimizer updates."""

    def multi_step(state, x_kmbt, y_kmbt):
        return jax.lax.scan(lambda s, batch: train_step(s, *batch), state, (x_kmbt, y_kmbt))

    return multi_step


def make_loss_and_grad(model: GPT) -> Callable:
    """(params, x_bt, y_bt, dropout key) -> ((loss, (cross-entropy, MoE stats)), grads) of one batch.

    The loss is the cross-entropy plus, for a mixture of experts, the routers' losses
    (`jaxgpt.nn.moe.moe_loss`)."""
    cfg = model.config

    def loss_fn(params, x_bt, y_bt, key):
        logits_btv, variables = model.apply(params, x_bt, deterministic=False, rngs={"dropout": key},
                                            mutable=["moe"])
        ce = cross_entropy(logits_btv, y_bt)
        stats = moe_stats(variables)
        return ce + moe_loss(stats, cfg.moe_aux_loss_coef, cfg.moe_z_loss_coef), (ce, stats)

    return jax.value_and_grad(loss_fn, has_aux=True)


def apply_update(tx: optax.GradientTransformation, cfg, state: dict, grads, loss, stats):
    """(new state, metrics) from the batch's mean gradients: the optimizer update, then a sigmoid
    router's balance-bias move from the whole batch's expert counts."""
    params = state["params"]
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if stats is not None and cfg.moe_bias_rate > 0:
        new_params = update_balance_bias(new_params, stats["counts"], cfg.moe_bias_rate)
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics if stats is None else {**metrics, **_moe_metrics(stats)}


def _merge_micro_stats(stats: Optional[dict]) -> Optional[dict]:
    """Micro-batch statistics (leading axis M) as one batch's: losses averaged, counts summed."""
    if stats is None:
        return None
    return {"aux_loss": stats["aux_loss"].mean(0), "z_loss": stats["z_loss"].mean(0),
            "counts": stats["counts"].sum(0), "dropped": stats["dropped"].sum(0)}


def _merge_device_stats(stats: dict, axis_name: str) -> dict:
    return {"aux_loss": jax.lax.pmean(stats["aux_loss"], axis_name), "z_loss": jax.lax.pmean(stats["z_loss"], axis_name),
            "counts": jax.lax.psum(stats["counts"], axis_name), "dropped": jax.lax.psum(stats["dropped"], axis_name)}


def _moe_metrics(stats: dict) -> dict:
    """Router metrics of a step: mean losses over the MoE layers, the share of assignments dropped
    by capacity, and the tokens each expert received in each MoE layer (moe_counts, (L, E))."""
    assignments = jnp.sum(stats["counts"])  # tokens · k · layers
    return {"moe_aux_loss": jnp.mean(stats["aux_loss"]), "moe_z_loss": jnp.mean(stats["z_loss"]),
            "moe_dropped_frac": jnp.sum(stats["dropped"]) / jnp.maximum(assignments, 1),
            "moe_counts": stats["counts"]}


def make_eval_step(model: GPT) -> Callable:
    """(params, x_bt, y_bt) -> mean cross-entropy, without dropout."""

    def eval_step(params, x_bt, y_bt):
        return cross_entropy(model.apply(params, x_bt, deterministic=True), y_bt)

    return eval_step


class ParallelTrainer:
    """The train step compiled for `n_devices` local devices: plain jit for one, pmap for several.

    It owns the layout: `put_state`/`get_state` move the state in and out of the replicated form,
    `split_batch` reshapes a global (B, T) batch into what the compiled step takes. With
    `steps_per_call` K > 1 it also compiles K steps as one call (`run_steps`).
    """

    def __init__(self, model: GPT, tx: optax.GradientTransformation, n_devices: int, micro_batches: int,
                 steps_per_call: int = 1) -> None:
        available = jax.local_device_count()
        if not 1 <= n_devices <= available:
            raise ValueError(f"asked for {n_devices} devices but JAX sees {available} local device(s)")
        self.n_devices = n_devices
        self.micro_batches = micro_batches
        self.scan_layers = model.config.scan_layers
        self.devices = jax.local_devices()[:n_devices]
        compute_dtype = resolve_dtype(model.config)  # picks the XLA options (jaxgpt.xla_tuning)
        train_step = make_train_step(model, tx, axis_name=None if n_devices == 1 else PMAP_AXIS)
        self.step = self._compile(train_step, compute_dtype)
        # K steps per call: each device's x, y are (K, M, rows, T), scanned over K
        self.multi_step = self._compile(make_multi_step(train_step), compute_dtype) if steps_per_call > 1 else None
        self.eval_step = xla_tuning.jit(make_eval_step(model), compute_dtype=compute_dtype)

    def _compile(self, fn: Callable, compute_dtype) -> Callable:
        if self.n_devices == 1:
            return xla_tuning.jit(fn, compute_dtype=compute_dtype, donate_argnums=0)
        return xla_tuning.pmap(fn, compute_dtype=compute_dtype, axis_name=PMAP_AXIS, donate_argnums=0,
                               devices=self.devices)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % (self.n_devices * self.micro_batches):
            raise ValueError(
                f"batch_size {batch_size} must be divisible by devices × micro_batches "
                f"= {self.n_devices} × {self.micro_batches}"
            )

    def put_state(self, state: dict):
        if self.n_devices == 1:
            return jax.device_put(state, self.devices[0])
        return jax.tree.map(lambda a: np.broadcast_to(np.asarray(a), (self.n_devices,) + np.shape(a)), state)

    def get_state(self, state) -> dict:
        """The state as one (unreplicated) copy: device 0's replica, taken without computing.

        Indexing the replicated arrays (`a[0]`) would launch a program over all devices; with Orbax
        saving in a background thread at the same time, the CPU devices could enter two such
        programs' collectives in different orders and deadlock (seen at a step where a best and a
        periodic checkpoint were saved together). `addressable_data(0)` is device 0's own (1, …)
        shard; indexing it runs on that device alone and copies (the next step donates the state).
        """
        if self.n_devices == 1:
            return state
        return jax.tree.map(lambda a: a.addressable_data(0)[0], state)

    def params(self, state):
        """The parameters to evaluate at (`model_params`: schedule-free's average)."""
        return model_params(self.get_state(state))

    def local_rows(self, batch_size: int) -> slice:
        """Rows of each global batch this process feeds: all of them (one process)."""
        return slice(None)

    def local_eval_rows(self, batch_size: int) -> slice:
        return slice(None)

    def split_batch(self, x_bt: np.ndarray) -> np.ndarray:
        b, t = x_bt.shape
        if self.n_devices == 1:
            return x_bt.reshape(self.micro_batches, b // self.micro_batches, t)  # (M, B/M, T)
        rows = b // (self.n_devices * self.micro_batches)
        return x_bt.reshape(self.n_devices, self.micro_batches, rows, t)  # (D, M, B/(D·M), T)

    def step_flops(self, state, x_bt: np.ndarray, y_bt: np.ndarray) -> Optional[float]:
        """FLOPs of one step on this batch shape, from the compiled step's cost analysis (all devices)."""
        if self.micro_batches > 1 or self.scan_layers:  # a loop (over micro-batches, over layers): XLA's cost
            return None  # analysis counts its body once
        flops = compiled_flops(self.step, state, self.split_batch(x_bt), self.split_batch(y_bt))
        return None if flops is None else flops * self.n_devices

    def __call__(self, state, x_bt: np.ndarray, y_bt: np.ndarray):
        state, metrics = self.step(state, self.split_batch(x_bt), self.split_batch(y_bt))
        if self.n_devices > 1:
            metrics = jax.tree.map(lambda m: m.addressable_data(0)[0], metrics)  # identical on every device after pmean
        return state, metrics

    def run_steps(self, state, batches: list[tuple[np.ndarray, np.ndarray]]):
        """K optimizer steps, one (x_bt, y_bt) batch each, in one compiled call (`steps_per_call` = K);
        (state, metrics with a leading K axis)."""
        axis = 0 if self.n_devices == 1 else 1  # the steps axis goes after pmap's device axis
        x = np.stack([self.split_batch(x_bt) for x_bt, _ in batches], axis=axis)
        y = np.stack([self.split_batch(y_bt) for _, y_bt in batches], axis=axis)
        state, metrics = self.multi_step(state, x, y)
        if self.n_devices > 1:
            metrics = jax.tree.map(lambda m: m.addressable_data(0)[0], metrics)
        return state, metrics
