"""`jaxgpt selfcheck`: what this backend computes, checked and timed, in one command.

On whatever JAX sees (CPU, GPU, TPU): every layer, attention kind and backend of the model against
the float64 reference in float32 and bfloat16 (the divergence finder's tolerances,
`jaxgpt.numerics.divergence`), gradients, `jax.nn.dot_product_attention`'s cuDNN kernel against
XLA's where there is one, data parallelism over all local devices against one device (and the
deterministic reduction bitwise), a short training run against the same run on the CPU, and the
speed of a training step (tokens/s, MFU against a measured matmul peak) and of decoding.
Each check gives {"check", "status": pass | fail | skip, "detail", …figures}; `--quick` is the
short mode the test suite runs.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import get_preset, resolve_dtype
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.numerics.divergence import first_divergence, forward_rows, gradient_rows, tolerance_for

# (name, preset, overrides): the models the parity check runs, each in float32 and bfloat16
PARITY_QUICK = [("gpt2 xla", "test", dict(attn_impl="xla"))]
PARITY_FULL = PARITY_QUICK + [
    ("llama", "llama-tiny", {}), ("gpt2 naive", "test", dict(attn_impl="naive")),
    ("gpt2 blockwise", "test", dict(attn_impl="blockwise")), ("linear attention", "test", dict(attention="linear")),
    ("mla rope", "test", dict(attention="mla", latent_dim=16, position="rope")), ("mixtral moe", "mixtral-tiny", {}),
    ("alibi", "test", dict(position="alibi")), ("gqa window", "test", dict(position="rope", n_kv_heads=2, sliding_window=4)),
    ("qwen3", "qwen3-tiny", {}), ("gemma3", "gemma3-tiny", {}), ("qwen3 moe", "qwen3-moe-tiny", {}),
    ("gated deltanet", "test", dict(attention="gated_deltanet")),
    ("sink gate blockwise", "test", dict(position="rope", attn_sink=True, attn_gate=True, attn_impl="blockwise")),
    ("differential rope", "test", dict(position="rope", differential=True))]


def _batch(vocab: int, b: int = 2, t: int = 16, seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, vocab, (b, t + 1))
    return ids[:, :-1], ids[:, 1:]


def check_parity(quick: bool) -> list[dict]:
    out = []
    for name, preset, overrides in PARITY_QUICK if quick else PARITY_FULL:
        for dtype in ("float32", "bfloat16"):
            cfg = get_preset(preset, **overrides, dtype=dtype)
            rows = forward_rows(cfg, init_params(cfg, 0), *_batch(cfg.vocab_size))
            first = first_divergence(rows)
            worst = max(r["rel_err"] / r["tolerance"] for r in rows)
            detail = (f"{len(rows)} ops within tolerance (worst at {worst:.2f} of it)" if first is None else
                      f"first divergence: layer {first['layer']}, {first['op']} ({first['rel_err']:.3g} > {first['tolerance']:.3g})")
            out.append({"check": f"parity {name} {dtype}", "status": "pass" if first is None else "fail",
                        "detail": detail, "worst_ratio": worst, "first_divergence": first})
    return out


def check_gradients(quick: bool) -> list[dict]:
    out = []
    for preset in ("test",) if quick else ("test", "llama-tiny"):
        for dtype in ("float32",) if quick else ("float32", "bfloat16"):
            cfg = get_preset(preset, dtype=dtype)
            rows, source = gradient_rows(cfg, init_params(cfg, 0), *_batch(cfg.vocab_size))
            bad = [r for r in rows if not r["ok"]]
            worst = max(r["rel_err"] / r["tolerance"] for r in rows)
            out.append({"check": f"gradients {preset} {dtype}", "status": "fail" if bad else "pass",
                        "detail": f"{len(rows)} parameters against {source}, worst at {worst:.2f} of tolerance"
                        + (f"; outside: {[r['op'] for r in bad][:3]}" if bad else ""), "worst_ratio": worst})
    return out


def check_cudnn_attention() -> dict:
    """cuDNN's fused attention against XLA's, bf16, causal, where the backend has it."""
    name = "cudnn attention vs xla"
    if jax.default_backend() != "gpu":
        return {"check": name, "status": "skip", "detail": f"no cuDNN on the {jax.default_backend()} backend"}
    k = jax.random.split(jax.random.key(0), 3)
    q, kk, v = (jax.random.normal(key, (2, 256, 8, 64), jnp.bfloat16) for key in k)
    try:
        fused = jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="cudnn")
    except Exception as e:  # an older GPU or cuDNN: say so, do not fail the whole check
        return {"check": name, "status": "skip", "detail": f"cuDNN attention unavailable: {type(e).__name__}: {e}"[:300]}
    plain = jax.nn.dot_product_attention(q, kk, v, is_causal=True, implementation="xla")
    err = float(jnp.max(jnp.abs(fused.astype(jnp.float32) - plain.astype(jnp.float32))))
    rel = err / float(jnp.max(jnp.abs(plain.astype(jnp.float32))))
    tol = 2 * tolerance_for("attn.context", get_preset("test", dtype="bfloat16"), 256)  # two bf16 computations
    return {"check": name, "status": "pass" if rel <= tol else "fail", "rel_err": rel, "tolerance": tol,
            "detail": f"relative difference {rel:.3g} (tolerance {tol:.3g})"}


def _train_losses(trainer, init: Callable, batches) -> tuple[list[float], dict]:
    state = trainer.put_state(init())
    losses = []
    for x, y in batches:
        state, metrics = trainer(state, x, y)
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, trainer.get_state(state)["params"])


def check_multi_device() -> list[dict]:
    """Data parallelism over all local devices (pmap; the mesh; the deterministic reduction) against one."""
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.deterministic import DeterministicTrainer
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.sharding import ShardedTrainer, build_mesh
    from jaxgpt.train.step import ParallelTrainer, create_state

    d = jax.local_device_count()
    if d < 2 or jax.process_count() > 1:
        return [{"check": "data parallel vs 1 device", "status": "skip",
                 "detail": f"{d} local device(s), {jax.process_count()} process(es)"}]
    cfg = get_preset("test", drop_rate=0.0)
    model, tx = GPT(cfg), build_optimizer(TrainConfig(batch_size=4 * d, warmup_steps=1, lr=3e-3))
    init = lambda: create_state(model, tx, init_params(cfg), 0)  # noqa: E731
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (4 * d, 16)).astype(np.int32),) * 2 for _ in range(3)]
    one_losses, one = _train_losses(ParallelTrainer(model, tx, 1, 1), init, batches)
    out = []
    for name, trainer in (("pmap", ParallelTrainer(model, tx, d, 1)),
                          ("mesh data axis", ShardedTrainer(model, tx, build_mesh("data=-1"), 1, jax.eval_shape(init)))):
        _, params = _train_losses(trainer, init, batches)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one)))
        out.append({"check": f"{name} over {d} devices vs 1", "status": "pass" if diff < 1e-5 else "fail",
                    "max_abs_diff": diff, "detail": f"parameters after 3 steps differ by {diff:.3g} (tolerance 1e-5)"})
    if d & (d - 1) == 0:
        shards = 2 * d
        _, det_one = _train_losses(DeterministicTrainer(model, tx, 1, shards), init, batches)
        _, det_d = _train_losses(DeterministicTrainer(model, tx, d, shards), init, batches)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(det_one), jax.tree.leaves(det_d)))
        out.append({"check": f"deterministic_reduce over {d} devices vs 1", "status": "pass" if same else "fail",
                    "detail": "bitwise equal" if same else "parameters differ"})
    return out


def check_cpu_trajectory(steps: int = 5) -> dict:
    """The same short run on the default device and on the CPU: the loss curves agree."""
    name = "training run vs the CPU's"
    if jax.default_backend() == "cpu":
        return {"check": name, "status": "skip", "detail": "the default backend is the CPU"}
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.step import create_state, make_train_step

    cfg = get_preset("test", drop_rate=0.0, dtype="float32")
    model, tx = GPT(cfg), build_optimizer(TrainConfig(batch_size=8, warmup_steps=1, lr=3e-3))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 64, (1, 8, 16)).astype(np.int32) for _ in range(steps)]
    curves = {}
    for device in (jax.local_devices()[0], jax.devices("cpu")[0]):
        state = jax.device_put(create_state(model, tx, init_params(cfg), 0), device)
        step = jax.jit(make_train_step(model, tx))
        curve = []
        for x in batches:
            state, metrics = step(state, jax.device_put(x, device), jax.device_put(x, device))
            curve.append(float(metrics["loss"]))
        curves[device.platform] = curve
    here, cpu = curves[jax.default_backend()], curves["cpu"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(here, cpu))
    return {"check": name, "status": "pass" if rel < 1e-3 else "fail", "rel_diff": rel, "losses": curves,
            "detail": f"{steps} steps, float32: largest relative loss difference {rel:.3g} (tolerance 1e-3; "
                      f"default matmul precision {jax.config.jax_default_matmul_precision})"}


def check_speed(quick: bool) -> list[dict]:
    """Train-step time, tokens/s and MFU; decoding tokens/s at batch 1 and 8."""
    from jaxgpt.inference.generate import Decoder
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.metrics import flops_per_token, measure_peak_flops
    from jaxgpt.train.optimizer import build_optimizer
    from jaxgpt.train.step import ParallelTrainer, create_state

    preset, batch, seq = ("small", 4, 128) if quick else ("gpt2-small", 8, 1024)
    cfg = get_preset(preset, **(dict(vocab_size=512) if quick else {}))
    model, tx = GPT(cfg), build_optimizer(TrainConfig(batch_size=batch, warmup_steps=1))
    params = init_params(cfg)
    trainer = ParallelTrainer(model, tx, 1, 1)
    state = trainer.put_state(create_state(model, tx, params, 0))
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    times = []
    for i in range(3 if quick else 6):
        t0 = time.perf_counter()
        state, metrics = trainer(state, x, x)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:]))
    tokens_s = batch * seq / step_s
    dtype = resolve_dtype(cfg)
    peak = measure_peak_flops(1024 if quick else 4096, dtype=dtype)
    n_params = sum(a.size for a in jax.tree.leaves(state["params"]))
    mfu = flops_per_token(cfg, seq, n_params) * tokens_s / peak
    out = [{"check": f"train step {preset}", "status": "pass", "step_s": step_s, "tokens_per_s": tokens_s,
            "mfu": mfu, "peak_flops": peak, "dtype": jnp.dtype(dtype).name, "compile_s": times[0] - step_s,
            "detail": f"batch {batch}×{seq} {jnp.dtype(dtype).name}: {step_s * 1e3:.1f} ms/step, {tokens_s:,.0f} tokens/s, "
                      f"MFU {100 * mfu:.1f} % of a measured {peak / 1e12:.2f} TFLOP/s matmul"}]
    decoder = Decoder(trainer.params(state), cfg)  # `params` were donated to the train step
    for rows in (1, 8):
        prompt = np.ones((rows, 16), np.int32)
        new = 16 if quick else 128
        decoder.generate(prompt, new)  # compile
        t0 = time.perf_counter()
        decoder.generate(prompt, new)
        rate = rows * new / (time.perf_counter() - t0)
        out.append({"check": f"decode {preset} batch {rows}", "status": "pass", "tokens_per_s": rate,
                    "detail": f"{new} new tokens per row: {rate:,.0f} tokens/s"})
    return out


def run_selfcheck(quick: bool = False, progress: Optional[Callable[[str], None]] = None) -> dict:
    say = progress or (lambda msg: None)
    steps = [("parity with the float64 reference", lambda: check_parity(quick)),
             ("gradients", lambda: check_gradients(quick)), ("cuDNN attention", lambda: [check_cudnn_attention()]),
             ("data parallelism", check_multi_device), ("CPU trajectory", lambda: [check_cpu_trajectory()]),
             ("speed", lambda: check_speed(quick))]
    checks = []
    for i, (what, run) in enumerate(steps):
        say(f"[{i + 1}/{len(steps)}] {what}")
        checks += run()
    device = jax.local_devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
            "devices": jax.local_device_count(), "jax_version": jax.__version__, "quick": quick,
            "default_matmul_precision": jax.config.jax_default_matmul_precision,
            "passed": all(c["status"] != "fail" for c in checks), "checks": checks}


def format_selfcheck(report: dict) -> str:
    lines = [f"jaxgpt selfcheck on {report['backend']} ({report['device']}, {report['devices']} device(s)), "
             f"jax {report['jax_version']}{' — quick mode' if report['quick'] else ''}"]
    width = max(len(c["check"]) for c in report["checks"])
    for c in report["checks"]:
        lines.append(f"  {c['check']:<{width}}  {c['status'].upper():<4}  {c['detail']}")
    failed = [c["check"] for c in report["checks"] if c["status"] == "fail"]
    lines.append("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return "\n".join(lines)
