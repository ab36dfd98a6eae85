"""DPO: the loss and its gradient against the NumPy reference, a known answer at the start (the
policy is its own reference), training that separates chosen from rejected, and the commands."""

import json
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import reference as ref
from jaxgpt.cli.main import main
from jaxgpt.config import get_preset
from jaxgpt.data.tokenizer import CharTokenizer
from jaxgpt.finetune.dpo import dpo_loss, finetune_dpo, offline_preferences, sequence_logprobs
from jaxgpt.finetune.loop import FinetuneConfig
from jaxgpt.nn.model import init_params


def test_dpo_loss_and_gradient_match_the_numpy_reference():
    rng = np.random.default_rng(0)
    b, t, v, beta = 3, 7, 11, 0.3
    logits = rng.normal(size=(2 * b, t, v))
    targets = rng.integers(0, v, (2 * b, t))
    targets[:, :2] = -100  # the prompt
    targets[1, 5:] = -100  # padding
    ref_c, ref_r = rng.normal(size=b) - 10, rng.normal(size=b) - 10

    def loss_of(logits):
        pi_c, pi_r = jnp.split(sequence_logprobs(logits, jnp.asarray(targets)), 2)
        return dpo_loss(pi_c, pi_r, jnp.asarray(ref_c), jnp.asarray(ref_r), beta)[0]

    with jax.enable_x64(True):
        loss, grad = jax.value_and_grad(loss_of)(jnp.asarray(logits))
    logps = ref.sequence_logprob(logits, targets)
    np.testing.assert_allclose(np.asarray(sequence_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))),
                               logps, rtol=1e-5)
    ref_loss, _ = ref.dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta)
    d_c, d_r = ref.dpo_loss_backward(logps[:b], logps[b:], ref_c, ref_r, beta)
    ref_grad = ref.sequence_logprob_backward(np.concatenate([d_c, d_r]), logits, targets)
    # the JAX loss casts logits to float32 inside; the rest is float64
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-7)
    assert np.all(ref_grad[:, :2] == 0) and np.all(ref_grad[1, 5:] == 0)  # no gradient through masked targets


def test_offline_pairs_and_training_separate_chosen_from_rejected(tmp_path):
    tok = CharTokenizer(list(string.printable))
    config = get_preset("test", vocab_size=tok.vocab_size, context_length=192)
    rng = np.random.default_rng(0)
    entries = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}."}
               for w in ["".join(rng.choice(list("abcdefgh"), 4)) for _ in range(40)]]
    offline = offline_preferences(entries, seed=0)
    assert all(p["chosen"] == e["output"] and p["rejected"] != p["chosen"] for p, e in zip(offline, entries))
    # a preference a small model can learn and carry to held-out pairs: "yes …" over "no …"
    pairs = [{**e, "chosen": "yes " + e["output"], "rejected": "no " + e["output"]} for e in entries]
    cfg = FinetuneConfig(epochs=4, batch_size=8, lr=2e-3, trainable="all", drop_rate=0.0, log_every=2)
    results = finetune_dpo(init_params(config), config, tok, (pairs[:32], pairs[32:]), cfg, tmp_path, beta=0.5,
                           progress=False)
    start, end = results["history"][0], results["history"][-1]
    assert start["val_reward_margin"] == 0.0 and start["val_reward_accuracy"] == 0.0  # the policy is its reference
    assert start["val_dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert end["train_reward_accuracy"] == 1.0 and end["train_reward_margin"] > 1.0
    assert end["val_reward_accuracy"] == 1.0 and end["val_dpo_loss"] < 0.5 * math.log(2)  # held out, too
    assert (tmp_path / "dpo.png").is_file() and (tmp_path / "model").is_dir()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in lines) and sum("val_reward_margin" in r for r in lines) == 5


def test_dpo_commands(tmp_path, capsys):
    data = [{"instruction": f"Q{i}", "input": "", "output": f"answer {i}"} for i in range(12)]
    (tmp_path / "instr.json").write_text(json.dumps(data))
    assert main(["finetune", "dpo-data", "--data", str(tmp_path / "instr.json"), "--offline",
                 "--out", str(tmp_path / "prefs.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 12
    run = ["finetune", "dpo", "--data", str(tmp_path / "prefs.json"), "--batch-size", "4", "--no-progress", "--json"]
    assert main([*run, "--preset", "test", "--out", str(tmp_path / "short")]) == 2  # a 16-token context
    assert "no response token would be scored" in capsys.readouterr().err
    assert main([*run, "--preset", "tiny", "--out", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"] == {"train": 11, "val": 1} and result["beta"] == 0.1
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x", "chosen": "y"}]))
    assert main(["finetune", "dpo", "--preset", "test", "--data", str(tmp_path / "bad.json")]) == 2
    assert "rejected" in capsys.readouterr().err
