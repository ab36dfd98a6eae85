"""The NumPy reference's hand-written backward pass and AdamW, against finite differences and JAX/Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from jaxgpt import reference as ref
from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPT, cross_entropy, init_params
from jaxgpt.train.optimizer import build_optimizer, lr_schedule
from jaxgpt.train.config import TrainConfig

RNG = np.random.default_rng(0)


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f at every entry of x (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        hi = f()
        x[i] = old - eps
        lo = f()
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


def check(f_forward, backward_grads, arrays, rtol=1e-6, atol=1e-8):
    """f_forward() -> output; backward_grads(dout) -> {name: grad}; compare each with finite differences."""
    dout = RNG.normal(size=np.shape(f_forward()))
    loss = lambda: float(np.sum(f_forward() * dout))  # noqa: E731
    analytic = backward_grads(dout)
    for name, arr in arrays.items():
        np.testing.assert_allclose(analytic[name], numeric_grad(loss, arr), rtol=rtol, atol=atol, err_msg=name)


def test_gelu_softmax_layernorm_linear_backward_by_finite_differences():
    x = RNG.normal(size=(2, 3, 5))
    check(lambda: ref.gelu(x), lambda d: {"x": ref.gelu_backward(d, x)}, {"x": x})
    check(lambda: ref.softmax(x), lambda d: {"x": ref.softmax_backward(d, ref.softmax(x))}, {"x": x})
    scale, bias = RNG.normal(size=5), RNG.normal(size=5)

    def ln_grads(d):
        dx, g = ref.layer_norm_backward(d, x, scale)
        return {"x": dx, "scale": g["scale"], "bias": g["bias"]}
    check(lambda: ref.layer_norm(x, scale, bias), ln_grads, {"x": x, "scale": scale, "bias": bias})
    kernel, b = RNG.normal(size=(5, 4)), RNG.normal(size=4)

    def lin_grads(d):
        dx, g = ref.linear_backward(d, x, kernel, has_bias=True)
        return {"x": dx, **g}
    check(lambda: ref.linear(x, kernel, b), lin_grads, {"x": x, "kernel": kernel, "bias": b})


def test_attention_mha_mlp_block_backward_by_finite_differences():
    b, t, d, n = 2, 4, 6, 2
    x = RNG.normal(size=(b, t, d))
    q, k, v = (RNG.normal(size=(b, n, t, 3)) for _ in range(3))
    mask = ref.causal_mask(t)
    check(lambda: ref.attention(q, k, v, mask),
          lambda dd: dict(zip("qkv", ref.attention_backward(dd, q, k, v, mask))), {"q": q, "k": k, "v": v})

    c_attn = {"kernel": 0.3 * RNG.normal(size=(d, 3 * d)), "bias": 0.1 * RNG.normal(size=3 * d)}
    c_proj = {"kernel": 0.3 * RNG.normal(size=(d, d)), "bias": 0.1 * RNG.normal(size=d)}

    def mha_grads(dd):
        dx, g = ref.mha_backward(dd, x, c_attn, c_proj, n)
        return {"x": dx, "attn_kernel": g["c_attn"]["kernel"], "attn_bias": g["c_attn"]["bias"],
                "proj_kernel": g["c_proj"]["kernel"]}
    check(lambda: ref.mha(x, c_attn, c_proj, n), mha_grads,
          {"x": x, "attn_kernel": c_attn["kernel"], "attn_bias": c_attn["bias"], "proj_kernel": c_proj["kernel"]})

    c_fc = {"kernel": 0.3 * RNG.normal(size=(d, 4 * d)), "bias": 0.1 * RNG.normal(size=4 * d)}
    c_out = {"kernel": 0.3 * RNG.normal(size=(4 * d, d)), "bias": 0.1 * RNG.normal(size=d)}
    check(lambda: ref.mlp(x, c_fc, c_out), lambda dd: {"x": ref.mlp_backward(dd, x, c_fc, c_out)[0]}, {"x": x})

    ln = lambda: {"scale": 1 + 0.1 * RNG.normal(size=d), "bias": 0.1 * RNG.normal(size=d)}  # noqa: E731
    ln_1, ln_2 = ln(), ln()
    attn, mlp_p = {"c_attn": c_attn, "c_proj": c_proj}, {"c_fc": c_fc, "c_proj": c_out}

    def block_grads(dd):
        dx, g = ref.transformer_block_backward(dd, x, ln_1, attn, ln_2, mlp_p, n, 1e-5)
        return {"x": dx, "ln_2_scale": g["ln_2"]["scale"], "fc_kernel": g["mlp"]["c_fc"]["kernel"]}
    check(lambda: ref.transformer_block(x, ln_1, attn, ln_2, mlp_p, n, 1e-5), block_grads,
          {"x": x, "ln_2_scale": ln_2["scale"], "fc_kernel": c_fc["kernel"]})


@pytest.mark.parametrize("tied", [False, True])
def test_whole_model_backward_by_finite_differences(tied):
    cfg = GPTConfig(vocab_size=7, context_length=5, emb_dim=4, n_heads=2, n_layers=1, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=tied)
    params = ref.to_numpy(init_params(cfg, seed=2))
    p = params["params"]
    for leaf in ref.tree_leaves(p):
        leaf += 0.2 * RNG.normal(size=leaf.shape)  # away from init's zero biases and unit scales
    ids, targets = RNG.integers(0, 7, (2, 5)), RNG.integers(0, 7, (2, 5))
    targets[0, 2] = -100
    _, grads = ref.gpt_loss_and_grads(params, ids, targets, cfg)
    loss = lambda: ref.cross_entropy(ref.gpt_forward(params, ids, cfg), targets)  # noqa: E731
    for name in ("wte", "wpe"):
        np.testing.assert_allclose(grads["params"][name]["embedding"], numeric_grad(loss, p[name]["embedding"]),
                                   rtol=1e-6, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(grads["params"]["h_0"]["attn"]["c_attn"]["bias"],
                               numeric_grad(loss, p["h_0"]["attn"]["c_attn"]["bias"]), rtol=1e-6, atol=1e-9)


configs = st.builds(
    lambda n, h, layers, v, ctx, bias, tied: GPTConfig(
        vocab_size=v, context_length=ctx, emb_dim=n * h, n_heads=n, n_layers=layers, drop_rate=0.0,
        qkv_bias=bias, tie_embeddings=tied, attn_impl="naive"),
    n=st.sampled_from([1, 2]), h=st.sampled_from([4, 8]), layers=st.integers(1, 2),
    v=st.integers(5, 30), ctx=st.integers(3, 8), bias=st.booleans(), tied=st.booleans(),
)


def _jax_grads(cfg, params, ids, targets):
    loss_fn = lambda p: cross_entropy(GPT(cfg).apply(p, ids), targets)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _perturbed(params, seed, dtype):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jnp.asarray(l, dtype) + 0.05 * jax.random.normal(k, l.shape, dtype)
                                     for l, k in zip(leaves, keys)])


def _max_rel_err(jax_tree, np_tree):
    """Largest |a - b| / max|b| over the leaves (relative to each tensor's scale)."""
    errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-30)),
                        jax_tree, np_tree)
    return max(jax.tree.leaves(errs))


@settings(max_examples=5)  # each example compiles a new model shape: few, and each different (derandomized)
@given(cfg=configs, seed=st.integers(0, 1000), ignore=st.booleans())
def test_jax_grad_matches_numpy_backward_x64(cfg, seed, ignore):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (2, cfg.context_length))
    targets = rng.integers(0, cfg.vocab_size, (2, cfg.context_length))
    if ignore:
        targets[1, cfg.context_length // 2:] = -100  # the instruction-finetuning collate's padding
    with jax.enable_x64(True):
        cfg64 = cfg.replace(dtype="float64")
        params = _perturbed(init_params(cfg64, seed=seed), seed, jnp.float64)
        loss, grads = _jax_grads(cfg64, params, jnp.asarray(ids), jnp.asarray(targets))
        ref_loss, ref_grads = ref.gpt_loss_and_grads(ref.to_numpy(params), ids, targets, cfg)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-12)
        assert _max_rel_err(grads, ref_grads) <= 1e-8


def test_jax_grad_matches_numpy_backward_float32():
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=True)
    ids, targets = RNG.integers(0, 50, (4, 16)), RNG.integers(0, 50, (4, 16))
    params = _perturbed(init_params(cfg, seed=1), 1, jnp.float32)
    loss, grads = _jax_grads(cfg, params, ids, targets)
    ref_loss, ref_grads = ref.gpt_loss_and_grads(ref.to_numpy(params), ids, targets, cfg)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    # float32 carries ~7 significant digits; a gradient sums O(b·t·d) float32 products, so its
    # error relative to the tensor's largest entry stays around 1e-6; 1e-4 leaves a wide margin
    # while still catching any wrong term (those show up at O(1)).
    assert _max_rel_err(grads, ref_grads) <= 1e-4


def test_numpy_adamw_matches_optax_over_k_steps():
    # No qkv bias here: the gradient of the key bias is exactly zero in exact arithmetic (softmax is
    # shift-invariant per query), so both sides hold rounding noise there, which Adam's
    # normalisation m/sqrt(v) blows up to O(lr) differences. Its gradient is checked above.
    cfg = GPTConfig(vocab_size=20, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0,
                    qkv_bias=False)
    tc = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6, weight_decay=0.1, grad_clip=0.5,
                     beta1=0.9, beta2=0.95, eps=1e-8)
    batches = [(RNG.integers(0, 20, (2, 8)), RNG.integers(0, 20, (2, 8))) for _ in range(6)]
    with jax.enable_x64(True):
        cfg64 = cfg.replace(dtype="float64")
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), init_params(cfg64, seed=0))
        tx = build_optimizer(tc)
        opt_state = tx.init(params)
        np_params, np_state = ref.to_numpy(params), ref.adamw_init(ref.to_numpy(params))
        schedule = lr_schedule(tc)
        step = jax.jit(lambda p, s, x, y: _optax_step(cfg64, tx, p, s, x, y))
        for k, (x, y) in enumerate(batches):
            params, opt_state = step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
            _, g = ref.gpt_loss_and_grads(np_params, x, y, cfg)
            np_params, np_state = ref.adamw_step(
                np_params, g, np_state, float(schedule(k)), b1=tc.beta1, b2=tc.beta2, eps=tc.eps,
                weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
        diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), params, np_params)
        # float64 on both sides. Adam divides each gradient entry by its own magnitude, so entries
        # that nearly cancel (relative error far above 1e-16) still move by O(lr) and carry their
        # rounding into the parameters. Six steps move a parameter by up to 6·lr ≈ 0.02; we see
        # differences of a few 1e-9 and allow 1e-8, i.e. below 1e-6 of the distance travelled.
        assert max(jax.tree.leaves(diff)) < 1e-8


def _optax_step(cfg, tx, params, opt_state, x, y):
    grads = jax.grad(lambda p: cross_entropy(GPT(cfg).apply(p, x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
