"""Run fingerprints: a bit-exact checksum of every parameter, logged during training, and the
comparison of two runs' logs (`jaxgpt compare-runs A B`).

The checksum of a leaf is Σ_i bits(a_i) · m_i mod 2³², with bits the float's raw bits and m_i an
odd multiplier per position. Addition mod 2³² is exact, associative and commutative, so the sum is
the same in every reduction order — on one device, replicated, or sharded over a mesh and summed
by XLA in pieces — while any change of any bit of any one element changes it (an odd m_i is
invertible mod 2³²). Beside it, the leaf's norm says by how much two runs' weights differ (a float
sum: its last bits may depend on the layout; only the checksums decide equality).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.train.metrics import read_jsonl
from jaxgpt.train.sharding import path_str

_GOLDEN = np.uint32(0x9E3779B1)  # Knuth's multiplicative hash constant


def _leaf_fingerprint(a: jax.Array):
    """(checksum uint32, L2 norm float32) of one array, bit-exact whatever its sharding."""
    flat = a.reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[flat.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(flat, unsigned)
    if flat.dtype.itemsize == 8:  # fold the two halves of a 64-bit value
        bits = (bits ^ (bits >> 32)).astype(jnp.uint32)
    multiplier = (jnp.arange(flat.shape[0], dtype=jnp.uint32) * _GOLDEN) | jnp.uint32(1)
    checksum = jnp.sum(bits.astype(jnp.uint32) * multiplier, dtype=jnp.uint32)
    return checksum, jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(params) -> dict:
    """{"checksum": hex of all leaves together, "leaves": {path: [hex checksum, norm]}}."""
    paths = [path_str(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    pairs = jax.tree.leaves(_fingerprints(params), is_leaf=lambda x: isinstance(x, tuple))  # same leaf order
    to_host = lambda x: np.asarray(x if x.is_fully_addressable else x.addressable_data(0))  # noqa: E731  replicated
    leaves, combined = {}, 0
    for i, (path, (checksum, norm)) in enumerate(sorted(zip(paths, pairs), key=lambda item: item[0])):
        leaves[path] = [f"{int(to_host(checksum)):08x}", float(to_host(norm))]
        combined = (combined * 31 + int(to_host(checksum)) + i) % 2**32
    return {"checksum": f"{combined:08x}", "leaves": leaves}


def read_fingerprints(run_dir: Path) -> dict[int, dict]:
    """step -> fingerprint record of a run's metrics.jsonl (ValueError when there are none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: not a training run directory")
    records = read_jsonl(path)
    prints = {r["step"]: r for r in records if r.get("kind") == "fingerprint"}
    if not prints:
        raise ValueError(f"{path} holds no fingerprints (train with train.fingerprint_every > 0)")
    return prints


def compare_runs(run_a: Path, run_b: Path) -> dict:
    """Where two runs' parameters first differ: the first common fingerprinted step whose checksums
    differ, the leaves that differ there (largest relative norm difference first), and the last
    step at which they were still bitwise equal."""
    a, b = read_fingerprints(run_a), read_fingerprints(run_b)
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"the runs have no fingerprinted step in common ({sorted(a)[:5]}… vs {sorted(b)[:5]}…)")
    last_equal: Optional[int] = None
    for step in common:
        if a[step]["checksum"] == b[step]["checksum"]:
            last_equal = step
            continue
        moved = []
        for path, (sum_a, norm_a) in a[step]["leaves"].items():
            sum_b, norm_b = b[step]["leaves"].get(path, [None, float("nan")])
            if sum_a != sum_b:
                moved.append({"param": path, "norm_a": norm_a, "norm_b": norm_b,
                              "rel_norm_diff": abs(norm_a - norm_b) / max(abs(norm_a), 1e-30)})
        moved.sort(key=lambda m: -m["rel_norm_diff"])
        return {"identical": False, "first_difference_step": step, "last_equal_step": last_equal,
                "params_differing": len(moved), "params_total": len(a[step]["leaves"]), "moved": moved,
                "steps_compared": common}
    return {"identical": True, "first_difference_step": None, "last_equal_step": last_equal, "moved": [],
            "steps_compared": common}
