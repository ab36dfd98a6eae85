"""Running a sweep: each (variant, seed, task) in its own directory, skipped once finished.

`DIR/runs/VARIANT/seed-S/TASK/` holds `spec.json` (what the run is: the model config, the budget,
the task's options) and, once done, `result.json` (written atomically: a run stopped half-way has
none and runs again). A finished run whose spec differs from what the sweep now asks for is
refused, by name: results of two different sweeps never mix in one report.

Training runs go to `jobs` worker processes (spawned, each with its own JAX, one thread each when
there are several); the cost runs follow one at a time in this process, with nothing else running,
so their timings are not shared with other work. The main process shows one progress bar.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional

from jaxgpt.arena.sweep import Sweep, SweepError, folder_name
from jaxgpt.atomic import write_json


def run_dir(out: Path, variant: str, seed: int, task: str) -> Path:
    return Path(out) / "runs" / folder_name(variant) / f"seed-{seed}" / folder_name(task)


def run_spec(sweep: Sweep, variant: str, seed: int, task: str) -> dict:
    """All that decides a run's result: a rerun reuses a finished run only if this is unchanged."""
    reference = task if task != "cost" else next(iter(sweep.tasks))
    vocab = sweep.task(reference).vocab_size
    spec = {"variant": variant, "seed": seed, "task": task, "task_options": sweep.tasks.get(task, {}),
            "model": sweep.model_config(variant, vocab).to_dict(), "train": sweep.train,
            "lengths": list(sweep.lengths)}
    if sweep.plugins:  # a changed plugin file makes its runs new runs
        from jaxgpt.plugins import load_plugin

        spec["plugins"] = {r["path"]: r["sha256"] for r in map(load_plugin, sweep.plugins)}
    return spec


def finished_result(directory: Path, spec: dict) -> Optional[dict]:
    """The stored result of a finished run, None if it has not finished; a changed spec is an error."""
    path = directory / "result.json"
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is corrupt ({e}); delete it to run that run again") from None
    if result.get("spec") != spec:
        raise SweepError(f"{directory} was run with different settings than this sweep now asks for "
                         f"(variant {spec['variant']!r}, seed {spec['seed']}, task {spec['task']!r}); "
                         "use another --out folder, or delete that run's folder to rerun it")
    return result


def execute_run(sweep: Sweep, variant: str, seed: int, task_name: str, directory: Path) -> dict:
    """Train and evaluate one run (or measure the variant's cost) and store its result."""
    from jaxgpt.arena.cost import measure_cost
    from jaxgpt.arena.trainer import evaluate_lengths, train_task
    from jaxgpt.config import GPTConfig

    spec = run_spec(sweep, variant, seed, task_name)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "spec.json", spec)
    config = GPTConfig.from_dict(spec["model"])
    t0 = time.perf_counter()
    row = {"variant": variant, "seed": seed, "task": task_name}
    try:
        if task_name == "cost":
            row["metrics"] = measure_cost(config, sweep.train, seed)
        else:
            task = sweep.task(task_name)
            params, curve, stats = train_task(task, config, sweep.train, seed)
            metrics = evaluate_lengths(task, config, params, sweep.train["length"], sweep.lengths,
                                       sweep.train["eval_examples"])
            row.update(metric=task.metric, curve=curve, metrics={**metrics, **stats,
                                                                 "final_train_loss": curve[-1]["train_loss"]})
    except Exception as e:  # noqa: BLE001 - a failed run is recorded by name, the sweep goes on
        row["error"] = f"{type(e).__name__}: {e}"
    row["wall_s"] = time.perf_counter() - t0
    if "error" not in row:
        write_json(directory / "result.json", {**row, "spec": spec})
    return row


def _exit_with_parent(parent: int) -> None:
    """A worker outlives a killed sweep otherwise (ProcessPoolExecutor's workers wait on a pipe
    that a SIGKILLed parent never closes) and goes on training for nobody."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(plugins: tuple = ()) -> None:
    """Several workers share the cores: one XLA thread each (set before the worker imports JAX);
    then the sweep's plugins, so the worker knows the kinds its variants name."""
    import threading

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    from jaxgpt.plugins import load_plugins

    load_plugins(plugins)


def run_sweep(sweep: Sweep, out: Path, *, jobs: int = 1, progress: Optional[Callable] = None) -> list[dict]:
    """Every run of the sweep, finished ones read back; returns their rows (failed runs with "error")."""
    out = Path(out)
    todo, rows = [], []
    for variant, seed, task in sweep.runs():
        directory = run_dir(out, variant, seed, task)
        done = finished_result(directory, run_spec(sweep, variant, seed, task))
        if done is not None:
            rows.append({k: v for k, v in done.items() if k != "spec"})
        else:
            todo.append((variant, seed, task, directory))
    total = len(rows) + len(todo)
    if progress is not None:
        progress(len(rows), total, None)
    training = [run for run in todo if run[2] != "cost"]
    serial = (training if jobs <= 1 else []) + [run for run in todo if run[2] == "cost"]  # cost runs last, alone
    if jobs > 1 and training:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(sweep.plugins,)) as pool:
            futures = [pool.submit(execute_run, sweep, v, s, t, d) for v, s, t, d in training]
            for future in as_completed(futures):
                rows.append(future.result())
                if progress is not None:
                    progress(len(rows), total, rows[-1])
    for variant, seed, task, directory in serial:
        rows.append(execute_run(sweep, variant, seed, task, directory))
        if progress is not None:
            progress(len(rows), total, rows[-1])
    return rows
