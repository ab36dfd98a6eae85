"""Selective copying (Gu & Dao 2023, the Mamba paper): copy the data tokens, skipping the noise.

A region of blanks holds N data tokens at random positions; a separator follows, and then the N
data tokens in their order. Scored: each copied token (the first is predicted at the separator).
Unlike plain copying, where a data token sits cannot be known in advance: a model must select by
content. At longer lengths the region grows and the tokens spread further apart.

Vocabulary: 0 blank, 1 separator, then `data` data tokens.
"""

from __future__ import annotations

import numpy as np

from jaxgpt.arena.tasks.base import IGNORE, ArenaTask, TaskError, per_row

BLANK, SEP, FIRST_DATA = 0, 1, 2


class SelectiveCopy(ArenaTask):
    name = "selective_copy"

    def __init__(self, tokens: int = 8, data: int = 16) -> None:
        if tokens < 1 or data < 1:
            raise TaskError(f"task 'selective_copy' needs tokens >= 1 and data >= 1, got {tokens}, {data}")
        self.tokens = int(tokens)
        self.vocab_size = FIRST_DATA + int(data)

    def min_length(self) -> int:
        return 2 * self.tokens + 1

    def sample(self, rng: np.random.Generator, length: int):
        n = self.tokens
        region = length - n  # the blanks and data, then SEP and the first n - 1 copied tokens
        data_n = rng.integers(FIRST_DATA, self.vocab_size, size=n)
        x_t = np.full(length, BLANK, np.int64)
        x_t[np.sort(rng.choice(region, size=n, replace=False))] = data_n
        x_t[region] = SEP
        x_t[region + 1:] = data_n[:-1]
        y_t = np.full(length, IGNORE, np.int64)
        y_t[region:] = data_n
        return x_t, y_t

    def solve(self, x_bt: np.ndarray) -> np.ndarray:
        """Collect the data tokens before the separator; after it, say them in order."""
        def row(x_t):
            sep = int(np.argmax(x_t == SEP))
            data = x_t[:sep][x_t[:sep] >= FIRST_DATA]
            pred_t = np.zeros_like(x_t)
            pred_t[sep:sep + len(data)] = data[:len(x_t) - sep]
            return pred_t
        return per_row(row)(x_bt)
