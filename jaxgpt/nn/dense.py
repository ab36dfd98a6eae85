"""Mixed precision for the dense layers: low-precision matmul inputs, float32 accumulation and output.

With `GPTConfig.dtype = "bfloat16"` every dense layer (`Dense` below) casts its input and kernel to
bfloat16 and multiplies them with `preferred_element_type=float32`: the matmul units do bf16 ×
bf16 → f32 (GPU tensor cores, TPU MXUs, the AMX tiles of recent x86 CPUs), while the parameters
(the "master weights"), the residual stream, LayerNorm, attention scores, softmax and the loss stay
in float32. With float32 compute, `Dense` is a plain dense layer and nothing else here runs.

Why a custom VJP: XLA's CPU backend runs a bf16 dot on the AMX/YNNPACK path only when the left
operand's contracted dimension is its minor (contiguous) one. The forward x @ W and dx = g @ Wᵀ are
such dots, but the weight gradient dW = xᵀ g contracts x over its major (token) dimension, and XLA
folds any plain transpose of x back into the dot, which then runs upcast to float32 at a fifth of the
speed. `_transposed_copy` writes xᵀ out through a 3-D transpose that XLA keeps as a copy, so dW runs
on the fast path too (measured: 1.3 TFLOP/s against 0.25 for the folded form on a 512×768×3072
product here; docs/performance.md). The values are the same either way; on GPU/TPU the plain form
is used.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.config import is_low_precision

Array = jax.Array


def _dot_f32(a_mk: Array, b: Array, *, contract_b: int) -> Array:
    """a (m, k) · b over k, b's contracted dimension `contract_b` (0: b is (k, n); 1: b is (n, k)), f32 out."""
    return jax.lax.dot_general(a_mk, b, (((1,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


# The name under which a decoding copy of the weights holds a dense kernel transposed to (n, k)
# (`jaxgpt.inference.decoding_copy`): `Dense` contracts such a kernel over its minor axis.
DECODING_KERNEL = "kernel_nk"

FEW_ROWS = 64  # up to this many rows (a decode step's batch), `few_rows_dot` takes the product's transpose


def few_rows_dot(x_mk: Array, w_nk: Array) -> Array:
    """x (m, k) · w (n, k)ᵀ → (m, n) in x's dtype, for a decode step's few rows against an (n, k) weight.

    XLA's CPU dot picks a faster kernel for the transposed product w · xᵀ (n, m) — a weight-sized
    left operand against a few columns — than for x · wᵀ: 48 chained gpt2-small float32 products took
    20.5 against 27.5 ms at 8 rows, 1.16–1.4× faster from 2 to 64 rows and the same at one
    (docs/performance.md). XLA folds a plain transpose of the result back into the dot, so the
    (n, m) product sits behind an optimization barrier and its small transpose is a real copy.
    Above `FEW_ROWS` rows (a long prefill) the plain form is used.
    """
    contract = (((1,), (1,)), ((), ()))
    if x_mk.shape[0] > FEW_ROWS:
        return jax.lax.dot_general(x_mk, w_nk, contract)
    y_nm = jax.lax.optimization_barrier(jax.lax.dot_general(w_nk, x_mk, contract))  # (n, k)·(m, k) -> (n, m)
    return y_nm.T


def _transposed_copy(x_mk: Array) -> Array:
    """xᵀ (k, m) as a real copy in row-major order (see the module docstring), on the CPU backend.

    Split k into (k/c, c) and move m last: XLA keeps this 3-D transpose as a copy, where it would fold
    a plain `x.T` into the consuming dot. Elsewhere a plain transpose is as good.
    """
    m, k = x_mk.shape
    if jax.default_backend() != "cpu":
        return x_mk.T
    c = math.gcd(k, 64)
    return x_mk.reshape(m, k // c, c).transpose(1, 2, 0).reshape(k, m)  # (m, k/c, c) -> (k/c, c, m) -> (k, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def mixed_matmul(x_mk: Array, w: Array, dtype, w_is_nk: bool = False) -> Array:
    """x (m, k) @ w with both cast to `dtype` (bf16), accumulated and returned in float32 (m, n).

    `w` is (k, n) — a dense kernel — or, with `w_is_nk`, (n, k) — the tied head's embedding table,
    used as it is stored (a transposed view of it would reach XLA as a layout its CPU bf16 path
    cannot run). The gradients come back in the inputs' own dtypes: dx in x's, dw in w's (float32
    master weights get a float32 gradient straight from the f32-accumulated dot, never rounded to bf16).
    """
    return _dot_f32(x_mk.astype(dtype), w.astype(dtype), contract_b=1 if w_is_nk else 0)


def _mixed_matmul_fwd(x_mk, w, dtype, w_is_nk):
    dtype_tags = (jnp.zeros((0,), x_mk.dtype), jnp.zeros((0,), w.dtype))  # the inputs' own dtypes, for bwd
    x_lo, w_lo = x_mk.astype(dtype), w.astype(dtype)
    return _dot_f32(x_lo, w_lo, contract_b=1 if w_is_nk else 0), (x_lo, w_lo, dtype_tags)


def _mixed_matmul_bwd(dtype, w_is_nk, residuals, g_mn):
    x_mk, w_lo, (x_tag, w_tag) = residuals  # x and w in `dtype`
    g_mn = g_mn.astype(dtype)  # the incoming float32 cotangent, to the matmul precision
    if w_is_nk:
        dx_mk = _dot_f32(g_mn, w_lo, contract_b=0)  # g (m, n) @ w (n, k)
        dw = _dot_f32(_transposed_copy(g_mn), x_mk, contract_b=0)  # gᵀ (n, m) @ x (m, k)
    else:
        dx_mk = _dot_f32(g_mn, w_lo, contract_b=1)  # g @ wᵀ: w contracted on its minor dim
        dw = _dot_f32(_transposed_copy(x_mk), g_mn, contract_b=0)  # xᵀ (k, m) @ g (m, n)
    return dx_mk.astype(x_tag.dtype), dw.astype(w_tag.dtype)


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


class Dense(nn.Module):
    """y = x · kernel + bias with GPT-2's parameter names and shapes (kernel (k, n), bias (n,), float32).

    The matmul follows the compute `dtype`: mixed precision (`mixed_matmul`) for bf16/f16, a plain
    dot otherwise. When the parameters hold `kernel_nk` — the kernel transposed to (n, k), which
    `jaxgpt.inference.decoding_copy.decode_params` substitutes for decoding on CPU — the layer contracts that over
    its minor axis instead (float32 through `few_rows_dot`): same values, but XLA's CPU dot for a
    few rows runs ~1.4× faster with the weight in that layout, and float32 ~1.3× faster again as
    `few_rows_dot`'s transposed product (docs/performance.md).
    """

    features: int
    use_bias: bool = True
    dtype: Optional[jnp.dtype] = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = jnp.dtype(self.dtype or jnp.float32)
        w_is_nk = self.has_variable("params", DECODING_KERNEL)
        w = (self.get_variable("params", DECODING_KERNEL) if w_is_nk
             else self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32))
        x_mk = x.reshape(-1, x.shape[-1])  # (..., k) -> (m, k)
        if is_low_precision(dtype):
            y_mn = mixed_matmul(x_mk, w, dtype, w_is_nk)
        elif w_is_nk:  # decoding on CPU
            y_mn = few_rows_dot(x_mk.astype(dtype), w.astype(dtype))
        else:
            y_mn = jax.lax.dot_general(x_mk.astype(dtype), w.astype(dtype), (((1,), (0,)), ((), ())))
        y = y_mn.reshape(x.shape[:-1] + (self.features,))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(y.dtype)
        return y


def logits_from_embedding(x_btd: Array, embedding_vd: Array, dtype) -> Array:
    """The tied output head x @ wteᵀ (b, t, v): mixed precision for a low-precision dtype.

    (Decoding on CPU runs the tied head as a `Dense` over an "lm_head" entry of its decoding copy,
    the table itself as `kernel_nk`: see `jaxgpt.inference.decoding_copy`.)
    """
    if is_low_precision(dtype):
        out_mv = mixed_matmul(x_btd.reshape(-1, x_btd.shape[-1]), embedding_vd, jnp.dtype(dtype), True)  # (b·t, v)
        return out_mv.reshape(x_btd.shape[:-1] + embedding_vd.shape[:1])
    # contract over wte's minor dimension directly: `x @ wte.T` made XLA copy the transposed
    # 50257×768 table inside the decode loop at every step (7 ms of a 30 ms step on gpt2-small)
    return jax.lax.dot_general(x_btd.astype(dtype), embedding_vd.astype(dtype), (((x_btd.ndim - 1,), (1,)), ((), ())))
