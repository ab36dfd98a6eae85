"""The main job before and after, side by side in one invocation: `jaxgpt train` (the default
recipe) and `jaxgpt train --recipe gpt2-classic` (the old default), run as users run them.

Each is a fresh `jaxgpt train` process timed from start to exit (install excluded); recorded:
validation loss (whole split), wall time, tokens/s, the samples, and how many of the samples'
words are real words (words of two or more letters that occur in the training corpus). Writes
docs/results/main_job.json and main_job.png (validation loss against wall time).

    python experiments/main_job.py
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTENDERS = {"default": [], "gpt2-classic": ["--recipe", "gpt2-classic"]}


def real_word_fraction(samples: list[str], vocabulary: set[str]) -> float:
    words = [w.lower() for s in samples for w in re.findall(r"[A-Za-z]{2,}", s)]
    return sum(w in vocabulary for w in words) / max(len(words), 1)


def run(name: str, extra: list[str], out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    cmd = [sys.executable, "-m", "jaxgpt.cli", "train", "--out", str(out), "--json", "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time_s"] for r in records if r["kind"] == "train"}
    return {"name": name, "command": "jaxgpt train " + " ".join(extra), "wall_s": round(wall, 1),
            "val_loss": summary["val_loss"], "train_loss": summary["train_loss"], "steps": summary["step"],
            "tokens_per_s": summary["tokens_per_s"], "samples": summary.get("samples", []),
            "curve": [(times.get(r["step"]), r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/main_job")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "main_job"))
    args = parser.parse_args()

    from jaxgpt.data.corpus import load_text

    vocabulary = {w.lower() for w in re.findall(r"[A-Za-z]{2,}", load_text("python-docs"))}
    results = {}
    for name, extra in CONTENDERS.items():
        print(f"running {name} …", file=sys.stderr, flush=True)
        results[name] = run(name, extra, Path(args.runs) / name)
        results[name]["real_word_fraction"] = round(real_word_fraction(results[name]["samples"], vocabulary), 3)
        print(json.dumps({k: results[name][k] for k in ("name", "wall_s", "val_loss", "real_word_fraction")}),
              file=sys.stderr, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        points = [(t, loss) for t, _, loss in r["curve"] if t is not None]
        ax.plot(*zip(*points), "o-", label=f"{r['command'].strip()} ({r['wall_s']:.0f} s, val {r['val_loss']:.3f})")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation loss (whole split)")
    ax.set_title("the main job: embedded corpus, character level, small preset")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("| recipe | wall (s) | steps | val loss | tokens/s | real words in samples |\n|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| `{r['command'].strip()}` | {r['wall_s']} | {r['steps']} | {r['val_loss']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['real_word_fraction']:.0%} |")


if __name__ == "__main__":
    main()
