"""float32 against bf16 mixed precision (`GPTConfig.dtype = "bfloat16"`): the same model, data order
and seed trained both ways; validation-loss curves side by side, final losses and train tokens/s.

    JAXGPT_DATA_DIR=../shared/data python experiments/mixed_precision.py [--steps 300]

Writes docs/results/mixed_precision.json and .png. The model is wide enough (512) for the matmuls
to dominate, so the speed-up is the one bf16 matmul units give (AMX on this CPU); bf16 changes only
the matmul inputs (jaxgpt.precision): weights, optimizer, LayerNorm, softmax and loss stay float32.
One CPU device for both; tokens/s are medians of the logged intervals after the first (compilation).
"""

import argparse
import json
from pathlib import Path

import jax
from _common import plot_val_curves, train_fresh

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import count_params, param_shapes
from jaxgpt.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
MODEL = GPTConfig(vocab_size=66, context_length=128, emb_dim=512, n_heads=8, n_layers=6, drop_rate=0.0)

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--runs", default=str(ROOT / "runs" / "mixed-precision"))
parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the saved JSON")
args = parser.parse_args()
results_path = ROOT / "docs" / "results" / "mixed_precision.json"

cfg = TrainConfig(data="tinyshakespeare", tokenizer="char", batch_size=16, max_steps=args.steps, lr=1e-3,
                  min_lr=1e-4, warmup_steps=30, eval_every=50, eval_batches=20, log_every=10, ckpt_every=10_000,
                  keep_checkpoints=1, samples=0, devices=1, seed=0)
results = json.loads(results_path.read_text()) if args.plot_only else {"runs": {}}
for dtype in () if args.plot_only else ("float32", "bfloat16"):
    run = train_fresh(MODEL.replace(dtype=dtype), cfg, Path(args.runs) / dtype)
    results["runs"][dtype] = {k: run[k] for k in ("final_val_loss", "best_val_loss", "final_train_loss", "curve",
                                                  "tokens_per_s", "wall_s")}
    print(dtype, json.dumps({k: v for k, v in results["runs"][dtype].items() if k != "curve"}), flush=True)

if not args.plot_only:
    f32, bf16 = results["runs"]["float32"], results["runs"]["bfloat16"]
    results["bf16_speedup"] = bf16["tokens_per_s"] / f32["tokens_per_s"]
    results["val_loss_difference"] = bf16["final_val_loss"] - f32["final_val_loss"]
    results["setup"] = {"model": MODEL.to_dict(), "params": count_params(param_shapes(MODEL)), "train": cfg.to_dict(),
                        "jax": jax.__version__, "devices": f"1 x {jax.devices()[0].platform}",
                        "command": "python experiments/mixed_precision.py --steps %d" % args.steps}
    results_path.write_text(json.dumps(results, indent=2))
print(json.dumps({k: results[k] for k in ("bf16_speedup", "val_loss_difference")}))

plot_val_curves({f"{dtype}: val {r['final_val_loss']:.3f}, {r['tokens_per_s']:,.0f} tokens/s": r["curve"]
                 for dtype, r in results["runs"].items()}, results_path.with_suffix(".png"),
                "float32 vs bf16 mixed precision\ntinyshakespeare (char), same model, data and seed", figsize=(7, 4.5))
