"""Train the same tiny GPT with the NumPy reference (hand-written backward + AdamW, float64) and
with jaxgpt's jitted Optax step (float32 by default, float64 with --x64), from the same initial
parameters and the same batches; plot both loss curves on one PNG and report the largest parameter
difference at the end.

    python experiments/numpy_vs_jax_training.py [--steps 300] [--x64] [--data python-docs]
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import reference as ref
from jaxgpt.config import GPTConfig
from jaxgpt.data.corpus import RandomWindowSampler, load_text
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.train.optimizer import build_optimizer, lr_schedule
from jaxgpt.data.tokenizer import CharTokenizer
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.step import create_state, make_train_step

ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--x64", action="store_true", help="run JAX in float64 too")
parser.add_argument("--data", default="python-docs")
parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
args = parser.parse_args()
jax.config.update("jax_enable_x64", args.x64)
dtype = "float64" if args.x64 else "float32"

text = load_text(args.data)[:200_000]
tok = CharTokenizer.from_text(text)
ids = np.asarray(tok.encode(text), dtype=np.int32)
cfg = GPTConfig(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                drop_rate=0.0, qkv_bias=False, dtype=dtype)  # see test_numpy_adamw_matches_optax_over_k_steps
tc = TrainConfig(batch_size=8, max_steps=args.steps, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                 weight_decay=0.1, grad_clip=1.0, beta1=0.9, beta2=0.99)
sampler = RandomWindowSampler(ids, cfg.context_length, tc.batch_size, seed=0)

model, tx = GPT(cfg), build_optimizer(tc)
params = init_params(cfg, seed=0)
if args.x64:
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
state = create_state(model, tx, params, seed=0)
step = jax.jit(make_train_step(model, tx))
np_params, np_opt = ref.to_numpy(params), ref.adamw_init(ref.to_numpy(params))
schedule = lr_schedule(tc)

jax_losses, np_losses, t_jax, t_np = [], [], 0.0, 0.0
for s in range(args.steps):
    x, y = sampler.batch(s)
    t0 = time.perf_counter()
    state, metrics = step(state, x[None], y[None])
    jax_losses.append(float(metrics["loss"]))
    t1 = time.perf_counter()
    loss, grads = ref.gpt_loss_and_grads(np_params, x, y, cfg)
    np_params, np_opt = ref.adamw_step(np_params, grads, np_opt, float(schedule(s)), b1=tc.beta1, b2=tc.beta2,
                                       eps=tc.eps, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    np_losses.append(float(loss))
    t_jax, t_np = t_jax + t1 - t0, t_np + time.perf_counter() - t1

diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max()), state["params"], np_params)
max_diff = max(jax.tree.leaves(diffs))
scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(np_params))
loss_gap = max(abs(a - b) for a, b in zip(jax_losses, np_losses))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
name = f"numpy_vs_jax_{dtype}"
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(np_losses, label="NumPy reference (float64, hand-written backward + AdamW)", lw=2.5, alpha=0.6)
ax.plot(jax_losses, "--", label=f"JAX jitted Optax step ({dtype})", lw=1.2)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title(f"same init and batches; max |Δparam| after {args.steps} steps = {max_diff:.2e}")
ax.legend()
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out / f"{name}.png", dpi=110)
result = {"steps": args.steps, "jax_dtype": dtype, "max_param_diff": max_diff, "largest_param": scale,
          "max_loss_gap": loss_gap, "final_loss_numpy": np_losses[-1], "final_loss_jax": jax_losses[-1],
          "seconds_jax": t_jax, "seconds_numpy": t_np, "model": cfg.to_dict(), "train": tc.to_dict()}
(out / f"{name}.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: result[k] for k in ("max_param_diff", "max_loss_gap", "final_loss_numpy", "final_loss_jax",
                                          "seconds_jax", "seconds_numpy")}))
