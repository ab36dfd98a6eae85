"""The arena's three figures: the metric over training, accuracy against context length, and
quality against KV-cache bytes per token (the Pareto front drawn through the best trade-offs)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _colours(sweep) -> dict:
    """One distinct colour per variant: tab20's ten dark hues first, then their light twins."""
    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {v: cmap(order[i % 20]) for i, v in enumerate(sweep.variants)}


def _save(fig, axes, path: Path) -> Path:
    """One legend for the whole figure, to the right of the panels, then the PNG."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def mean_curve(rows: list[dict], variant: str, task: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps and the seed-mean of a curve's `key` for one variant and task (None if no run)."""
    curves = [r["curve"] for r in rows if r["variant"] == variant and r["task"] == task and r.get("curve")]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    steps = np.array([p["step"] for p in curves[0][:n]])
    return steps, np.mean([[p[key] for p in c[:n]] for c in curves], axis=0)


def plot_training(sweep, rows: list[dict], out: Path) -> Path:
    fig, axes = _grid(len(sweep.tasks))
    colours = _colours(sweep)
    for ax, task in zip(axes, sweep.tasks):
        key = "accuracy" if sweep.metric_prefix(task) == "acc" else "loss"
        for variant in sweep.variants:
            curve = mean_curve(rows, variant, task, key)
            if curve is not None:
                ax.plot(*curve, label=variant, color=colours[variant])
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss" if key == "loss" else "held-out accuracy")
    return _save(fig, axes, out / "training.png")


def plot_lengths(sweep, summary: dict, out: Path) -> Path:
    fig, axes = _grid(len(sweep.tasks))
    length, colours = sweep.train["length"], _colours(sweep)
    for ax, task in zip(axes, sweep.tasks):
        metric = sweep.metric_prefix(task)
        for variant in sweep.variants:
            points = [(length * k, summary.get(variant, {}).get(f"{task}:{metric}@{k}L")) for k in sweep.lengths]
            points = [(x, e["mean"]) for x, e in points if e is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=variant, color=colours[variant])
        ax.set_xscale("log", base=2)
        ax.set_xticks([length * k for k in sweep.lengths], [str(length * k) for k in sweep.lengths])
        ax.axvline(length, color="gray", lw=0.8, ls=":")
        ax.set_title(task)
        ax.set_xlabel("evaluation length (tokens; dotted: training length)")
        ax.set_ylabel("loss" if metric == "loss" else "accuracy")
    return _save(fig, axes, out / "lengths.png")


def quality(sweep, summary: dict, variant: str) -> tuple[float | None, str]:
    """One quality figure per variant: the first language task's loss at L, else the mean accuracy
    at L over the tasks (lower loss / higher accuracy is better)."""
    lm = [t for t in sweep.tasks if sweep.metric_prefix(t) == "loss"]
    if lm:
        entry = summary.get(variant, {}).get(f"{lm[0]}:loss@1L")
        return (None if entry is None else entry["mean"]), f"{lm[0]} loss at L"
    accs = [summary.get(variant, {}).get(f"{t}:acc@1L") for t in sweep.tasks]
    accs = [e["mean"] for e in accs if e is not None]
    return (sum(accs) / len(accs) if accs else None), "mean accuracy at L"


def plot_pareto(sweep, summary: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points, label = [], ""
    for variant in sweep.variants:
        q, label = quality(sweep, summary, variant)
        kv = summary.get(variant, {}).get("cost:kv_bytes_per_token")
        if q is not None and kv is not None:
            points.append((kv["mean"], q, variant))
    lower_better = "loss" in label
    colours = _colours(sweep)
    for kv, q, name in points:
        ax.scatter(kv, q, color=colours[name])
        ax.annotate(name, (kv, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front, best = [], None
    for kv, q, _ in sorted(points):
        if best is None or (q < best if lower_better else q > best):
            front.append((kv, q))
            best = q
    if len(front) > 1:
        ax.plot(*zip(*front), color="gray", lw=1, ls="--", label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KV-cache bytes per token (at the training length)")
    ax.set_ylabel(label)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(sweep, rows: list[dict], summary: dict, out: Path) -> list[Path]:
    return [plot_training(sweep, rows, out), plot_lengths(sweep, summary, out), plot_pareto(sweep, summary, out)]
