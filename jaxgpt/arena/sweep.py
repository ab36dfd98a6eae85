"""The sweep file: what `jaxgpt arena SWEEP.toml` runs, read and checked before anything trains.

```toml
baseline = "mha"            # the variant every other is tested against (default: the first)
seeds = [0, 1, 2]
lengths = [1, 2, 4, 8]      # evaluation lengths, as multiples of the training length
match = "none"              # "params" or "flops": the arena sets each variant's mlp_hidden to match the baseline
cost = true                 # measure each variant's cost (parameters, FLOPs, KV bytes, speeds, memory)

[model]                     # GPTConfig fields shared by every variant (vocab_size comes from the task)
n_layers = 2
[train]                     # the budget, the same for every variant: steps × batch × length tokens
steps = 400
batch_size = 32
length = 64
[tasks.mqar]                # a task and its options (jaxgpt.arena.tasks)
pairs = [2, 4, 8]
[variants.mha]              # a named variant: GPTConfig overrides
[variants.gqa]
n_kv_heads = 2
[compare]                   # optional: p-values of a variant against another than the baseline
qk-norm = "rope"
[smoke]                     # what --smoke changes: variants (a count or names), tasks, seeds,
                            # lengths, and [smoke.train] / [smoke.model] tables (defaults: SMOKE_DEFAULTS)
```

Every variant trains on the same batches (a pure function of task, seed and step) for the same
number of tokens; the parameter init depends on the seed only.
"""

from __future__ import annotations

import re

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxgpt.arena.tasks import ArenaTask, TaskError, task_of
from jaxgpt.config import ConfigError, GPTConfig

TRAIN_DEFAULTS = {
    "steps": 400, "batch_size": 32, "length": 64, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 40,
    "weight_decay": 0.1, "grad_clip": 1.0, "optimizer": "adamw", "eval_every": 50, "eval_examples": 64,
    "cost_repeats": 3,
}
MODEL_DEFAULTS = {"n_layers": 2, "n_heads": 4, "emb_dim": 64, "drop_rate": 0.0, "tie_embeddings": False}
SMOKE_DEFAULTS = {"seeds": [0, 1], "variants": 2, "lengths": [1, 2],
                  "train": {"steps": 3, "batch_size": 4, "eval_every": 2, "eval_examples": 4, "cost_repeats": 1}}
MATCH = ("none", "params", "flops")
TOP_KEYS = {"plugins", "baseline", "seeds", "lengths", "match", "model", "train", "tasks", "variants", "smoke", "title", "compare",
            "cost"}


class SweepError(ValueError):
    """The sweep file is wrong; the message names the key."""


@dataclass(frozen=True)
class Sweep:
    title: str
    variants: dict[str, dict[str, Any]]  # name -> GPTConfig overrides (matched widths included)
    baseline: str
    seeds: tuple[int, ...]
    lengths: tuple[int, ...]
    match: str
    model: dict[str, Any]
    train: dict[str, Any]
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare: dict[str, str] = field(default_factory=dict)  # variant -> the variant its p-values are against
    cost: bool = True  # measure each variant's cost (a "cost" run per variant and seed)
    plugins: tuple[str, ...] = ()  # plugin files (resolved paths) that register kinds the variants use

    def reference_of(self, variant: str) -> str:
        return self.compare.get(variant, self.baseline)

    def model_config(self, variant: str, vocab_size: int, context_length: int | None = None) -> GPTConfig:
        """The variant's model for a task's vocabulary (context: the training length by default)."""
        fields = {**self.model, **self.variants[variant], "vocab_size": vocab_size,
                  "context_length": context_length or self.train["length"]}
        return GPTConfig(**fields)

    def task(self, name: str) -> ArenaTask:
        """The task `name` with the sweep's options for it."""
        return task_of(name, self.tasks[name])

    def metric_prefix(self, task: str) -> str:
        """How the task's metrics are named: "acc" (accuracy, higher is better) or "loss"."""
        return "acc" if self.task(task).metric == "accuracy" else "loss"

    def runs(self) -> list[tuple[str, int, str]]:
        """(variant, seed, task) of every run, "cost" the cost measurement of a variant and seed."""
        return [(v, s, t) for v in self.variants for s in self.seeds for t in (*self.tasks, *(("cost",) if self.cost else ()))]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_int_list(name: str, value, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           and v >= minimum for v in value):
        raise SweepError(f"sweep: {name} must be a non-empty list of integers >= {minimum}, got {value!r}")
    if len(set(value)) != len(value):
        raise SweepError(f"sweep: {name} has repeated values: {value}")
    return tuple(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise SweepError(f"sweep: {name} must be true or false, got {value!r}")
    return value


def folder_name(name: str) -> str:
    """The folder a variant's (or task's) runs go in: its name with anything but letters, digits,
    `_`, `.` and `-` made `-`, and no leading or trailing dots or dashes (so never `.` or `..`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "x"


def _check_folder_names(what: str, names) -> None:
    """Two names that would share a run folder (here, or on a case-insensitive disk) are refused:
    the second's results would overwrite the first's."""
    seen: dict[str, str] = {}
    for name in names:
        key = folder_name(name).casefold()
        if key in seen:
            raise SweepError(f"sweep: {what} {seen[key]!r} and {name!r} would share the run folder "
                             f"{folder_name(name)!r}: rename one")
        seen[key] = name


def parse_sweep(raw: dict, *, smoke: bool = False) -> Sweep:
    """A checked `Sweep` from the TOML's dict (`smoke`: with the [smoke] changes applied). Its
    `plugins` are imported first: the variants may name kinds they register."""
    from jaxgpt.plugins import load_plugins

    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SweepError(f"sweep: unknown keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    plugins = tuple(str(Path(p).expanduser().resolve()) for p in raw.get("plugins", ()))
    load_plugins(plugins)
    variants = raw.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise SweepError("sweep: [variants.NAME] tables are needed (one per variant, GPTConfig overrides)")
    tasks = raw.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise SweepError("sweep: [tasks.NAME] tables are needed (one per task; see jaxgpt.arena.tasks.TASKS)")
    if "cost" in tasks:
        raise SweepError("sweep: 'cost' is the name of the cost measurement, not a task")
    _check_folder_names("variants", variants)
    _check_folder_names("tasks", [*tasks, "cost"])
    train = {**TRAIN_DEFAULTS, **raw.get("train", {})}
    unknown = set(train) - set(TRAIN_DEFAULTS)
    if unknown:
        raise SweepError(f"sweep: [train] has unknown keys {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    model = {**MODEL_DEFAULTS, **raw.get("model", {})}
    seeds, lengths = raw.get("seeds", [0, 1, 2]), raw.get("lengths", [1, 2, 4, 8])
    if smoke:
        changes = {**SMOKE_DEFAULTS, **raw.get("smoke", {})}
        seeds, lengths = changes["seeds"], changes["lengths"]
        train = {**train, **SMOKE_DEFAULTS["train"], **changes.get("train", {})}
        model = {**model, **changes.get("model", {})}
        keep = changes["variants"]
        names = list(variants)[:keep] if isinstance(keep, int) else keep
        baseline = raw.get("baseline", next(iter(variants)))
        variants = {k: variants[k] for k in dict.fromkeys([baseline, *names]) if k in variants}
        if "tasks" in changes:
            missing = [t for t in changes["tasks"] if t not in tasks]
            if missing:
                raise SweepError(f"sweep: [smoke] tasks {missing} are not tasks of the sweep {list(tasks)}")
            tasks = {t: tasks[t] for t in changes["tasks"]}
    baseline = raw.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise SweepError(f"sweep: baseline {baseline!r} is not one of the variants {list(variants)}")
    match = raw.get("match", "none")
    if match not in MATCH:
        raise SweepError(f"sweep: match must be one of {MATCH}, got {match!r}")
    compare = {k: v for k, v in raw.get("compare", {}).items() if k in variants}
    for name, reference in compare.items():
        if reference not in variants:
            raise SweepError(f"sweep: [compare] {name} = {reference!r}: no such variant in {list(variants)}")
    sweep = Sweep(title=str(raw.get("title", "arena sweep")), variants={k: dict(v) for k, v in variants.items()},
                  baseline=baseline, seeds=_check_int_list("seeds", seeds), lengths=_check_int_list("lengths", lengths, 1),
                  match=match, model=model, train=train, tasks={k: dict(v) for k, v in tasks.items()}, compare=compare,
                  cost=_check_bool("cost", raw.get("cost", True)), plugins=plugins)
    _check_configs(sweep)
    return sweep


def _check_configs(sweep: Sweep) -> None:
    """Build every variant × task config and task once, so a typo fails before hours of training."""
    for name in ("steps", "batch_size", "length", "eval_every", "eval_examples", "cost_repeats"):
        v = sweep.train[name]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SweepError(f"sweep: [train] {name} must be a positive integer, got {v!r}")
    for task_name, options in sweep.tasks.items():
        try:
            task = task_of(task_name, options)
            task.check_length(sweep.train["length"])
        except TaskError as e:
            raise SweepError(f"sweep: [tasks.{task_name}]: {e}") from None
        for variant in sweep.variants:
            try:
                sweep.model_config(variant, task.vocab_size)
            except (ConfigError, TypeError) as e:
                raise SweepError(f"sweep: variant {variant!r}: {e}") from None


def load_sweep(path: str | Path, *, smoke: bool = False) -> Sweep:
    """Read and check a sweep file, then apply the parameter/FLOP matching it asks for."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: not a valid TOML file: {e}") from None
    plugins = raw.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise SweepError(f"sweep: plugins must be a list of file paths, got {plugins!r}")
    raw["plugins"] = [str((path.parent / p).resolve()) for p in plugins]  # relative to the sweep file
    sweep = parse_sweep(raw, smoke=smoke)
    if sweep.match != "none":
        from jaxgpt.arena.matching import match_widths  # JAX is needed from here on
        sweep = dataclasses.replace(sweep, variants=match_widths(sweep))
    return sweep


