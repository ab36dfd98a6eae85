"""XLA compiler options chosen at run time from the backend JAX reports and the compute dtype.

On the CPU backend, XLA hands matmuls, reductions and elementwise fusions to its YNNPACK library
by default. For a float32 training step that default is slow here: the gradient-norm reduction of
the 50257×768 head ran as one YNNPACK fusion that took 1.9 s of a 3.9 s gpt2-small step, and
letting YNNPACK take only the dots (`LIBRARY_FUSION_TYPE_DOT`) gave 2.9 s a step (1.35×) and 7 %
on nanoGPT's small CPU recipe. With bfloat16 matmuls the default is the faster one (its dots run on
the AMX tiles), so the option is only set for float32 compute. GPU and TPU compile with XLA's
defaults. Measurements and how they were taken: docs/performance.md.

`JAXGPT_XLA_TUNING=0` turns this off; an option that the installed XLA does not know is dropped
with one warning (its names are experimental), so nothing here can stop a run.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxgpt.config import is_low_precision

CPU_FLOAT32_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def compiler_options(compute_dtype, platform: Optional[str] = None) -> Optional[dict]:
    """The options for compiling a model step on `platform` (default: JAX's default backend)."""
    if not _tuning_on():
        return None
    platform = platform or jax.default_backend()
    if platform != "cpu" or is_low_precision(compute_dtype):
        return None
    return dict(CPU_FLOAT32_OPTIONS) if _accepted(tuple(CPU_FLOAT32_OPTIONS.items())) else None


def transposed_decode_kernels(platform: Optional[str] = None) -> bool:
    """Whether decoding should read each dense kernel as an (n, k) copy (`jaxgpt.inference.decoding_copy`).

    On XLA's CPU backend a dot of a few rows (the decode step's batch) against a row-major (k, n)
    weight packs the weight at every call; against its (n, k) transpose it does not: 48 such
    768×3072 products took 31.9 against 44.5 ms at 8 rows and 20.9 against 22.4 ms at one row
    (docs/performance.md). On GPU/TPU the matmul libraries take either layout, so nothing is copied.
    """
    return _tuning_on() and (platform or jax.default_backend()) == "cpu"


def decode_cache_dtype(compute_dtype, platform: Optional[str] = None):
    """The dtype softmax attention's key/value cache is kept in while decoding.

    The compute dtype, except float32 for a bf16/f16 model on the CPU backend: XLA's CPU dot has no
    low-precision batched product, so a decode step converted each layer's whole bf16 cache to
    float32 for its two attention products, at every step (gpt2-small at batch 8: 24 conversions,
    ~6 ms of a 33 ms step). The cache holds the bf16-rounded keys and values either way and the
    products are rounded back to the compute dtype (`attention.cached_query_attention`), so the
    attention is the same; the cache takes twice the memory.
    """
    if is_low_precision(compute_dtype) and _tuning_on() and (platform or jax.default_backend()) == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(compute_dtype)


def _tuning_on() -> bool:
    """False when the user turned the run-time tuning off (`JAXGPT_XLA_TUNING=0`)."""
    return os.environ.get("JAXGPT_XLA_TUNING", "1") != "0"


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple) -> bool:
    """Whether this XLA compiles with `options` (probed once on a tiny function)."""
    try:
        jax.jit(lambda x: x @ x, compiler_options=dict(options)).lower(jnp.ones((2, 2))).compile()
        return True
    except Exception as e:  # noqa: BLE001 — any refusal means: compile without them
        warnings.warn(f"XLA does not take the compiler options {dict(options)} ({e}); using its defaults", stacklevel=3)
        return False


def jit(fun: Callable, *, compute_dtype, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` with the compiler options for `compute_dtype` on this backend."""
    return jax.jit(fun, compiler_options=compiler_options(compute_dtype), **jit_kwargs)


class PmapWithOptions:
    """A `jax.pmap`-ed function compiled with compiler options (pmap takes none of its own).

    The first call for each input signature lowers and compiles it ahead of time with `options`;
    training calls it with one signature, so that is one compilation, as plain pmap would do.
    """

    def __init__(self, pmapped, options: dict) -> None:
        self.pmapped, self.options, self._compiled = pmapped, options, {}

    def compiled(self, *args):
        """The executable for these arguments (compiled on first use)."""
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
        if key not in self._compiled:
            self._compiled[key] = self.pmapped.lower(*args).compile(compiler_options=self.options)
        return self._compiled[key]

    def lower(self, *args):  # `.lower(...).compile()` as on a jitted function: the cached executable
        executable = self.compiled(*args)
        return type("Lowered", (), {"compile": staticmethod(lambda: executable)})()

    def __call__(self, *args):
        return self.compiled(*args)(*args)


def pmap(fun: Callable, *, compute_dtype, **pmap_kwargs):
    """`jax.pmap(fun, **pmap_kwargs)`, compiled with the options for `compute_dtype` when there are any."""
    pmapped = jax.pmap(fun, **pmap_kwargs)
    options = compiler_options(compute_dtype)
    return pmapped if not options else PmapWithOptions(pmapped, options)
