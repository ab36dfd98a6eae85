"""`jaxgpt evaluate`: a model on standard task kinds (multiple choice, cloze, perplexity, generation)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxgpt.cli.common import add_model_source_args, load_model


def _cmd_evaluate(args) -> int:
    from jaxgpt.atomic import write_json
    from jaxgpt.evaluation.tasks import evaluate_tasks, load_task, progress_to_stderr

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of examples per task, got {args.limit}")
    specs = [load_task(t) for t in args.tasks.split(",") if t]
    for spec in specs:
        spec["limit"] = args.limit or spec.get("limit")
    params, config, tokenizer = load_model(args)
    report = evaluate_tasks(params, config, tokenizer, specs, batch_size=args.batch_size, progress=progress_to_stderr)
    report["model"] = args.checkpoint or args.hf or f"random {args.preset}"
    if args.out:
        write_json(Path(args.out), report)
    if args.json:
        print(json.dumps(report))
    else:
        for name, result in report["tasks"].items():
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
            print(f"{name} ({result['kind']}, {result['n']} examples): {metrics}")
    return 0


def add_commands(sub) -> None:
    from jaxgpt.evaluation.tasks import BUILTIN

    p = sub.add_parser("evaluate", help="score a model on tasks: multiple choice, cloze, perplexity, generation")
    add_model_source_args(p, what="evaluate")
    p.add_argument("--tasks", required=True,
                   help=f"comma-separated built-in names ({', '.join(sorted(BUILTIN))}) or task YAML files")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="a random model's initialisation (no --checkpoint/--hf)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)
