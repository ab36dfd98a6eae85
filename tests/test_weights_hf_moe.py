"""Qwen3-MoE and Mixtral weights in and out, checked against transformers on randomly initialised
models saved with `save_pretrained`: logits within 1e-4 (float32) and the same greedy tokens both
ways, and the published shapes' parameter counts against transformers on the meta device."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import random_hf_model  # noqa: E402
from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.inference.generate import generate  # noqa: E402
from jaxgpt.nn.model import GPT, init_params, param_counts  # noqa: E402
from jaxgpt.weights.hf import WeightsError, load_hf, save_hf  # noqa: E402
from jaxgpt.weights.hf_families import config_to_hf  # noqa: E402

ATOL = 1e-4
COMMON = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=64, num_experts_per_tok=2, tie_word_embeddings=False)
MODELS = {  # name -> (config class, model class, options)
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, moe_intermediate_size=24, intermediate_size=80, norm_topk_prob=True)),
    "qwen3_moe-sparse-step": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,  # layer 0 dense
                              dict(num_experts=4, moe_intermediate_size=24, intermediate_size=80, norm_topk_prob=False,
                                   mlp_only_layers=[0])),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, intermediate_size=40)),
}
IDS = np.random.default_rng(0).integers(0, 96, (2, 17))


def _hf_model(name: str, seed: int = 0):
    config_cls, model_cls, extra = MODELS[name]
    return random_hf_model(config_cls, model_cls, seed, router_scale=40.0, **COMMON, **extra)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(torch.tensor(prompt), max_new_tokens=n, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None).numpy()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_matches_transformers_logits_and_greedy_tokens(tmp_path, name):
    model = _hf_model(name)
    model.save_pretrained(tmp_path)
    params, cfg = load_hf(str(tmp_path))
    assert cfg.moe_experts == 4 and cfg.moe_top_k == 2
    if name == "qwen3_moe-sparse-step":
        assert (cfg.moe_first_dense, cfg.moe_renormalize) == (1, False) and "c_fc" in params["params"]["h_0"]["mlp"]
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, IDS)), _logits(model, IDS), atol=ATOL)
    prompt = IDS[:, :5]
    np.testing.assert_array_equal(generate(params, cfg, prompt, 12), _greedy(model, prompt, 12))


@pytest.mark.parametrize("preset, cls", [("qwen3-moe-tiny", transformers.Qwen3MoeForCausalLM),
                                         ("mixtral-tiny", transformers.MixtralForCausalLM)])
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, preset, cls):
    cfg = get_preset(preset)
    params = init_params(cfg, seed=4)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 40.0 if "router" in jax.tree_util.keystr(path) else a, params)
    save_hf(params, cfg, tmp_path / "out")
    hf = cls.from_pretrained(tmp_path / "out").eval()
    ids = IDS % cfg.vocab_size
    np.testing.assert_allclose(np.asarray(GPT(cfg).apply(params, ids)), _logits(hf, ids), atol=ATOL)
    np.testing.assert_array_equal(generate(params, cfg, ids[:, :4], 10), _greedy(hf, ids[:, :4], 10))
    again, cfg2 = load_hf(str(tmp_path / "out"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the round trip is exact


@pytest.mark.parametrize("preset, kind, cls", [("qwen3-30b-a3b", "qwen3_moe", transformers.Qwen3MoeForCausalLM),
                                               ("mixtral-8x7b", "mixtral", transformers.MixtralForCausalLM)])
def test_published_shapes_have_transformers_parameter_counts(preset, kind, cls):
    cfg = get_preset(preset)
    hf = config_to_hf(cfg, kind)
    with torch.device("meta"):
        model = cls(transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"}))
    counts = param_counts(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]  # both untied
    # the published active sizes: Qwen3-30B-A3B "3.3B activated", Mixtral-8x7B "12.9B active"
    assert round(counts["active"] / 1e9, 1) == {"qwen3-30b-a3b": 3.4, "mixtral-8x7b": 12.9}[preset]


def test_export_refuses_what_the_moe_classes_cannot_hold(tmp_path):
    from jaxgpt.weights.hf_families import family_of

    cfg = get_preset("mixtral-tiny", moe_router="sigmoid")
    with pytest.raises(WeightsError, match="moe_router='sigmoid'"):
        save_hf(init_params(cfg), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for changes, named in [(dict(moe_shared_experts=1), "moe_shared_experts=1"),
                           (dict(moe_every=2), "every Mixtral layer is MoE"),
                           (dict(moe_renormalize=False), "renormalises")]:
        kind, problems = family_of(get_preset("mixtral-tiny", **changes))
        assert kind == "mixtral" and any(named in p for p in problems), (changes, problems)
    kind, problems = family_of(get_preset("qwen3-moe-tiny", moe_renormalize=False, moe_first_dense=1))
    assert (kind, problems) == ("qwen3_moe", [])  # norm_topk_prob=false and mlp_only_layers hold these
