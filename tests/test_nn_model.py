"""GPT model: presets and parameter counts, validation, NumPy parity, causality, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxgpt import reference as ref
from jaxgpt.config import ConfigError, GPTConfig, get_preset
from jaxgpt.nn.model import GPT, cross_entropy, init_params, param_counts

BOOK_COUNTS = {
    "gpt2-small": (163_009_536, 124_412_160),
    "gpt2-medium": (406_212_608, 354_749_440),
    "gpt2-large": (838_220_800, 773_891_840),
    "gpt2-xl": (1_637_792_000, 1_557_380_800),
}


@pytest.mark.parametrize("name", sorted(BOOK_COUNTS))
def test_param_counts_match_book(name):
    counts = param_counts(get_preset(name))
    assert (counts["total"], counts["total_tied"]) == BOOK_COUNTS[name]


@pytest.mark.parametrize("changes, match", [
    ({"emb_dim": 30, "n_heads": 4}, "divisible"),
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"drop_rate": 1.5}, "drop_rate"),
    ({"attn_impl": "flash"}, "attn_impl"),
    ({"dtype": "int8"}, "dtype"),
    ({"qkv_bias": "yes"}, "qkv_bias"),
])
def test_invalid_configs_raise(changes, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**changes)
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        get_preset("test").replace(emb_size=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("gpt5")


def test_config_roundtrip():
    cfg = get_preset("small", qkv_bias=True)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


configs = st.builds(
    lambda n, h, layers, v, ctx, bias, tied: GPTConfig(
        vocab_size=v, context_length=ctx, emb_dim=n * h, n_heads=n, n_layers=layers, drop_rate=0.0,
        qkv_bias=bias, tie_embeddings=tied, attn_impl="naive"),
    n=st.sampled_from([1, 2, 4]), h=st.sampled_from([4, 8]), layers=st.integers(1, 2),
    v=st.integers(5, 40), ctx=st.integers(4, 12), bias=st.booleans(), tied=st.booleans(),
)


@given(cfg=configs, b=st.integers(1, 2), seed=st.integers(0, 1000), data=st.data())
def test_gpt_matches_numpy_reference_float32(cfg, b, seed, data):
    t = data.draw(st.integers(1, cfg.context_length))
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))
    params = init_params(cfg, seed=seed)
    logits = jax.jit(GPT(cfg).apply)(params, ids)
    assert logits.shape == (b, t, cfg.vocab_size) and logits.dtype == jnp.float32
    expected = ref.gpt_forward(ref.to_numpy(params), ids, cfg)
    # float32 vs float64: logits are O(0.1–1); errors come from O(d) accumulations in float32
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=2e-5)


@given(cfg=configs, seed=st.integers(0, 1000))
def test_gpt_matches_numpy_reference_x64(cfg, seed):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, cfg.context_length))
    with jax.enable_x64(True):
        cfg64 = cfg.replace(dtype="float64")
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(cfg64, seed=seed))
        logits = jax.jit(GPT(cfg64).apply)(params, jnp.asarray(ids))
        expected = ref.gpt_forward(ref.to_numpy(params), ids, cfg)
        assert logits.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 1000), t=st.integers(0, 15))
def test_whole_model_is_causal(seed, t):
    cfg = get_preset("test")
    params = init_params(cfg)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (1, 16))
    changed = ids.copy()
    changed[0, t + 1:] = rng.integers(0, cfg.vocab_size, 15 - t)
    a = GPT(cfg).apply(params, ids)
    b = GPT(cfg).apply(params, changed)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])


def test_dropout_off_is_deterministic_on_differs_by_seed():
    cfg = get_preset("test", drop_rate=0.2)
    params = init_params(cfg)
    ids = jnp.ones((2, 8), jnp.int32)
    m = GPT(cfg)
    np.testing.assert_array_equal(m.apply(params, ids), m.apply(params, ids))
    run = lambda s: m.apply(params, ids, deterministic=False, rngs={"dropout": jax.random.key(s)})  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))


def test_too_long_input_is_a_clear_error():
    cfg = get_preset("test")
    with pytest.raises(ValueError, match="longer than the model's context_length 16"):
        GPT(cfg).apply(init_params(cfg), jnp.zeros((1, 17), jnp.int32))


def test_cross_entropy_matches_reference_with_ignore_index():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7))
    targets = rng.integers(0, 7, (2, 5))
    targets[1, 3:] = -100
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)),
                               ref.cross_entropy(logits, targets), rtol=1e-5)
    assert np.isclose(ref.cross_entropy(np.zeros((1, 1, 7)), np.array([[3]])), np.log(7))


def test_zero_init_proj_starts_each_block_as_the_identity():
    """zero_init_proj: attention's and the MLP's c_proj kernels start at zero (every other weight as
    before), so each block adds nothing at step 0 and the logits are the embeddings' through ln_f."""
    import jax

    from jaxgpt.config import get_preset
    from jaxgpt.nn.model import GPT, init_params

    cfg = get_preset("test", zero_init_proj=True)
    params, plain = init_params(cfg, seed=0), init_params(get_preset("test"), seed=0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(k, "key", "") for k in path]
        zero = "c_proj" in names and names[-1] == "kernel"
        assert (np.abs(np.asarray(leaf)).max() == 0) == (zero or names[-1] == "bias"), names
    assert sum("c_proj" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)) >= 4
    x = np.arange(8)[None] % cfg.vocab_size
    blocks_off = jax.tree.map(lambda a: a, plain)
    for i in range(cfg.n_layers):  # the plain model with its blocks' output projections zeroed
        for part in ("attn", "mlp"):
            kernel = blocks_off["params"][f"h_{i}"][part]["c_proj"]["kernel"]
            blocks_off["params"][f"h_{i}"][part]["c_proj"]["kernel"] = np.zeros_like(kernel)
    np.testing.assert_array_equal(GPT(cfg).apply(params, x), GPT(cfg).apply(blocks_off, x))
