"""Induction heads (Olsson et al. 2022): continue a repeated random sequence.

A sequence is P distinct random tokens followed by the same P tokens again. Scored: every token of
the second copy after its first (the first is not predictable: nothing says where the copy starts).
A model that has learnt "after A came B earlier, so B follows A now" scores 100 %; at longer
lengths the copy is longer and the earlier occurrence further away. `vocab` must be at least the
longest half-sequence evaluated (distinct tokens keep the continuation unambiguous).
"""

from __future__ import annotations

import numpy as np

from jaxgpt.arena.tasks.base import IGNORE, ArenaTask, TaskError, per_row


class Induction(ArenaTask):
    name = "induction"

    def __init__(self, vocab: int = 512) -> None:
        self.vocab_size = int(vocab)

    def min_length(self) -> int:
        return 4

    def check_length(self, length: int) -> None:
        super().check_length(length)
        if length % 2 or length // 2 > self.vocab_size:
            raise TaskError(f"task 'induction' needs an even length of at most 2 × vocab ({2 * self.vocab_size}), "
                            f"got {length}")

    def sample(self, rng: np.random.Generator, length: int):
        half = length // 2
        seq_p = rng.choice(self.vocab_size, size=half, replace=False)
        x_t = np.concatenate([seq_p, seq_p])
        y_t = np.full(length, IGNORE, np.int64)
        y_t[half:-1] = x_t[half + 1:]  # from the copy's first token on, the next one is known
        return x_t, y_t

    def solve(self, x_bt: np.ndarray) -> np.ndarray:
        """Predict what followed the token's previous occurrence."""
        def row(x_t):
            after, pred_t = {}, np.zeros_like(x_t)
            for i, tok in enumerate(x_t):
                pred_t[i] = after.get(tok, 0)
                if i + 1 < len(x_t) and tok not in after:
                    after[tok] = x_t[i + 1]
            return pred_t
        return per_row(row)(x_bt)
