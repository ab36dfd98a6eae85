"""The arena's tasks, by name: `make_task("mqar", pairs=[4, 8])`.

Adding a task: a module here with an `ArenaTask` subclass (its generator `sample`, its
`eval_sets`, a hand-built `solve`), a line in `TASKS`, and a test in tests/test_arena_tasks.py
that the solution scores 100 % and a wrong one does not.
"""

from __future__ import annotations

import json
from functools import lru_cache

from jaxgpt.arena.tasks.base import IGNORE, ArenaTask, EvalSet, TaskError, batch_rng, token_accuracy
from jaxgpt.arena.tasks.induction import Induction
from jaxgpt.arena.tasks.language import Language
from jaxgpt.arena.tasks.mqar import MQAR
from jaxgpt.arena.tasks.passkey import Passkey
from jaxgpt.arena.tasks.selective_copy import SelectiveCopy

TASKS = {
    "mqar": MQAR,
    "induction": Induction,
    "passkey": Passkey,
    "selective_copy": SelectiveCopy,
    "lm-tinyshakespeare": lambda **kw: Language("tinyshakespeare", **kw),
    "lm-python-docs": lambda **kw: Language("python-docs", **kw),
}


def make_task(name: str, **options) -> ArenaTask:
    """The task `name` with its options (the sweep file's `[tasks.NAME]` table)."""
    if name not in TASKS:
        raise TaskError(f"unknown arena task {name!r}; known: {sorted(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise TaskError(f"task {name!r}: bad options {options}: {e}") from None


@lru_cache(maxsize=None)
def _cached_task(name: str, options_json: str) -> ArenaTask:
    return make_task(name, **json.loads(options_json))


def task_of(name: str, options: dict) -> ArenaTask:
    """`make_task`, once per (name, options) in a process: a language task reads its corpus once."""
    return _cached_task(name, json.dumps(options, sort_keys=True))


__all__ = ["IGNORE", "TASKS", "ArenaTask", "EvalSet", "TaskError", "batch_rng", "make_task", "task_of",
           "token_accuracy"]
