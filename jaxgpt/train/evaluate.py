"""`jaxgpt eval`: validation loss and perplexity of a saved run, on its own data or another corpus."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import jax

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPT
from jaxgpt.train.batches import build_data
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.loop import evaluate
from jaxgpt.train.step import make_eval_step
from jaxgpt.weights.checkpoint import load_for_inference, locate, read_meta


def evaluate_model(params, model_cfg: GPTConfig, tokenizer, cfg: TrainConfig, source: str = "the model") -> dict:
    """Validation loss and perplexity of a model on the validation split of `cfg.data`; a loss that
    is not finite is an error (FloatingPointError), never a result."""
    seq_len = min(cfg.context_length or model_cfg.context_length, model_cfg.context_length)
    run_data = build_data(cfg, seq_len, tokenizer)
    loss = evaluate(jax.jit(make_eval_step(GPT(model_cfg))), params, run_data.val_batches)
    if not math.isfinite(loss):
        raise FloatingPointError(f"the validation loss of {source} on {cfg.data} is {loss}: its weights hold or "
                                 "produce NaN/inf. Evaluate an earlier checkpoint step (give its folder, e.g. "
                                 "RUN/checkpoints/STEP), or resume training from one")
    n_tokens = sum(x.size for x, _ in run_data.val_batches)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": len(run_data.val_batches),
            "tokens": int(n_tokens), "data": cfg.data}


def evaluate_checkpoint(path: Path, data: Optional[str] = None, batches: Optional[int] = None) -> dict:
    """Validation loss and perplexity of a checkpoint (its parameters only), on its own data or on `data`."""
    found = locate(path)
    cfg = TrainConfig.from_dict(read_meta(found)["train"])
    params, model_cfg, tokenizer = load_for_inference(found)
    if data is not None:
        cfg = cfg.replace(data=data)
    if batches is not None:
        cfg = cfg.replace(eval_batches=batches)
    return evaluate_model(params, model_cfg, tokenizer, cfg, source=f"checkpoint {found.path}")


def evaluate_hf(name_or_dir: str, data: str, batches: Optional[int] = None, context: Optional[int] = None) -> dict:
    """Validation loss and perplexity of Hugging Face weights (any supported family) on `data`,
    tokenized with the folder's own tokenizer."""
    from jaxgpt.weights.hf import load_hf, load_tokenizer, resolve_checkpoint

    params, model_cfg = load_hf(name_or_dir)
    tokenizer = load_tokenizer(resolve_checkpoint(name_or_dir), model_cfg)
    cfg = TrainConfig(data=data, eval_batches=batches or TrainConfig.eval_batches, batch_size=8,
                      context_length=min(context or 256, model_cfg.context_length))
    return evaluate_model(params, model_cfg, tokenizer, cfg, source=str(name_or_dir))
