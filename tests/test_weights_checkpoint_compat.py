"""Checkpoints written before the package moved to its folders still load.

`tests/data/pre_layout_run` was written by jaxgpt at commit 15047ab (the flat layout): a 4-step run
of the `test` preset on a character corpus, with the logits that code computed from it.
"""

import shutil
from pathlib import Path

import jax
import numpy as np

from jaxgpt.nn.model import GPT, init_params
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.optimizer import build_optimizer
from jaxgpt.train.step import create_state
from jaxgpt.weights.checkpoint import load_for_inference, read_meta, restore

RUN = Path(__file__).parent / "data" / "pre_layout_run"


def test_old_checkpoint_gives_the_old_logits(tmp_path):
    run = shutil.copytree(RUN, tmp_path / "run")
    params, config, tokenizer = load_for_inference(run)  # parameters only: no optimizer built
    expected = np.load(RUN / "expected_logits.npz")
    np.testing.assert_array_equal(np.array([tokenizer.encode("the quick brown")]), expected["ids"])
    # the same weights bit for bit (the next test); the logits to float32 roundoff, not bitwise: XLA's
    # CPU kernels sum in another order on another CPU (4.5e-8 apart on this machine at commit 313270c)
    np.testing.assert_allclose(np.asarray(GPT(config).apply(params, expected["ids"])), expected["logits"],
                               rtol=1e-5, atol=1e-6)


def test_old_checkpoint_restores_as_a_train_state(tmp_path):
    """The whole state (optimizer included) restores onto today's train state: such runs resume."""
    run = shutil.copytree(RUN, tmp_path / "run")
    meta = read_meta(run)
    config, train_cfg = load_for_inference(run)[1], TrainConfig.from_dict(meta["train"])
    abstract = jax.eval_shape(lambda: create_state(GPT(config), build_optimizer(train_cfg), init_params(config), 0))
    state, restored_meta = restore(run, abstract)
    assert int(state["step"]) == 4 == restored_meta["step"]
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    inference_params = load_for_inference(run)[0]
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(inference_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
