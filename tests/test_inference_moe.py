"""Decoding and serving a mixture of experts: causal, cached = uncached, every row of a batch routed
on its own (a row's tokens equal its tokens decoded alone), and `jaxgpt serve` on MoE blocks."""

import jax
import numpy as np
import pytest

from jaxgpt.config import get_preset
from jaxgpt.inference.generate import generate, generate_batch
from jaxgpt.nn.model import GPT, init_params

PRESETS = {  # (Qwen3-MoE's and Mixtral's cached decoding are checked against transformers in test_weights_hf_moe.py)
    "sigmoid-shared-capacity": dict(moe_router="sigmoid", moe_shared_experts=1, moe_capacity_factor=0.5,
                                    moe_first_dense=1, n_layers=3),
}


def _model(name):
    cfg = get_preset("qwen3-moe-tiny", **PRESETS[name])
    params = init_params(cfg, seed=2)
    # sharper routers than the 0.02 initialisation, so that the experts really differ per token
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 30.0 if "router" in jax.tree_util.keystr(path) else a, params)
    return cfg, params


@pytest.mark.parametrize("name", list(PRESETS))
def test_moe_is_causal_and_decodes_the_same_cached_uncached_and_batched(name):
    cfg, params = _model(name)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, cfg.vocab_size, (1, 20))
    changed = ids.copy()
    changed[0, 11:] = rng.integers(0, cfg.vocab_size, 9)
    a, b = GPT(cfg).apply(params, ids), GPT(cfg).apply(params, changed)
    np.testing.assert_allclose(a[:, :11], b[:, :11], rtol=1e-6, atol=1e-6)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13], [5, 9]]  # ragged: padded rows share the batch
    batched = generate_batch(params, cfg, prompts, 8)
    for prompt, new in zip(prompts, batched):  # each row as if alone: uncached, batch of one
        assert new == generate(params, cfg, [prompt], 8, use_cache=False)[0, len(prompt):].tolist()
    seeded = dict(temperature=1.0, top_k=8, seed=3)
    np.testing.assert_array_equal(generate(params, cfg, np.array(prompts[0])[None], 8, use_cache=True, **seeded),
                                  generate(params, cfg, np.array(prompts[0])[None], 8, use_cache=False, **seeded))


def test_moe_model_is_served():
    from conftest import assert_serves_greedy_like_the_decoder
    from jaxgpt.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    cfg = get_preset("mixtral-tiny", vocab_size=tok.vocab_size)
    assert_serves_greedy_like_the_decoder(init_params(cfg, seed=1), cfg, tok)
