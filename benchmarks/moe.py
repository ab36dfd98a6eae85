"""`python -m benchmarks.moe` (from a checkout): the mixture-of-experts train step against a dense one.

Step time and peak memory (each variant in its own process, `benchmarks.bench.time_calls`) of:
- a dense model with the MoE model's active parameters (MLP width = k · expert width);
- the MoE model with dropless dispatch (the grouped matmul `jaxgpt.nn.moe.grouped_matmul` picks
  for this backend), with `jax.lax.ragged_dot` forced, and with capacity factor 1.25;
- expert parallelism on 4 simulated CPU devices (`--mesh expert=4`), and the same step with the
  two all-to-alls replaced by the identity (same shapes, wrong values): the difference is the
  all-to-all's share of the step.
Writes docs/results/bench_moe.json and .md; `--quick` runs fewer steps.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(vocab_size=256, context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0, mlp="swiglu",
            norm="rmsnorm", position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False)
MOE = dict(moe_experts=8, moe_top_k=2, moe_hidden=512)
VARIANTS = {  # name -> (model overrides, devices/mesh, what the worker changes)
    "dense, same active": (dict(mlp_hidden=1024), None, None),
    "MoE dropless": (MOE, None, None),
    "MoE dropless, ragged_dot forced": (MOE, None, "ragged"),
    "MoE capacity 1.25": (dict(MOE, moe_capacity_factor=1.25), None, None),
    "MoE expert=4 (4 CPU devices)": (MOE, "expert=4", None),
    "MoE expert=4, all-to-all as identity": (MOE, "expert=4", "no-a2a"),
}
BATCH, SEQ = 8, 256


def worker(name: str, steps: int) -> dict:
    overrides, mesh, change = VARIANTS[name]
    if mesh:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax

    from benchmarks.bench import time_trainer
    from jaxgpt.config import GPTConfig
    from jaxgpt.nn import moe
    from jaxgpt.nn.model import GPT, init_params, param_counts
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.sharding import ShardedTrainer, build_mesh
    from jaxgpt.train.step import ParallelTrainer, create_state

    if change == "ragged":
        moe.TILED_BACKENDS = ()
    if change == "no-a2a":
        jax.lax.all_to_all = lambda x, *args, **kwargs: x  # same shapes, no exchange (timing only)
    cfg = GPTConfig(**BASE, **overrides)
    tcfg = TrainConfig(batch_size=BATCH, max_steps=1000, warmup_steps=10)
    model, tx = GPT(cfg), build_optimizer(tcfg)
    init = lambda: create_state(model, tx, init_params(cfg), 0)  # noqa: E731
    trainer = (ShardedTrainer(model, tx, build_mesh(mesh), 1, jax.eval_shape(init)) if mesh
               else ParallelTrainer(model, tx, 1, 1))
    state = trainer.put_state(init())
    timing = time_trainer(trainer, state, cfg.vocab_size, BATCH, SEQ, steps)

    counts = param_counts(cfg)
    return {"name": name, "params": counts["total"], "active_params": counts["active"], **timing}


def run(steps: int) -> dict:
    from benchmarks.bench import run_variant_workers

    rows = run_variant_workers("benchmarks.moe", VARIANTS, steps, ROOT)
    by_name = {r["name"]: r for r in rows}
    ep, no_a2a = by_name["MoE expert=4 (4 CPU devices)"], by_name["MoE expert=4, all-to-all as identity"]
    share = 1.0 - no_a2a["median_step_s"] / ep["median_step_s"]
    return {"batch": BATCH, "seq_len": SEQ, "model": {**BASE, **MOE}, "rows": rows, "all_to_all_share": share}


def markdown(report: dict) -> str:
    dense = next(r for r in report["rows"] if r["name"] == "dense, same active")["median_step_s"]
    lines = [f"Train step, batch {report['batch']} × {report['seq_len']} tokens, float32, CPU "
             f"(model: width 256, 4 layers, 8 experts of width 512, top-2).", "",
             "| variant | params (total / active) | step ms (median) | vs dense | compile s | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['params']:,} / {r['active_params']:,} | {r['median_step_s'] * 1e3:.1f} | "
                     f"{r['median_step_s'] / dense:.2f}× | {r['compile_s']:.1f} | {r['peak_rss_bytes'] / 2**20:,.0f} |")
    lines += ["", f"All-to-all share of the expert-parallel step (4 simulated devices): "
              f"{100 * report['all_to_all_share']:.1f} %"]
    return "\n".join(lines) + "\n"


def main() -> int:
    from benchmarks.bench import variant_bench_main

    return variant_bench_main(__doc__.splitlines()[0], "bench_moe", ROOT, worker, run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
