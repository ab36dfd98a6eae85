"""Multi-query associative recall (Zoology, Arora et al. 2023).

A sequence opens with N key-value pairs `k1 v1 … kN vN` (distinct keys), then filler, then every
key again in a random order, each followed by its value: `… kσ1 vσ1 … kσN vσN`. Scored: the value
after each queried key, which only recall of the opening pairs can give. Training mixes the pair
counts of `pairs`; evaluation reports each count apart ("pairs=8"). At longer lengths the filler
grows, so the keys are recalled from further away.

Vocabulary: token 0 is the filler, then `keys` key tokens, then `values` value tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxgpt.arena.tasks.base import IGNORE, ArenaTask, EvalSet, TaskError, per_row

FILLER = 0


class MQAR(ArenaTask):
    name = "mqar"

    def __init__(self, pairs: Sequence[int] = (4, 8, 16), keys: int = 64, values: int = 64) -> None:
        pairs = tuple(int(p) for p in pairs)
        if not pairs or min(pairs) < 1 or max(pairs) > keys:
            raise TaskError(f"task 'mqar' needs 1 <= pairs <= keys ({keys}), got {pairs}")
        self.pairs, self.keys, self.values = pairs, keys, values
        self.vocab_size = 1 + keys + values

    def min_length(self) -> int:
        return 4 * max(self.pairs)

    def sample(self, rng: np.random.Generator, length: int, pairs: int | None = None):
        n = int(rng.choice(self.pairs)) if pairs is None else pairs
        keys_n = 1 + rng.choice(self.keys, size=n, replace=False)
        values_n = 1 + self.keys + rng.integers(0, self.values, size=n)
        x_t = np.full(length, FILLER, np.int64)
        y_t = np.full(length, IGNORE, np.int64)
        x_t[0:2 * n:2], x_t[1:2 * n:2] = keys_n, values_n
        order_n = rng.permutation(n)
        start = length - 2 * n  # the queries close the sequence
        x_t[start::2], x_t[start + 1::2] = keys_n[order_n], values_n[order_n]
        y_t[start::2] = values_n[order_n]  # after a queried key comes its value
        return x_t, y_t

    def eval_sets(self, length: int, n: int, seed: int = 0) -> list[EvalSet]:
        return [self._eval_set(f"pairs={p}", length, n, seed, pairs=p) for p in self.pairs]

    def solve(self, x_bt: np.ndarray) -> np.ndarray:
        """Remember each key's first value; after a key seen before, answer that value."""
        def row(x_t):
            seen, pred_t = {}, np.zeros_like(x_t)
            for i, tok in enumerate(x_t):
                if tok in seen:
                    pred_t[i] = seen[tok]
                elif 1 <= tok <= self.keys and i + 1 < len(x_t):
                    seen[tok] = x_t[i + 1]
            return pred_t
        return per_row(row)(x_bt)
