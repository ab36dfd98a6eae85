"""Memory and time of the attention backends against sequence length (forward, forward+backward).

Memory is XLA's own account of each compiled program (`memory_analysis()`: temporaries + outputs),
so it is exact and needs no running; a program whose account exceeds `--budget-gib` is not run
(that is where the backend "runs out"). Times are medians of `--repeats` runs after a warm-up.

    python experiments/attention_backends.py [--lengths 128,256,...] [--heads 8] [--head-dim 64]

Writes docs/results/attention_backends.json and .png.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.nn.attention import ATTENTION_BACKENDS

ROOT = Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser()
parser.add_argument("--lengths", default="128,256,512,1024,2048,4096,8192,16384")
parser.add_argument("--heads", type=int, default=8)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--budget-gib", type=float, default=4.0, help="skip programs that need more memory than this")
args = parser.parse_args()


def programs(name, t):
    fn = ATTENTION_BACKENDS[name]
    pos = jnp.arange(t)[None]

    def forward(q, k, v):
        return fn(q, k, v, q_pos_bt=pos, k_pos_bs=pos)

    def forward_backward(q, k, v, w):
        return jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    return {"forward": jax.jit(forward), "forward+backward": jax.jit(forward_backward)}


rows = []
for t in [int(x) for x in args.lengths.split(",")]:
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=(1, t, args.heads, args.head_dim)), jnp.float32) for _ in range(4))
    for name in ATTENTION_BACKENDS:
        for kind, fn in programs(name, t).items():
            inputs = (q, k, v) if kind == "forward" else (q, k, v, w)
            t0 = time.perf_counter()
            compiled = fn.lower(*inputs).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            need = mem.temp_size_in_bytes + mem.output_size_in_bytes
            row = {"length": t, "backend": name, "pass": kind, "memory_bytes": need, "compile_s": round(compile_s, 2)}
            if need > args.budget_gib * 2**30:
                row["skipped"] = f"needs {need / 2**30:.1f} GiB > budget {args.budget_gib} GiB"
            else:
                jax.block_until_ready(compiled(*inputs))
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(*inputs))
                    times.append(time.perf_counter() - t0)
                row["seconds"] = statistics.median(times)
            rows.append(row)
            print(json.dumps(row), flush=True)

out = ROOT / "docs" / "results" / "attention_backends.json"
out.write_text(json.dumps({"setup": {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
                                     "budget_gib": args.budget_gib, "jax": jax.__version__,
                                     "device": str(jax.devices()[0])}, "rows": rows}, indent=2))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
for name in ATTENTION_BACKENDS:
    for kind, style in (("forward", "--"), ("forward+backward", "-")):
        sel = [r for r in rows if r["backend"] == name and r["pass"] == kind]
        axes[0].plot([r["length"] for r in sel], [r["memory_bytes"] / 2**20 for r in sel], style, marker="o",
                     label=f"{name} {kind}")
        ran = [r for r in sel if "seconds" in r]
        axes[1].plot([r["length"] for r in ran], [r["seconds"] for r in ran], style, marker="o", label=f"{name} {kind}")
axes[0].axhline(args.budget_gib * 1024, color="grey", lw=0.8)
for ax, label in zip(axes, ("memory (MiB, XLA's account)", "seconds (median)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
axes[0].set_title(f"memory; grey line: {args.budget_gib} GiB budget (not run above it)")
axes[1].set_title(f"time, b=1, {args.heads} heads x {args.head_dim}")
fig.tight_layout()
fig.savefig(out.with_suffix(".png"), dpi=120)
