"""The attention research kit: every variant against the NumPy reference, the invariants that define
the variants, backends agreeing with `naive` (values and gradients), and cached = uncached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt import reference as ref
from jaxgpt.nn.attention import ATTENTION_BACKENDS, MultiHeadAttention
from jaxgpt.nn.attention_backends import naive_attention
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.inference.generate import generate_batch
from jaxgpt.inference.kv_cache import kv_cache_bytes_per_token
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.nn.positions import alibi_slopes, apply_rope

TEST = get_preset("test")  # 2 layers, 4 heads, width 32, context 16
VARIANTS = {
    "gqa-2": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "rope": dict(position="rope", rope_base=500.0),
    "alibi": dict(position="alibi"),
    "none": dict(position="none"),
    "window-3": dict(sliding_window=3),
    "window-3-global-every-2": dict(sliding_window=3, global_every=2),
    "mla-8": dict(attention="mla", latent_dim=8),
    "mla-8-gqa-rope": dict(attention="mla", latent_dim=8, n_kv_heads=2, position="rope"),
    "linear": dict(attention="linear"),
    "linear-mqa-nopos": dict(attention="linear", n_kv_heads=1, position="none"),
}


def _qkv(seed, b, t, n, m, h, s=None):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    return (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32), jnp.asarray(rng.normal(size=(b, s, m, h)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, s, m, h)), jnp.float32))


def _positions(b, t, offset=0):
    return jnp.broadcast_to(jnp.arange(t)[None] + offset, (b, t))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gpt_variant_matches_numpy_reference(name):
    config = TEST.replace(**VARIANTS[name])
    params = init_params(config, seed=3)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    out = np.asarray(GPT(config).apply(params, jnp.asarray(ids)))
    expected = ref.gpt_forward(ref.to_numpy(params), ids, config)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=2e-5)  # float32 vs float64
    assert ("wpe" in params["params"]) == (config.position == "learned")
    if config.attention != "mla":
        qkv_width = params["params"]["h_0"]["attn"]["c_attn"]["kernel"].shape[1]
        assert qkv_width == (config.n_heads + 2 * config.kv_heads) * config.head_dim


@settings(max_examples=4)
@given(b=st.integers(1, 2), t=st.integers(1, 40), groups=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 1)]),
       window=st.sampled_from([None, 1, 5, 64]), alibi=st.booleans(), seed=st.integers(0, 3))
def test_backends_agree_with_naive_and_reference(b, t, groups, window, alibi, seed):
    n, m = groups
    q, k, v = _qkv(seed, b, t, n, m, 8)
    pos = _positions(b, t)
    kw = dict(q_pos_bt=pos, k_pos_bs=pos, window=window, slopes_n=alibi_slopes(n) if alibi else None)
    expected = ref.attention_variant(*(np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v)),
                                     np.asarray(pos), np.asarray(pos), window, kw["slopes_n"]).transpose(0, 2, 1, 3)
    for name, fn in ATTENTION_BACKENDS.items():
        extra = dict(block_q=8, block_k=16) if name == "blockwise" else {}
        np.testing.assert_allclose(fn(q, k, v, **kw, **extra), expected, rtol=1e-5, atol=1e-5, err_msg=name)


@settings(max_examples=3)
@given(t=st.integers(2, 37), groups=st.sampled_from([(4, 4), (4, 2)]), window=st.sampled_from([None, 6]),
       alibi=st.booleans())
def test_blockwise_gradients_match_naive(t, groups, window, alibi):
    n, m = groups
    q, k, v = _qkv(t, 2, t, n, m, 8)
    pos = _positions(2, t)
    kw = dict(q_pos_bt=pos, k_pos_bs=pos, window=window, slopes_n=alibi_slopes(n) if alibi else None)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, t, n, 8)), jnp.float32)

    def loss(fn, **extra):
        return lambda q, k, v: jnp.sum(w * fn(q, k, v, **kw, **extra))

    expected = jax.grad(loss(naive_attention), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(ATTENTION_BACKENDS["blockwise"], block_q=8, block_k=8), argnums=(0, 1, 2))(q, k, v)
    for e, g, name in zip(expected, got, "qkv"):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


@settings(max_examples=4)
@given(t=st.integers(2, 20), groups=st.sampled_from([(4, 4), (4, 2), (4, 1)]), window=st.sampled_from([None, 4]),
       alibi=st.booleans(), backend=st.sampled_from(sorted(ATTENTION_BACKENDS)))
def test_causality(t, groups, window, alibi, backend):
    """Changing the last key and value changes no earlier query's output."""
    n, m = groups
    q, k, v = _qkv(t, 1, t, n, m, 4)
    pos = _positions(1, t)
    kw = dict(q_pos_bt=pos, k_pos_bs=pos, window=window, slopes_n=alibi_slopes(n) if alibi else None)
    fn = ATTENTION_BACKENDS[backend]
    out = fn(q, k, v, **kw)
    out2 = fn(q, k.at[:, -1].add(3.0), v.at[:, -1].add(3.0), **kw)
    np.testing.assert_allclose(out2[:, :-1], out[:, :-1], rtol=1e-6, atol=1e-6)
    assert out.shape == q.shape


@settings(max_examples=3)
@given(t=st.integers(1, 12), n_kv=st.sampled_from([1, 2, 4]), seed=st.integers(0, 5))
def test_grouped_query_equals_multihead_with_shared_key_value_weights(t, n_kv, seed):
    """GQA with m KV heads = MHA whose K/V projections repeat each KV head's weights for its group;
    with m = n it is MHA itself, and with m = 1 it is multi-query attention."""
    n, h, d = 4, 8, 32
    x = jax.random.normal(jax.random.key(seed), (2, t, d))
    gqa = MultiHeadAttention(n_heads=n, n_kv_heads=n_kv, impl="naive")
    p = gqa.init(jax.random.key(seed), x)["params"]
    kernel = np.asarray(p["c_attn"]["kernel"])
    q_w, k_w, v_w = kernel[:, : n * h], kernel[:, n * h:(n + n_kv) * h], kernel[:, (n + n_kv) * h:]
    tile = lambda w: np.repeat(w.reshape(d, n_kv, h), n // n_kv, axis=1).reshape(d, n * h)  # noqa: E731
    mha_params = {"c_attn": {"kernel": np.concatenate([q_w, tile(k_w), tile(v_w)], axis=1)}, "c_proj": p["c_proj"]}
    mha = MultiHeadAttention(n_heads=n, impl="naive")
    np.testing.assert_allclose(gqa.apply({"params": p}, x), mha.apply({"params": mha_params}, x), rtol=1e-5, atol=1e-6)
    if n_kv == 1:  # multi-query is grouped-query with one KV head: same parameters, same function
        assert p["c_attn"]["kernel"].shape[1] == (n + 2) * h


@settings(max_examples=6)
@given(t=st.integers(1, 30), window=st.integers(1, 40), seed=st.integers(0, 3))
def test_window_at_least_the_sequence_is_full_causal_attention(t, window, seed):
    q, k, v = _qkv(seed, 1, t, 2, 2, 4)
    pos = _positions(1, t)
    full = naive_attention(q, k, v, q_pos_bt=pos, k_pos_bs=pos)
    windowed = naive_attention(q, k, v, q_pos_bt=pos, k_pos_bs=pos, window=window)
    if window >= t:
        np.testing.assert_array_equal(windowed, full)
    else:  # the last query can no longer see the first key, so something changes
        assert not np.allclose(windowed[:, -1], full[:, -1])


@given(t=st.integers(1, 12), shift=st.integers(1, 500), base=st.sampled_from([100.0, 10000.0]))
def test_rope_scores_depend_only_on_relative_positions(t, shift, base):
    q, k, _ = _qkv(t, 1, t, 2, 2, 8)
    pos = _positions(1, t)

    def scores(offset):
        qr, kr = apply_rope(q, pos + offset, base), apply_rope(k, pos + offset, base)
        return jnp.einsum("btnh,bsnh->bnts", qr, kr)

    np.testing.assert_allclose(scores(shift), scores(0), rtol=1e-4, atol=1e-4)
    # and RoPE is a rotation: norms are unchanged
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, pos, base), axis=-1), jnp.linalg.norm(q, axis=-1),
                               rtol=1e-5)


@settings(max_examples=5)
@given(t=st.integers(1, 12), backend=st.sampled_from(sorted(ATTENTION_BACKENDS)))
def test_alibi_with_zero_slopes_is_no_bias(t, backend):
    q, k, v = _qkv(t, 1, t, 4, 4, 4)
    pos = _positions(1, t)
    fn = ATTENTION_BACKENDS[backend]
    np.testing.assert_allclose(fn(q, k, v, q_pos_bt=pos, k_pos_bs=pos, slopes_n=np.zeros(4, np.float32)),
                               fn(q, k, v, q_pos_bt=pos, k_pos_bs=pos), rtol=1e-6, atol=1e-6)


def test_alibi_slopes_are_the_papers():
    for slopes in (alibi_slopes, ref.alibi_slopes):  # the model's table and the reference's own
        np.testing.assert_allclose(slopes(8), [2.0 ** -k for k in range(1, 9)])
        # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence
        np.testing.assert_allclose(slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])
    for n in range(1, 33):
        np.testing.assert_allclose(alibi_slopes(n), ref.alibi_slopes(n), rtol=1e-7)


@pytest.mark.parametrize("variant", [dict(n_kv_heads=2, position="rope"),
                                     dict(n_kv_heads=1, position="alibi", sliding_window=3, global_every=2),
                                     dict(sliding_window=2, position="rope"),
                                     dict(position="none", attn_impl="blockwise"),
                                     dict(attention="mla", latent_dim=8, position="rope", n_kv_heads=2),
                                     dict(attention="linear", n_kv_heads=2)])
def test_cached_decoding_equals_uncached(variant):
    config = TEST.replace(**variant)
    params = init_params(config, seed=1)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]  # ragged: the second row is left-padded in the cache
    new, logits = generate_batch(params, config, prompts, 6, return_logits=True)
    for row, prompt in enumerate(prompts):
        assert len(new[row]) == 6  # no end-of-text given: every row runs to the end
        # one uncached pass over prompt + generated tokens gives every step's logits (causality)
        full = np.asarray(GPT(config).apply(params, jnp.asarray([prompt + new[row]])))[0]
        np.testing.assert_allclose(logits[row], full[len(prompt) - 1:-1], rtol=1e-4, atol=1e-5)
        assert new[row] == list(np.argmax(full[len(prompt) - 1:-1], axis=-1))


def test_kv_cache_bytes_per_token():
    small = get_preset("gpt2-small")
    # 12 layers × (K and V: 12 heads × 64 × 4 bytes, + a 4-byte position)
    assert kv_cache_bytes_per_token(small) == 12 * (2 * 12 * 64 * 4 + 4)
    assert kv_cache_bytes_per_token(small.replace(n_kv_heads=4)) == 12 * (2 * 4 * 64 * 4 + 4)
    assert kv_cache_bytes_per_token(small.replace(n_kv_heads=1)) == 12 * (2 * 64 * 4 + 4)
    # latent attention caches the latent: 12 layers × (128 × 4 bytes + position)
    assert kv_cache_bytes_per_token(small.replace(attention="mla", latent_dim=128)) == 12 * (128 * 4 + 4)
    # linear attention: a fixed state (12 heads × (64 × 64 + 64) float32 per layer), whatever the length
    # sliding windows: a local layer caches its window only (5 local : 1 global, window 128, at 1024)
    local = small.replace(sliding_window=128, global_every=6)
    ring = 2 * 12 * 64 * 4 * 128 + 2 * 4 * 128  # K, V, and "pos" + "col" of 128 slots
    full = (2 * 12 * 64 * 4 + 4) * 1024
    assert kv_cache_bytes_per_token(local, length=1024) == (10 * ring + 2 * full) / 1024
    state = 12 * 12 * (64 * 64 + 64) * 4
    assert kv_cache_bytes_per_token(small.replace(attention="linear"), length=1024) == state / 1024


def test_variant_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        TEST.replace(n_kv_heads=3)
    with pytest.raises(ConfigError, match="position"):
        TEST.replace(position="sinusoidal")
    with pytest.raises(ConfigError, match="global_every"):
        TEST.replace(global_every=2)
    with pytest.raises(ConfigError, match="latent_dim"):
        TEST.replace(attention="mla")
    with pytest.raises(ConfigError, match="linear"):
        TEST.replace(attention="linear", position="rope")


@pytest.mark.parametrize("variant", [dict(), dict(attention="mla", latent_dim=8, position="alibi"),
                                     dict(attention="linear")])
def test_attention_maps_are_causal_distributions(variant):
    from jaxgpt.inference.attention_map import attention_maps

    config = TEST.replace(**variant)
    maps = attention_maps(init_params(config), config, [1, 2, 3, 4, 5])
    assert maps.shape == (config.n_layers, config.n_heads, 5, 5)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps, k=1) == 0)


def test_attention_map_cli(tmp_path, capsys):
    from jaxgpt.cli.main import main

    out = tmp_path / "map.png"
    assert main(["attention-map", "--preset", "test", "--prompt", "Hello there", "--out", str(out), "--json"]) == 0
    result = __import__("json").loads(capsys.readouterr().out)
    assert out.stat().st_size > 1000 and len(result["weights"]) == 2


def test_blockwise_memory_grows_linearly_naive_quadratically():
    """XLA's own memory account of the compiled forward+backward: doubling the length about doubles
    blockwise's memory (no t × s matrix anywhere, backward included) and quadruples naive's scores."""

    def memory(name, t):
        pos = jnp.arange(t)[None]
        fn = ATTENTION_BACKENDS[name]
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, q_pos_bt=pos, k_pos_bs=pos)), argnums=(0, 1, 2))
        x = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
        mem = jax.jit(grad).lower(x, x, x).compile().memory_analysis()
        return mem.temp_size_in_bytes + mem.output_size_in_bytes

    blockwise = [memory("blockwise", t) for t in (512, 1024, 2048)]
    naive = [memory("naive", t) for t in (512, 1024, 2048)]
    assert blockwise[2] / blockwise[1] < 2.5 and blockwise[1] / blockwise[0] < 2.5, blockwise
    assert naive[2] / naive[1] > 3.0, naive
    assert blockwise[2] < naive[2] / 8


X64_CASES = [  # every backend with each position scheme, grouped heads and windows; MLA and linear too
    ("xla", dict(position="rope", n_kv_heads=2)), ("xla", dict(position="alibi", sliding_window=3)),
    ("blockwise", dict(position="rope", n_kv_heads=2)), ("blockwise", dict(position="alibi", sliding_window=3)),
    ("xla", dict(attention="mla", latent_dim=8, position="rope")), ("naive", dict(attention="linear")),
]


@pytest.mark.parametrize("impl, changes", X64_CASES)
def test_every_backend_computes_float64_under_x64(impl, changes):
    """With dtype float64 every backend and variant matches the float64 reference to float64
    precision (XLA's fused attention, which would compute in float32, is not used for float64)."""
    config = TEST.replace(**changes, dtype="float64", attn_impl=impl, drop_rate=0.0)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 11))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(config, seed=3))
        logits = GPT(config).apply(params, jnp.asarray(ids))
        assert logits.dtype == jnp.float64
        expected = ref.gpt_forward(ref.to_numpy(params), ids, config)
        np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-10, atol=1e-12)
