"""`jaxgpt numerics`: one batch, the divergence table, its JSON and its plot."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.numerics.divergence import describe, first_divergence, forward_rows, gradient_rows


def sample_batch(config: GPTConfig, tokenizer, batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, targets), each (batch, length): text of the embedded corpus when the model's tokenizer
    fits its vocabulary (realistic activations), otherwise seeded random token ids."""
    from jaxgpt.data.corpus import embedded_corpus_text

    if length > config.context_length:
        raise ValueError(f"--length {length} exceeds the model's context_length {config.context_length}")
    need = batch * (length + 1)
    tokens = None
    if tokenizer is not None and getattr(tokenizer, "vocab_size", math.inf) <= config.vocab_size:
        text = embedded_corpus_text()
        tokens = np.asarray(tokenizer.encode(text[: 16 * need]), np.int64)[:need]
        tokens = tokens if tokens.size == need else None
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, config.vocab_size, need)
    rows = tokens.reshape(batch, length + 1)
    return rows[:, :-1], rows[:, 1:]


def run_numerics(config: GPTConfig, params, ids_bt, targets_bt, *, grads: bool = False, jax_params=None,
                 progress=None) -> dict:
    """The report `jaxgpt numerics --json` prints: {"setting", "rows", "first_divergence",
    "grad_reference"}; `rows` are the forward's in the order it computes them, then (with `grads`)
    every parameter's gradient, last layer first."""
    say = progress or (lambda msg: None)
    say("forward: JAX and the float64 reference, each operation alone and end to end")
    rows = forward_rows(config, params, ids_bt, targets_bt, jax_params=jax_params)
    grad_reference = None
    if grads:
        say("gradients: JAX against the float64 reference")
        grad_rows, grad_reference = gradient_rows(config, params, ids_bt, targets_bt, jax_params=jax_params)
        rows = rows + grad_rows
    setting = {**describe(config), "batch": int(np.shape(ids_bt)[0]), "length": int(np.shape(ids_bt)[1])}
    return {"setting": setting, "rows": rows, "first_divergence": first_divergence(rows),
            "grad_reference": grad_reference}


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_table(report: dict) -> str:
    s = report["setting"]
    lines = [f"jaxgpt numerics: {s['dtype']} on {s['backend']} ({s['device']}), attention {s['attn_impl']}, "
             f"batch {s['batch']}×{s['length']}; tolerance = {s['safety']:g}·(u + u_acc·sqrt(K)), u = {s['unit_roundoff']:.3g}",
             f"{'layer':>5}  {'op':<28} {'max_abs_err':>11} {'rel_err':>9} {'tolerance':>9} {'ratio':>7} "
             f"{'end-to-end':>10}  ok"]
    first = report["first_divergence"]
    for row in report["rows"]:
        ratio = row["rel_err"] / row["tolerance"] if row["tolerance"] else math.inf
        mark = "  <- first divergence" if row is first else ""
        layer = "-" if row["layer"] is None else str(row["layer"])
        lines.append(f"{layer:>5}  {row['op']:<28} {_fmt(row['max_abs_err']):>11} {_fmt(row['rel_err']):>9} "
                     f"{_fmt(row['tolerance']):>9} {ratio:>7.3f} {_fmt(row.get('global_rel_err')):>10}  "
                     f"{'yes' if row['ok'] else 'NO'}{mark}")
    if first is None:
        lines.append("every operation is within its tolerance of the float64 reference")
    else:
        where = "outside the blocks" if first["layer"] is None else f"layer {first['layer']}"
        lines.append(f"first divergence: {where}, {first['op']} (rel_err {first['rel_err']:.3g} > "
                     f"tolerance {first['tolerance']:.3g}{', NaN/inf' if first['nonfinite'] else ''})")
    if report["grad_reference"]:
        lines.append(f"gradients checked against: {report['grad_reference']}")
    return "\n".join(lines)


def plot_errors(report: dict, out: Path) -> Path:
    """Two panels: each forward op's error over its tolerance by layer (a heat map, log scale; the
    first divergence circled), and the end-to-end relative error along the residual stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forward = [r for r in report["rows"] if not r["op"].startswith("grad ")]
    layers = sorted({r["layer"] for r in forward if r["layer"] is not None})
    ops = list(dict.fromkeys(r["op"] for r in forward if r["layer"] is not None))
    grid = np.full((len(ops), len(layers)), np.nan)
    for r in forward:
        if r["layer"] is not None:
            ratio = r["rel_err"] / r["tolerance"]
            grid[ops.index(r["op"]), layers.index(r["layer"])] = np.log10(max(ratio, 1e-6)) if np.isfinite(ratio) else 6
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.3 * len(ops) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="RdYlGn_r", vmin=-3, vmax=3)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(ops)), ops)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="log10(rel_err / tolerance)  (> 0: outside)")
    first = report["first_divergence"]
    if first is not None and first["layer"] is not None and first["op"] in ops:
        ax.scatter([layers.index(first["layer"])], [ops.index(first["op"])], s=300, facecolors="none",
                   edgecolors="black", linewidths=2)
    stream = [r for r in forward if r["op"] in ("embed", "residual", "ln_f", "logits", "loss")]
    ax2.semilogy(range(len(stream)), [max(r["global_rel_err"], 1e-18) for r in stream], "o-")
    ax2.set_xticks(range(len(stream)), [r["op"] if r["layer"] is None else f"h_{r['layer']}" for r in stream],
                   rotation=45)
    ax2.set_ylabel("end-to-end relative error")
    s = report["setting"]
    fig.suptitle(f"JAX ({s['dtype']}, {s['attn_impl']}, {s['backend']}) against the float64 reference")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def progress_to_stderr(msg: str) -> None:
    print(f"[numerics] {msg}", file=sys.stderr, flush=True)
