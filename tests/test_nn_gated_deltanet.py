"""Gated DeltaNet: the chunked parallel form = the recurrent form = the NumPy reference's token-by-token
recurrence (values and gradients, the latter against the reference's hand-written backward, itself
checked by finite differences); the layer in a GPT against the reference; causality; cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt import reference as ref
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.inference.generate import generate_batch
from jaxgpt.nn.gated_deltanet import delta_chunked, delta_step, l2_normalise
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.reference.gated_deltanet import gated_delta_rule, gated_delta_rule_backward
from test_reference_grad import check

CONFIG = get_preset("test", attention="gated_deltanet", context_length=64)


def _inputs(seed, b, t, n, h):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, t, n, h)) for _ in range(3))
    q, k = (np.asarray(l2_normalise(jnp.asarray(a))) for a in (q, k))
    return q, k, v, -rng.random((b, t, n)) * 2, rng.random((b, t, n))  # log α in (-2, 0], β in [0, 1)


def _to_ref(a):  # (b, t, n, ...) -> (b, n, t, ...)
    return np.swapaxes(np.asarray(a, np.float64), 1, 2)


@settings(max_examples=5)
@given(t=st.integers(1, 40), chunk=st.sampled_from([1, 4, 16, 64]), seed=st.integers(0, 5))
def test_chunked_form_equals_recurrence_and_reference(t, chunk, seed):
    q, k, v, g, beta = _inputs(seed, 2, t, 3, 4)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    zero = jnp.zeros((2, 3, 4, 4), jnp.float32)
    state, out = delta_chunked(zero, *map(f32, (q, k, v, g, beta)), chunk=chunk)
    expected = gated_delta_rule(*map(_to_ref, (q, k, v, g, beta)))
    np.testing.assert_allclose(_to_ref(out), expected, rtol=1e-4, atol=1e-5)
    s = zero
    for i in range(t):
        s, o = delta_step(s, *(f32(a[:, i]) for a in (q, k, v, g, beta)))
        np.testing.assert_allclose(o, expected[:, :, i], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state, s, rtol=1e-4, atol=1e-5)


def test_reference_backward_matches_finite_differences():
    q, k, v, g, beta = (_to_ref(a) for a in _inputs(0, 1, 5, 2, 3))
    names = ("q", "k", "v", "g", "beta")
    check(lambda: gated_delta_rule(q, k, v, g, beta),
          lambda d: dict(zip(names, gated_delta_rule_backward(d, q, k, v, g, beta))),
          dict(zip(names, (q, k, v, g, beta))))


def test_jax_gradients_of_the_chunked_form_equal_the_reference_backward():
    q, k, v, g, beta = _inputs(1, 2, 19, 2, 4)
    dout = np.random.default_rng(2).normal(size=v.shape)
    zero = jnp.zeros((2, 2, 4, 4), jnp.float32)

    def loss(*args):
        return jnp.sum(jnp.asarray(dout, jnp.float32) * delta_chunked(zero, *args, chunk=8)[1])

    got = jax.grad(loss, argnums=range(5))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta)))
    expected = gated_delta_rule_backward(_to_ref(dout), *map(_to_ref, (q, k, v, g, beta)))
    for name, a, e in zip("q k v g beta".split(), got, expected):
        np.testing.assert_allclose(_to_ref(a), e, rtol=1e-4, atol=1e-5, err_msg=name)


def _lively(config, seed=3):
    params = init_params(config, seed=seed)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), params)


@pytest.mark.parametrize("position", ["learned", "none"])
def test_gpt_with_gated_deltanet_matches_reference_over_several_chunks(position):
    config = CONFIG.replace(position=position)
    params = _lively(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 45))  # chunks of 32: two
    out = np.asarray(GPT(config).apply(params, jnp.asarray(ids)))
    np.testing.assert_allclose(out, ref.gpt_forward(ref.to_numpy(params), ids, config), rtol=1e-4, atol=5e-5)


def test_causality_and_cached_decoding():
    params = _lively(CONFIG, seed=1)
    ids = np.random.default_rng(1).integers(0, 64, (1, 40))
    out = np.asarray(GPT(CONFIG).apply(params, jnp.asarray(ids)))
    changed = np.asarray(GPT(CONFIG).apply(params, jnp.asarray(ids).at[:, -1].set((ids[0, -1] + 1) % 64)))
    np.testing.assert_allclose(changed[:, :-1], out[:, :-1], rtol=1e-6, atol=1e-6)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]  # ragged: padding must leave the state untouched
    new, logits = generate_batch(params, CONFIG, prompts, 6, return_logits=True)
    for row, prompt in enumerate(prompts):
        full = np.asarray(GPT(CONFIG).apply(params, jnp.asarray([prompt + new[row]])))[0]
        np.testing.assert_allclose(logits[row], full[len(prompt) - 1:-1], rtol=1e-4, atol=1e-5)


def test_cache_is_the_state_whatever_the_length():
    from jaxgpt.inference.kv_cache import kv_cache_bytes

    assert kv_cache_bytes(CONFIG, 64) == kv_cache_bytes(CONFIG, 16) == 2 * 4 * 8 * 8 * 4  # layers × heads × h × h × 4 B


def test_config_errors():
    with pytest.raises(ConfigError, match="gated_deltanet.*position"):
        CONFIG.replace(position="rope")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        CONFIG.replace(n_kv_heads=2)
