"""Task evaluation during pretraining (`train.eval_tasks`): the tasks are loaded and checked once at
the start of a run, and every `train.eval_tasks_every` steps (and at the last step) their metrics go
to metrics.jsonl as {"kind": "tasks", "step", "<task>/<metric>": value, …}; `loss.png` draws them."""

from __future__ import annotations

from typing import Optional

from jaxgpt.evaluation.tasks import evaluate_tasks, load_task


class TrainingTasks:
    def __init__(self, names: str, every: int, limit: Optional[int], config, tokenizer, batch_size: int = 8) -> None:
        self.specs = [load_task(name) for name in names.split(",") if name]
        for spec in self.specs:
            spec["limit"] = limit or spec.get("limit")
        self.every, self.config, self.tokenizer, self.batch_size = every, config, tokenizer, batch_size

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step == max_steps

    def run(self, step: int, params) -> dict:
        report = evaluate_tasks(params, self.config, self.tokenizer, self.specs, self.batch_size)
        flat = {f"{task}/{k}": v for task, metrics in report["tasks"].items() for k, v in metrics.items()
                if isinstance(v, float)}
        return {"kind": "tasks", "step": step, **flat}
