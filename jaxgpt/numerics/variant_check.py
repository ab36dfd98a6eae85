"""`jaxgpt variant-check KIND`: the project's property checks, run on any registered attention kind
(built in or from a plugin), on a small model of that kind (`get_preset("test")` with the kind's
`example` fields). One row per check; a check that does not apply says why ("skipped").

- forward: the model's logits against the NumPy float64 reference (`AttentionKind.reference`),
  both in float64 (x64), relative error ≤ 1e-9;
- backward: the layer's gradients (JAX autodiff, float64) against the kind's hand-written NumPy
  backward, relative error ≤ 1e-8;
- causal: changing later tokens leaves earlier logits unchanged (≤ 1e-6);
- cached decoding: a ragged batch decoded with the cache gives each row the tokens it gets decoded
  alone without a cache (greedy);
- backends: every attention backend the kind honours gives the naive backend's logits (≤ 1e-5);
- gradients: the training loss's gradients are finite, and the attention layer's are not all zero.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import get_preset
from jaxgpt.registry import attention_kind


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def example_config(name: str, **changes):
    kind = attention_kind(name)
    return get_preset("test", attention=name, drop_rate=0.0, **{**dict(kind.example), **changes})


def _lively(params, seed: int):
    """Parameters moved off their initial values (norm scales of 1, zero biases): every one matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(0.05 * rng.normal(size=a.shape), a.dtype), params)


def check_forward(name: str) -> dict:
    from jaxgpt import reference as ref
    from jaxgpt.nn.model import GPT, init_params

    cfg = example_config(name, dtype="float64")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    with jax.enable_x64(True):
        params = _lively(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(cfg, seed=3)), 0)
        logits = np.asarray(GPT(cfg).apply(params, jnp.asarray(ids)))
        rel = _rel(logits, ref.gpt_forward(ref.to_numpy(params), ids, cfg))
    return {"rel_err": rel, "tolerance": 1e-9, "ok": rel <= 1e-9}


def check_backward(name: str) -> dict:
    kind = attention_kind(name)
    if kind.reference_backward is None:
        return {"skipped": f"attention {name!r} registers no hand-written NumPy backward", "ok": True}
    cfg = example_config(name, dtype="float64")
    layer = kind.layer(cfg, impl="naive", dtype=jnp.float64, out_init_std=0.02, window=cfg.layer_window(0))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 7, cfg.emb_dim))
    dout = rng.normal(size=x.shape)
    with jax.enable_x64(True):
        params = _lively(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), layer.init(jax.random.key(0), jnp.asarray(x))), 1)
        _, vjp = jax.vjp(lambda p, xx: layer.apply(p, xx), params, jnp.asarray(x))
        g_params, g_x = vjp(jnp.asarray(dout))
        numpy_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
        try:
            dx, grads = kind.reference_backward(dout, x, numpy_params, cfg, 0)
        except NotImplementedError as e:
            return {"skipped": str(e), "ok": True}
    errors = [_rel(g_x, dx)] + [_rel(a, b) for a, b in zip(jax.tree.leaves(g_params["params"]), jax.tree.leaves(grads))]
    return {"rel_err": max(errors), "tolerance": 1e-8, "ok": max(errors) <= 1e-8}


def check_causal(name: str) -> dict:
    from jaxgpt.nn.model import GPT, init_params

    cfg = example_config(name)
    params = _lively(init_params(cfg, seed=4), 2)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, cfg.vocab_size, (1, 14))
    changed = ids.copy()
    changed[0, 9:] = rng.integers(0, cfg.vocab_size, 5)
    a, b = GPT(cfg).apply(params, ids), GPT(cfg).apply(params, changed)
    diff = float(np.abs(np.asarray(a[:, :9]) - np.asarray(b[:, :9])).max())
    later = float(np.abs(np.asarray(a[:, 9:]) - np.asarray(b[:, 9:])).max())
    return {"max_abs_change_before": diff, "tolerance": 1e-6, "ok": diff <= 1e-6 and later > 0}


def check_cached_decoding(name: str) -> dict:
    from jaxgpt.inference.generate import generate, generate_batch
    from jaxgpt.nn.model import init_params

    cfg = example_config(name)
    params = _lively(init_params(cfg, seed=5), 3)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [11, 12, 13], [5, 9]]  # ragged: the short rows are padded
    cached = generate_batch(params, cfg, prompts, 6)
    alone = [generate(params, cfg, [p], 6, use_cache=False)[0, len(p):].tolist() for p in prompts]
    return {"rows_differing": sum(a != b for a, b in zip(cached, alone)), "ok": cached == alone}


def check_backends(name: str) -> dict:
    from jaxgpt.nn.model import GPT, init_params

    kind = attention_kind(name)
    if len(kind.impls) < 2:
        return {"skipped": f"attention {name!r} has one backend ({kind.impls[0]})", "ok": True}
    cfg = example_config(name, attn_impl="naive")
    params = _lively(init_params(cfg, seed=6), 4)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 12))
    want = GPT(cfg).apply(params, ids)
    errors = {impl: _rel(GPT(cfg.replace(attn_impl=impl)).apply(params, ids), want) for impl in kind.impls}
    return {"rel_err": errors, "tolerance": 1e-5, "ok": max(errors.values()) <= 1e-5}


def check_gradients(name: str) -> dict:
    from jaxgpt.nn.model import GPT, cross_entropy, init_params

    cfg = example_config(name)
    params = _lively(init_params(cfg, seed=8), 5)
    ids = np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 13))
    grads = jax.grad(lambda p: cross_entropy(GPT(cfg).apply(p, ids[:, :-1]), ids[:, 1:]))(params)
    finite = all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    attn_norm = math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["params"]["h_0"]["attn"])))
    return {"finite": finite, "attention_grad_norm": attn_norm, "ok": finite and attn_norm > 0}


CHECKS: dict[str, Callable[[str], dict]] = {
    "forward matches the float64 reference": check_forward,
    "backward matches the hand-written reference": check_backward,
    "causal": check_causal,
    "cached decoding equals uncached (ragged batch)": check_cached_decoding,
    "backends agree": check_backends,
    "gradients finite": check_gradients,
}


def variant_check(name: str, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """{"kind", "ok", "checks": [{"name", "ok", ...}]} for the registered attention kind `name`."""
    kind = attention_kind(name)
    rows = []
    for check_name, check in CHECKS.items():
        progress(check_name)
        try:
            row = check(name)
        except Exception as e:  # noqa: BLE001 - a kind that crashes a check fails that check, by name
            row = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        rows.append({"name": check_name, **row, "ok": bool(row["ok"])})
    return {"kind": name, "plugin": kind.plugin, "ok": all(r["ok"] for r in rows), "checks": rows}
