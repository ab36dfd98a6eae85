"""What every finetuning task shares: which parameters train, the optimizer that enforces it, one
jitted step, the epoch loop with logging, and finetuned checkpoints.

A finetuning parameter tree is `{"gpt": <model params>, "head": {kernel, bias} (classification),
"lora": <adapters> (LoRA)}`. `trainable_mask` says, leaf by leaf, what trains; the optimizer gives
frozen leaves no state and no update (`optax.set_to_zero`), the step stops their gradients (so XLA
skips that work) and copies them through unchanged — frozen weights are bit-identical after training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.config import ConfigError, GPTConfig, check_finite_numbers
from jaxgpt.data.corpus import DataError
from jaxgpt.finetune.lora import LoRAConfig, init_lora, merge_lora
from jaxgpt.train.optimizer import adamw
from jaxgpt.weights.finite import non_finite_tensors

TRAINABLE = ("head", "last-block", "all", "lora")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5  # the book's chapters 6 and 7
    weight_decay: float = 0.1
    grad_clip: float = 0.0  # global-norm clipping; 0 = none (the book clips nothing)
    trainable: str = "last-block"  # "head", "last-block" (last block + final LayerNorm + head), "all", "lora"
    lora: Optional[LoRAConfig] = None  # required when trainable == "lora"
    lora_train_head: bool = True  # with LoRA, train the (new) head too
    drop_rate: Optional[float] = None  # dropout while finetuning (default: the model's own)
    seed: int = 123  # the book's seed
    log_every: int = 10

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        for name in ("epochs", "batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"finetune {name} must be a positive integer, got {v!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("finetune lr must be > 0 and weight_decay, grad_clip >= 0")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"finetune trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if (self.trainable == "lora") != (self.lora is not None):
            raise ConfigError("a LoRA config is needed exactly when trainable == 'lora'")
        if self.drop_rate is not None and not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"finetune drop_rate must be in [0, 1), got {self.drop_rate}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = self.lora.to_dict() if self.lora else None
        return d


def path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", str(k)) for k in path)


def trainable_mask(params: dict, cfg: FinetuneConfig, n_layers: int) -> dict:
    """A bool per leaf of `params`: True where finetuning with `cfg.trainable` updates it."""
    last_block = f"h_{n_layers - 1}"
    has_head = "head" in params

    def is_head(names) -> bool:
        return names[0] == "head" or (not has_head and names[:2] == ("gpt", "lm_head"))

    def trains(path, leaf) -> bool:
        names = path_names(path)
        if cfg.trainable == "all":
            return names[0] != "lora"
        if cfg.trainable == "lora":
            return names[0] == "lora" or (cfg.lora_train_head and is_head(names))
        if cfg.trainable == "head":
            return is_head(names)
        return is_head(names) or names[:2] in (("gpt", last_block), ("gpt", "ln_f"))  # last-block

    mask = jax.tree_util.tree_map_with_path(trains, params)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError(f"trainable={cfg.trainable!r} selects no parameter of this model")
    return mask


def count_trainable(params: dict, mask: dict) -> int:
    return sum(math.prod(p.shape) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)


def build_finetune_optimizer(cfg: FinetuneConfig, mask: dict) -> optax.GradientTransformation:
    """Pretraining's AdamW (`jaxgpt.train.optimizer.adamw`: decay on matrices and adapters) on the
    trainable leaves, at a constant learning rate; frozen leaves get no state and no update."""
    opt = adamw(cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


def model_params(params: dict, lora_cfg: Optional[LoRAConfig]) -> dict:
    """The GPT parameters the forward pass uses: `params["gpt"]`, with adapters merged if any."""
    if lora_cfg is None or "lora" not in params:
        return params["gpt"]
    return merge_lora(params["gpt"], params["lora"], lora_cfg.scale)


def with_lora(gpt_params: dict, cfg: FinetuneConfig, key: jax.Array) -> dict:
    """{"gpt": params} plus fresh adapters when finetuning with LoRA."""
    tree = {"gpt": gpt_params}
    if cfg.lora is not None:
        tree["lora"] = init_lora(gpt_params, cfg.lora, key)
    return tree


def shuffled_index_batches(n_examples: int, batch_size: int, seed: int):
    """(steps per epoch, epoch -> index arrays of its batches): reshuffled every epoch, the last
    partial batch dropped (the book's data loader)."""
    steps = n_examples // batch_size
    if steps == 0:
        raise DataError(f"{n_examples} training examples do not fill one batch of {batch_size}")
    rng = np.random.default_rng(seed)

    def batches(epoch: int):
        order = rng.permutation(n_examples)
        for s in range(steps):
            yield order[s * batch_size:(s + 1) * batch_size]

    return steps, batches


LossFn = Callable[..., tuple[jax.Array, Any]]  # (params, batch, rng, deterministic) -> (loss, aux)


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, mask: dict):
    """A jitted (params, opt_state, batch, rng) -> (params, opt_state, loss, aux) update."""

    def step(params, opt_state, batch, rng):
        def objective(p):
            p = jax.tree.map(lambda x, trains: x if trains else jax.lax.stop_gradient(x), p, mask)
            return loss_fn(p, batch, rng, deterministic=False)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u, trains: p + u if trains else p, params, updates, mask)
        return params, opt_state, loss, aux

    return jax.jit(step, donate_argnums=(0, 1))


@jax.jit
def _first_bad_step(first_bad, loss, step):
    return jnp.where((first_bad == 0) & ~jnp.isfinite(loss), step, first_bad)


def _refuse_non_finite(first_bad: int, params: Optional[dict], epoch: Optional[int] = None) -> None:
    """FloatingPointError when a step's loss was not finite, or (at an epoch's end, before it is
    evaluated and saved) when a parameter is not: nothing non-finite is ever written."""
    if first_bad:
        raise FloatingPointError(f"finetuning loss became non-finite at step {first_bad}; nothing from that step on "
                                 "was saved. Lower the lr, or check the settings (e.g. --beta) for NaN or inf")
    bad = non_finite_tensors(params)[0] if params is not None else []
    if bad:
        raise FloatingPointError(f"{', '.join(bad[:3])} became non-finite in epoch {epoch}; its model was not saved. "
                                 "Lower the lr, or check the settings for NaN or inf")


class FinetuneInterrupted(RuntimeError):
    """Ctrl-C during finetuning; the parameters of the last finished epoch were saved."""


def fit(params: dict, cfg: FinetuneConfig, mask: dict, loss_fn: LossFn,
        epoch_batches: Callable[[int], Iterable[dict]], steps_per_epoch: int,
        end_of_epoch: Callable[[dict, int, int], dict], log: Callable[[dict], None], progress: bool = True) -> dict:
    """Train for `cfg.epochs` epochs; after each, `end_of_epoch(params, epoch, step)` evaluates (and saves).

    Logs {"step", "epoch", "train_loss", "examples_per_s"} every `log_every` steps. Returns the params.
    """
    from tqdm import tqdm

    tx = build_finetune_optimizer(cfg, mask)
    opt_state = tx.init(params)
    step_fn = make_step(loss_fn, tx, mask)
    rng = jax.random.key(cfg.seed)
    step, t_log, n_log = 0, time.perf_counter(), 0
    first_bad = jnp.int32(0)  # the first step whose loss was not finite (0: none), kept on the device
    bar = tqdm(total=cfg.epochs * steps_per_epoch, disable=not progress, desc="finetune", file=sys.stderr)
    try:
        for epoch in range(1, cfg.epochs + 1):
            for batch in epoch_batches(epoch):
                rng, step_rng = jax.random.split(rng)
                params, opt_state, loss, _ = step_fn(params, opt_state, batch, step_rng)
                step += 1
                first_bad = _first_bad_step(first_bad, loss, step)
                n_log += len(next(iter(batch.values())))
                bar.update(1)
                if step % cfg.log_every == 0:
                    _refuse_non_finite(int(first_bad), params=None)
                    loss = float(loss)
                    now = time.perf_counter()
                    log({"step": step, "epoch": epoch, "train_loss": loss, "examples_per_s": n_log / (now - t_log)})
                    bar.set_postfix(loss=f"{loss:.3f}")
                    t_log, n_log = now, 0
            _refuse_non_finite(int(first_bad), params, epoch)  # before anything of this epoch is saved
            log({"step": step, "epoch": epoch, **end_of_epoch(params, epoch, step)})
    except KeyboardInterrupt as e:
        raise FinetuneInterrupted(f"interrupted in epoch {epoch}; the last finished epoch's model was saved") from e
    finally:
        bar.close()
    return params


# --- finetuned checkpoints: {"params": tree} + JSON meta, through the same Orbax manager --------

def save_finetuned(run_dir: Path, step: int, params: dict, meta: dict) -> None:
    from jaxgpt.atomic import write_json
    from jaxgpt.weights.checkpoint import Checkpointer

    ckpt = Checkpointer(Path(run_dir), keep=1)
    ckpt.save(step, {"params": params}, meta)
    ckpt.close()
    write_json(Path(run_dir) / "config.json", meta)


def load_finetuned(path: Path, build_abstract: Callable[[dict], dict], task: str) -> tuple[dict, dict]:
    """(params, meta) of a finetuned checkpoint of `task`; `build_abstract(meta)` gives its shapes."""
    from jaxgpt.weights.checkpoint import CheckpointError, read_meta, restore

    meta = read_meta(path, required=("model", "tokenizer"))
    if meta.get("task") != task:
        raise CheckpointError(f"{path} is not a {task!r} finetuning checkpoint (task: {meta.get('task')!r})")
    state, _ = restore(path, {"params": jax.eval_shape(lambda: build_abstract(meta))})
    return state["params"], meta


def gpt_config_for_finetuning(config: GPTConfig, cfg: FinetuneConfig) -> GPTConfig:
    return config if cfg.drop_rate is None else config.replace(drop_rate=cfg.drop_rate)


def json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_results(path: Path, results: dict) -> None:
    Path(path).write_text(json.dumps(results, indent=2, default=json_default))
