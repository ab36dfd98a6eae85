"""Run as a script with 4 simulated CPU devices (XLA_FLAGS set before jax is imported).

Trains the same models (GPT-2 with dropout; a mixture of experts with a balancing bias) from the
same batches with `DeterministicTrainer` on 1, 2 and 4 devices (the MoE on 1 and 2), and prints as
JSON which runs end bitwise equal to the 1-device run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.nn.model import GPT, init_params  # noqa: E402
from jaxgpt.train.config import TrainConfig  # noqa: E402
from jaxgpt.train.deterministic import DeterministicTrainer  # noqa: E402
from jaxgpt.train.optimizer import build_optimizer  # noqa: E402
from jaxgpt.train.step import create_state  # noqa: E402

MODELS = {"gpt2-dropout": get_preset("test", drop_rate=0.1),
          "moe": get_preset("test", mlp="swiglu", norm="rmsnorm", moe_experts=4, moe_top_k=2, moe_hidden=32,
                            moe_router="sigmoid", moe_bias_rate=0.01)}


def run(trainer, init, batches):
    state = trainer.put_state(init())
    for x, y in batches:
        state, metrics = trainer(state, x, y)
    return jax.tree.map(np.asarray, trainer.get_state(state)["params"]), float(metrics["loss"])


def main() -> None:
    assert jax.local_device_count() == 4, jax.devices()
    tc = TrainConfig(batch_size=16, warmup_steps=2, max_steps=4, lr=3e-3)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (16, 16)).astype(np.int32), rng.integers(0, 64, (16, 16)).astype(np.int32))
               for _ in range(3)]
    out = {}
    for name, cfg in MODELS.items():
        model, tx = GPT(cfg), build_optimizer(tc)
        init = lambda: create_state(model, tx, init_params(cfg), 0)  # noqa: E731
        counts = (1, 2, 4) if name == "gpt2-dropout" else (1, 2)
        runs = {f"deterministic:{d}": run(DeterministicTrainer(model, tx, d, 8), init, batches) for d in counts}
        base, base_loss = runs["deterministic:1"]
        out[name] = {key: {"bitwise": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base))),
                           "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base))),
                           "loss": loss, "loss_bitwise": loss == base_loss}
                     for key, (p, loss) in runs.items()}
        out[name]["param_change"] = max(float(np.abs(a - np.asarray(b)).max())
                                        for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(init_params(cfg))))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
