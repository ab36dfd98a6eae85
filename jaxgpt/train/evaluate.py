"""`jaxgpt eval`: validation loss and perplexity of a saved run, on its own data or another corpus."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import jax

from jaxgpt.nn.model import GPT
from jaxgpt.train.batches import build_data
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.loop import evaluate
from jaxgpt.train.step import make_eval_step
from jaxgpt.weights.checkpoint import load_for_inference, locate, read_meta


def evaluate_checkpoint(path: Path, data: Optional[str] = None, batches: Optional[int] = None) -> dict:
    """Validation loss and perplexity of a checkpoint (its parameters only), on its own data or on `data`."""
    found = locate(path)
    cfg = TrainConfig.from_dict(read_meta(found)["train"])
    params, model_cfg, tokenizer = load_for_inference(found)
    if data is not None:
        cfg = cfg.replace(data=data)
    if batches is not None:
        cfg = cfg.replace(eval_batches=batches)
    seq_len = cfg.context_length or model_cfg.context_length
    run_data = build_data(cfg, seq_len, tokenizer)
    loss = evaluate(jax.jit(make_eval_step(GPT(model_cfg))), params, run_data.val_batches)
    n_tokens = sum(x.size for x, _ in run_data.val_batches)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": len(run_data.val_batches),
            "tokens": int(n_tokens), "data": cfg.data}
