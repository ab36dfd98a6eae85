"""What every arena task is: a generator of (inputs, targets) batches, a metric, and a hand-built
solution that proves the metric scores a perfect answer 100 %.

Targets follow the training loss's convention: `y_bt[b, i]` is the token that should follow
`x_bt[b, i]`, and IGNORE (-100) where nothing is scored. Generated tasks score only the positions
that need the skill (the value after a queried key, the copied tokens); language tasks score all.

Batches are a pure function of (task, seed, step): every variant of a sweep sees the same data
in the same order (`batch_rng`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

IGNORE = -100


class TaskError(ValueError):
    """A task was asked for something it cannot give (a length too short for its layout, an unknown
    option); the message names the task and the value."""


def batch_rng(task_name: str, seed: int, step: int, stream: str = "train") -> np.random.Generator:
    """The generator of one batch: (task, seed, step, stream) alone decide it, never the variant."""
    salt = int.from_bytes(hashlib.sha256(f"{task_name}/{stream}".encode()).digest()[:4], "little")
    return np.random.default_rng([salt, seed, step])


def token_accuracy(pred_bt: np.ndarray, y_bt: np.ndarray) -> float:
    """Share of the scored positions (y != IGNORE) where the prediction is the target."""
    scored = y_bt != IGNORE
    if not scored.any():
        raise TaskError("no scored position in this batch")
    return float(np.mean(pred_bt[scored] == y_bt[scored]))


@dataclass(frozen=True)
class EvalSet:
    """One named evaluation set of a task at one length: inputs and targets."""

    name: str
    x_bt: np.ndarray
    y_bt: np.ndarray


class ArenaTask:
    """A task of the arena. Subclasses set `name`, `metric` ("accuracy" or "loss"), `vocab_size`,
    and implement `sample` (one sequence), `eval_sets` and, for generated tasks, `solve`."""

    name: str = ""
    metric: str = "accuracy"  # "accuracy": argmax predictions on scored positions; "loss": mean nats/token
    vocab_size: int = 0

    def min_length(self) -> int:
        """The shortest sequence the task's layout fits in."""
        return 2

    def check_length(self, length: int) -> None:
        if length < self.min_length():
            raise TaskError(f"task {self.name!r} needs sequences of at least {self.min_length()} tokens, got {length}")

    def sample(self, rng: np.random.Generator, length: int, **options) -> tuple[np.ndarray, np.ndarray]:
        """One sequence (x_t, y_t) of `length` tokens."""
        raise NotImplementedError

    def train_batch(self, seed: int, step: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of `step`: (x_bt, y_bt) int32, the same for every variant."""
        self.check_length(length)
        rng = batch_rng(self.name, seed, step)
        rows = [self.sample(rng, length) for _ in range(batch)]
        return np.stack([r[0] for r in rows]).astype(np.int32), np.stack([r[1] for r in rows]).astype(np.int32)

    def eval_sets(self, length: int, n: int, seed: int = 0) -> list[EvalSet]:
        """Held-out sets at `length` (a stream no training batch draws from), one per setting."""
        return [self._eval_set("all", length, n, seed)]

    def _eval_set(self, name: str, length: int, n: int, seed: int, **options) -> EvalSet:
        self.check_length(length)
        rng = batch_rng(self.name, seed, length, stream=f"eval/{name}")
        rows = [self.sample(rng, length, **options) for _ in range(n)]
        return EvalSet(name, np.stack([r[0] for r in rows]).astype(np.int32),
                       np.stack([r[1] for r in rows]).astype(np.int32))

    def solve(self, x_bt: np.ndarray) -> np.ndarray:
        """A hand-built solution: the predicted next token at every position (b, t)."""
        raise NotImplementedError


def per_row(solve_row: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A batch solver from a one-sequence solver."""
    return lambda x_bt: np.stack([solve_row(x) for x in x_bt])
