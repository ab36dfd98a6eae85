"""`jaxgpt arena SWEEP.toml --out DIR`: the attention arena (jaxgpt.arena, docs/arena.md)."""

from __future__ import annotations

import json
import sys


def cmd_arena(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from jaxgpt.arena.report import write_report
    from jaxgpt.arena.run import run_sweep
    from jaxgpt.arena.sweep import load_sweep

    sweep = load_sweep(args.sweep, smoke=args.smoke)
    if args.plugin:  # --plugin files join the sweep's own (its workers load them too)
        import dataclasses

        sweep = dataclasses.replace(sweep, plugins=tuple(dict.fromkeys(
            [*sweep.plugins, *(str(Path(p).expanduser().resolve()) for p in args.plugin)])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(sweep.runs()), unit="run", desc="arena", file=sys.stderr, disable=args.quiet)

    def progress(done: int, total: int, row) -> None:
        bar.n = done
        if row is not None:
            state = "FAILED" if "error" in row else f"{row['wall_s']:.0f}s"
            bar.set_postfix_str(f"{row['variant']} s{row['seed']} {row['task']} {state}")
            if "error" in row:
                tqdm.write(f"arena: {row['variant']} seed {row['seed']} {row['task']} failed: {row['error']}",
                           file=sys.stderr)
        bar.refresh()

    rows = run_sweep(sweep, out, jobs=args.jobs, progress=progress)
    bar.close()
    results = write_report(sweep, rows, out)
    failed = len(results["failed"])
    print(f"arena: {len(results['runs'])} runs finished, {failed} failed; report: {out / 'report.md'}", file=sys.stderr)
    if args.json:
        print(json.dumps({"out": str(out), "runs": len(results["runs"]), "failed": failed,
                          "variants": results["variants"]}))
    return 1 if failed else 0


def add_commands(sub) -> None:
    p = sub.add_parser("arena", help="compare attention variants over seeds, tasks and lengths (docs/arena.md)")
    p.add_argument("sweep", help="the sweep file (TOML; examples in experiments/arena/)")
    p.add_argument("--out", required=True, help="output folder: one folder per run, results.json, report.md, plots; "
                   "a rerun skips the runs already finished")
    p.add_argument("--smoke", action="store_true", help="a tiny version of the same sweep (the [smoke] table)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_arena)
