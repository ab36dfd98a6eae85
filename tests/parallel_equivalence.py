"""Run as a script with 4 simulated CPU devices (XLA_FLAGS set before jax is imported).

Trains the same model from the same batches with several (devices, micro_batches) layouts and
prints the largest parameter difference to the 1-device, 1-micro-batch run as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.model import GPT, init_params  # noqa: E402
from jaxgpt.optim import build_optimizer  # noqa: E402
from jaxgpt.train_config import TrainConfig  # noqa: E402
from jaxgpt.train_step import ParallelTrainer, create_state  # noqa: E402


def main() -> None:
    assert jax.local_device_count() == 4, jax.devices()
    cfg = get_preset("test")
    tc = TrainConfig(batch_size=8, warmup_steps=2, max_steps=6, lr=3e-3)
    model, tx = GPT(cfg), build_optimizer(tc)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (8, 16)).astype(np.int32), rng.integers(0, 64, (8, 16)).astype(np.int32))
               for _ in range(6)]
    results, losses = {}, {}
    for devices, micro in [(1, 1), (4, 1), (2, 2), (1, 4)]:
        trainer = ParallelTrainer(model, tx, devices, micro)
        state = trainer.put_state(create_state(model, tx, init_params(cfg), 0))
        for x, y in batches:
            state, metrics = trainer(state, x, y)
        results[(devices, micro)] = trainer.get_state(state)["params"]
        losses[f"{devices}x{micro}"] = float(metrics["loss"])
    base = results[(1, 1)]
    diffs = {
        f"{d}x{m}": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base)))
        for (d, m), p in results.items()
    }
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(init_params(cfg))))
    json.dump({"max_abs_diff": diffs, "final_loss": losses, "param_change": moved}, sys.stdout)


if __name__ == "__main__":
    main()
