"""A run's data: the tokenizer, the training batch source and the fixed validation batches.

From a named corpus or a text file (tokenized here, split by `train_ratio`) or from a
`jaxgpt data prepare` directory (token files written ahead). The batch of step s is a pure
function of (config, s), which is what makes exact resume possible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from jaxgpt.data.corpus import (
    DataError, EpochSampler, RandomWindowSampler, SlidingWindowDataset, load_text, open_token_file,
)
from jaxgpt.data.tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict
from jaxgpt.train.config import TrainConfig

PREPARED_META = "meta.json"


@dataclass
class RunData:
    tokenizer: Tokenizer
    train_source: object  # has .batch(step) -> (x_bt, y_bt)
    val_batches: list  # fixed [(x_bt, y_bt), ...] for evaluation
    n_train_tokens: int
    n_val_tokens: int
    sample_prompt: list  # token ids the end-of-run samples start from


def is_prepared_dir(path: str) -> bool:
    return (Path(path) / PREPARED_META).is_file()


def _val_batches(val_ids, seq_len: int, batch_size: int, max_batches: int) -> list:
    """Consecutive non-overlapping windows of the validation tokens, the same at every evaluation."""
    if len(val_ids) <= seq_len:
        raise DataError(
            f"validation split has {len(val_ids)} tokens, too few for one window of {seq_len}: "
            "lower train.train_ratio or train.context_length, or use more text"
        )
    ds = SlidingWindowDataset(val_ids, seq_len, seq_len)
    batches = list(ds.batches(min(batch_size, len(ds)), drop_last=True))
    return batches[:max_batches]


def _token_streams(cfg: TrainConfig, tokenizer: Optional[Tokenizer]):
    """(tokenizer, train ids, val ids) of a prepared directory or of a corpus tokenized here."""
    if is_prepared_dir(cfg.data):
        meta = json.loads((Path(cfg.data) / PREPARED_META).read_text())
        tokenizer = tokenizer or tokenizer_from_dict(meta["tokenizer"])
        return (tokenizer, open_token_file(Path(cfg.data) / "train.bin"),
                np.asarray(open_token_file(Path(cfg.data) / "val.bin")))
    text = load_text(cfg.data)
    tokenizer = tokenizer or get_tokenizer(cfg.tokenizer, corpus_text=text)
    split = int(cfg.train_ratio * len(text))
    train_ids = np.asarray(tokenizer.encode(text[:split], allow_special=True), dtype=np.int32)
    val_ids = np.asarray(tokenizer.encode(text[split:], allow_special=True), dtype=np.int32)
    return tokenizer, train_ids, val_ids


def build_data(cfg: TrainConfig, seq_len: int, tokenizer: Optional[Tokenizer] = None) -> RunData:
    """Token streams, samplers and the fixed validation batches of a run."""
    tokenizer, train_ids, val_ids = _token_streams(cfg, tokenizer)
    if len(train_ids) <= seq_len:
        raise DataError(
            f"training split of {cfg.data!r} has {len(train_ids)} tokens, too few for a context of {seq_len} "
            "(needs at least one window plus one target)"
        )
    if cfg.sampling == "random":
        source = RandomWindowSampler(train_ids, seq_len, cfg.batch_size, seed=cfg.seed)
    else:
        dataset = SlidingWindowDataset(train_ids, seq_len, cfg.stride or seq_len)
        source = EpochSampler(dataset, cfg.batch_size, seed=cfg.seed)
    val = _val_batches(val_ids, seq_len, cfg.batch_size, cfg.eval_batches)
    prompt = [int(i) for i in val_ids[: min(16, seq_len // 2)]]
    return RunData(tokenizer, source, val, len(train_ids), len(val_ids), prompt)
