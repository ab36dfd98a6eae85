"""The two layouts of the blocks' parameters, and the conversion between them.

GPT-2's layout names each block: {"h_0": {...}, "h_1": {...}, ...}. With `GPTConfig.scan_layers`
the blocks are one tree "h" whose leaves carry a leading layer axis, {"h": {"attn": {"c_attn":
{"kernel": (n_layers, d, 3d)}}, ...}}, so that the optimizer, like the scanned forward pass, is a
fixed amount of work to compile whatever the depth. Everything that reads weights by block name
(the NumPy reference, Hugging Face export, LoRA, finetuning) takes the GPT-2 layout; these helpers
convert at those boundaries. NumPy-only at import, so the reference can use them.
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"h_(\d+)$")


def _inner(params: dict) -> tuple[dict, bool]:
    """The dict holding wte/h_i (unwrapping {"params": …}), and whether it was wrapped."""
    return (params["params"], True) if "params" in params else (params, False)


def is_stacked(params: dict) -> bool:
    return "h" in _inner(params)[0]


def unstack_layers(params: dict) -> dict:
    """GPT-2's layout (h_0 … h_{L-1}) of `params`; returned as is when already in it."""
    inner, wrapped = _inner(params)
    if "h" not in inner:
        return params
    stacked = inner["h"]
    n_layers = _leading_dim(stacked)
    out = {k: v for k, v in inner.items() if k != "h"}
    for i in range(n_layers):
        out[f"h_{i}"] = _map(lambda a, i=i: a[i], stacked)
    return {"params": out} if wrapped else out


def stack_layers(params: dict) -> dict:
    """The scanned layout (one "h" tree, leaves (n_layers, …)) of `params`; as is when already in it."""
    import jax.numpy as jnp

    inner, wrapped = _inner(params)
    if "h" in inner:
        return params
    blocks = sorted((int(m.group(1)), k) for k in inner if (m := _BLOCK.match(k)))
    if [i for i, _ in blocks] != list(range(len(blocks))) or not blocks:
        raise ValueError(f"expected blocks h_0 … h_{{L-1}}, found {[k for _, k in blocks]}")
    out = {k: v for k, v in inner.items() if not _BLOCK.match(k)}
    out["h"] = _map(lambda *leaves: jnp.stack(leaves), *[inner[k] for _, k in blocks])
    return {"params": out} if wrapped else out


def to_layout(params: dict, scan_layers: bool) -> dict:
    """`params` in the layout a model with this `scan_layers` setting takes."""
    return stack_layers(params) if scan_layers else unstack_layers(params)


def _map(fn, *trees):
    """Map over nested dicts of arrays (jax.tree.map without importing jax)."""
    if isinstance(trees[0], dict):
        return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _leading_dim(tree) -> int:
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return tree.shape[0]
