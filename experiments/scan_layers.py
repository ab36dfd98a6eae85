"""Scan over layers and rematerialisation: compile time against depth, step time and peak memory.

    python experiments/scan_layers.py [--depths 6 12 24 48] [--rounds 2]

Part 1 compiles the float32 train step (AdamW, clipping, dropout 0.1) of gpt2-small-wide models
(768 wide, context 256, batch 2) of each depth, unrolled (GPT-2's h_0 … h_{L-1}) and with
`scan_layers=True` (blocks stacked on a layer axis, one `lax.scan`), from abstract shapes: nothing
is allocated, so even 48 layers compile on a small machine. Part 2 times the gpt2-small step
(bench workload gpt2-small-b2) for each execution variant in its own process, variants alternating
A B A B for `--rounds` rounds: median step time, compile time, peak RSS. Writes
docs/results/scan_layers.json and .png.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # GPTConfig overrides: execution choices only (same function, same parameters)
    "unrolled": {},
    "scan": {"scan_layers": True},
    "remat dots_no_batch": {"remat": "dots_no_batch"},
    "remat dots": {"remat": "dots"},
    "remat full": {"remat": "full"},
    "scan + remat full": {"scan_layers": True, "remat": "full"},
}


def compile_seconds(n_layers: int, scan: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxgpt import xla_tuning
    from jaxgpt.config import get_preset
    from jaxgpt.nn.model import GPT, init_params
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.step import create_state, make_train_step

    cfg = get_preset("gpt2-small", context_length=256, n_layers=n_layers, scan_layers=scan)
    tx, model = build_optimizer(TrainConfig(batch_size=2)), GPT(cfg)
    state = jax.eval_shape(lambda: create_state(model, tx, init_params(cfg), 0))
    x_mbt = jax.ShapeDtypeStruct((1, 2, 256), jnp.int32)
    t0 = time.perf_counter()
    lowered = xla_tuning.jit(make_train_step(model, tx), compute_dtype=jnp.float32).lower(state, x_mbt, x_mbt)
    t1 = time.perf_counter()
    lowered.compile()
    return {"trace_lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def worker(variant: str) -> dict:
    import jax

    from benchmarks.bench import WORKLOADS, jax_train_step, time_calls, workload_config

    w = WORKLOADS["gpt2-small-b2"]
    step, detail = jax_train_step(w, workload_config(w).replace(**VARIANTS[variant]), "jaxgpt")
    return {"variant": variant, "detail": detail, "jax": jax.__version__, **time_calls(step, w.warmup, w.steps)}


def spawn(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, rows in results["compile"].items():
        ax1.plot([r["n_layers"] for r in rows], [r["trace_lower_s"] + r["compile_s"] for r in rows], "o-", label=mode)
    ax1.set(xlabel="layers (768 wide, context 256)", ylabel="trace + compile of the train step (s)",
            title="Compile time against depth")
    ax1.legend()
    steps = results["step"]
    names = list(steps)
    ax2.barh(names, [steps[n]["step_s"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        ax2.text(steps[n]["step_s"], i, f" {steps[n]['step_s']:.2f} s, {steps[n]['peak_rss_gb']:.2f} GB", va="center")
    ax2.set(xlabel="median step time (s)", title="gpt2-small step (batch 2, ctx 256, dropout 0.1)",
            xlim=(0, 1.45 * max(s["step_s"] for s in steps.values())))
    ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scan_layers.json")
    parser.add_argument("--compile-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--step-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_worker:
        print(json.dumps(compile_seconds(int(args.compile_worker[0]), args.compile_worker[1] == "scan")))
        return
    if args.step_worker:
        print(json.dumps(worker(args.step_worker)))
        return

    results = {"compile": {"unrolled": [], "scan": []}, "step": {}, "command": " ".join(["python", *sys.argv])}
    for n_layers in args.depths:  # each compile in a fresh process: no warm caches
        for mode in ("unrolled", "scan"):
            row = {"n_layers": n_layers, **spawn("--compile-worker", str(n_layers), mode)}
            results["compile"][mode].append(row)
            print(f"[compile] {n_layers} layers {mode}: trace+lower {row['trace_lower_s']:.2f} s, "
                  f"compile {row['compile_s']:.2f} s", flush=True)
    raw = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for variant in args.variants:
            run = spawn("--step-worker", variant)
            raw[variant].append(run)
            print(f"[step] round {r + 1} {variant}: median {statistics.median(run['step_s']):.3f} s, "
                  f"compile {run['compile_s']:.1f} s, peak {run['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    for variant, runs in raw.items():
        results["step"][variant] = {
            "overrides": VARIANTS[variant], "step_s": statistics.median(t for run in runs for t in run["step_s"]),
            "per_round_step_s": [statistics.median(run["step_s"]) for run in runs],
            "compile_s": statistics.median(run["compile_s"] for run in runs),
            "peak_rss_gb": max(run["peak_rss_bytes"] for run in runs) / 1e9, "detail": runs[0]["detail"]}
    base = results["step"].get("unrolled")
    if base:
        for row in results["step"].values():
            row["speed_vs_unrolled"] = statistics.median(
                b / a for a, b in zip(row["per_round_step_s"], base["per_round_step_s"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items() if isinstance(vv, float)}
                      for k, v in results["step"].items()}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
