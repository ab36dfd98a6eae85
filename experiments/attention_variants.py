"""Every attention variant trained the same way: tinyshakespeare (character level), same model size,
steps, data order and seed; a table of validation loss, train tokens/s, parameters and KV-cache bytes
per token, and one figure of validation loss against steps.

    JAXGPT_DATA_DIR=../shared/data python experiments/attention_variants.py [--steps 600] [--only rope,alibi]

Writes docs/results/attention_variants.json and .png. One CPU device (the same for every variant);
tokens/s are medians of the logged intervals after the first (which includes compilation).
"""

import argparse
import json
from pathlib import Path

import jax
from _common import plot_val_curves, train_fresh

from jaxgpt.config import get_preset
from jaxgpt.inference.kv_cache import kv_cache_bytes_per_token
from jaxgpt.nn.model import count_params, param_shapes
from jaxgpt.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BASE = get_preset("tiny", context_length=128)  # 4 layers, 4 heads, width 128, no dropout
VARIANTS = {  # name: GPTConfig changes from GPT-2's attention
    "mha (GPT-2)": {},
    "gqa-2": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "rope": {"position": "rope"},
    "alibi": {"position": "alibi"},
    "no positions": {"position": "none"},
    "window-32 (all layers)": {"sliding_window": 32},
    "window-32, 1 local : 1 global": {"sliding_window": 32, "global_every": 2},
    "mla latent-32": {"attention": "mla", "latent_dim": 32},
    "linear (elu+1)": {"attention": "linear"},
}

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--only", default=None, help="comma-separated variant names")
parser.add_argument("--runs", default=str(ROOT / "runs" / "attention-variants"))
args = parser.parse_args()
chosen = {k: v for k, v in VARIANTS.items() if args.only is None or k in args.only.split(",")}

cfg = TrainConfig(data="tinyshakespeare", tokenizer="char", batch_size=16, max_steps=args.steps, lr=1e-3,
                  min_lr=1e-4, warmup_steps=50, eval_every=100, eval_batches=20, log_every=20, ckpt_every=10_000,
                  keep_checkpoints=1, samples=0, devices=1, seed=0)
results_path = ROOT / "docs" / "results" / "attention_variants.json"
results = json.loads(results_path.read_text()) if results_path.exists() and args.only else {"variants": {}}
for name, changes in chosen.items():
    model = BASE.replace(vocab_size=66, **changes)  # 65 characters + end-of-text
    run = train_fresh(model, cfg, Path(args.runs) / "".join(c if c.isalnum() else "-" for c in name))
    results["variants"][name] = {
        "changes": changes,
        "val_loss": run["best_val_loss"],
        "curve": run["curve"],
        "tokens_per_s": run["tokens_per_s"],
        "params": count_params(param_shapes(model)),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
        "wall_s": run["wall_s"],
    }
    print(name, json.dumps({k: v for k, v in results["variants"][name].items() if k != "curve"}), flush=True)

results["setup"] = {"model": BASE.to_dict(), "train": cfg.to_dict(), "jax": jax.__version__,
                    "devices": f"1 x {jax.devices()[0].platform}",
                    "command": "python experiments/attention_variants.py --steps %d" % args.steps}
results_path.write_text(json.dumps(results, indent=2))

plot_val_curves({f"{name} ({r['val_loss']:.3f})": r["curve"] for name, r in results["variants"].items()},
                results_path.with_suffix(".png"), "attention variants, tinyshakespeare (char), same model, data and seed")
