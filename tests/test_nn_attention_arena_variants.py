"""The arena's attention variants — output gate, sink logits, differential attention — against the
NumPy reference (forward, and the reference's hand-written backward against finite differences),
with the invariants every variant shares: backends agree (values and gradients), causality,
cached = uncached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt import reference as ref
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.inference.generate import generate_batch
from jaxgpt.nn.attention import ATTENTION_BACKENDS
from jaxgpt.nn.attention_backends import naive_attention
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.nn.positions import alibi_slopes
from jaxgpt.reference.attention import differential, differential_backward
from jaxgpt.reference.attention_variants import gate_backward, gate_values, sink_attention, sink_attention_backward
from test_reference_grad import check

TEST = get_preset("test")  # 2 layers, 4 heads of 8, width 32, context 16
VARIANTS = {  # each on one backend (the backends agree by test_sink_backends_agree_…; compilations are dear)
    "gate": dict(attn_gate=True, attn_impl="xla"),
    "sink": dict(attn_sink=True, attn_impl="blockwise"),
    "sink-alibi-window": dict(attn_sink=True, position="alibi", sliding_window=4, attn_impl="naive"),
    "differential": dict(differential=True, attn_impl="blockwise"),
    "differential-rope-gqa": dict(differential=True, position="rope", n_kv_heads=2, attn_impl="xla"),
    "all-three-rope": dict(differential=True, attn_sink=True, attn_gate=True, position="rope", attn_impl="naive"),
}


def lively_params(config, seed=3):
    """Initial parameters moved off their initial values (sinks start at 0, the gate at 1/2)."""
    params = init_params(config, seed=seed)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), params)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_numpy_reference(name):
    config = TEST.replace(**VARIANTS[name])
    params = lively_params(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    out = np.asarray(GPT(config).apply(params, jnp.asarray(ids)))
    np.testing.assert_allclose(out, ref.gpt_forward(ref.to_numpy(params), ids, config), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["gate", "sink-alibi-window", "differential-rope-gqa"])
def test_causality_and_cached_decoding(name):
    config = TEST.replace(**VARIANTS[name])
    params = lively_params(config, seed=1)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 12))
    out = np.asarray(GPT(config).apply(params, jnp.asarray(ids)))
    changed = np.asarray(GPT(config).apply(params, jnp.asarray(ids).at[:, -1].set((ids[0, -1] + 1) % 64)))
    np.testing.assert_allclose(changed[:, :-1], out[:, :-1], rtol=1e-6, atol=1e-6)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]  # ragged: the second row is left-padded in the cache
    new, logits = generate_batch(params, config, prompts, 6, return_logits=True)
    for row, prompt in enumerate(prompts):
        full = np.asarray(GPT(config).apply(params, jnp.asarray([prompt + new[row]])))[0]
        np.testing.assert_allclose(logits[row], full[len(prompt) - 1:-1], rtol=1e-4, atol=1e-5)


def _qkv(seed, b, t, n, m, h):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32) for k in (n, m, m))


@settings(max_examples=4)
@given(t=st.integers(1, 37), groups=st.sampled_from([(4, 4), (4, 2)]), window=st.sampled_from([None, 5]),
       alibi=st.booleans(), seed=st.integers(0, 3))
def test_sink_backends_agree_with_reference_values_and_gradients(t, groups, window, alibi, seed):
    n, m = groups
    q, k, v = _qkv(seed, 2, t, n, m, 8)
    sinks = jnp.asarray(np.random.default_rng(seed).normal(size=n) * 2, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t)[None], (2, t))
    kw = dict(q_pos_bt=pos, k_pos_bs=pos, window=window, slopes_n=alibi_slopes(n) if alibi else None)
    expected = ref.attention_variant(*(np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v)),
                                     np.asarray(pos), np.asarray(pos), window, kw["slopes_n"],
                                     sinks=np.asarray(sinks, np.float64)).transpose(0, 2, 1, 3)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    grads = {}
    for name, fn in ATTENTION_BACKENDS.items():
        extra = dict(block_q=8, block_k=16) if name == "blockwise" else {}
        np.testing.assert_allclose(fn(q, k, v, **kw, sinks_n=sinks, **extra), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=name)
        loss = lambda q, k, v, s, fn=fn, extra=extra: jnp.sum(w * fn(q, k, v, **kw, sinks_n=s, **extra))  # noqa: E731
        grads[name] = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for name in ("xla", "blockwise"):  # blockwise has its own VJP, with the sink's gradient
        for e, g, what in zip(grads["naive"], grads[name], ("q", "k", "v", "sinks")):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"{name} d{what}")


def test_sink_limits():
    q, k, v = _qkv(0, 1, 6, 4, 4, 8)
    pos = jnp.broadcast_to(jnp.arange(6)[None], (1, 6))
    kw = dict(q_pos_bt=pos, k_pos_bs=pos)
    plain = naive_attention(q, k, v, **kw)
    np.testing.assert_allclose(naive_attention(q, k, v, **kw, sinks_n=jnp.full(4, -1e4)), plain, atol=1e-6)
    assert float(jnp.abs(naive_attention(q, k, v, **kw, sinks_n=jnp.full(4, 1e4))).max()) < 1e-6  # attends to nothing


def test_reference_backwards_match_finite_differences():
    rng = np.random.default_rng(0)
    b, n, t, h = 1, 2, 4, 4
    q, k, v = (rng.normal(size=(b, n, t, h)) for _ in range(3))
    sinks, mask = rng.normal(size=n), ref.causal_mask(t)
    check(lambda: sink_attention(q, k, v, sinks, mask),
          lambda d: dict(zip(("q", "k", "v", "sinks"), sink_attention_backward(d, q, k, v, sinks, mask))),
          {"q": q, "k": k, "v": v, "sinks": sinks})
    x, context = rng.normal(size=(b, t, 6)), rng.normal(size=(b, n, t, h))
    c_gate = {"kernel": rng.normal(size=(6, n * h))}
    grads = lambda d: (lambda g: {"context": g[0], "x": g[1], "kernel": g[2]["c_gate"]["kernel"]})(  # noqa: E731
        gate_backward(d, context, x, c_gate, n))
    check(lambda: context * gate_values(x, c_gate, n), grads, {"context": context, "x": x, "kernel": c_gate["kernel"]})
    diff = {name: rng.normal(size=h // 2) * 0.5 for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    diff["sub_norm"] = {"scale": rng.normal(size=h)}

    def forward():
        return differential(q, k, v, lambda a, c, e: ref.attention(a, c, e, mask), diff, 1e-5)

    def backward(d):
        dq, dk, dv, g = differential_backward(d, q, k, v, diff, mask, 1e-5)
        return {"q": dq, "k": dk, "v": dv, "lambda_q1": g["lambda_q1"], "lambda_k2": g["lambda_k2"],
                "scale": g["sub_norm"]["scale"]}

    check(forward, backward, {"q": q, "k": k, "v": v, "lambda_q1": diff["lambda_q1"], "lambda_k2": diff["lambda_k2"],
                              "scale": diff["sub_norm"]["scale"]})


def test_jax_gradients_equal_the_reference_backward():
    """The model's differentiable path through a differential layer = the hand-written backward."""
    from jaxgpt.nn.differential import DifferentialCore

    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(5)[None], (1, 5))
    attend = lambda a, c, e: naive_attention(a, c, e, q_pos_bt=pos, k_pos_bs=pos)  # noqa: E731
    core = DifferentialCore(norm_eps=1e-5)
    params = lively_params_core(core, q, k, v, attend)
    dout = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    got = jax.grad(lambda p, q, k, v: jnp.sum(dout * core.apply(p, q, k, v, attend)), argnums=(0, 1, 2, 3))(params, q, k, v)
    to_ref = lambda a: np.asarray(a, np.float64).transpose(0, 2, 1, 3)  # noqa: E731
    diff = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    dq, dk, dv, g = differential_backward(to_ref(dout), to_ref(q), to_ref(k), to_ref(v), diff, ref.causal_mask(5), 1e-5)
    for got_a, exp_a in ((got[1], dq), (got[2], dk), (got[3], dv)):
        np.testing.assert_allclose(to_ref(got_a), exp_a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0]["params"]["lambda_q1"], g["lambda_q1"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0]["params"]["sub_norm"]["scale"], g["sub_norm"]["scale"], rtol=1e-4, atol=1e-5)


def lively_params_core(core, q, k, v, attend):
    params = core.init(jax.random.key(0), q, k, v, attend)
    rng = np.random.default_rng(5)
    return jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), params)


def test_variant_config_errors():
    with pytest.raises(ConfigError, match="attention 'linear' cannot take: attn_sink"):
        TEST.replace(attention="linear", attn_sink=True)
    with pytest.raises(ConfigError, match="even head dimension"):
        TEST.replace(differential=True, head_size=7)
    with pytest.raises(ConfigError, match="query_scale"):
        TEST.replace(differential=True, query_scale=0.1)
    with pytest.raises(ConfigError, match="attn_gate must be true or false"):
        TEST.replace(attn_gate="yes")
