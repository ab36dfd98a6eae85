"""Run metrics: the JSONL log, model FLOPs and utilisation, and the loss-curve plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Optional

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import inactive_expert_params


class JsonlLogger:
    """Appends one JSON object per line to `path` (and optionally mirrors scalars to TensorBoard)."""

    def __init__(self, path: Path, tensorboard_dir: Optional[Path] = None) -> None:
        self.path = Path(path)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError(
                    "TensorBoard logging needs tensorboardX: pip install 'jaxgpt[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill -9 is skipped, the rest is still readable
    return records


def flops_per_token(config: GPTConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6·N (matmuls, forward + backward) + 12·L·T·d (attention scores).

    N excludes the position table (a lookup, no matmul), as in the PaLM paper's MFU appendix, and
    a mixture of experts' routed experts that a token does not use (N is the active parameters).
    """
    n = n_params - config.context_length * config.emb_dim - inactive_expert_params(config)
    return 6.0 * n + 12.0 * config.n_layers * seq_len * config.emb_dim


def compiled_flops(jitted, *args) -> Optional[float]:
    """FLOPs of one call of `jitted(*args)` by XLA's cost analysis of the compiled program (the one
    already compiled for these arguments: no new compilation after the first call), or None where
    the backend gives none. For a per-device program (pmap, SPMD) this is one device's share."""
    try:
        analysis = jitted.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis: the caller falls back to the formula
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def measure_peak_flops(size: int = 2048, repeats: int = 5, device=None, dtype=jnp.float32) -> float:
    """FLOP/s of a (size × size) matmul on one device: the best of `repeats` timed runs.

    This is what the device reaches in practice on dense work, so it is the MFU denominator when
    no datasheet peak is given. `dtype` is the matmul's input dtype (the model's compute dtype);
    it accumulates in float32, as the model's layers do (jaxgpt.nn.dense).
    """
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def plot_losses(records: Iterable[dict], out_path: Path, title: str = "") -> Path:
    """Train and validation loss against steps and against tokens seen, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "eval"]
    tasks = [r for r in records if r.get("kind") == "tasks"]
    fig, axes = plt.subplots(1, 3 if tasks else 2, figsize=(16.5 if tasks else 11, 4))
    if tasks:  # train.eval_tasks: each task metric over steps
        for key in sorted({k for r in tasks for k in r if "/" in k}):
            points = [(r["step"], r[key]) for r in tasks if key in r]
            axes[2].plot(*zip(*points), "o-", ms=3, label=key)
        axes[2].set_xlabel("step")
        axes[2].set_yscale("log")
        axes[2].set_title("task metrics")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    for ax, xkey, xlabel in ((axes[0], "step", "step"), (axes[1], "tokens_seen", "tokens seen")):
        if train:
            ax.plot([r[xkey] for r in train], [r["loss"] for r in train], label="train", lw=1)
        if val:
            ax.plot([r[xkey] for r in val], [r["val_loss"] for r in val], "o-", label="val", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_expert_load(records: Iterable[dict], out_path: Path, title: str = "") -> Optional[Path]:
    """A mixture of experts' load over training: each expert's share of its layer's assignments
    (one panel per MoE layer; 1/E is even). None when the records hold no router metrics."""
    train = [r for r in records if r.get("kind") == "train" and "moe_load" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    n_layers, n_experts = len(train[0]["moe_load"]), len(train[0]["moe_load"][0])
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 1, 3.2), squeeze=False, sharey=True)
    for layer, ax in enumerate(axes[0]):
        for e in range(n_experts):
            ax.plot(steps, [r["moe_load"][layer][e] for r in train], lw=1)
        ax.axhline(1.0 / n_experts, color="gray", ls="--", lw=0.8)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of assignments per expert")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


def plot_curves(rows: Iterable[dict], keys: list[str], out_path: Path, *, x_key: str = "epoch", title: str = "",
                ylabel: str = "", xlabel: Optional[str] = None) -> Path:
    """One PNG of the curves `keys` (e.g. train/val accuracy) against `x_key`, from rows holding them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        have = [r for r in rows if key in r]
        ax.plot([r[x_key] for r in have], [r[key] for r in have], marker="o", label=key)
    ax.set_xlabel(xlabel or x_key)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
