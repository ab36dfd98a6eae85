"""A run's data: the tokenizer, the training batch source and the fixed validation batches.

From a named corpus or a text file (tokenized here, split by `train_ratio`) or from a
`jaxgpt data prepare` directory (token files written ahead). The batch of step s is a pure
function of (config, s), which is what makes exact resume possible.
"""

from __future__ import annotations

import hashlib
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
    fingerprint: str  # sha256 of the corpus and the tokenizer: a resumed run must see the same


def _fingerprint(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


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
    """(tokenizer, train ids, val ids, fingerprint) of a prepared directory or of a corpus tokenized here."""
    if is_prepared_dir(cfg.data):
        root = Path(cfg.data)
        meta_text = (root / PREPARED_META).read_text()
        tokenizer = tokenizer or tokenizer_from_dict(json.loads(meta_text)["tokenizer"])
        sidecars = [(root / f"{split}.bin.json").read_bytes() if (root / f"{split}.bin.json").is_file() else b""
                    for split in ("train", "val")]
        fingerprint = _fingerprint(meta_text.encode(), *sidecars)  # the sidecars hold each file's sha256
        return (tokenizer, open_token_file(root / "train.bin", tokenizer.vocab_size),
                np.asarray(open_token_file(root / "val.bin", tokenizer.vocab_size)), fingerprint)
    text = load_text(cfg.data)
    tokenizer = tokenizer or get_tokenizer(cfg.tokenizer, corpus_text=text)
    split = int(cfg.train_ratio * len(text))
    train_ids = np.asarray(tokenizer.encode(text[:split], allow_special=True), dtype=np.int32)
    val_ids = np.asarray(tokenizer.encode(text[split:], allow_special=True), dtype=np.int32)
    fingerprint = _fingerprint(text.encode("utf-8", "surrogatepass"), json.dumps(tokenizer.to_dict()).encode())
    return tokenizer, train_ids, val_ids, fingerprint


def build_data(cfg: TrainConfig, seq_len: int, tokenizer: Optional[Tokenizer] = None) -> RunData:
    """Token streams, samplers and the fixed validation batches of a run."""
    tokenizer, train_ids, val_ids, fingerprint = _token_streams(cfg, tokenizer)
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
    return RunData(tokenizer, source, val, len(train_ids), len(val_ids), prompt, fingerprint)
