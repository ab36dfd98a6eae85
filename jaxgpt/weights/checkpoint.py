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

import json
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxgpt.config import GPTConfig
from jaxgpt.data.tokenizer import tokenizer_from_dict


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the requested model."""


def _manager(directory: Path, keep: int, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpointer:
    """Saves the last `keep` checkpoints of a run and, separately, its best one."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.latest = _manager(self.run_dir / "checkpoints", keep, create=True)
        self.best = _manager(self.run_dir / "best", 1, create=True)

    def save(self, step: int, state: dict, meta: dict, *, best: bool = False) -> None:
        manager = self.best if best else self.latest
        if step in manager.all_steps():
            return
        if jax.process_count() > 1:
            # Orbax's cross-process barriers are named by step only: two managers saving the same
            # step at once would collide, so the other manager's save finishes first.
            (self.latest if best else self.best).wait_until_finished()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args)

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def close(self) -> None:
        """Wait for pending writes and release the managers."""
        for m in (self.latest, self.best):
            m.wait_until_finished()
            m.close()


def _resolve(path: Path) -> tuple[Path, Optional[int]]:
    """(manager directory, step or None for latest) for a run dir, a checkpoints dir or a step dir."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such checkpoint path: {path}")
    if (path / "checkpoints").is_dir():
        # a run's newest state: its latest periodic save, or its best one when that is newer (a run
        # that died before or between periodic saves still has the state of its last evaluation)
        newest = lambda d: max((int(p.name) for p in d.iterdir() if p.name.isdigit()), default=-1) if d.is_dir() else -1  # noqa: E731
        if newest(path / "best") > newest(path / "checkpoints"):
            return path / "best", None
        return path / "checkpoints", None
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    return path, None


def find_checkpoint(path: Path) -> tuple[ocp.CheckpointManager, int]:
    """An open manager and the step to restore, or a `CheckpointError` saying what is wrong."""
    directory, step = _resolve(path)
    manager = _manager(directory, keep=1_000_000, create=False)
    steps = manager.all_steps()
    if not steps:
        unfinished = [p.name for p in directory.iterdir() if "tmp" in p.name] if directory.is_dir() else []
        hint = f" (only unfinished saves: {unfinished})" if unfinished else ""
        raise CheckpointError(f"no checkpoint found in {directory}{hint}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"{directory} has no finished checkpoint for step {step}; it has {sorted(steps)}")
    return manager, step


def read_meta(path: Path, required: tuple[str, ...] = ("model", "train", "tokenizer")) -> dict:
    """The JSON metadata of a checkpoint, checked to hold the `required` entries."""
    manager, step = find_checkpoint(path)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - Orbax raises many types; report them as one
        raise CheckpointError(f"cannot read the metadata of checkpoint {manager.directory}/{step}: {e}") from e
    finally:
        manager.close()
    for key in required:
        if key not in meta:
            raise CheckpointError(f"checkpoint {manager.directory}/{step} metadata has no {key!r} entry")
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
            f"checkpoint {manager.directory}/{step} is corrupt or does not fit this model/optimizer: {e}"
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


def restore_params(path: Path, abstract_params: Any) -> dict:
    """Only the parameters of the checkpoint at `path` (its `state["params"]`), restored onto the
    shapes of `abstract_params` ({"params": ...} of `ShapeDtypeStruct`s): the optimizer state is
    never read, so inference needs neither an optimizer nor a train state."""
    abstract = {"params": _default_sharding(abstract_params)}
    manager, step = find_checkpoint(path)
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        items = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {manager.directory}/{step} is corrupt or does not fit this model: {e}") from e
    finally:
        manager.close()
    return items["state"]["params"]


def load_for_inference(path: Path):
    """(params, model config, tokenizer) from a run or checkpoint directory, parameters only, in
    GPT-2's layout (a run trained with `scan_layers` comes back unstacked, its config with
    scan_layers=False: the same function, and what export, finetuning and LoRA address by block name)."""
    from jaxgpt.nn.layout import unstack_layers
    from jaxgpt.nn.model import param_shapes  # imported here: the CLI's light commands never pay for Flax

    meta = read_meta(path, required=("model", "tokenizer"))
    config = GPTConfig.from_dict(meta["model"])
    params = restore_params(path, param_shapes(config))
    return unstack_layers(params), config.replace(scan_layers=False), tokenizer_from_dict(meta["tokenizer"])


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
