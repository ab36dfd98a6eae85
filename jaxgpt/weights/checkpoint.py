"""Orbax checkpoints, behind one small module.

A run directory holds `checkpoints/<step>/` (the last K, saved every N steps and on interrupt) and
`best/<step>/` (the one with the lowest validation loss). Each checkpoint has two items:
- `state`: the train state pytree (params, optimizer state, step, RNG key data);
- `meta`: JSON with the model and train configs, the tokenizer spec, the data position and the
  best validation loss, so generation and evaluation need nothing but the directory.
This module knows the state only as a pytree: training builds and resumes it (`jaxgpt.train`),
inference reads the parameters alone (`load_for_inference`).
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint restorable; saves are asynchronous (the host copy is taken
before `save` returns, the disk write overlaps training).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxgpt.config import GPTConfig
from jaxgpt.data.tokenizer import tokenizer_from_dict
from jaxgpt.weights import integrity
from jaxgpt.weights.finite import check_finite_params
from jaxgpt.plugins import check_recorded


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the requested model."""


def _short(error: Exception) -> str:
    """The first line of an Orbax/TensorStore error (their dumps run to dozens of lines), led by
    "the disk is full" when that is what it says deep inside."""
    text = str(error).strip().splitlines()
    first = text[0][:300] if text else type(error).__name__
    full = "No space left on device" in str(error) or "ENOSPC" in str(error)
    return f"the disk is full ({first})" if full else first


def _manager(directory: Path, keep: int, create: bool) -> ocp.CheckpointManager:
    directory = directory.absolute()

    def seal() -> None:  # after each finished save: its integrity record
        if jax.process_index() == 0:
            integrity.seal_finished_steps(directory)

    # cleanup_tmp_directories: a save killed half-way (its `<step>.orbax-checkpoint-tmp` folder) is
    # removed when the next manager opens the directory, so it never blocks a new save of that step
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=create,
                                           async_options=ocp.AsyncOptions(post_finalization_callback=seal))
    return ocp.CheckpointManager(directory, options=options)


class Checkpointer:
    """Saves the last `keep` checkpoints of a run and, separately, its best one; every finished
    step gets an integrity record (`jaxgpt.weights.integrity`)."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.latest = _manager(self.run_dir / "checkpoints", keep, create=True)
        self.best = _manager(self.run_dir / "best", 1, create=True)

    def save(self, step: int, state: dict, meta: dict, *, best: bool = False) -> None:
        manager = self.best if best else self.latest
        if step in manager.all_steps():
            step_dir = Path(manager.directory) / str(step)
            if jax.process_count() > 1 or integrity.problem(step_dir) is None:
                return
            # a damaged copy of this step (a resumed run skipped it): keep it aside, write it anew
            step_dir.rename(step_dir.with_name(f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"))
            manager.reload()
        if jax.process_count() > 1:
            # Orbax's cross-process barriers are named by step only: two managers saving the same
            # step at once would collide, so the other manager's save finishes first.
            (self.latest if best else self.best).wait_until_finished()
        meta = {**meta, integrity.SEALED_KEY: True}  # this step must carry an integrity record once finished
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            manager.save(step, args=args)
        except Exception as e:  # noqa: BLE001 - a full disk surfaces as one of many Orbax/OS errors
            raise CheckpointError(f"could not save step {step} in {manager.directory}: {_short(e)}") from e

    def latest_step(self) -> Optional[int]:
        """The newest periodic or best step saved so far (None before the first save)."""
        steps = [s for s in (self.latest.latest_step(), self.best.latest_step()) if s is not None]
        return max(steps, default=None)

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        for m in (self.latest, self.best):
            m.wait_until_finished()

    def close(self) -> None:
        """Wait for pending writes, record the integrity of what was written, release the managers."""
        errors = []
        for m in (self.latest, self.best):
            try:
                m.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{m.directory}: {_short(e)}")
            m.close()
            if jax.process_index() == 0:
                integrity.seal_finished_steps(Path(m.directory))
        if errors:
            raise CheckpointError(f"a checkpoint save did not finish ({'; '.join(errors)})")


@dataclass(frozen=True)
class Located:
    """A checkpoint step found on disk and checked: its manager directory and its step."""

    directory: Path
    step: int

    @property
    def path(self) -> Path:
        return self.directory / str(self.step)


def _saved_steps(directory: Path) -> list[int]:
    """Steps Orbax finished (renamed from their temporary folder), newest first; a half-written save
    (`<step>.orbax-checkpoint-tmp…`) is not one."""
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                  reverse=True) if directory.is_dir() else []


def _candidates(path: Path) -> list[tuple[Path, int]]:
    """The steps to try, newest first, for a run dir, a checkpoints
    dir or a step dir. A run's newest state is its latest periodic save, or its best one when that
    is newer (a run that died before or between periodic saves still has its last evaluation's)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such checkpoint path: {path}")
    if (path / "checkpoints").is_dir():
        found = [(path / "checkpoints", s) for s in _saved_steps(path / "checkpoints")]
        found += [(path / "best", s) for s in _saved_steps(path / "best")]
        return sorted(found, key=lambda c: (c[1], c[0].name == "checkpoints"), reverse=True)
    if path.name.isdigit() and path.is_dir():
        return [(path.parent, int(path.name))]
    return [(path, s) for s in _saved_steps(path)]


def _step_problem(step_dir: Path) -> Optional[str]:
    """What is wrong with a saved step (its integrity record, or Orbax's own files missing), or None."""
    wrong = integrity.problem(step_dir)
    if wrong is None and not (step_dir / "_CHECKPOINT_METADATA").exists() and not (step_dir / "meta").is_dir():
        wrong = "its checkpoint metadata (_CHECKPOINT_METADATA, meta/) is missing"
    return wrong


def locate(path, *, fallback: bool = False, quiet: bool = False) -> Located:
    """The step of `path` to load, checked against its integrity record.

    A damaged newest step is an error naming it and the newest intact step; with `fallback`
    (resuming a run) the newest intact step is used instead, and that is said on stderr (unless `quiet`).
    A step folder Orbax finished is never skipped silently: one with files missing (its metadata
    included) is damaged, and named.
    """
    if isinstance(path, Located):
        return path
    candidates = _candidates(path)
    if not candidates:
        directory = Path(path).expanduser()
        directory = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
        unfinished = [p.name for p in directory.iterdir() if "tmp" in p.name] if directory.is_dir() else []
        hint = (f" (only unfinished saves, from a run stopped while saving: {unfinished}; start the run afresh "
                "without --resume)") if unfinished else ""
        raise CheckpointError(f"no checkpoint found in {directory}{hint}")
    damaged = []
    for directory, step in candidates:
        wrong = _step_problem(directory / str(step))
        if wrong is None:
            if damaged and not fallback:
                first = damaged[0]
                raise CheckpointError(f"checkpoint {first[0]} is corrupt ({first[1]}); the newest intact step is "
                                      f"{directory / str(step)}")
            if damaged and not quiet:
                print(f"[jaxgpt] checkpoint {damaged[0][0]} is corrupt ({damaged[0][1]}); using the newest intact "
                      f"step, {directory / str(step)}", file=sys.stderr)
            return Located(directory, step)
        damaged.append((directory / str(step), wrong))
    listed = "; ".join(f"{p} is corrupt ({why})" for p, why in damaged[:3])
    raise CheckpointError(f"no intact checkpoint in {path}: {listed}")


def find_checkpoint(path) -> tuple[ocp.CheckpointManager, int]:
    """An open manager and the (checked) step to restore, or a `CheckpointError` saying what is wrong."""
    found = locate(path)
    return _manager(found.directory, keep=1_000_000, create=False), found.step


def read_meta(path: Path, required: tuple[str, ...] = ("model", "train", "tokenizer")) -> dict:
    """The JSON metadata of a checkpoint, checked to hold the `required` entries."""
    manager, step = find_checkpoint(path)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - Orbax raises many types; report them as one
        raise CheckpointError(f"cannot read the metadata of checkpoint {manager.directory}/{step}: {_short(e)}") from e
    finally:
        manager.close()
    for key in required:
        if key not in meta:
            raise CheckpointError(f"checkpoint {manager.directory}/{step} metadata has no {key!r} entry")
    check_recorded(meta.get("plugins"), f"checkpoint {manager.directory}/{step}")
    return meta


def _default_sharding(abstract_state: Any) -> Any:
    """Leaves without a sharding go to the first local device (so a checkpoint written on a mesh of
    many devices restores onto one)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        abstract_state)


def restore(path: Path, abstract_state: Any) -> tuple[dict, dict]:
    """(state, meta) of the checkpoint at `path`, restored onto the shapes (and shardings) of
    `abstract_state`; leaves without a sharding land on the first local device."""
    abstract_state = _default_sharding(abstract_state)
    manager, step = find_checkpoint(path)
    try:
        items = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step} is corrupt or does not fit this model/optimizer: {_short(e)}"
        ) from e
    finally:
        manager.close()
    return items["state"], items["meta"]


def check_compatible(saved: dict, requested: GPTConfig) -> None:
    """Raise naming every model-config field where the checkpoint differs from the request.

    Fields a checkpoint predates take their defaults (the architecture it was trained with)."""
    saved = GPTConfig.from_dict(saved).to_dict()
    diffs = {k: (saved.get(k), v) for k, v in requested.to_dict().items() if saved.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint was written for a different model config ({detail})")


def model_params_entry(manager: ocp.CheckpointManager, step: int) -> str:
    """Which entry of a checkpoint's state is its model: "eval_params" where the run saved them (a
    schedule-free run's averaged parameters: `jaxgpt.train.optimizer.checkpoint_tree`), else "params"."""
    state_tree = ocp.PyTreeCheckpointHandler().metadata(Path(manager.directory) / str(step) / "state").tree
    return "eval_params" if "eval_params" in state_tree else "params"


def restore_params(path: Path, abstract_params: Any) -> dict:
    """Only the model's parameters of the checkpoint at `path` (its `state["params"]`, or
    `state["eval_params"]` when saved), restored onto the shapes of `abstract_params` ({"params": ...}
    of `ShapeDtypeStruct`s): the optimizer state is never read, so inference needs neither an
    optimizer nor a train state."""
    manager, step = find_checkpoint(path)
    try:
        key = model_params_entry(manager, step)
        abstract = {key: _default_sharding(abstract_params)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        items = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {manager.directory}/{step} is corrupt or does not fit this model: {_short(e)}") from e
    finally:
        manager.close()
    return items["state"][key]


def load_for_inference(path: Path):
    """(params, model config, tokenizer) from a run or checkpoint directory, parameters only, in
    GPT-2's layout (a run trained with `scan_layers` comes back unstacked, its config with
    scan_layers=False: the same function, and what export, finetuning and LoRA address by block name)."""
    from jaxgpt.nn.layout import unstack_layers
    from jaxgpt.nn.model import param_shapes  # imported here: the CLI's light commands never pay for Flax

    found = locate(path)  # checked once, read twice
    meta = read_meta(found, required=("model", "tokenizer"))
    config = GPTConfig.from_dict(meta["model"])
    params = restore_params(found, param_shapes(config))
    check_finite_params(params, f"checkpoint {found.path}")
    return unstack_layers(params), config.replace(scan_layers=False), tokenizer_from_dict(meta["tokenizer"])
