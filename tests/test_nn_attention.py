"""The book's chapter 3 numbers, attention invariants, and JAX vs the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxgpt import reference as ref
from jaxgpt.nn.attention import ATTENTION_BACKENDS, MultiHeadAttention
from jaxgpt.nn.attention_backends import causal_mask, masked_softmax
from jaxgpt.nn.attention_book import CausalAttention, SelfAttention, simplified_self_attention

INPUTS = np.array([[.43, .15, .89], [.55, .87, .66], [.57, .85, .64], [.22, .58, .33], [.77, .25, .10], [.05, .80, .55]])


def test_simplified_attention_book_numbers():
    scores, weights, context = simplified_self_attention(jnp.asarray(INPUTS))
    np.testing.assert_allclose(scores[1], [.9544, 1.4950, 1.4754, .8434, .7070, 1.0865], atol=1e-4)
    np.testing.assert_allclose(weights[1], [.1385, .2379, .2333, .1240, .1082, .1581], atol=1e-4)
    np.testing.assert_allclose(context[1], [.4419, .6515, .5683], atol=1e-4)
    for a, b in zip((scores, weights, context), ref.simplified_self_attention(INPUTS)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_self_attention_with_weights_matches_reference():
    x = jnp.asarray(INPUTS[None], jnp.float32)
    m = SelfAttention(d_out=2, qkv_bias=True)
    p = m.init(jax.random.key(0), x)["params"]
    out = m.apply({"params": p}, x)
    q, k, v = (ref.linear(INPUTS, **ref.to_numpy(p[n])) for n in ("W_query", "W_key", "W_value"))
    expected = ref.softmax(q @ k.T / np.sqrt(2)) @ v
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


def test_causal_attention_weights_and_dropout():
    x = jnp.asarray(np.stack([INPUTS, INPUTS[::-1]]), jnp.float32)  # (2, 6, 3)
    m = CausalAttention(d_out=2, drop_rate=0.5)
    p = m.init(jax.random.key(0), x)
    out = m.apply(p, x)
    # changing the last token never changes outputs before it
    x2 = x.at[:, -1].set(9.0)
    np.testing.assert_allclose(m.apply(p, x2)[:, :-1], out[:, :-1], rtol=1e-6)
    assert np.allclose(m.apply(p, x), out)  # deterministic without dropout
    d1 = m.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    d2 = m.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(d1, d2)


@given(t=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_masked_softmax_is_causal_and_normalised(t, seed):
    scores = jax.random.normal(jax.random.key(seed), (2, t, t))
    w = np.asarray(masked_softmax(scores, causal_mask(t)))
    assert np.all(w[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


def test_backends_agree_with_each_other_and_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 7, 3, 8)).astype(np.float32) for _ in range(3))  # btnh
    expected = ref.attention(*(a.transpose(0, 2, 1, 3).astype(np.float64) for a in (q, k, v)), ref.causal_mask(7))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    for name, fn in ATTENTION_BACKENDS.items():
        out = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos_bt=pos, k_pos_bs=pos))
        np.testing.assert_allclose(out.transpose(0, 2, 1, 3), expected, rtol=1e-5, atol=1e-5, err_msg=name)


@settings(max_examples=6)  # each example traces Flax anew; the variant tests cover more shapes
@given(b=st.integers(1, 3), t=st.integers(1, 9), n=st.sampled_from([1, 2, 4]), h=st.sampled_from([2, 4]),
       bias=st.booleans())
def test_multihead_shapes_causality_and_reference(b, t, n, h, bias):
    d = n * h
    x = jax.random.normal(jax.random.key(b * 100 + t), (b, t, d))
    m = MultiHeadAttention(n_heads=n, qkv_bias=bias, impl="naive")
    p = m.init(jax.random.key(0), x)
    out = m.apply(p, x)
    assert out.shape == (b, t, d)
    pn = ref.to_numpy(p["params"])
    expected = ref.mha(np.asarray(x, np.float64), pn["c_attn"], pn["c_proj"], n)
    # float32 JAX vs float64 NumPy: a handful of float32 roundings on O(1) values
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    x2 = x.at[:, -1].add(1.0)
    np.testing.assert_allclose(m.apply(p, x2)[:, :-1], out[:, :-1], rtol=1e-6, atol=1e-6)


def test_unknown_backend_is_an_error():
    m = MultiHeadAttention(n_heads=2, impl="flash9")
    with pytest.raises(ValueError, match="unknown attention backend"):
        m.init(jax.random.key(0), jnp.zeros((1, 3, 4)))
