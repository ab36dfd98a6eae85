"""Dense vs mixture-of-experts blocks at the same active and at the same total parameters, and the
balancing methods, on tinyshakespeare and the embedded corpus (character level), three seeds.

    JAXGPT_DATA_DIR=../shared/data python experiments/moe.py [--steps 250] [--seeds 0,1,2]

Every run: Qwen3-style blocks of the `tiny` shape (4 layers, width 128, context 64), the same
steps, data order and seeds, one CPU device. The MoE layers have 8 experts of width 128, top-2:
- "dense, same active": an MLP of width 256 (= the 2 experts a token uses);
- "dense, same total": an MLP of width 1024 (= all 8 experts);
- "MoE + aux loss" (Switch load-balancing loss, 0.01), "MoE + bias (aux-free)" (DeepSeek-V3's
  sigmoid router with a balancing bias), "MoE, no balancing".
Writes docs/results/moe.json, .md and .png (validation loss against steps and against wall time,
and the expert load over training: max_e load_e · E per MoE layer, 1 = even).
"""

import argparse
import json
import statistics
from pathlib import Path

import jax
from _common import train_fresh

from jaxgpt.config import get_preset
from jaxgpt.data.corpus import load_text
from jaxgpt.nn.model import param_counts
from jaxgpt.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BASE = get_preset("tiny").replace(position="rope", norm="rmsnorm", qkv_bias=False, attn_out_bias=False,
                                  mlp_bias=False, ln_eps=1e-6, mlp="swiglu", qk_norm=True)
MOE = dict(moe_experts=8, moe_top_k=2, moe_hidden=128)
VARIANTS = {
    "dense, same active": dict(mlp_hidden=256),
    "dense, same total": dict(mlp_hidden=1024),
    "MoE + aux loss": dict(MOE, moe_aux_loss_coef=0.01),
    "MoE + bias (aux-free)": dict(MOE, moe_router="sigmoid", moe_aux_loss_coef=0.0, moe_bias_rate=0.005),
    "MoE, no balancing": dict(MOE, moe_aux_loss_coef=0.0),
}
CORPORA = {"tinyshakespeare": 66, "python-docs": None}  # vocabulary: 65 characters + end-of-text; None: from data


def run_details(run_dir: Path) -> dict:
    """From metrics.jsonl: validation loss against wall time, and the expert load over training."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    time_at = {r["step"]: r["time_s"] for r in records if r["kind"] == "train"}
    timed = [(time_at[r["step"]], r["val_loss"]) for r in records if r["kind"] == "eval" and r["step"] in time_at]
    load = [(r["step"], r["moe_imbalance"], r["moe_load"]) for r in records
            if r["kind"] == "train" and "moe_imbalance" in r]
    return {"time_curve": timed, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "moe"))
    parser.add_argument("--replot", action="store_true", help="redraw table and plot from docs/results/moe.json")
    args = parser.parse_args()
    if args.replot:
        results = json.loads((ROOT / "docs" / "results" / "moe.json").read_text())
        write_table(results, ROOT / "docs" / "results" / "moe.md")
        plot(results, ROOT / "docs" / "results" / "moe.png")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"steps": args.steps, "seeds": seeds, "jax": jax.__version__, "runs": {}}
    for corpus, vocab in CORPORA.items():
        vocab = vocab or len(set(load_text(corpus))) + 1
        for name, changes in VARIANTS.items():
            model = BASE.replace(vocab_size=vocab, **changes)
            counts = param_counts(model)
            for seed in seeds:
                cfg = TrainConfig(data=corpus, tokenizer="char", batch_size=16, max_steps=args.steps, lr=2e-3,
                                  min_lr=2e-4, warmup_steps=25, eval_every=50, eval_batches=10, log_every=25,
                                  ckpt_every=100_000, keep_checkpoints=1, samples=0, devices=1, seed=seed,
                                  peak_flops=1e11)
                run_dir = Path(args.runs) / f"{corpus}-{name.replace(' ', '_')}-{seed}"
                run = {**train_fresh(model, cfg, run_dir), **run_details(run_dir)}
                key = f"{corpus}/{name}/{seed}"
                results["runs"][key] = {**run, "params": counts["total_tied" if model.tie_embeddings else "total"],
                                        "active_params": counts["active"]}
                print(key, {k: run[k] for k in ("best_val_loss", "tokens_per_s", "wall_s")}, flush=True)
    out = ROOT / "docs" / "results"
    (out / "moe.json").write_text(json.dumps(results, indent=2))
    write_table(results, out / "moe.md")
    plot(results, out / "moe.png")


def write_table(results: dict, path: Path) -> None:
    rows = ["| corpus | model | params (total / active) | best val loss (mean ± sd) | tokens/s (median) | "
            "wall s (mean) | final imbalance (max load · E) |", "|---|---|---|---|---|---|---|"]
    for corpus in CORPORA:
        for name in VARIANTS:
            runs = [results["runs"][f"{corpus}/{name}/{s}"] for s in results["seeds"]]
            losses = [r["best_val_loss"] for r in runs]
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            imbalance = (f"{statistics.mean(r['load'][-1][1] for r in runs):.2f}" if runs[0]["load"] else "—")
            rows.append(f"| {corpus} | {name} | {runs[0]['params']:,} / {runs[0]['active_params']:,} | "
                        f"{statistics.mean(losses):.4f} ± {spread:.4f} | "
                        f"{statistics.median(r['tokens_per_s'] for r in runs):,.0f} | "
                        f"{statistics.mean(r['wall_s'] for r in runs):.0f} | {imbalance} |")
    path.write_text("\n".join(rows) + "\n")


def plot(results: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = results["seeds"][0]
    fig, axes = plt.subplots(len(CORPORA), 3, figsize=(15, 4.2 * len(CORPORA)))
    for row, corpus in zip(axes, CORPORA):
        for i, name in enumerate(VARIANTS):  # one colour per variant in every panel
            run = results["runs"][f"{corpus}/{name}/{seed}"]
            row[0].plot(*zip(*run["curve"]), marker=".", label=name, color=f"C{i}")
            row[1].plot(*zip(*run["time_curve"]), marker=".", label=name, color=f"C{i}")
            if run["load"]:
                steps, imbalance, _ = zip(*run["load"])
                row[2].plot(steps, imbalance, marker=".", label=name, color=f"C{i}")
        for ax, xlabel, ylabel in zip(row, ("step", "wall time (s, from the start)", "step"),
                                      ("validation loss", "validation loss", "max load · E (mean over layers)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.set_title(f"{corpus} (seed {seed})", fontsize=10)
        row[0].legend(fontsize=8)
        row[2].axhline(1.0, color="gray", lw=0.8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main()
