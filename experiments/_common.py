"""Shared by the reproduction scripts: run a training, then copy its curve and summary to docs/results."""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import jax

from jaxgpt.config import GPTConfig
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.loop import train

ROOT = Path(__file__).resolve().parent.parent


def run_and_publish(name: str, model: GPTConfig, cfg: TrainConfig, out: Path, reference: dict) -> dict:
    """Train into `out`, then write docs/results/<name>.png and .json (with the reference figures)."""
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    summary = train(model, cfg, out)
    summary["total_wall_s"] = time.perf_counter() - t0  # includes data loading, compilation, evaluation
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "name": name,
        "model": model.to_dict(),
        "train": cfg.to_dict(),
        "summary": summary,
        "first_train_loss": next(r["loss"] for r in records if r["kind"] == "train"),
        "evals": [{k: r[k] for k in ("step", "val_loss")} for r in records if r["kind"] == "eval"],
        "reference": reference,
        "machine": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                    "cpu": platform.processor() or platform.machine()},
    }
    dest = ROOT / "docs" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "loss.png", dest / f"{name}.png")
    (dest / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: summary[k] for k in ("step", "train_loss", "val_loss", "best_val_loss", "wall_s")}))
    return result


def train_fresh(model: GPTConfig, cfg: TrainConfig, out: Path) -> dict:
    """Train into an emptied `out` without a progress bar; what the comparison scripts tabulate:
    best/final losses, the validation curve, median train tokens/s (the first logged interval,
    which includes compilation, left out) and the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(model, cfg, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    return {"best_val_loss": summary["best_val_loss"], "final_val_loss": evals[-1]["val_loss"],
            "final_train_loss": trains[-1]["loss"], "curve": [(r["step"], r["val_loss"]) for r in evals],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in trains[1:]),
            "wall_s": round(time.perf_counter() - t0, 1)}


def plot_val_curves(curves: dict, out_png: Path, title: str, figsize=(8, 5)) -> None:
    """One validation-loss-against-step line per run: `curves` maps a legend label to (step, loss) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    for label, curve in curves.items():
        steps, losses = zip(*curve)
        ax.plot(steps, losses, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def run_cli(*argv: str) -> dict:
    """Run the `jaxgpt` command line as users do and return its --json output (with its wall time)."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jaxgpt.cli", *argv, "--json", "--no-progress"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result
