"""One arena model: trained on a task's batches, then evaluated at the training length and beyond.

Compiled functions are kept per model config (`compiled_train_step`, `_predict`): the seeds of a
variant share one compilation of the step and of each evaluation length.
"""

from __future__ import annotations

import time
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.arena.tasks import IGNORE, ArenaTask, token_accuracy
from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.loop import TrainingDiverged
from jaxgpt.train.optimizer import build_optimizer
from jaxgpt.train.step import create_state, make_train_step

EVAL_CHUNK = 16  # sequences per evaluation call


def train_config(train: dict) -> TrainConfig:
    """The optimizer's settings of a sweep's [train] table as a checked `TrainConfig`."""
    return TrainConfig(max_steps=train["steps"], batch_size=train["batch_size"], lr=train["lr"],
                       min_lr=train["min_lr"], warmup_steps=min(train["warmup_steps"], train["steps"]),
                       weight_decay=train["weight_decay"], grad_clip=train["grad_clip"], optimizer=train["optimizer"])


@lru_cache(maxsize=32)
def compiled_train_step(config: GPTConfig, tcfg: TrainConfig):
    """(optimizer, jitted step) for a model config and budget, made once per process."""
    tx = build_optimizer(tcfg)
    return tx, jax.jit(make_train_step(GPT(config), tx), donate_argnums=0)


@lru_cache(maxsize=64)
def _predict(config: GPTConfig):
    """(params, x_bt, y_bt) -> (argmax predictions, per-token nll) at any length the config allows."""
    model = GPT(config)

    def predict(params, x_bt, y_bt):
        logp_btv = jax.nn.log_softmax(model.apply(params, x_bt).astype(jnp.float32), axis=-1)
        nll_bt = -jnp.take_along_axis(logp_btv, jnp.maximum(y_bt, 0)[..., None], axis=-1)[..., 0]
        return jnp.argmax(logp_btv, axis=-1), nll_bt

    return jax.jit(predict)


def score(task: ArenaTask, config: GPTConfig, params, x_bt: np.ndarray, y_bt: np.ndarray) -> float:
    """The task's metric of the model on one evaluation set: accuracy, or mean loss (nats/token)."""
    preds, nlls = [], []
    for i in range(0, len(x_bt), EVAL_CHUNK):
        pred_bt, nll_bt = _predict(config)(params, x_bt[i:i + EVAL_CHUNK], y_bt[i:i + EVAL_CHUNK])
        preds.append(np.asarray(pred_bt))
        nlls.append(np.asarray(nll_bt))
    if task.metric == "accuracy":
        return token_accuracy(np.concatenate(preds), y_bt)
    scored = y_bt != IGNORE
    return float(np.concatenate(nlls)[scored].mean())


def metric_key(task: ArenaTask, multiple: int, set_name: str | None = None) -> str:
    base = f"{'acc' if task.metric == 'accuracy' else 'loss'}@{multiple}L"
    return base if set_name is None else f"{base}/{set_name}"


def evaluate_lengths(task: ArenaTask, config: GPTConfig, params, length: int, multiples, n: int) -> dict:
    """The metric at each multiple of the training length, per evaluation set and averaged over
    them. Learned positions end at their table: beyond it the metric is None (n/a)."""
    out = {}
    for k in multiples:
        sets = task.eval_sets(length * k, n)
        if k > 1 and config.position == "learned":
            values = {s.name: None for s in sets}
        else:
            longer = config.replace(context_length=max(config.context_length, length * k))
            values = {s.name: score(task, longer, params, s.x_bt, s.y_bt) for s in sets}
        for name, v in values.items():
            out[metric_key(task, k, name)] = v
        known = [v for v in values.values() if v is not None]
        out[metric_key(task, k)] = float(np.mean(known)) if known else None
    return out


def train_task(task: ArenaTask, config: GPTConfig, train: dict, seed: int) -> tuple:
    """Train a fresh model (init from `seed`) for the sweep's budget on the task's batches.

    Returns (params, curve, stats): the curve has the training loss at every evaluation point and
    the metric at the training length on a held-out set; stats the tokens/s after compilation."""
    tcfg = train_config(train)
    tx, step_fn = compiled_train_step(config, tcfg)
    state = create_state(GPT(config), tx, init_params(config, seed), seed)
    length, batch, steps = train["length"], train["batch_size"], train["steps"]
    probe = task.eval_sets(length, train["eval_examples"], seed=1)  # a stream the final evaluation does not use
    curve, losses, start, eval_s = [], [], None, 0.0
    for i in range(steps):
        x_bt, y_bt = task.train_batch(seed, i, batch, length)
        state, metrics = step_fn(state, x_bt[None], y_bt[None])
        losses.append(metrics["loss"])
        if i == 0:
            jax.block_until_ready(state)
            start = time.perf_counter()
        if (i + 1) % train["eval_every"] == 0 or i + 1 == steps:
            t0 = time.perf_counter()
            loss = float(np.mean([float(v) for v in losses]))
            losses = []
            if not np.isfinite(loss):
                raise TrainingDiverged(f"training loss is {loss} at step {i + 1}")
            value = float(np.mean([score(task, config, state["params"], s.x_bt, s.y_bt) for s in probe]))
            curve.append({"step": i + 1, "train_loss": loss, task.metric: value})
            eval_s += time.perf_counter() - t0
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start - eval_s  # training steps only
    tokens_per_s = (steps - 1) * batch * length / elapsed if steps > 1 and elapsed > 0 else None
    return state["params"], curve, {"train_tokens_per_s": tokens_per_s}
