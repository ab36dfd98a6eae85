"""`python -m benchmarks.deterministic` (from a checkout): what `train.deterministic_reduce` costs.

Step time and peak memory (each variant in its own process, `benchmarks.bench.time_calls`) of the
same model and global batch trained by the ordinary step (jit on 1 device, pmap's all-reduce on 2)
and by `DeterministicTrainer` with S shards on 1 and 2 devices (2 simulated CPU devices: the two
cores of this machine). Writes docs/results/bench_deterministic.json and .md; `--quick`: 3 steps.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = dict(vocab_size=256, context_length=256, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.0)
BATCH, SEQ = 16, 256
VARIANTS = {  # name -> (devices, shards; 0: the ordinary step)
    "jit, 1 device": (1, 0),
    "pmap all-reduce, 2 devices": (2, 0),
    "deterministic S=2, 1 device": (1, 2),
    "deterministic S=8, 1 device": (1, 8),
    "deterministic S=2, 2 devices": (2, 2),
    "deterministic S=8, 2 devices": (2, 8),
}


def worker(name: str, steps: int) -> dict:
    devices, shards = VARIANTS[name]
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"

    from benchmarks.bench import time_trainer
    from jaxgpt.config import GPTConfig
    from jaxgpt.nn.model import GPT, init_params
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.deterministic import DeterministicTrainer
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.step import ParallelTrainer, create_state

    cfg = GPTConfig(**MODEL)
    model, tx = GPT(cfg), build_optimizer(TrainConfig(batch_size=BATCH, max_steps=1000, warmup_steps=10))
    trainer = DeterministicTrainer(model, tx, devices, shards) if shards else ParallelTrainer(model, tx, devices, 1)
    state = trainer.put_state(create_state(model, tx, init_params(cfg), 0))
    timing = time_trainer(trainer, state, cfg.vocab_size, BATCH, SEQ, steps)

    return {"name": name, "devices": devices, "shards": shards, **timing}


def run(steps: int) -> dict:
    from benchmarks.bench import run_variant_workers

    rows = run_variant_workers("benchmarks.deterministic", VARIANTS, steps, ROOT)
    return {"batch": BATCH, "seq_len": SEQ, "model": MODEL, "rows": rows}


def markdown(report: dict) -> str:
    base = {r["devices"]: r["median_step_s"] for r in report["rows"] if not r["shards"]}
    lines = [f"Train step, batch {report['batch']} × {report['seq_len']} tokens, float32, 2-core CPU "
             "(model: width 256, 4 layers, vocab 256).", "",
             "| variant | step ms (median) | vs the ordinary step on as many devices | compile s | peak RSS MiB |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['median_step_s'] * 1e3:.1f} | {r['median_step_s'] / base[r['devices']]:.2f}× | "
                     f"{r['compile_s']:.1f} | {r['peak_rss_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from benchmarks.bench import variant_bench_main

    return variant_bench_main(__doc__.splitlines()[0], "bench_deterministic", ROOT, worker, run, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
