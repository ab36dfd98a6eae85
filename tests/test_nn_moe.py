"""The mixture-of-experts layer against its NumPy reference (forward and hand-written backward,
float32 and x64), and its properties: token permutation, one expert = a dense MLP, capacity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxgpt import reference as ref
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.nn.mlp import MLP
from jaxgpt.nn.model import GPT, init_params, param_counts
from jaxgpt.nn.moe import MoE, moe_stats, update_balance_bias
from jaxgpt.reference.moe import route

settings.register_profile("moe", derandomize=True, deadline=None, max_examples=4)

D, E = 8, 4
# case -> (layer options, run in training mode (capacity applies), aux_coef, z_coef)
CASES = {
    "softmax-renormalised": (dict(top_k=2, kind="swiglu"), False, 0.1, 0.01),
    "softmax-plain-top1-gelu": (dict(top_k=1, kind="gelu", renormalize=False), False, 0.1, 0.0),
    "sigmoid-bias-shared": (dict(top_k=2, kind="geglu", router="sigmoid", shared_hidden=6), False, 0.1, 0.02),
    "capacity-drops": (dict(top_k=2, kind="swiglu", capacity_factor=0.5), True, 0.1, 0.01),
    "router-ties": (dict(top_k=1, kind="swiglu", capacity_factor=1.0), True, 0.1, 0.01),
}


def _case(name, seed=0, n=12):
    options, training, aux, z = CASES[name]
    layer = MoE(n_experts=E, hidden=5, dtype=jnp.float64, **options)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    with jax.enable_x64(True):
        params = ref.to_numpy(layer.init(jax.random.key(seed), jnp.zeros((1, 1, D)))["params"])
    params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), params)  # experts differ, biases non-zero
    if name == "router-ties":  # experts 1 and 2 tie for every token (both logits 0, the others negative)
        x = np.abs(x)
        kernel = -np.abs(params["router"]["kernel"])
        kernel[:, 1:3] = 0.0
        params["router"]["kernel"] = kernel
    return layer, params, x, training, aux, z


def _reference_options(layer):
    return dict(top_k=layer.top_k, kind=layer.kind, router=layer.router, renormalize=layer.renormalize)


def _jax_loss(layer, training, aux, z):
    def loss(params, x_nd, dy_nd):
        y_btd, variables = layer.apply({"params": params}, x_nd[None], deterministic=not training, mutable=["moe"])
        stats = moe_stats(variables)
        total = jnp.sum(y_btd[0] * dy_nd) + aux * stats["aux_loss"][0] + z * stats["z_loss"][0]
        return total, (y_btd[0], stats)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _reference(layer, params, x, dy, training, aux, z):
    factor = layer.capacity_factor if training else None
    options = _reference_options(layer)
    y, stats = ref.moe(x, params, capacity_factor=factor, **options)
    dx, grads = ref.moe_backward(dy, x, params, capacity_factor=factor, aux_coef=aux, z_coef=z, **options)
    return y, stats, dx, grads


@pytest.mark.parametrize("name", list(CASES))
def test_moe_matches_reference_x64(name):
    layer, params, x, training, aux, z = _case(name)
    dy = np.random.default_rng(9).normal(size=x.shape)
    y_ref, stats_ref, dx_ref, grads_ref = _reference(layer, params, x, dy, training, aux, z)
    with jax.enable_x64(True):
        (_, (y, stats)), (grads, dx) = _jax_loss(layer, training, aux, z)(
            jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(stats["counts"][0]), stats_ref["counts"])
    assert int(stats["dropped"][0]) == stats_ref["dropped"]
    np.testing.assert_allclose(float(stats["aux_loss"][0]), stats_ref["aux_loss"], rtol=1e-12)
    np.testing.assert_allclose(float(stats["z_loss"][0]), stats_ref["z_loss"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-9, atol=1e-11)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-11),
                 grads, grads_ref)
    if name == "capacity-drops":
        assert stats_ref["dropped"] > 0  # the case exercises dropping
    if name == "router-ties":
        assert set(np.unique(route(x, params, 1)[1])) == {1}  # the tie went to the lower index
        assert stats_ref["dropped"] > 0


@pytest.mark.parametrize("name", ["softmax-renormalised", "sigmoid-bias-shared", "capacity-drops"])
def test_moe_matches_reference_float32(name):
    layer, params, x, training, aux, z = _case(name)
    layer = layer.clone(dtype=jnp.float32)
    dy = np.random.default_rng(9).normal(size=x.shape)
    y_ref, stats_ref, dx_ref, grads_ref = _reference(layer, params, x, dy, training, aux, z)
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    (_, (y, stats)), (grads, dx) = _jax_loss(layer, training, aux, z)(jax.tree.map(as32, params), as32(x), as32(dy))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats["counts"][0]), stats_ref["counts"])
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5),
                 grads, grads_ref)


@settings(settings.get_profile("moe"))
@given(seed=st.integers(0, 1000), top_k=st.sampled_from([1, 2, 3]))
def test_permuting_tokens_permutes_the_output(seed, top_k):
    layer = MoE(n_experts=E, top_k=top_k, hidden=5, kind="swiglu")
    rng = np.random.default_rng(seed)
    x_btd = jnp.asarray(rng.normal(size=(2, 6, D)), jnp.float32)
    params = layer.init(jax.random.key(seed), x_btd)
    perm = rng.permutation(12)
    y = layer.apply(params, x_btd).reshape(12, D)
    y_perm = layer.apply(params, x_btd.reshape(12, D)[perm].reshape(2, 6, D)).reshape(12, D)
    np.testing.assert_allclose(np.asarray(y_perm), np.asarray(y)[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_one_expert_top1_is_the_dense_mlp(kind):
    layer = MoE(n_experts=1, top_k=1, hidden=7, kind=kind)
    x_btd = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, D)), jnp.float32)
    params = layer.init(jax.random.key(0), x_btd)["params"]
    dense = {name: {"kernel": w["kernel"][0]} for name, w in params["experts"].items()}
    want = MLP(hidden=7, kind=kind, use_bias=False).apply({"params": dense}, x_btd)
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x_btd)), np.asarray(want), rtol=1e-6,
                               atol=1e-6)


def test_ample_capacity_equals_dropless():
    x_btd = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, D)), jnp.float32)
    dropless = MoE(n_experts=E, top_k=2, hidden=5)
    capacity = dropless.clone(capacity_factor=E / 2)  # room for every token at every expert
    params = dropless.init(jax.random.key(1), x_btd)
    y, variables = capacity.apply(params, x_btd, deterministic=False, mutable=["moe"])
    assert int(moe_stats(variables)["dropped"][0]) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(dropless.apply(params, x_btd)), rtol=1e-6, atol=1e-6)
    # and evaluation is dropless whatever the factor
    tight = dropless.clone(capacity_factor=0.25)
    np.testing.assert_array_equal(np.asarray(tight.apply(params, x_btd)), np.asarray(dropless.apply(params, x_btd)))


def test_balance_bias_moves_towards_underloaded_experts():
    cfg = get_preset("qwen3-tiny", moe_experts=4, moe_top_k=1, moe_hidden=16, moe_router="sigmoid",
                     moe_bias_rate=0.01)
    params = init_params(cfg)
    counts_le = jnp.array([[10, 0, 3, 3], [4, 4, 4, 4]])
    new = update_balance_bias(params, counts_le, 0.01)
    np.testing.assert_allclose(np.asarray(new["params"]["h_0"]["mlp"]["router"]["balance_bias"]),
                               [-0.01, 0.01, 0.01, 0.01])
    np.testing.assert_allclose(np.asarray(new["params"]["h_1"]["mlp"]["router"]["balance_bias"]), 0.0)


def test_model_with_moe_layers_matches_reference_and_counts():
    cfg = get_preset("qwen3-tiny", moe_experts=4, moe_top_k=2, moe_hidden=24, moe_every=2, n_layers=3,
                     moe_shared_experts=1)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, False]
    params = init_params(cfg, seed=3)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, ids)), ref.gpt_forward(ref.to_numpy(params), ids, cfg),
                               rtol=1e-4, atol=2e-5)
    counts = param_counts(cfg)
    expert = 3 * cfg.emb_dim * 24
    assert counts["total_tied"] - counts["active"] == 2 * expert  # one MoE layer, 4 − 2 experts idle


@pytest.mark.parametrize("changes, message", [
    (dict(moe_experts=4, moe_top_k=5), "cannot exceed"),
    (dict(moe_experts=0), "positive integer"),
    (dict(moe_experts=4, moe_router="topk"), "moe_router"),
    (dict(moe_experts=4, moe_bias_rate=0.01), "sigmoid"),
    (dict(moe_experts=4, moe_capacity_factor=float("nan")), "finite"),
    (dict(moe_experts=4, moe_first_dense=2), "no MoE layer"),
    (dict(moe_experts=4, moe_every=2, scan_layers=True), "identical layers"),
])
def test_bad_moe_config_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("qwen3-tiny", **changes)


@pytest.mark.parametrize("overrides", [dict(scan_layers=True, remat="full")])
def test_scan_and_remat_give_the_same_moe_loss_gradients_and_stats(overrides):
    from jaxgpt.nn.layout import stack_layers, unstack_layers
    from jaxgpt.nn.model import cross_entropy
    from jaxgpt.nn.moe import moe_loss

    cfg = get_preset("qwen3-moe-tiny", moe_z_loss_coef=0.01)
    params = init_params(cfg, seed=5)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 12))

    def loss(c, p):
        logits, variables = GPT(c).apply(p, ids[:, :-1], mutable=["moe"])
        stats = moe_stats(variables)
        return cross_entropy(logits, ids[:, 1:]) + moe_loss(stats, c.moe_aux_loss_coef, c.moe_z_loss_coef), stats

    (base_loss, base_stats), base_grads = jax.value_and_grad(lambda p: loss(cfg, p), has_aux=True)(params)
    other = cfg.replace(**overrides)
    other_params = stack_layers(params) if other.scan_layers else params
    (other_loss, other_stats), other_grads = jax.value_and_grad(lambda p: loss(other, p), has_aux=True)(other_params)
    np.testing.assert_allclose(other_loss, base_loss, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(other_stats["counts"]), np.asarray(base_stats["counts"]))
    assert base_stats["counts"].shape == (2, 4)
    other_grads = jax.tree.leaves(unstack_layers(other_grads) if other.scan_layers else other_grads)
    for g1, g2 in zip(jax.tree.leaves(base_grads), other_grads):
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_an_moe_model_trains_from_the_command_line_and_logs_expert_load(tmp_path, capsys):
    import json

    from jaxgpt.cli.main import main

    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    sets = ["train.batch_size=4", "train.eval_every=2", "train.samples=1", "train.sample_tokens=8",
            "train.peak_flops=1e9", "train.context_length=32", "train.log_every=1", "model.moe_capacity_factor=1.0"]
    code = main(["train", "--preset", "qwen3-moe-tiny", "--data", str(corpus), "--tokenizer", "char", "--out",
                 str(tmp_path / "run"), "--max-steps", "4", "--no-progress", "--devices", "1",
                 *[a for s in sets for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert code == 0 and "completed at step 4" in out and "--- sample 1 ---" in out
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert len(train) == 4
    last = train[-1]
    assert np.asarray(last["moe_load"]).shape == (2, 4) and 0.0 <= last["moe_dropped_frac"] < 1.0
    assert np.asarray(last["moe_counts"]).sum(-1).tolist() == [4 * 32 * 2] * 2  # batch · length · top-k per layer
    assert 0.0 < last["moe_aux_loss"] < 4.0 and last["moe_imbalance"] >= 1.0  # top-2 of 4 at balance: aux = 2
    assert (tmp_path / "run" / "expert_load.png").stat().st_size > 0


def test_tiled_grouped_matmul_equals_ragged_dot_with_empty_groups():
    from jaxgpt.nn.moe import grouped_matmul

    rng = np.random.default_rng(0)
    sizes = jnp.array([5, 0, 17, 0, 1, 9], jnp.int32)  # empty groups, and groups across tile borders
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 6, 3)), jnp.float32)
    loss = lambda fn: lambda x, w: jnp.sum(fn(x, w) ** 2)  # noqa: E731
    tiled = lambda x, w: grouped_matmul(x, w, sizes)  # noqa: E731  (the CPU backend takes the tiled form)
    ragged = lambda x, w: jax.lax.ragged_dot(x, w, sizes)  # noqa: E731
    assert jax.default_backend() == "cpu"
    np.testing.assert_allclose(np.asarray(tiled(x, w)), np.asarray(ragged(x, w)), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(loss(tiled), (0, 1))(x, w), jax.grad(loss(ragged), (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_an_expert_axis_must_divide_the_experts():
    from jaxgpt.train.sharding import MeshError, ShardedTrainer

    mesh = type("Mesh", (), {"shape": {"data": 1, "fsdp": 1, "expert": 3}})()  # only its axis sizes are read first
    with pytest.raises(MeshError, match="expert axis has 3 devices but the model has 4 experts"):
        ShardedTrainer(GPT(get_preset("qwen3-moe-tiny")), None, mesh, 1, None)
