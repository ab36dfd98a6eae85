"""`python -m benchmarks.bench` (from a checkout): named workloads timed side by side against PyTorch on the same machine.

Each measurement runs in a fresh subprocess (so compile time, peak memory and thread pools are its
own), and the implementations of a workload alternate A B C A B C … for `rounds` rounds, so slow
drifts of the machine hit them alike. A worker runs `warmup` steps (the first includes jaxgpt's
compilation, reported as compile time) and then `steps` timed steps; the report gives medians over
all timed steps of all rounds, and each ratio is the median of the per-round ratios.

MFU is model FLOPs per second (`jaxgpt.train.metrics.flops_per_token`) over the fp32 matmul peak the harness
measures itself (best of NumPy, PyTorch and JAX on a 4096² matmul). Peak memory is the worker's
maximum resident set size.

The PyTorch baselines (`benchmarks.torch_baselines`) need the `bench` extra (torch 2.13.0 CPU); the
harness lives outside the package, so jaxgpt itself never imports torch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


# jaxgpt and PyTorch in float32, then both with bf16 matmuls (jaxgpt dtype="bfloat16", torch autocast)
TRAIN_IMPLS = ("jaxgpt", "torch-book", "torch-fast", "jaxgpt-bf16", "torch-fast-bf16")
JAX_IMPLS = ("jaxgpt", "jaxgpt-bf16")
BF16_IMPLS = ("jaxgpt-bf16", "torch-fast-bf16", "transformers-bf16")
# decoding: jaxgpt and transformers in float32, then with bf16 matmuls (jaxgpt dtype="bfloat16",
# transformers' model cast to bfloat16)
DECODE_IMPLS = ("jaxgpt", "transformers", "jaxgpt-bf16", "transformers-bf16")


@dataclass(frozen=True)
class Workload:
    kind: str  # "train" or "decode"
    preset: str
    overrides: dict = field(default_factory=dict)
    batch: int = 2
    seq_len: int = 256  # train: context; decode: prompt tokens
    new_tokens: int = 0  # decode only
    steps: int = 5
    warmup: int = 2
    impls: tuple = TRAIN_IMPLS
    note: str = ""


# A Llama 3-style model (RMSNorm, SwiGLU, RoPE with Llama 3 scaling, grouped-query heads, tied head) of
# gpt2-small's size, for the decode comparison with transformers' LlamaForCausalLM.
LLAMA_SMALL = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_kv_heads": 4,
               "n_layers": 12, "mlp_hidden": 2048, "rope_original_context": 256}

WORKLOADS: dict[str, Workload] = {
    "nanogpt-cpu": Workload("train", "tiny", {"vocab_size": 65, "drop_rate": 0.0}, batch=12, seq_len=64, steps=40,
                            warmup=3, note="nanoGPT's CPU recipe: char tinyshakespeare, 4 layers, 4 heads, 128 wide"),
    "gpt2-small-b2": Workload("train", "gpt2-small", {"context_length": 256, "drop_rate": 0.1}, batch=2, seq_len=256,
                              note="the book's chapter 5 run: gpt2-small, context 256, batch 2, dropout 0.1"),
    "gpt2-small-b8": Workload("train", "gpt2-small", {"context_length": 256, "drop_rate": 0.1}, batch=8, seq_len=256,
                              steps=3, warmup=1, note="the same at batch 8"),
    "decode-b1": Workload("decode", "gpt2-small", {"drop_rate": 0.0, "tie_embeddings": True, "qkv_bias": True}, batch=1,
                          seq_len=16, new_tokens=128, steps=3, warmup=1, impls=DECODE_IMPLS,
                          note="gpt2-small greedy decode with KV cache, 16-token prompt, 128 new tokens"),
    "decode-b8": Workload("decode", "gpt2-small", {"drop_rate": 0.0, "tie_embeddings": True, "qkv_bias": True}, batch=8,
                          seq_len=16, new_tokens=128, steps=3, warmup=1, impls=DECODE_IMPLS,
                          note="the same at batch 8"),
    "decode-llama-b1": Workload("decode", "llama-tiny", LLAMA_SMALL, batch=1, seq_len=16, new_tokens=128, steps=3,
                                warmup=1, impls=DECODE_IMPLS,
                                note="a Llama-style model of gpt2-small's size (12 layers, 768 wide, 4 kv heads), greedy"),
    "decode-llama-b8": Workload("decode", "llama-tiny", LLAMA_SMALL, batch=8, seq_len=16, new_tokens=128, steps=3,
                                warmup=1, impls=DECODE_IMPLS, note="the same at batch 8"),
}


def workload_config(w: Workload):
    from jaxgpt.config import get_preset

    return get_preset(w.preset, **w.overrides)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- workers: one implementation of one workload, in its own process ------------------------------

def jax_train_step(w: Workload, cfg, impl: str):
    import jax
    import numpy as np

    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.nn.model import GPT, init_params
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.step import ParallelTrainer, create_state
    from jaxgpt.train.loop import default_device_count

    tcfg = TrainConfig(batch_size=w.batch, max_steps=1000, warmup_steps=10)
    if impl == "jaxgpt-bf16":
        cfg = cfg.replace(dtype="bfloat16")
    trainer = ParallelTrainer(GPT(cfg), build_optimizer(tcfg), default_device_count(tcfg, cfg), 1)
    state = trainer.put_state(create_state(GPT(cfg), build_optimizer(tcfg), init_params(cfg), 0))
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, cfg.vocab_size, (w.batch, w.seq_len)).astype(np.int32) for _ in range(2)]

    def step():
        nonlocal state
        state, metrics = trainer(state, *batch)
        jax.block_until_ready(metrics["loss"])

    return step, f"{trainer.n_devices} device(s){', bf16 matmuls' if impl == 'jaxgpt-bf16' else ''}"


def _torch_train(w: Workload, cfg, impl: str):
    import torch

    from benchmarks.torch_baselines import BookGPT, FastGPT, train_step_fn

    torch.manual_seed(0)
    model = (BookGPT if impl == "torch-book" else FastGPT)(cfg)
    step_fn = train_step_fn(model, autocast_dtype=torch.bfloat16 if impl in BF16_IMPLS else None)
    x = torch.randint(0, cfg.vocab_size, (w.batch, w.seq_len))
    y = torch.randint(0, cfg.vocab_size, (w.batch, w.seq_len))
    autocast = ", bf16 autocast" if impl in BF16_IMPLS else ""
    return (lambda: step_fn(x, y)), f"{torch.get_num_threads()} threads{autocast}"


def _jax_decode(w: Workload, cfg, impl: str):
    import numpy as np

    from jaxgpt.inference.generate import Decoder
    from jaxgpt.nn.model import init_params

    params = init_params(cfg)
    if impl == "jaxgpt-bf16":
        cfg = cfg.replace(dtype="bfloat16")
    decoder = Decoder(params, cfg)  # the decoding copy of the weights, made once (as a server does)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (w.batch, w.seq_len)).tolist()
    return (lambda: decoder.generate_batch(prompts, w.new_tokens)), f"KV cache{', bf16 matmuls' if impl == 'jaxgpt-bf16' else ''}"


def _transformers_decode(w: Workload, cfg, impl: str):
    import tempfile

    import torch
    import transformers

    from jaxgpt.weights.hf import save_hf
    from jaxgpt.nn.model import init_params

    with tempfile.TemporaryDirectory() as d:
        save_hf(init_params(cfg), cfg, Path(d))
        model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()  # GPT-2 or Llama, from config.json
    if impl == "transformers-bf16":
        model = model.to(torch.bfloat16)
    inp = torch.randint(0, cfg.vocab_size, (w.batch, w.seq_len))

    def run():
        with torch.no_grad():
            out = model.generate(inp, max_new_tokens=w.new_tokens, min_new_tokens=w.new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        assert out.shape[1] == w.seq_len + w.new_tokens

    return run, f"transformers {transformers.__version__}, KV cache{', bf16' if impl == 'transformers-bf16' else ''}"


def run_worker(name: str, impl: str) -> dict:
    """Time one implementation of one workload in this process; returns the raw measurements."""
    w = WORKLOADS[name]
    cfg = workload_config(w)
    if w.kind == "train":
        step, detail = jax_train_step(w, cfg, impl) if impl in JAX_IMPLS else _torch_train(w, cfg, impl)
    else:
        step, detail = _jax_decode(w, cfg, impl) if impl in JAX_IMPLS else _transformers_decode(w, cfg, impl)
    return {"workload": name, "impl": impl, "detail": detail, **time_calls(step, w.warmup, w.steps)}


def time_calls(step, warmup: int, steps: int) -> dict:
    """Wall times of `steps` calls of `step` after `warmup` calls; the first call's time less the
    median is the compile time; the process's peak RSS so far."""
    first = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        first.append(time.perf_counter() - t0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first[0], "compile_s": max(first[0] - statistics.median(times), 0.0), "step_s": times,
            "peak_rss_bytes": _peak_rss_bytes()}


def time_trainer(trainer, state, vocab_size: int, batch: int, seq: int, steps: int) -> dict:
    """`time_calls` of a trainer's step on one fixed random batch (2 warm-up steps)."""
    import jax
    import numpy as np

    x, y = (np.random.default_rng(0).integers(0, vocab_size, (batch, seq)).astype(np.int32) for _ in range(2))

    def step():
        nonlocal state
        state, metrics = trainer(state, x, y)
        jax.block_until_ready(metrics["loss"])

    return time_calls(step, 2, steps)


def run_variant_workers(module: str, names, steps: int, root: Path) -> list[dict]:
    """Run `python -m <module> --worker NAME --steps N` for each variant in its own process (clean
    memory figures, no shared compilation cache); rows with their median step time, printed as they come."""
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, "-m", module, "--worker", name, "--steps", str(steps)],
                              env=dict(os.environ, PYTHONPATH=str(root)), cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {name!r} failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["median_step_s"] = statistics.median(row["step_s"])
        rows.append(row)
        print(f"{name}: {row['median_step_s'] * 1e3:.1f} ms/step, peak {row['peak_rss_bytes'] / 2**20:,.0f} MiB",
              flush=True)
    return rows


def variant_bench_main(description: str, stem: str, root: Path, worker, run, markdown) -> int:
    """The command line of a worker-per-variant benchmark: `--worker NAME` runs one variant and
    prints its JSON; otherwise `run(steps)` builds the report, written to DIR/<stem>.json and .md."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 timed steps per variant")
    parser.add_argument("--out", default=str(root / "docs" / "results"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0
    report = run(3 if args.quick else args.steps)
    publish(report, markdown(report), Path(args.out), stem)
    return 0


def publish(report: dict, text: str, out: Path, stem: str) -> None:
    """DIR/<stem>.json and DIR/<stem>.md, and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(text)
    print(text)


# --- the harness ----------------------------------------------------------------------------------

def measure_matmul_peak(size: int = 4096, repeats: int = 5, dtype: str = "float32") -> dict:
    """Matmul FLOP/s of NumPy (float32 only), PyTorch (if installed) and JAX with `dtype` inputs
    (accumulating in float32); the best is the MFU denominator of the implementations in `dtype`."""
    import jax.numpy as jnp
    import numpy as np

    from jaxgpt.train.metrics import measure_peak_flops

    def best_of(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return 2.0 * size**3 / best

    peaks = {"jax": measure_peak_flops(size, repeats, dtype=jnp.dtype(dtype))}
    if dtype == "float32":
        a = np.ones((size, size), np.float32)
        peaks["numpy"] = best_of(lambda: a @ a)
    try:
        import torch

        t = torch.ones(size, size, dtype=getattr(torch, dtype))
        peaks["torch"] = best_of(lambda: t @ t)
    except ImportError:
        pass
    return peaks


def _spawn(name: str, impl: str) -> dict:
    root = str(Path(__file__).resolve().parent.parent)  # the checkout holding `benchmarks/`
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", name, impl]
    proc = subprocess.run(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {name}/{impl} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(names: list[str], rounds: int = 2, progress=print, on_workload=None) -> dict:
    """Run the workloads `names` A B A B for `rounds` rounds; medians, ratios, MFU, memory.

    `on_workload(report)` is called after each workload (to write partial results of long runs)."""
    from jaxgpt.train.metrics import flops_per_token
    from jaxgpt.nn.model import count_params, param_shapes

    unknown = set(names) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workload(s) {sorted(unknown)}; known: {sorted(WORKLOADS)}")
    peaks, peaks_bf16 = measure_matmul_peak(), measure_matmul_peak(dtype="bfloat16")
    peak, peak_bf16 = max(peaks.values()), max(peaks_bf16.values())
    report = {"matmul_peak_flops": peaks, "mfu_denominator": peak, "matmul_peak_flops_bf16": peaks_bf16,
              "mfu_denominator_bf16": peak_bf16, "rounds": rounds, "workloads": {}}
    for name in names:
        w = WORKLOADS[name]
        raw = {impl: [] for impl in w.impls}
        for r in range(rounds):
            for impl in w.impls:
                progress(f"[bench] {name}: {impl} (round {r + 1}/{rounds})")
                raw[impl].append(_spawn(name, impl))
        cfg = workload_config(w)
        tokens = w.batch * (w.seq_len if w.kind == "train" else w.new_tokens)
        flops = flops_per_token(cfg, w.seq_len, count_params(param_shapes(cfg))) * tokens if w.kind == "train" else None
        rows = {}
        for impl, runs in raw.items():
            times = [t for run in runs for t in run["step_s"]]
            med = statistics.median(times)
            rows[impl] = {"step_s": med, "tokens_per_s": tokens / med, "compile_s": statistics.median(r["compile_s"] for r in runs),
                          "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / 1e9, "detail": runs[0]["detail"],
                          "per_round_step_s": [statistics.median(r["step_s"]) for r in runs]}
            if flops:  # against the matmul peak of the implementation's own matmul dtype
                rows[impl]["mfu"] = flops / med / (peak_bf16 if impl in BF16_IMPLS else peak)
        ratios = {}
        for mine in (i for i in w.impls if i in JAX_IMPLS):  # speed of jaxgpt relative to each baseline,
            for other in (i for i in w.impls if i not in JAX_IMPLS):  # per round, then the median
                per_round = [b / a for a, b in zip(rows[mine]["per_round_step_s"], rows[other]["per_round_step_s"])]
                ratios[f"{mine}_vs_{other}"] = statistics.median(per_round)
        report["workloads"][name] = {"workload": asdict(w), "tokens_per_step": tokens, "results": rows, "speedup": ratios}
        progress(f"[bench] {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        if on_workload is not None:
            on_workload(report)
    return report


def markdown(report: dict) -> str:
    """One table per workload and its side-by-side speed-ups (what docs/results/bench.md holds)."""
    def peak_line(peaks: dict) -> str:
        return ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in peaks.items())

    lines = [f"Matmul peak (4096², FLOP/s): float32 {peak_line(report['matmul_peak_flops'])}"
             + (f"; bf16 inputs, f32 accumulation {peak_line(report['matmul_peak_flops_bf16'])}"
                if "matmul_peak_flops_bf16" in report else ""),
             f"— MFU is against {report['mfu_denominator'] / 1e9:.0f} GFLOP/s"
             + (f" (bf16 rows: {report['mfu_denominator_bf16'] / 1e9:.0f})" if "mfu_denominator_bf16" in report else "")
             + f". Medians over {report['rounds']} alternating rounds.", ""]
    for name, wl in report["workloads"].items():
        lines += [f"### {name}", "", wl["workload"]["note"], "",
                  "| implementation | step (s) | tokens/s | MFU | compile (s) | peak RSS (GB) |",
                  "|---|---|---|---|---|---|"]
        for impl, r in wl["results"].items():
            mfu = f"{r['mfu']:.0%}" if "mfu" in r else "—"
            lines.append(f"| {impl} ({r['detail']}) | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                         f"{r['compile_s']:.1f} | {r['peak_rss_gb']:.2f} |")
        lines += ["", "Speed-ups (median of per-round ratios): "
                  + ", ".join(f"{k.replace('_vs_', ' vs ')} {v:.2f}×" for k, v in wl["speedup"].items()), ""]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = report["workloads"][name]["results"]
        ax.bar(list(res), [r["tokens_per_s"] for r in res.values()], color=[f"C{i}" for i in range(len(res))])
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[list] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {sorted(WORKLOADS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="directory for bench.json, bench.md and bench.png")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.worker[0] in WORKLOADS and WORKLOADS[args.worker[0]].kind == "train" and args.worker[1] in JAX_IMPLS:
            from jaxgpt.host_setup import one_cpu_device_per_core

            one_cpu_device_per_core()  # the layout `jaxgpt train` uses
        print(json.dumps(run_worker(*args.worker)))
        return 0

    def write(report: dict) -> None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2))
        (out / "bench.md").write_text(markdown(report))
        plot(report, out / "bench.png")

    report = run_bench(args.workloads.split(","), args.rounds, progress=lambda m: print(m, file=sys.stderr, flush=True),
                       on_workload=write if args.out else None)
    print(json.dumps(report) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
