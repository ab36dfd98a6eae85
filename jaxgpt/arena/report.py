"""The sweep's report: `results.json`, `report.md` and three plots.

results.json: {"sweep": the sweep, "runs": [one row per variant, seed and task with its metrics],
"variants": {name: {"TASK:METRIC": {"mean", "ci95", "n", "p_value"}}}, "failed": [rows with errors]}.
Metric names: `acc@4L` (accuracy at 4 × the training length, averaged over the task's evaluation
sets), `acc@4L/pairs=8` (one set), `loss@1L` (nats/token); the cost run's figures under `cost:`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from jaxgpt.arena.stats import summarise
from jaxgpt.atomic import write_json, write_text

COST_COLUMNS = [("params", "params", "{:,.0f}"), ("flops_per_token", "train FLOPs/token", "{:,.0f}"),
                ("kv_bytes_per_token", "KV bytes/token", "{:,.0f}"), ("train_tokens_per_s", "train tok/s", "{:,.0f}"),
                ("prefill_tokens_per_s_b1", "prefill tok/s b1", "{:,.0f}"),
                ("prefill_tokens_per_s_b8", "prefill tok/s b8", "{:,.0f}"),
                ("decode_tokens_per_s_b1", "decode tok/s b1", "{:,.0f}"),
                ("decode_tokens_per_s_b8", "decode tok/s b8", "{:,.0f}"),
                ("train_peak_bytes", "train peak MB", "{:,.1f}")]


def collect(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{variant: {"TASK:METRIC": [value per seed]}} of the finished runs (None values left out)."""
    samples: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for metric, value in row.get("metrics", {}).items():
            if value is not None:
                samples[row["variant"]][f"{row['task']}:{metric}"].append(float(value))
    return {v: dict(m) for v, m in samples.items()}


def _cell(entry: dict | None, fmt: str = "{:.3f}", scale: float = 1.0, p: bool = True) -> str:
    if entry is None:
        return "n/a"
    text = fmt.format(entry["mean"] * scale)
    if entry["ci95"] is not None:
        text += " ± " + fmt.format(entry["ci95"] * scale)
    if p and entry.get("p_value") is not None:
        text += f" (p={entry['p_value']:.2g})"
    return text


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def task_tables(sweep, summary: dict) -> list[str]:
    parts = []
    for task in sweep.tasks:
        metric = sweep.metric_prefix(task)
        header = ["variant", *(f"{metric}@{k}L" for k in sweep.lengths)]
        lines = [[v, *(_cell(summary.get(v, {}).get(f"{task}:{metric}@{k}L")) for k in sweep.lengths)]
                 for v in sweep.variants]
        parts.append(f"### {task} ({'lower' if metric == 'loss' else 'higher'} is better)\n\n" + _table(header, lines))
        sets = sorted({m.split("/", 1)[1] for v in summary.values() for m in v
                       if m.startswith(f"{task}:{metric}@1L/")})
        if len(sets) > 1:
            lines = [[v, *(_cell(summary.get(v, {}).get(f"{task}:{metric}@1L/{s}"), p=False) for s in sets)]
                     for v in sweep.variants]
            parts.append(f"{task} at the training length, per evaluation set:\n\n" + _table(["variant", *sets], lines))
    return parts


def cost_table(sweep, summary: dict) -> str:
    lines = []
    for v in sweep.variants:
        cells = [v]
        for key, _, fmt in COST_COLUMNS:
            entry = summary.get(v, {}).get(f"cost:{key}")
            scale = 1e-6 if key == "train_peak_bytes" else 1.0
            cells.append("n/a" if entry is None else fmt.format(entry["mean"] * scale))
        lines.append(cells)
    return _table(["variant", *(title for _, title, _ in COST_COLUMNS)], lines)


def write_report(sweep, rows: list[dict], out: Path) -> dict:
    """Write results.json, report.md and the plots into `out`; returns the results."""
    from jaxgpt.arena.plots import plot_all

    out = Path(out)
    good = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    summary = summarise(collect(good), sweep.baseline, sweep.compare)
    order = {(v, s, t): i for i, (v, s, t) in enumerate(sweep.runs())}
    good.sort(key=lambda r: order.get((r["variant"], r["seed"], r["task"]), len(order)))
    results = {"sweep": sweep.to_dict(), "runs": good, "variants": summary, "failed": failed}
    write_json(out / "results.json", results)
    plots = plot_all(sweep, good, summary, out)
    tokens = sweep.train["steps"] * sweep.train["batch_size"] * sweep.train["length"]
    text = [f"# {sweep.title}", "",
            f"{len(sweep.variants)} variants × {len(sweep.seeds)} seeds ({', '.join(map(str, sweep.seeds))}) × "
            f"{len(sweep.tasks)} tasks; every run trains {tokens:,} tokens ({sweep.train['steps']} steps × "
            f"{sweep.train['batch_size']} × {sweep.train['length']}) on the same batches. Cells: mean ± 95 % "
            f"interval over seeds (Student's t), and Welch's p-value against the baseline `{sweep.baseline}` "
            "(or the variant named in the table below). "
            "`n/a`: learned positions end at the training length."
            + (f" Widths matched on {sweep.match} (mlp_hidden set per variant)." if sweep.match != "none" else ""),
            "", "## Variants", "",
            _table(["variant", "config changes", "p-values against"],
                   [[v, ", ".join(f"{k}={c}" for k, c in ch.items()) or "(none)",
                     "—" if v == sweep.baseline else sweep.reference_of(v)] for v, ch in sweep.variants.items()]),
            "", "## Cost (means over seeds; this machine)", "", cost_table(sweep, summary), "", "## Quality", ""]
    text += [p + "\n" for p in task_tables(sweep, summary)]
    text += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if failed:
        text += ["", "## Failed runs", ""] + [f"- {r['variant']} seed {r['seed']} {r['task']}: {r['error']}"
                                               for r in failed]
    write_text(out / "report.md", "\n".join(text) + "\n")
    return results
