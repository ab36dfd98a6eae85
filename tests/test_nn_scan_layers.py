"""Scan over layers and rematerialisation (GPTConfig.scan_layers, .remat): execution choices that
must not change the function. Each variant's loss and gradients are compared with the unrolled
model's on the same parameters (float32: atol 1e-6 on gradients of order 1e-1); the stacked
layout converts losslessly to GPT-2's and back, and every boundary that reads blocks by name
(NumPy reference, cached decoding, inference checkpoints, sharding rules) takes it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import reference
from jaxgpt.train.run_dir import save_for_inference
from jaxgpt.weights.checkpoint import load_for_inference
from jaxgpt.config import ConfigError, get_preset
from jaxgpt.inference.generate import generate_batch
from jaxgpt.nn.layout import is_stacked, stack_layers, to_layout, unstack_layers
from jaxgpt.nn.model import GPT, cross_entropy, init_params
from jaxgpt.train.sharding import spec_for
from jaxgpt.data.tokenizer import CharTokenizer

CFG = get_preset("test").replace(n_layers=3, drop_rate=0.1)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)


def _loss_and_grads(cfg, params, deterministic=True):
    def loss(p):
        logits = GPT(cfg).apply(p, IDS[:, :-1], deterministic=deterministic, rngs={"dropout": jax.random.key(3)})
        return cross_entropy(logits, IDS[:, 1:])

    value, grads = jax.jit(jax.value_and_grad(loss))(to_layout(params, cfg.scan_layers))
    return float(value), unstack_layers(grads)


def _assert_trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG)


@pytest.fixture(scope="module")
def unrolled(params):
    return _loss_and_grads(CFG, params)


@pytest.mark.parametrize("overrides", [{"scan_layers": True}, {"remat": "full"}, {"remat": "dots_no_batch"},
                                       {"scan_layers": True, "remat": "dots"}])
def test_scan_and_remat_compute_the_unrolled_loss_and_gradients(params, unrolled, overrides):
    base_loss, base_grads = unrolled
    loss, grads = _loss_and_grads(CFG.replace(**overrides), params)
    assert loss == pytest.approx(base_loss, rel=1e-6)
    _assert_trees_close(grads, base_grads, atol=1e-6)


def test_dropout_draws_the_same_bits_scanned_and_unrolled(params, unrolled):
    # scan and the unrolled functional path (remat) both give layer i the key split(key, L)[i]
    scanned = _loss_and_grads(CFG.replace(scan_layers=True), params, deterministic=False)
    rematerialised = _loss_and_grads(CFG.replace(remat="full"), params, deterministic=False)
    assert scanned[0] == pytest.approx(rematerialised[0], rel=1e-6) and scanned[0] != pytest.approx(unrolled[0])
    _assert_trees_close(scanned[1], rematerialised[1], atol=1e-6)


def test_stacked_layout_round_trips_and_inits_with_a_layer_axis(params):
    stacked = stack_layers(params)
    assert is_stacked(stacked) and not is_stacked(params)
    assert stacked["params"]["h"]["attn"]["c_attn"]["kernel"].shape == (3, 32, 96)
    _assert_trees_close(unstack_layers(stacked), params, atol=0)
    assert to_layout(stacked, True) is stacked and to_layout(params, False) is params
    fresh = init_params(CFG.replace(scan_layers=True))
    assert jax.tree.map(jnp.shape, unstack_layers(fresh)) == jax.tree.map(jnp.shape, params)
    with pytest.raises(ValueError, match="stack_layers"):
        GPT(CFG.replace(scan_layers=True)).apply(params, IDS)


def test_reference_and_cached_decoding_take_the_stacked_layout(params):
    cfg = CFG.replace(scan_layers=True, drop_rate=0.0)
    stacked = stack_layers(params)
    np.testing.assert_allclose(reference.gpt_forward(reference.to_numpy(stacked), IDS, cfg),
                               np.asarray(GPT(cfg).apply(stacked, IDS), np.float64), atol=1e-4)
    prompts = np.asarray(IDS[:, :5]).tolist()
    np.testing.assert_array_equal(generate_batch(stacked, cfg, prompts, 6),
                                  generate_batch(params, CFG.replace(drop_rate=0.0), prompts, 6))


def test_inference_checkpoint_of_a_scanned_run_loads_in_gpt2_layout(params, tmp_path):
    cfg = CFG.replace(scan_layers=True)
    save_for_inference(stack_layers(params), cfg, CharTokenizer(list("abcdef")), tmp_path / "run")
    loaded, loaded_cfg, _ = load_for_inference(tmp_path / "run")
    assert not loaded_cfg.scan_layers
    _assert_trees_close(loaded, params, atol=0)


def test_sharding_rules_skip_the_layer_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    assert spec_for("params/h/attn/c_attn/kernel", (3, 32, 96), mesh) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert spec_for("params/h_0/attn/c_attn/kernel", (32, 96), mesh) == jax.sharding.PartitionSpec(None, "fsdp")


def test_config_rejects_unknown_remat_and_scan_over_mixed_layers():
    with pytest.raises(ConfigError, match="remat"):
        CFG.replace(remat="some")
    with pytest.raises(ConfigError, match="scan_layers"):
        CFG.replace(scan_layers=True, sliding_window=4, global_every=2)
    with pytest.raises(ConfigError, match="scan_layers"):
        CFG.replace(scan_layers="yes")
