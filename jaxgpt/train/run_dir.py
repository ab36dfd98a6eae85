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
from pathlib import Path
from typing import Optional

from jaxgpt.config import GPTConfig
from jaxgpt.data.tokenizer import Tokenizer, tokenizer_from_dict
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.metrics import read_jsonl
from jaxgpt.weights.checkpoint import Checkpointer, CheckpointError, check_compatible, read_meta, write_json

# Train-config fields a resumed run may change: the training stays the same function of the step.
RESUMABLE_CHANGES = ("max_steps", "mesh", "devices", "log_every", "eval_every", "eval_batches", "ckpt_every",
                     "keep_checkpoints", "samples", "sample_tokens", "peak_flops", "tensorboard")


def run_meta(model_cfg: GPTConfig, cfg: TrainConfig, tokenizer: Tokenizer, step: int, best: float) -> dict:
    """What every checkpoint of a run carries beside its state (and config.json holds)."""
    return {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "step": step,
        "data_position": {"seed": cfg.seed, "next_step": step, "sampling": cfg.sampling},
        "best_val_loss": best if math.isfinite(best) else None,
    }


def holds_checkpoints(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())


def run_configs(run_dir: Path, model_cfg: Optional[GPTConfig], cfg: Optional[TrainConfig], resume: bool
                ) -> tuple[GPTConfig, TrainConfig, Optional[Tokenizer], float]:
    """(model config, train config, tokenizer or None, best validation loss so far) of the run to start.

    A new run takes the configs given, in a directory without checkpoints. A resumed run takes the
    configs stored in its checkpoint: `model_cfg`, if given, must match them, and `cfg`, if given,
    may differ from the stored train config only in `RESUMABLE_CHANGES`.
    """
    if not resume:
        if holds_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or use a new --out")
        if model_cfg is None or cfg is None:
            raise ValueError("a new run needs both a model config and a train config")
        return model_cfg, cfg, None, float("inf")
    meta = read_meta(run_dir)
    saved_model = GPTConfig.from_dict(meta["model"])
    if model_cfg is not None:
        check_compatible(meta["model"], model_cfg.replace(vocab_size=saved_model.vocab_size))
    saved_train = TrainConfig.from_dict(meta["train"])
    if cfg is not None:
        changed = {k for k, v in cfg.to_dict().items() if v != getattr(saved_train, k)}
        if changed - set(RESUMABLE_CHANGES):
            raise CheckpointError(
                f"cannot resume with different {sorted(changed - set(RESUMABLE_CHANGES))}: they change the "
                f"training itself; only {RESUMABLE_CHANGES} may change on resume")
    best_val = meta.get("best_val_loss") or float("inf")
    return saved_model, cfg or saved_train, tokenizer_from_dict(meta["tokenizer"]), best_val


def keep_records_up_to(path: Path, step: int) -> None:
    """On resume, drop log records of steps after the checkpoint (they will be redone)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        tmp = Path(str(path) + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)


def save_for_inference(params, config: GPTConfig, tokenizer, run_dir: Path) -> Path:
    """A jaxgpt run (step 0, fresh optimizer state) holding given weights, e.g. imported GPT-2.

    It loads with `--checkpoint` like any run and can be trained further (`--resume`).
    """
    from jaxgpt.nn.model import GPT
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.step import create_state

    run_dir = Path(run_dir)
    if holds_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints; choose a new directory")
    train_cfg = TrainConfig(tokenizer="gpt2" if tokenizer.name == "gpt2" else "char")
    state = create_state(GPT(config), build_optimizer(train_cfg), params, seed=0)
    meta = run_meta(config, train_cfg, tokenizer, 0, float("inf"))
    ckpt = Checkpointer(run_dir, keep=1)
    ckpt.save(0, state, meta)
    ckpt.close()
    write_json(run_dir / "config.json", meta)
    return run_dir
