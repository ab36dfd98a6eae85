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

BASELINE = "nanoGPT's CPU recipe (AdamW, cosine, tied head)"
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
    # a second round, on top of the first's result
    ("warmup-stable-decay again, over the 1000-step horizon", ["train.schedule=wsd"]),
    ("3 Newton–Schulz steps (not 5)", ["train.muon_ns_steps=3"]),
    ("schedule over 700 steps", ["train.decay_steps=700"]),
    ("warmup 50 steps (not 100)", ["train.warmup_steps=50"]),
    ("one device with two threads (not pmap over two)", ["train.devices=1"]),
    # a third round, in a later session: the kept configuration measured again first (a change with no
    # overrides re-bases the comparison on this session's machine), then what benchmarks/step_profile.py
    # pointed at: the bias gradients' reductions cost ~9 % of the step's kernel time
    ("the kept configuration again (re-measured in a later session)", []),
    ("no biases (attention, MLP)", ["model.qkv_bias=false", "model.attn_out_bias=false", "model.mlp_bias=false"]),
    ("RMSNorm (not LayerNorm)", ["model.norm=rmsnorm"]),
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
    parser.add_argument("--reuse", default=None, help="an earlier report: its rows are taken as measured while "
                        "they follow the same changes in the same order (so new changes at the end run alone)")
    args = parser.parse_args()
    earlier = json.loads(Path(args.reuse).read_text())["rows"] if args.reuse else []
    if earlier and earlier[0]["runs"] and len(earlier[0]["runs"]) != args.seeds:
        raise SystemExit(f"{args.reuse} was measured with other seeds than --seeds {args.seeds}")

    def measured(index: int, label: str, overrides: list) -> dict:
        if index < len(earlier) and earlier[index]["change"] == label and all(
                earlier[i]["change"] == ([BASELINE] + [c for c, _ in CHANGES])[i] for i in range(index)):
            return {k: earlier[index][k] for k in ("wall_s", "steps", "runs")}
        return measure(overrides, args.seeds, Path(args.runs))

    kept: list = []
    base = measured(0, BASELINE, kept)
    rows = [{"change": BASELINE, "kept": True, **base}]
    best = base["wall_s"]
    print(f"baseline: {best:.1f} s, {base['steps']} steps", file=sys.stderr, flush=True)
    for index, (label, overrides) in enumerate(CHANGES, start=1):
        result = measured(index, label, kept + overrides)
        rebase = not overrides and result["wall_s"] is not None  # a re-measurement of what was kept
        keep = rebase or result["wall_s"] is not None and (best is None or result["wall_s"] < best)
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
