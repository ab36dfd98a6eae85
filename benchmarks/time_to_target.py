"""Time to target: wall time until tinyshakespeare's whole validation split (character level, the
90/10 split) reaches loss 1.88, compilation included, three contenders × seeds, in one invocation.

- `torch-nanogpt`: a PyTorch implementation of nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide,
  context 64, batch 12, tied embeddings, no dropout, AdamW (0.9, 0.99), weight decay 0.1 on every
  matrix, lr 1e-3 with 100 warmup steps and cosine to 1e-4 at 2000, clip 1.0), `FastGPT` of
  `benchmarks/torch_baselines.py`, on 2 threads;
- `jaxgpt-nanogpt`: the same recipe in jaxgpt (`experiments/nanogpt_shakespeare_char.py`'s
  settings), as `jaxgpt train` runs it (one CPU device per core);
- `jaxgpt-speedrun`: the `speedrun` recipe (`jaxgpt.train.recipes`).

Every contender sees the same batches (jaxgpt's seeded random windows) and is scored the same way:
the whole validation split (consecutive 64-token windows) every `--eval-every` steps; the clock
stops at the first evaluation at or below the target. Each (contender, seed) runs in a fresh
process, so compilation is timed. Writes JSON, a table and a plot of validation loss against wall
time.

    JAXGPT_DATA_DIR=../shared/data python benchmarks/time_to_target.py            # 3 seeds each
    JAXGPT_DATA_DIR=../shared/data python benchmarks/time_to_target.py --seeds 1 --contenders jaxgpt-speedrun
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONTENDERS = ("torch-nanogpt", "jaxgpt-nanogpt", "jaxgpt-speedrun")
TARGET, EVAL_EVERY, MAX_STEPS = 1.88, 100, 5000  # (a cap: nanoGPT's recipe trains on at min_lr after 2000)


def nanogpt_configs(seed: int, dtype: str = "float32"):
    """nanoGPT's CPU recipe as jaxgpt configs (the model and the train settings both sides use)."""
    from jaxgpt.config import get_preset
    from jaxgpt.train.config import TrainConfig

    model = get_preset("tiny", tie_embeddings=True, dtype=dtype)
    cfg = TrainConfig(data="tinyshakespeare", tokenizer="char", train_ratio=0.9, batch_size=12, max_steps=MAX_STEPS,
                      decay_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99,
                      weight_decay=0.1, decay_embeddings=True, grad_clip=1.0, log_every=50, eval_every=EVAL_EVERY,
                      eval_batches=100_000, ckpt_every=100_000, keep_checkpoints=1, samples=0, seed=seed,
                      target_val_loss=TARGET)
    return model, cfg


def worker_jaxgpt(name: str, seed: int, out: Path, overrides: tuple = ()) -> dict:
    from jaxgpt.host_setup import one_cpu_device_per_core

    one_cpu_device_per_core()  # as `jaxgpt train` does, before JAX starts
    from jaxgpt.train.loop import train
    from jaxgpt.train.recipes import recipe_configs

    if name == "jaxgpt-nanogpt":
        model, cfg = nanogpt_configs(seed)
    else:
        model, cfg = recipe_configs("speedrun")  # its schedule kept, trained on at min_lr up to the cap if need be
        cfg = cfg.replace(seed=seed, target_val_loss=TARGET, eval_every=EVAL_EVERY, eval_batches=100_000,
                          ckpt_every=100_000, samples=0, log_every=50, keep_checkpoints=1,
                          max_steps=MAX_STEPS, decay_steps=cfg.total_decay_steps)
    if overrides:  # the ablation's changes (section.field=value, as `--set`)
        from jaxgpt.train.config import apply_overrides

        model, cfg = apply_overrides(model, cfg, list(overrides))
    t0 = time.perf_counter()
    summary = train(model, cfg, out, progress=False)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time_s"] for r in records if "time_s" in r}
    curve = [(times.get(r["step"]), r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    return {"reached": summary["status"] == "target reached", "wall_s": wall, "steps": summary["step"],
            "final_val_loss": summary["val_loss"], "curve": curve}


def worker_torch(seed: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_baselines import FastGPT
    from jaxgpt.train.batches import build_data

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model_cfg, cfg = nanogpt_configs(seed)
    data = build_data(cfg, model_cfg.context_length)
    model = FastGPT(model_cfg.replace(vocab_size=data.tokenizer.vocab_size))
    model.out_head.weight = model.tok_emb.weight  # tied, as nanoGPT
    for name, p in model.named_parameters():  # nanoGPT's init: N(0, 0.02), residual projections 0.02/sqrt(2L)
        if p.dim() >= 2:
            std = 0.02 / (2 * model_cfg.n_layers) ** 0.5 if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
            torch.nn.init.normal_(p, 0.0, std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def lr_at(step):  # nanoGPT's get_lr
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
        if step > cfg.total_decay_steps:
            return cfg.min_lr
        ratio = (step - cfg.warmup_steps) / (cfg.total_decay_steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (cfg.lr - cfg.min_lr)

    val = [(torch.from_numpy(np.asarray(x, np.int64)), torch.from_numpy(np.asarray(y, np.int64)))
           for x, y in data.val_batches]

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val]
        model.train()
        return float(np.mean(losses))

    curve, reached, step = [], False, 0
    model.train()
    for step in range(cfg.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = (torch.from_numpy(np.asarray(a, np.int64)) for a in data.train_source.batch(step))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.eval_every == 0:
            val_loss = evaluate()
            curve.append((time.perf_counter() - t0, step + 1, val_loss))
            if val_loss <= TARGET:
                reached = True
                break
    return {"reached": reached, "wall_s": time.perf_counter() - t0, "steps": step + 1,
            "final_val_loss": curve[-1][2] if curve else None, "curve": curve}


def run_worker(name: str, seed: int, runs: Path, overrides: tuple = ()) -> dict:
    """One (contender, seed) in a fresh process (so its compilation is timed); its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seed", str(seed), "--runs", str(runs)]
    cmd += [a for o in overrides for a in ("--set", o)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t0  # with Python and library start-up
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--runs", default="runs/time_to_target")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "time_to_target"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import shutil

        out = Path(args.runs) / f"{args.worker}-seed{args.seed}"
        shutil.rmtree(out, ignore_errors=True)
        result = (worker_torch(args.seed) if args.worker == "torch-nanogpt"
                  else worker_jaxgpt(args.worker, args.seed, out, tuple(args.set)))
        print(json.dumps(result))
        return

    from tqdm import tqdm

    names = args.contenders.split(",")
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    results: dict = {name: [] for name in names}
    with tqdm(total=len(names) * args.seeds, desc="time to target", unit="run") as bar:
        for seed in range(args.seeds):
            for name in names:
                results[name].append({"seed": seed, **run_worker(name, seed, Path(args.runs))})
                bar.set_postfix(contender=name, wall=f"{results[name][-1]['wall_s']:.0f}s")
                bar.update()
    summary = {}
    for name, runs in results.items():
        walls = [r["wall_s"] for r in runs if r["reached"]]
        summary[name] = {"reached": f"{len(walls)}/{len(runs)}", "median_s": statistics.median(walls) if walls else None,
                         "min_s": min(walls) if walls else None, "max_s": max(walls) if walls else None,
                         "median_steps": statistics.median(r["steps"] for r in runs)}
    report = {"target_val_loss": TARGET, "eval_every": EVAL_EVERY, "summary": summary, "runs": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"))
    print("| contender | reached | median wall (s) | min–max (s) | median steps |\n|---|---|---|---|---|")
    for name, s in summary.items():
        span = f"{s['min_s']:.0f}–{s['max_s']:.0f}" if s["min_s"] is not None else "—"
        median = f"{s['median_s']:.1f}" if s["median_s"] is not None else "—"
        print(f"| {name} | {s['reached']} | {median} | {span} | {s['median_steps']:.0f} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, runs) in enumerate(results.items()):
        for run in runs:
            points = [(t, loss) for t, _, loss in run["curve"] if t is not None]
            if points:
                ax.plot(*zip(*points), "-", color=f"C{i}", alpha=0.8, label=name if run["seed"] == 0 else None)
    ax.axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET}")
    ax.set_xlabel("wall time (s, compilation included)")
    ax.set_ylabel("validation loss (whole split)")
    ax.set_ylim(top=2.6)
    ax.set_title("tinyshakespeare (char): time to validation loss 1.88, 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
