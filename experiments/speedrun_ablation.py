"""The speedrun ablation: starting from nanoGPT's CPU recipe in jaxgpt, add one change at a time and
keep it only if the time to validation loss 1.88 (tinyshakespeare, whole split, compilation
included) drops. Each run is a fresh process of `benchmarks/time_to_target.py`'s jaxgpt worker.

    JAXGPT_DATA_DIR=../shared/data python experiments/speedrun_ablation.py [--seeds 1]

Writes docs/results/speedrun_ablation.json and prints the table for docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.time_to_target import run_worker  # noqa: E402

CHANGES = [  # (label, overrides), tried in this order on top of what was kept
    ("Muon on the hidden matrices", ["train.optimizer=muon"]),
    ("warmup-stable-decay schedule", ["train.schedule=wsd"]),
    ("untied output head", ["model.tie_embeddings=false"]),
    ("zero-initialised output projections", ["model.zero_init_proj=true"]),
    ("QK-norm", ["model.qk_norm=true"]),
    ("ReLU² MLP", ["model.mlp=relu2"]),
    ("logit soft-cap 30", ["model.logit_softcap=30"]),
    ("bf16 matmuls", ["model.dtype=bfloat16"]),
    ("10 optimizer steps per compiled call", ["train.steps_per_call=10"]),
    ("schedule over 1000 steps (not 2000)", ["train.decay_steps=1000"]),
    ("batch 24", ["train.batch_size=24"]),
    ("batch 6", ["train.batch_size=6"]),
    ("lr × 2 (AdamW 2e-3, Muon 0.04)", ["train.lr=2e-3", "train.muon_lr=0.04"]),
    ("lr × 1/2 (AdamW 5e-4, Muon 0.01)", ["train.lr=5e-4", "train.muon_lr=0.01"]),
    ("schedule-free AdamW instead", ["train.optimizer=schedule_free_adamw"]),
]


def measure(overrides: list, seeds: int, runs: Path) -> dict:
    results = [run_worker("jaxgpt-nanogpt", seed, runs, tuple(overrides)) for seed in range(seeds)]
    walls = [r["wall_s"] for r in results if r["reached"]]
    return {"wall_s": statistics.median(walls) if len(walls) == len(results) else None,
            "steps": statistics.median(r["steps"] for r in results), "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--runs", default="runs/speedrun_ablation")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "speedrun_ablation.json"))
    args = parser.parse_args()

    kept: list = []
    base = measure(kept, args.seeds, Path(args.runs))
    rows = [{"change": "nanoGPT's CPU recipe (AdamW, cosine, tied head)", "kept": True, **base}]
    best = base["wall_s"]
    print(f"baseline: {best:.1f} s, {base['steps']} steps", file=sys.stderr, flush=True)
    for label, overrides in CHANGES:
        result = measure(kept + overrides, args.seeds, Path(args.runs))
        keep = result["wall_s"] is not None and (best is None or result["wall_s"] < best)
        rows.append({"change": label, "overrides": overrides, "kept": keep, **result})
        print(f"{label}: {result['wall_s']} s, {result['steps']} steps -> {'kept' if keep else 'dropped'}",
              file=sys.stderr, flush=True)
        if keep:
            kept += overrides
            best = result["wall_s"]
    report = {"target_val_loss": 1.88, "seeds": args.seeds, "kept_overrides": kept, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| change (cumulative when kept) | time to 1.88 (s) | steps | kept |\n|---|---|---|---|")
    for r in rows:
        wall = f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "not reached"
        print(f"| {r['change']} | {wall} | {r['steps']:.0f} | {'yes' if r['kept'] else 'no'} |")
    print(f"kept: {' '.join(kept)}")


if __name__ == "__main__":
    main()
