"""Decoding and serving a mixture of experts: causal, cached = uncached, every row of a batch routed
on its own (a row's tokens equal its tokens decoded alone), and `jaxgpt serve` on MoE blocks."""

import jax
import numpy as np
import pytest

from conftest import assert_causal_and_decodes_like_uncached
from jaxgpt.config import get_preset
from jaxgpt.inference.generate import generate
from jaxgpt.nn.model import init_params

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
    assert_causal_and_decodes_like_uncached(params, cfg, new_tokens=8)  # rows routed on their own
    prompt_bt = np.arange(1, 11)[None]
    seeded = dict(temperature=1.0, top_k=8, seed=3)
    np.testing.assert_array_equal(generate(params, cfg, prompt_bt, 8, use_cache=True, **seeded),
                                  generate(params, cfg, prompt_bt, 8, use_cache=False, **seeded))


def test_moe_model_is_served():
    from conftest import assert_serves_greedy_like_the_decoder
    from jaxgpt.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    cfg = get_preset("mixtral-tiny", vocab_size=tok.vocab_size)
    assert_serves_greedy_like_the_decoder(init_params(cfg, seed=1), cfg, tok)
