"""A run directory's records: the metadata stored with every checkpoint, the checks that decide
whether a run may be resumed with the configs asked for, and a fresh run made from given weights.

A run directory holds:
    config.json        model + train config + tokenizer
    metrics.jsonl      one record per log step ("train") and per evaluation ("eval")
    checkpoints/ best/ Orbax checkpoints (`jaxgpt.weights.checkpoint`)
    loss.png           train/val loss against steps and tokens seen
    summary.json       final figures
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from jaxgpt.atomic import write_json, write_text
from jaxgpt.plugins import loaded_records
from jaxgpt.config import GPTConfig
from jaxgpt.data.corpus import DataError
from jaxgpt.data.tokenizer import Tokenizer, tokenizer_from_dict
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.metrics import read_jsonl
from jaxgpt.weights.checkpoint import (
    Checkpointer, CheckpointError, Located, check_compatible, locate, read_meta,
)

# Train-config fields a resumed run may change: the training stays the same function of the step.
RESUMABLE_CHANGES = ("max_steps", "mesh", "devices", "deterministic_reduce", "steps_per_call", "log_every", "eval_every", "eval_batches", "ckpt_every",
                     "keep_checkpoints", "samples", "sample_tokens", "peak_flops", "tensorboard",
                     "fingerprint_every", "eval_tasks", "eval_tasks_every", "eval_tasks_limit", "target_val_loss")


def run_meta(model_cfg: GPTConfig, cfg: TrainConfig, tokenizer: Tokenizer, step: int, best: float,
             data_fingerprint: Optional[str] = None) -> dict:
    """What every checkpoint of a run carries beside its state (and config.json holds)."""
    return {
        "data_fingerprint": data_fingerprint,
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "step": step,
        "data_position": {"seed": cfg.seed, "next_step": step, "sampling": cfg.sampling},
        "best_val_loss": best if math.isfinite(best) else None,
        "plugins": loaded_records(),  # files that registered kinds this run may use (jaxgpt.plugins)
    }


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether a run folder holds a finished checkpoint step (a save stopped half-way is none: the
    run may start afresh there, and the checkpoint manager clears the unfinished folder)."""
    return any(p.name.isdigit() and p.is_dir() for sub in ("checkpoints", "best") if (run_dir / sub).is_dir()
               for p in (run_dir / sub).iterdir())


@dataclass(frozen=True)
class RunStart:
    """What a run starts from: its configs, and for a resumed run what its checkpoint recorded."""

    model: GPTConfig
    train: TrainConfig
    tokenizer: Optional[Tokenizer] = None  # a resumed run's own; a new run builds one from its data
    best_val: float = float("inf")
    resume_from: Optional[Located] = None  # the checkpoint step a resumed run continues
    data_fingerprint: Optional[str] = None  # of the corpus the run was trained on so far
    params_only: bool = False  # the checkpoint holds weights alone (a converted model): a fresh optimizer

    def check_data(self, fingerprint: str, data: str) -> None:
        """Refuse to resume on a corpus (or tokenizer) other than the one the run trained on."""
        if self.data_fingerprint is not None and fingerprint != self.data_fingerprint:
            raise DataError(f"the corpus {data!r} or its tokenizer changed since this run started (fingerprint "
                            f"{fingerprint[:12]}… against {self.data_fingerprint[:12]}… recorded): resuming would train "
                            "on other data; restore that corpus or start a new run")


def run_configs(run_dir: Path, model_cfg: Optional[GPTConfig], cfg: Optional[TrainConfig], resume: bool) -> RunStart:
    """The configs of the run to start and, when resuming, what its newest intact checkpoint recorded.

    A new run takes the configs given, in a directory without checkpoints. A resumed run takes the
    configs stored in its checkpoint: `model_cfg`, if given, must match them, and `cfg`, if given,
    may differ from the stored train config only in `RESUMABLE_CHANGES`. A resumed run continues
    from its newest intact step (a damaged newer one is reported and skipped).
    """
    if not resume:
        if holds_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or use a new --out")
        if model_cfg is None or cfg is None:
            raise ValueError("a new run needs both a model config and a train config")
        # the schedule's length is fixed when the run starts: a later --max-steps only moves the end
        return RunStart(model_cfg, cfg.replace(decay_steps=cfg.total_decay_steps))
    found = locate(run_dir, fallback=True)
    meta = read_meta(found)
    saved_model = GPTConfig.from_dict(meta["model"])
    if model_cfg is not None:
        check_compatible(meta["model"], model_cfg.replace(vocab_size=saved_model.vocab_size))
    saved_train = TrainConfig.from_dict(meta["train"])
    # runs saved before the schedule length was recorded decayed over their max_steps
    saved_train = saved_train.replace(decay_steps=saved_train.total_decay_steps)
    if meta.get("params_only"):  # converted weights: training starts now, with whatever train config is given
        cfg = (cfg or saved_train).replace(decay_steps=(cfg or saved_train).total_decay_steps)
        return RunStart(saved_model, cfg, tokenizer_from_dict(meta["tokenizer"]), float("inf"), found, None, True)
    if cfg is not None and cfg.decay_steps is None:
        cfg = cfg.replace(decay_steps=saved_train.decay_steps)
    if cfg is not None:
        changed = {k for k, v in cfg.to_dict().items() if v != getattr(saved_train, k)}
        if changed - set(RESUMABLE_CHANGES):
            raise CheckpointError(
                f"cannot resume with different {sorted(changed - set(RESUMABLE_CHANGES))}: they change the "
                f"training itself; only {RESUMABLE_CHANGES} may change on resume")
    cfg = cfg or saved_train
    step = meta.get("step")
    if step is not None and cfg.max_steps <= step:
        raise CheckpointError(
            (f"this run already reached step {step}, its --max-steps: nothing to train" if cfg.max_steps == step else
             f"--max-steps {cfg.max_steps} is below this run's step {step}: a run cannot go back")
            + f" ({found.path}). Pass a larger --max-steps to continue it")
    return RunStart(saved_model, cfg, tokenizer_from_dict(meta["tokenizer"]),
                    meta.get("best_val_loss") or float("inf"), found, meta.get("data_fingerprint"))


def keep_records_up_to(path: Path, step: int) -> None:
    """On resume, drop log records of steps after the checkpoint (they will be redone)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def save_for_inference(params, config: GPTConfig, tokenizer, run_dir: Path) -> Path:
    """A jaxgpt run at step 0 holding given weights, e.g. imported from Hugging Face.

    It loads with `--checkpoint` like any run and can be trained further (`--resume` starts a fresh
    optimizer on these weights). Only the parameters are written ("params_only" in its metadata):
    no optimizer state is built, so converting a model needs memory for about one copy of it.
    """
    run_dir = Path(run_dir)
    if holds_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints; choose a new directory")
    train_cfg = TrainConfig(tokenizer="gpt2" if tokenizer.name == "gpt2" else "char")
    meta = {**run_meta(config, train_cfg, tokenizer, 0, float("inf")), "params_only": True}
    ckpt = Checkpointer(run_dir, keep=1)
    ckpt.save(0, {"step": np.zeros((), np.int32), "params": params}, meta)
    ckpt.close()
    write_json(run_dir / "config.json", meta)
    return run_dir
