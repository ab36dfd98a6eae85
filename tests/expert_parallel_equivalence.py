"""Run as a script with 4 simulated CPU devices (XLA_FLAGS set before jax is imported).

Trains the same mixture-of-experts model from the same batches on one device and with the experts
split over an `expert` mesh axis (with data parallelism and FSDP beside it), and prints as JSON the
largest parameter and loss differences to the one-device run, and where the expert weights live.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.nn.model import GPT, init_params  # noqa: E402
from jaxgpt.train.config import TrainConfig  # noqa: E402
from jaxgpt.train.fingerprint import fingerprint  # noqa: E402
from jaxgpt.train.optimizer import build_optimizer  # noqa: E402
from jaxgpt.train.sharding import ShardedTrainer, build_mesh  # noqa: E402
from jaxgpt.train.step import ParallelTrainer, create_state  # noqa: E402

STEPS = 5


def main() -> None:
    assert jax.local_device_count() == 4, jax.devices()
    cfg = get_preset("qwen3-tiny", moe_experts=4, moe_top_k=2, moe_hidden=32, moe_shared_experts=1,
                     moe_router="sigmoid", moe_bias_rate=0.01, moe_z_loss_coef=1e-3, vocab_size=64, n_layers=2)
    tc = TrainConfig(batch_size=8, warmup_steps=1, max_steps=STEPS, lr=3e-3)
    model, tx = GPT(cfg), build_optimizer(tc)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (8, 16)).astype(np.int32), rng.integers(0, 64, (8, 16)).astype(np.int32))
               for _ in range(STEPS)]
    init = lambda: create_state(model, tx, init_params(cfg), 0)  # noqa: E731
    params, losses, counts, placement, same_print = {}, {}, {}, {}, {}
    for mode, micro in [("one", 1), ("expert=4", 1), ("data=2,expert=2", 1), ("one", 2), ("fsdp=2,expert=2", 2)]:
        if mode == "one":
            trainer = ParallelTrainer(model, tx, 1, micro)
        else:
            trainer = ShardedTrainer(model, tx, build_mesh(mode), micro, jax.eval_shape(init))
        state = trainer.put_state(init())
        kernel = state["params"]["params"]["h_0"]["mlp"]["experts"]["c_fc"]["kernel"]  # (E, d, f)
        placement[f"{mode}:micro={micro}"] = [list(shard.data.shape) for shard in kernel.addressable_shards]
        for x, y in batches:
            state, metrics = trainer(state, x, y)
        mode = f"{mode}:micro={micro}"  # compared with the one-device run of the same micro-batching
        params[mode] = jax.tree.map(np.asarray, trainer.get_state(state)["params"])
        # the run fingerprint's checksums of the sharded parameters equal those of the same values on one
        # device (the norms beside them are float sums: their last bits may differ with the layout)
        sums = lambda p: {k: v[0] for k, v in fingerprint(p)["leaves"].items()}  # noqa: E731
        same_print[mode] = sums(trainer.params(state)) == sums(jax.tree.map(jnp.asarray, params[mode]))
        losses[mode] = float(metrics["loss"])
        counts[mode] = np.asarray(metrics["moe_counts"]).tolist()
    diff = lambda p, q: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)))  # noqa: E731
    diffs = {mode: diff(p, params[f"one:{mode.split(':')[1]}"]) for mode, p in params.items()}
    base = params["one:micro=1"]
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(init_params(cfg))))
    bias = base["params"]["h_0"]["mlp"]["router"]["balance_bias"].tolist()
    json.dump({"max_abs_diff": diffs, "final_loss": losses, "counts": counts, "placement": placement,
               "param_change": moved, "balance_bias": bias, "fingerprint_layout_independent": same_print},
              sys.stdout)


if __name__ == "__main__":
    main()
