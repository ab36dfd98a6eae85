"""Mixed precision (jaxgpt.precision) and the XLA compiler options (jaxgpt.xla_tuning).

The bf16 path is checked against float64 NumPy on the same bf16-rounded inputs (so only the
float32 accumulation differs: rtol 1e-5), and the whole bf16 model against the float32 model
with the tolerances bf16's 8-bit mantissa allows (stated per check).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import xla_tuning
from jaxgpt.config import get_preset
from jaxgpt.inference.decoding_copy import decode_params
from jaxgpt.inference.generate import Decoder, generate_batch
from jaxgpt.nn.model import GPT, cross_entropy, init_params
from jaxgpt.nn.dense import FEW_ROWS, _transposed_copy, few_rows_dot, mixed_matmul


def _bf16_as_f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("m,k", [(6, 128), (5, 40), (3, 7)])
def test_transposed_copy_is_the_transpose(m, k):
    x = jnp.arange(m * k, dtype=jnp.float32).reshape(m, k)
    np.testing.assert_array_equal(_transposed_copy(x), x.T)


@pytest.mark.parametrize("m", [1, 8, FEW_ROWS, FEW_ROWS + 1])
def test_few_rows_dot_is_x_times_w_transposed(m):
    """Both of its forms (the barrier-held transpose up to FEW_ROWS rows, the plain dot above), jitted."""
    x_mk = jax.random.normal(jax.random.key(m), (m, 48))
    w_nk = jax.random.normal(jax.random.key(100 + m), (40, 48))
    want = np.asarray(x_mk, np.float64) @ np.asarray(w_nk, np.float64).T
    np.testing.assert_allclose(jax.jit(few_rows_dot)(x_mk, w_nk), want, rtol=1e-5, atol=1e-5)


def test_mixed_matmul_value_and_gradients_match_float64_on_bf16_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 40)).astype(np.float32)
    w = rng.standard_normal((40, 16)).astype(np.float32)
    g = rng.standard_normal((24, 16)).astype(np.float32)
    out, vjp = jax.vjp(lambda x, w: mixed_matmul(x, w, jnp.bfloat16), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32  # f32 out; gradients in the inputs' dtypes
    xb, wb, gb = _bf16_as_f64(x), _bf16_as_f64(w), _bf16_as_f64(g)
    np.testing.assert_allclose(out, xb @ wb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gb @ wb.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, xb.T @ gb, rtol=1e-5, atol=1e-5)


def _small_cfg(dtype: str, tie: bool):
    return get_preset("tiny", vocab_size=97, context_length=16, drop_rate=0.0, dtype=dtype, tie_embeddings=tie)


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_model_tracks_the_float32_model(tie):
    params = init_params(_small_cfg("float32", tie))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 97)
    targets = jnp.roll(ids, -1, axis=1)

    def loss_and_grads(dtype):  # jitted, as training runs it (XLA picks the dot kernels at compile time)
        model = GPT(_small_cfg(dtype, tie))
        return jax.jit(jax.value_and_grad(lambda p: cross_entropy(model.apply(p, ids), targets)))(params)

    loss32, grads32 = loss_and_grads("float32")
    loss16, grads16 = loss_and_grads("bfloat16")
    # the same float32 parameters and gradient dtypes: checkpoints and optimizers do not change
    assert jax.tree.map(lambda g: g.dtype, grads16) == jax.tree.map(lambda g: g.dtype, grads32)
    assert abs(float(loss16) - float(loss32)) < 1e-2 * float(loss32)  # bf16 rounds to ~3 significant digits
    flat32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads32)])
    flat16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads16)])
    cosine = float(flat32 @ flat16 / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16)))
    assert cosine > 0.995, cosine
    assert float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32)) < 0.05


def test_compiler_options_depend_on_backend_dtype_and_setting(monkeypatch):
    monkeypatch.delenv("JAXGPT_XLA_TUNING", raising=False)
    assert xla_tuning.compiler_options(jnp.float32, platform="cpu") == xla_tuning.CPU_FLOAT32_OPTIONS
    assert xla_tuning.compiler_options(jnp.bfloat16, platform="cpu") is None  # YNNPACK's default wins there
    assert xla_tuning.compiler_options(jnp.float32, platform="gpu") is None
    monkeypatch.setenv("JAXGPT_XLA_TUNING", "0")
    assert xla_tuning.compiler_options(jnp.float32, platform="cpu") is None


def test_an_option_xla_does_not_know_is_dropped_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert xla_tuning._accepted((("xla_no_such_option_for_jaxgpt", "1"),)) is False
    assert any("xla_no_such_option_for_jaxgpt" in str(w.message) for w in caught)


def test_pmap_with_options_compiles_once_and_computes_what_pmap_does():
    fn = lambda x: jax.lax.psum(x @ x.T, "i")  # noqa: E731
    plain = jax.pmap(fn, axis_name="i")
    tuned = xla_tuning.PmapWithOptions(jax.pmap(fn, axis_name="i"), xla_tuning.CPU_FLOAT32_OPTIONS)
    x = jnp.arange(jax.local_device_count() * 12, dtype=jnp.float32).reshape(-1, 3, 4)
    np.testing.assert_allclose(tuned(x), plain(x))
    tuned(x + 1)
    assert len(tuned._compiled) == 1


def test_bf16_model_decodes_with_the_kv_cache():
    cfg = _small_cfg("bfloat16", True)
    params = init_params(cfg)
    prompts = [[1, 2, 3], [4, 5]]
    first = generate_batch(params, cfg, prompts, 6)
    assert [len(row) for row in first] == [6, 6] and first == generate_batch(params, cfg, prompts, 6)


@pytest.mark.parametrize("dtype,tie", [("float32", False), ("bfloat16", True)])
def test_decoding_layout_transposes_kernels_and_decodes_the_same(monkeypatch, dtype, tie):
    # local layers too: their ring caches take the decoding cache dtype as well
    cfg = _small_cfg(dtype, tie).replace(sliding_window=4, global_every=2)
    params = init_params(cfg)
    monkeypatch.delenv("JAXGPT_XLA_TUNING", raising=False)
    nk = decode_params(params)  # this test runs on CPU: every dense kernel becomes its (n, k) transpose
    block = nk["params"]["h_0"]["attn"]["c_attn"]
    assert "kernel" not in block and block["kernel_nk"].shape == (3 * 128, 128)
    np.testing.assert_array_equal(block["kernel_nk"], params["params"]["h_0"]["attn"]["c_attn"]["kernel"].T)
    assert decode_params(nk) is nk  # idempotent: a server converts once
    assert Decoder(nk, cfg).params is nk  # a Decoder keeps its decoding copy (no module-level cache any more)
    # a bf16 model rounds its kernels to bf16 at every call: its decoding copy is stored rounded
    want = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    assert decode_params(params, cfg)["params"]["h_0"]["mlp"]["c_fc"]["kernel_nk"].dtype == want
    assert decode_params(params, cfg)["params"]["wte"]["embedding"].dtype == want  # the tied head's table too
    # XLA's CPU dot converted a bf16 cache to float32 at every step: on CPU the cache is float32
    assert xla_tuning.decode_cache_dtype(jnp.dtype(dtype)) == jnp.float32
    assert xla_tuning.decode_cache_dtype(jnp.dtype(dtype), "gpu") == jnp.dtype(dtype)
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, 97)
    np.testing.assert_allclose(GPT(cfg).apply(nk, ids), GPT(cfg).apply(params, ids), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("JAXGPT_XLA_TUNING", "0")
    assert decode_params(params) is params and xla_tuning.transposed_decode_kernels("cpu") is False
    assert xla_tuning.decode_cache_dtype(jnp.dtype(dtype), "cpu") == jnp.dtype(dtype)
    if dtype == "float32":  # float32 decoding on CPU always runs transposed: tests/test_inference_kv_cache.py checks it
        return
    prompts = [[1, 2, 3], [4, 5]]
    plain_tokens, plain_logits = generate_batch(params, cfg, prompts, 5, return_logits=True)
    monkeypatch.setenv("JAXGPT_XLA_TUNING", "1")
    tokens, logits = generate_batch(params, cfg, prompts, 5, return_logits=True)  # the bf16 copy, float32 cache
    assert tokens == plain_tokens
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-4, atol=1e-4)  # bitwise equal here, on this CPU
