"""GPT-2-style vs Llama-style vs Qwen3-style vs Gemma3-style blocks at the same parameter count, the
same steps, data order and seeds, on tinyshakespeare and the embedded corpus (character level).

    JAXGPT_DATA_DIR=../shared/data python experiments/families.py [--steps 300] [--seeds 0,1,2]

Writes docs/results/families.json, .md and .png. The gated MLPs' hidden width is chosen so that
every variant has GPT-2's parameter count (within 0.5 %). One CPU device for every run; tokens/s
are medians of the logged intervals after the first (which includes compilation).
"""

import argparse
import json
import statistics
from pathlib import Path

import jax
from _common import plot_val_curves, train_fresh

from jaxgpt.config import get_preset
from jaxgpt.nn.model import count_params, param_shapes
from jaxgpt.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BASE = get_preset("tiny", context_length=128)  # GPT-2 blocks: 4 layers, 4 heads, width 128
ROPE = dict(position="rope", norm="rmsnorm", qkv_bias=False, attn_out_bias=False, mlp_bias=False, ln_eps=1e-6)
FAMILIES = {
    "GPT-2": {},
    "Llama": dict(ROPE, mlp="swiglu"),
    "Qwen3": dict(ROPE, mlp="swiglu", qk_norm=True),
    "Gemma3": dict(ROPE, mlp="geglu", qk_norm=True, norm_unit_offset=True, post_norms=True, emb_scale=True,
                   sliding_window=32, global_every=2, rope_local_base=10_000.0, rope_base=1_000_000.0),
}
CORPORA = {"tinyshakespeare": 66, "python-docs": None}  # vocabulary: 65 characters + end-of-text; None: from data


def matched(changes: dict, vocab: int) -> dict:
    """`changes` with the MLP width that brings the parameter count closest to GPT-2's."""
    target = count_params(param_shapes(BASE.replace(vocab_size=vocab)))
    if not changes:
        return changes
    widths = range(64, 1024, 4)
    best = min(widths, key=lambda f: abs(count_params(param_shapes(BASE.replace(vocab_size=vocab, mlp_hidden=f,
                                                                                    **changes))) - target))
    return {**changes, "mlp_hidden": best}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "families"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"steps": args.steps, "seeds": seeds, "jax": jax.__version__, "runs": {}}
    for corpus, vocab in CORPORA.items():
        from jaxgpt.data.corpus import load_text

        vocab = vocab or len(set(load_text(corpus))) + 1
        for family, changes in FAMILIES.items():
            model = BASE.replace(vocab_size=vocab, **matched(changes, vocab))
            for seed in seeds:
                cfg = TrainConfig(data=corpus, tokenizer="char", batch_size=16, max_steps=args.steps, lr=1e-3,
                                  min_lr=1e-4, warmup_steps=30, eval_every=50, eval_batches=10, log_every=25,
                                  ckpt_every=100_000, keep_checkpoints=1, samples=0, devices=1, seed=seed,
                                  peak_flops=1e11)
                run = train_fresh(model, cfg, Path(args.runs) / f"{corpus}-{family}-{seed}")
                key = f"{corpus}/{family}/{seed}"
                results["runs"][key] = {**run, "params": count_params(param_shapes(model)),
                                        "mlp_hidden": model.hidden_dim}
                print(key, {k: run[k] for k in ("best_val_loss", "tokens_per_s", "wall_s")}, flush=True)
    out = ROOT / "docs" / "results"
    (out / "families.json").write_text(json.dumps(results, indent=2))
    write_table(results, out / "families.md")
    curves = {f"{c}/{f} (seed {seeds[0]})": results["runs"][f"{c}/{f}/{seeds[0]}"]["curve"]
              for c in CORPORA for f in FAMILIES}
    plot_val_curves(curves, out / "families.png", f"validation loss, {args.steps} steps, equal parameters",
                    figsize=(9, 5.5))


def write_table(results: dict, path: Path) -> None:
    rows = ["| corpus | blocks | params | MLP width | best val loss (mean ± sd over seeds) | tokens/s (median) |",
            "|---|---|---|---|---|---|"]
    for corpus in CORPORA:
        for family in FAMILIES:
            runs = [results["runs"][f"{corpus}/{family}/{s}"] for s in results["seeds"]]
            losses = [r["best_val_loss"] for r in runs]
            spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
            rows.append(f"| {corpus} | {family} | {runs[0]['params']:,} | {runs[0]['mlp_hidden']} | "
                        f"{statistics.mean(losses):.4f} ± {spread:.4f} | "
                        f"{statistics.median(r['tokens_per_s'] for r in runs):,.0f} |")
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
