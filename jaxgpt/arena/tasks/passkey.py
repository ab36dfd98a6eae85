"""Passkey retrieval (Mohtashami & Jaggi 2023), at token level.

A haystack of random filler tokens hides a needle `KEY d1 … dD` (D random digits) at a chosen
depth (0 = the start, 1 = the end); the sequence closes with `QUERY d1 … dD`. Scored: each digit
after QUERY, which only retrieval of the needle gives. Training draws the depth uniformly;
evaluation reports each depth of `depths` apart ("depth=0.5"). At longer lengths the haystack
grows.

Vocabulary: digits 0–9, KEY, QUERY, then `fillers` filler tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxgpt.arena.tasks.base import IGNORE, ArenaTask, EvalSet, TaskError, per_row

KEY, QUERY, FIRST_FILLER = 10, 11, 12


class Passkey(ArenaTask):
    name = "passkey"

    def __init__(self, digits: int = 5, fillers: int = 16, depths: Sequence[float] = (0.1, 0.5, 0.9)) -> None:
        if digits < 1 or fillers < 1 or not all(0.0 <= d <= 1.0 for d in depths):
            raise TaskError(f"task 'passkey' needs digits >= 1, fillers >= 1 and depths in [0, 1], "
                            f"got {digits}, {fillers}, {tuple(depths)}")
        self.digits, self.depths = int(digits), tuple(float(d) for d in depths)
        self.vocab_size = FIRST_FILLER + int(fillers)

    def min_length(self) -> int:
        return 2 * (self.digits + 1)

    def sample(self, rng: np.random.Generator, length: int, depth: float | None = None):
        d = self.digits
        depth = rng.random() if depth is None else depth
        x_t = rng.integers(FIRST_FILLER, self.vocab_size, size=length)
        key_d = rng.integers(0, 10, size=d)
        haystack = length - 2 * (d + 1)  # filler tokens around the needle
        at = int(round(depth * haystack))
        x_t[at], x_t[at + 1:at + 1 + d] = KEY, key_d
        x_t[length - d - 1], x_t[length - d:] = QUERY, key_d
        y_t = np.full(length, IGNORE, np.int64)
        y_t[length - d - 1:length - 1] = key_d  # from QUERY on, each next digit
        return x_t, y_t

    def eval_sets(self, length: int, n: int, seed: int = 0) -> list[EvalSet]:
        return [self._eval_set(f"depth={d:g}", length, n, seed, depth=d) for d in self.depths]

    def solve(self, x_bt: np.ndarray) -> np.ndarray:
        """Read the digits after KEY; from QUERY on, say them in order."""
        d = self.digits

        def row(x_t):
            pred_t = np.zeros_like(x_t)
            at, query = int(np.argmax(x_t == KEY)), int(np.argmax(x_t == QUERY))
            pred_t[query:query + d] = x_t[at + 1:at + 1 + d]
            return pred_t
        return per_row(row)(x_bt)
