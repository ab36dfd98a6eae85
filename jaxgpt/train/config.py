"""Training configuration and the `section.field=value` overrides of the command line.

`TrainConfig` is frozen and validated like `GPTConfig`; a run is described completely by
(model config, train config, tokenizer), all three stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from jaxgpt.config import ConfigError, GPTConfig, check_finite_numbers

OPTIMIZERS = ("adamw", "muon", "schedule_free_adamw")  # jaxgpt.train.optimizer.build_optimizer


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str = "python-docs"  # named corpus, text file, or a `jaxgpt data prepare` directory
    tokenizer: str = "char"  # "char" (built from the corpus), "gpt2", or a trained tokenizer's directory
    train_ratio: float = 0.9  # first part of the token stream trains, the rest validates
    sampling: str = "random"  # "random" windows (pure function of seed, step) or "epochs" (book-style, shuffled)
    stride: Optional[int] = None  # window stride for "epochs" sampling (default: context length)
    # batch: batch_size sequences per optimizer step, split over devices, then into micro-batches
    batch_size: int = 16
    micro_batches: int = 1  # gradient accumulation: micro-batches per optimizer step
    steps_per_call: int = 1  # optimizer steps per compiled call (a lax.scan over them): less dispatch and host
    # work per step for small models; side work (logging, evaluation, checkpoints) falls between calls
    context_length: Optional[int] = None  # training window (default: the model's context length)
    max_steps: int = 600
    # optimizer: AdamW (or Muon on the hidden matrices + AdamW on the rest) with linear warmup, then cosine
    # decay to min_lr or warmup-stable-decay (docs/training.md)
    optimizer: str = "adamw"  # "adamw", "muon" or "schedule_free_adamw" (warmup then constant lr; no schedule)
    schedule: str = "cosine"  # "cosine" or "wsd" (warmup, constant, then linear decay to min_lr)
    decay_fraction: float = 0.2  # wsd: the share of the steps after warmup spent decaying
    muon_lr: float = 0.02  # Muon's peak learning rate (its schedule has the shape of lr's)
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.0  # decoupled, times the Muon learning rate
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    decay_steps: Optional[int] = None  # steps of warmup + cosine decay (default: max_steps of the run's start;
    # recorded then, so extending a run with a larger max_steps keeps its schedule; min_lr after it)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip by global norm; 0 disables
    decay_embeddings: bool = False  # weight decay on wte/wpe (off by default, as nanoGPT)
    # schedule of side work, in optimizer steps
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 200
    eval_tasks: Optional[str] = None  # task names or files (`jaxgpt evaluate`), comma-separated, scored during training
    eval_tasks_every: Optional[int] = None  # every this many steps (default: eval_every) and at the last step
    eval_tasks_limit: Optional[int] = None  # examples per task (default: each task's own)
    fingerprint_every: Optional[int] = None  # log a bit-exact parameter checksum (jaxgpt.train.fingerprint)
    # every this many steps (default: log_every; 0: never), for `jaxgpt compare-runs`
    keep_checkpoints: int = 3
    samples: int = 3  # generated samples printed at the end
    sample_tokens: int = 200
    # run
    seed: int = 0
    devices: Optional[int] = None  # local devices for pmap data parallelism (default: all)
    deterministic_reduce: int = 0  # S > 0: gradients of S fixed shards summed in a fixed tree, so the run is
    # bitwise the same on any device count (S a power of two; jaxgpt.train.deterministic)
    mesh: Optional[str] = None  # e.g. "data=2,fsdp=2": sharded jit over all processes' devices instead of pmap
    target_val_loss: Optional[float] = None  # stop (saving a checkpoint) at the first evaluation at or below it
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU (default: measured by a matmul probe)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        positive = ("batch_size", "micro_batches", "steps_per_call", "max_steps", "log_every", "eval_every", "eval_batches",
                    "ckpt_every", "keep_checkpoints")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("stride", "context_length", "decay_steps", "devices", "eval_tasks_every", "eval_tasks_limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"TrainConfig.{name} must be a positive integer or unset, got {v!r}")
        if self.fingerprint_every is not None and (isinstance(self.fingerprint_every, bool)
                                                   or not isinstance(self.fingerprint_every, int)
                                                   or self.fingerprint_every < 0):
            raise ConfigError(f"TrainConfig.fingerprint_every must be a non-negative integer or unset, "
                              f"got {self.fingerprint_every!r}")
        for name in ("warmup_steps", "samples", "sample_tokens", "seed", "deterministic_reduce"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ConfigError(f"TrainConfig.train_ratio must be in (0, 1), got {self.train_ratio}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"TrainConfig needs 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"TrainConfig.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("TrainConfig.eps must be > 0 and weight_decay, grad_clip >= 0")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:  # a directory is checked when it is read
            raise ConfigError(f"TrainConfig.tokenizer must be 'char', 'gpt2' or the directory of a tokenizer made by "
                              f"`jaxgpt tokenizer train`, got {self.tokenizer!r}")
        if self.sampling not in ("random", "epochs"):
            raise ConfigError(f"TrainConfig.sampling must be 'random' or 'epochs', got {self.sampling!r}")
        if self.batch_size % self.micro_batches:
            raise ConfigError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by micro_batches ({self.micro_batches})"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"TrainConfig.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "schedule_free_adamw" and not 0.0 < self.beta1 < 1.0:
            raise ConfigError(f"schedule-free AdamW needs 0 < beta1 < 1 (its interpolation weight), got {self.beta1}")
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"TrainConfig.schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"TrainConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0 or self.muon_weight_decay < 0:
            raise ConfigError(f"TrainConfig needs muon_lr > 0, 0 <= muon_momentum < 1 and muon_weight_decay >= 0, got "
                              f"{self.muon_lr}, {self.muon_momentum}, {self.muon_weight_decay}")
        if isinstance(self.muon_ns_steps, bool) or not isinstance(self.muon_ns_steps, int) or self.muon_ns_steps < 1:
            raise ConfigError(f"TrainConfig.muon_ns_steps must be a positive integer, got {self.muon_ns_steps!r}")
        if self.target_val_loss is not None and self.target_val_loss <= 0:
            raise ConfigError(f"TrainConfig.target_val_loss must be positive, got {self.target_val_loss}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"TrainConfig.peak_flops must be positive, got {self.peak_flops}")

    @property
    def total_decay_steps(self) -> int:
        return self.decay_steps or self.max_steps

    def replace(self, **changes: Any) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {sorted(unknown)}")
        return cls(**d)


def _parse_value(text: str, current: Any, field: dataclasses.Field, where: str) -> Any:
    """Convert the text of an override to the type of the field it sets."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    low = text.strip().lower()
    if low in ("none", "null") and "Optional" in kind:
        return None
    try:
        if "bool" in kind:
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if "int" in kind:
            return int(text)
        if "float" in kind:
            return float(text)
    except ValueError:
        raise ConfigError(f"{where}: cannot read {text!r} as {kind}") from None
    return text


def apply_overrides(model: GPTConfig, train: TrainConfig, overrides: list[str]) -> tuple[GPTConfig, TrainConfig]:
    """Apply `section.field=value` strings (section `model` or `train`) with type checks."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    targets = {"model": model, "train": train}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.field=value (section: model or train)")
        key, text = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in targets:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; use 'model' or 'train'")
        fields = {f.name: f for f in dataclasses.fields(targets[section])}
        if name not in fields:
            raise ConfigError(f"override {item!r}: {section} has no field {name!r}; fields: {sorted(fields)}")
        changes[section][name] = _parse_value(text, getattr(targets[section], name), fields[name], item)
    return model.replace(**changes["model"]), train.replace(**changes["train"])
