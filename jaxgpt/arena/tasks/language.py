"""Language modelling at character level: a named corpus (`tinyshakespeare`) or the embedded
default (`python-docs`), split 90/10 as training does.

Training windows start at random points of the training part; evaluation reads `n` windows spread
evenly over the validation part. The metric is the mean next-character cross-entropy (nats) over
every position of the window, so at 2L … 8L it includes the positions past the training length.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from jaxgpt.arena.tasks.base import ArenaTask, EvalSet, TaskError, batch_rng
from jaxgpt.data.corpus import load_text, split_train_val
from jaxgpt.data.tokenizer import CharTokenizer


class Language(ArenaTask):
    metric = "loss"

    def __init__(self, corpus: str = "tinyshakespeare", name: str | None = None) -> None:
        self.corpus = corpus
        self.name = name or f"lm-{corpus}"

    @cached_property
    def _splits(self) -> tuple[np.ndarray, np.ndarray]:
        text = load_text(self.corpus)
        tokenizer = CharTokenizer.from_text(text)
        self._vocab = tokenizer.vocab_size
        ids = np.asarray(tokenizer.encode(text), np.int32)
        return split_train_val(ids, 0.9)

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        self._splits  # noqa: B018 (reads the corpus once)
        return self._vocab

    def check_length(self, length: int) -> None:
        val = self._splits[1]
        if length + 1 > len(val):
            raise TaskError(f"task {self.name!r}: the validation part of {self.corpus!r} has {len(val)} characters, "
                            f"fewer than a window of {length} + 1")

    def train_batch(self, seed: int, step: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        self.check_length(length)
        train, _ = self._splits
        starts_b = batch_rng(self.name, seed, step).integers(0, len(train) - length - 1, size=batch)
        return self._windows(train, starts_b, length)

    def eval_sets(self, length: int, n: int, seed: int = 0) -> list[EvalSet]:
        self.check_length(length)
        _, val = self._splits
        starts_b = np.linspace(0, len(val) - length - 1, n).astype(np.int64)
        return [EvalSet("val", *self._windows(val, starts_b, length))]

    @staticmethod
    def _windows(ids: np.ndarray, starts_b: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        idx_bt = starts_b[:, None] + np.arange(length)[None, :]
        return ids[idx_bt].astype(np.int32), ids[idx_bt + 1].astype(np.int32)


