"""Weights that hold NaN or inf are refused when loaded: they would decode blank text and score NaN
without a word. One reduction per tensor, read back together."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteWeightsError(ValueError):
    """Loaded weights hold NaN or inf; the message names the tensors."""


def non_finite_tensors(params) -> tuple[list[str], int]:
    """(the paths of the tensors of `params` that hold NaN or inf, how many tensors there are)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0]) if jax.tree.leaves(params) else ((), ())
    finite = jax.device_get([np.isfinite(leaf).all() if isinstance(leaf, np.ndarray)  # host weights stay on the host
                             else jnp.isfinite(leaf).all() for leaf in leaves])
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, ok in zip(paths, finite) if not ok], len(leaves)


def check_finite_params(params, source: str) -> None:
    """Raise NonFiniteWeightsError naming the first tensors of `params` that hold NaN or inf."""
    bad, n_tensors = non_finite_tensors(params)
    if bad:
        raise NonFiniteWeightsError(f"{source} holds NaN or inf in {len(bad)} of {n_tensors} tensors (e.g. "
                                    f"{', '.join(bad[:3])}): its outputs would be meaningless. Use an earlier "
                                    "checkpoint step, or retrain from one")
