"""The float64 divergence finder (`jaxgpt numerics`): where does a JAX run leave the reference?

One batch goes through the JAX model (its dtype, attention backend and device) and through the
float64 NumPy reference (`jaxgpt.reference`) twice:

- **alone** (the `max_abs_err`, `rel_err` and `ok` of a row): the reference computes each operation
  from the JAX model's *own* input to it (`jaxgpt.reference.layers.keep`: the reference's `record`
  hook hands the JAX value on), so a row's error is that operation's error alone, whatever came
  before it. That is what a tolerance can be stated for, and what names the place a fault enters;
- **end to end** (`global_max_abs_err`, `global_rel_err`): the reference runs on its own from the
  token ids, so a row's error is everything accumulated up to it (what a user sees in the logits).

A row's relative error is its largest absolute error over the largest magnitude of the reference
tensor. Its tolerance (`tolerance_for`) is `SAFETY · (u + u_acc · sqrt(K))`: u the unit roundoff of
the compute dtype (inputs and outputs are rounded to it), u_acc that of the accumulation (float32:
jaxgpt's layers accumulate in float32 whatever the compute dtype; float64 under x64), K the
operation's reduction length (the dot product's inner size, a norm's width, a softmax's row) — the
probabilistic rounding-error bound of a K-term sum (Higham & Mary, 2019) — with a safety factor
measured to hold on healthy models (docs/numerics.md). The first row, in the order the
model computes them, whose error leaves its tolerance (or which is NaN/inf where the reference is
finite) is the first divergence.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig, resolve_attn_impl, resolve_dtype
from jaxgpt.nn.layout import unstack_layers
from jaxgpt.nn.model import GPT, cross_entropy
from jaxgpt.reference.layers import to_numpy
from jaxgpt.reference.model import cross_entropy as ref_cross_entropy, gpt_forward

# unit roundoff u = 2^-p of each compute dtype (p: the significand's bits, the hidden one included)
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SAFETY = 8.0  # measured: healthy models stay ≥ 2× below it in float32 and bfloat16 (docs/numerics.md)
# the name a JAX module records an intermediate under, where it differs from the reference's op name
JAX_OP_NAMES = {"attn.attention_weights": "attn.weights"}


def compute_dtype_name(config: GPTConfig) -> str:
    return jnp.dtype(resolve_dtype(config)).name


def reduction_length(op: str, config: GPTConfig, length: int) -> int:
    """K of `op`: how many rounded terms one output element sums (1 for elementwise work)."""
    d, f, h = config.emb_dim, config.hidden_dim, config.head_dim
    if config.moe_experts is not None:
        f = config.expert_hidden
    last = op.rsplit(".", 1)[-1]
    table = {"embed": 2, "residual": 3, "attn.q": h, "attn.k": h, "attn.v": 1, "attn.scores": h,
             "attn.weights": length, "attn.context": length, "attn": config.n_heads * h, "mlp": f,
             "logits": d, "loss": config.vocab_size}
    if op in table:
        return table[op]
    if last.startswith("ln") or op == "ln_f":
        return d
    return d  # the projections from the model width: c_attn, c_q, c_kv_down, c_fc, c_gate


def accumulation_roundoff(dtype_name: str) -> float:
    """u of the dtype sums are accumulated in: float64 under x64, float32 otherwise (`jaxgpt.nn.dense`)."""
    return UNIT_ROUNDOFF["float64" if dtype_name == "float64" else "float32"]


def tolerance_for(op: str, config: GPTConfig, length: int, dtype_name: Optional[str] = None) -> float:
    """SAFETY · (u + u_acc · (sqrt(K) + rotation)): `rotation` is the largest RoPE angle's position
    for q and k of a RoPE model, whose angles pos · freq are rounded in float32 (an absolute error
    that grows with the position: at position 63 the rounding alone reaches ~0.57 of sqrt(K)'s term)."""
    dtype_name = dtype_name or compute_dtype_name(config)
    k = reduction_length(op, config, length)
    rotation = length if config.position == "rope" and op in ("attn.q", "attn.k") else 0
    return SAFETY * (UNIT_ROUNDOFF[dtype_name] + accumulation_roundoff(dtype_name) * (math.sqrt(k) + rotation))


def errors(jax_value, ref_value) -> tuple[float, float, int]:
    """(max |jax − ref|, that over max |ref|, non-finite entries JAX introduced). NaN/inf where
    the reference is finite counts as an infinite error; where both are non-finite, as none."""
    j, r = np.asarray(jax_value, np.float64), np.asarray(ref_value, np.float64)
    if j.shape != r.shape:
        raise ValueError(f"shapes differ: JAX {j.shape} against the reference's {r.shape}")
    introduced = ~np.isfinite(j) & np.isfinite(r)
    both_bad = ~np.isfinite(j) & ~np.isfinite(r)
    err = np.where(both_bad, 0.0, np.abs(np.where(introduced, 0.0, j) - np.where(np.isfinite(r), r, 0.0)))
    max_abs = math.inf if introduced.any() else float(err.max(initial=0.0))
    scale = float(np.abs(np.where(np.isfinite(r), r, 0.0)).max(initial=0.0))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel, int(introduced.sum())


def _op_key(path: tuple) -> Optional[tuple]:
    """A captured module path (("h_0", "attn", "c_attn", "__call__") …) as (layer, op)."""
    names = [str(p) for p in path if p != "__call__"]
    if not names:
        return None, "logits"  # the model's own output
    layer = None
    if names[0].startswith("h_") and names[0][2:].isdigit():
        layer, names = int(names[0][2:]), names[1:]
    op = ".".join(names) or "residual"  # a block's own output is the residual stream after it
    return layer, JAX_OP_NAMES.get(op, op)


def capture_jax(config: GPTConfig, params, ids_bt) -> dict:
    """{(layer, op): float64 array} of every intermediate of one JAX forward pass (module outputs,
    and what the attention layers sow when "intermediates" is mutable)."""
    plain = config.replace(scan_layers=False, remat="none")  # blocks as modules, so each is captured
    params = unstack_layers(params) if config.scan_layers else params
    _, state = jax.jit(lambda p, x: GPT(plain).apply(p, x, capture_intermediates=True, mutable=["intermediates"]))(
        params, jnp.asarray(ids_bt))
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if isinstance(keys[-1], int):  # sown values are tuples: one entry per call
            keys = keys[:-1]
        out.setdefault(_op_key(keys), np.asarray(value, np.float64))
    return out


def _reference_pass(config: GPTConfig, params64, ids_bt, targets_bt, captured: dict, forced: bool):
    """The reference forward with a `record` that measures each op against `captured` (in order)
    and, when `forced`, continues from the JAX value. Returns {(layer, op): (max_abs, rel, nonfinite)}."""
    found: dict = {}

    def record(layer, op, value):
        jax_value = captured.get((layer, op))
        if jax_value is None or jax_value.shape != np.shape(value):
            return value
        found[(layer, op)] = errors(jax_value, value)
        return jax_value if forced else value

    logits = gpt_forward(params64, ids_bt, config, record=record)
    found[(None, "loss")] = errors(captured[(None, "loss")], ref_cross_entropy(logits, targets_bt))
    return found


def forward_rows(config: GPTConfig, params, ids_bt, targets_bt, *, jax_params=None) -> list[dict]:
    """One row per intermediate both sides have, in the order the model computes them.

    `jax_params` (default `params`) are what the JAX model runs with: a copy that differs from the
    reference's (a conversion bug, a corrupted load) is found as the first op it changes."""
    jax_params = params if jax_params is None else jax_params
    captured = capture_jax(config, jax_params, ids_bt)
    logits = captured[(None, "logits")]
    captured[(None, "loss")] = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(targets_bt)), np.float64)
    params64 = to_numpy(unstack_layers(params))
    alone = _reference_pass(config, params64, ids_bt, targets_bt, captured, forced=True)
    end_to_end = _reference_pass(config, params64, ids_bt, targets_bt, captured, forced=False)
    dtype_name, length = compute_dtype_name(config), np.shape(ids_bt)[1]
    rows = []
    for (layer, op), (max_abs, rel, nonfinite) in alone.items():
        tol = tolerance_for(op, config, length, dtype_name)
        g_abs, g_rel, _ = end_to_end[(layer, op)]
        rows.append({"layer": layer, "op": op, "max_abs_err": max_abs, "rel_err": rel, "tolerance": tol,
                     "ok": bool(rel <= tol), "nonfinite": nonfinite, "global_max_abs_err": g_abs,
                     "global_rel_err": g_rel, "reduction": reduction_length(op, config, length)})
    return rows


def first_divergence(rows: list[dict]) -> Optional[dict]:
    return next((row for row in rows if not row["ok"]), None)


def describe(config: GPTConfig) -> dict:
    """The setting a table was measured in: dtype, attention backend, device, matmul precision."""
    device = jax.devices()[0]
    return {"dtype": compute_dtype_name(config), "attn_impl": resolve_attn_impl(config, attention_dropout=False),
            "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
            "default_matmul_precision": jax.config.jax_default_matmul_precision, "safety": SAFETY,
            "unit_roundoff": UNIT_ROUNDOFF[compute_dtype_name(config)]}


def _grad_key(path: str) -> tuple:
    """"h_3/attn/c_attn/kernel" -> (3, "grad attn.c_attn.kernel"); others (None, "grad wte.embedding")."""
    parts = path.split("/")
    if parts[0] == "params":
        parts = parts[1:]
    if parts[0].startswith("h_") and parts[0][2:].isdigit():
        return int(parts[0][2:]), "grad " + ".".join(parts[1:])
    return None, "grad " + ".".join(parts)


def _jax_grads(config: GPTConfig, params, ids_bt, targets_bt):
    loss = lambda p: cross_entropy(GPT(config).apply(p, ids_bt), targets_bt)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)


def reference_grads(config: GPTConfig, params, ids_bt, targets_bt) -> tuple[dict, str]:
    """(float64 gradients, what computed them): the reference's hand-written backward where it
    covers the model (GPT-2), otherwise JAX's autodiff of the same model run in float64."""
    from jaxgpt.reference.model import gpt_loss_and_grads

    params = unstack_layers(params)
    try:
        return gpt_loss_and_grads(to_numpy(params), ids_bt, targets_bt, config)[1], "numpy-backward"
    except NotImplementedError:
        pass
    with jax.enable_x64(True):
        cfg64 = config.replace(dtype="float64", scan_layers=False, remat="none")
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        grads = _jax_grads(cfg64, params64, jnp.asarray(ids_bt), jnp.asarray(targets_bt))
        return jax.tree.map(lambda a: np.asarray(a, np.float64), grads), "jax-float64-autodiff"


def gradient_rows(config: GPTConfig, params, ids_bt, targets_bt, *, jax_params=None) -> tuple[list[dict], str]:
    """One row per parameter: the JAX gradient (the model's dtype) against the float64 one. The
    backward is not split into operations, so these errors are end to end: the tolerance is
    `SAFETY · (u · sqrt(depth) + u_acc · sqrt(tokens · depth))`, depth the blocks the gradient came
    back through, tokens what each weight gradient sums over."""
    from jaxgpt.train.sharding import path_str

    jax_params = unstack_layers(params if jax_params is None else jax_params)
    plain = config.replace(scan_layers=False, remat="none")
    jax_grads = _jax_grads(plain, jax_params, jnp.asarray(ids_bt), jnp.asarray(targets_bt))
    ref, source = reference_grads(plain, params, ids_bt, targets_bt)
    ref_leaves = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
    dtype_name = compute_dtype_name(config)
    u, u_acc = UNIT_ROUNDOFF[dtype_name], accumulation_roundoff(dtype_name)
    tokens = int(np.prod(np.shape(ids_bt)))
    rows = []
    for path, g in jax.tree_util.tree_flatten_with_path(jax_grads)[0]:
        name = path_str(path)
        layer, op = _grad_key(name)
        depth = config.n_layers - (layer if layer is not None else 0) + 1
        k = tokens * depth
        max_abs, rel, nonfinite = errors(g, ref_leaves[name])
        tol = SAFETY * (u * math.sqrt(depth) + u_acc * math.sqrt(k))
        rows.append({"layer": layer, "op": op, "max_abs_err": max_abs, "rel_err": rel, "tolerance": tol,
                     "ok": bool(rel <= tol), "nonfinite": nonfinite, "reduction": k})
    def backprop_order(row):  # the head and ln_f first, then the last layer down to the first, then the embeddings
        if row["layer"] is not None:
            return row["layer"]
        return config.n_layers if ("ln_f" in row["op"] or "lm_head" in row["op"]) else -1

    return sorted(rows, key=backprop_order, reverse=True), source
