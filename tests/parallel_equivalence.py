"""Run as a script with 4 simulated CPU devices (XLA_FLAGS set before jax is imported).

Trains the same model from the same batches with several (devices, micro_batches) layouts and
prints the largest parameter difference to the 1-device, 1-micro-batch run as JSON. With the
argument `muon`, the optimizer is Muon + AdamW (warmup-stable-decay) over fewer layouts: data
parallel with accumulation, and FSDP, where Newton–Schulz runs on sharded matrices; with
`schedule_free_adamw` the same layouts, comparing the averaged parameters x too.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgpt.config import get_preset  # noqa: E402
from jaxgpt.nn.model import GPT, init_params  # noqa: E402
from jaxgpt.train.optimizer import build_optimizer, model_params  # noqa: E402
from jaxgpt.train.config import TrainConfig  # noqa: E402
from jaxgpt.train.sharding import ShardedTrainer, build_mesh  # noqa: E402
from jaxgpt.train.step import ParallelTrainer, create_state, pmap_optimizer  # noqa: E402


def main() -> None:
    assert jax.local_device_count() == 4, jax.devices()
    cfg = get_preset("test")
    optimizer = sys.argv[1] if len(sys.argv) > 1 else "adamw"
    tc = TrainConfig(batch_size=8, warmup_steps=2, max_steps=6, lr=3e-3, optimizer=optimizer,
                     schedule="wsd" if optimizer == "muon" else "cosine")
    model, tx = GPT(cfg), build_optimizer(tc)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 64, (8, 16)).astype(np.int32), rng.integers(0, 64, (8, 16)).astype(np.int32))
               for _ in range(6)]
    results, losses = {}, {}
    init = lambda: create_state(model, tx, init_params(cfg), 0)  # noqa: E731
    layouts = [("pmap", 1, 1), ("pmap", 4, 1), ("pmap", 2, 2), ("pmap", 1, 4),
               ("data=4", 4, 1), ("fsdp=4", 4, 1), ("data=2,fsdp=2", 4, 2)]
    if optimizer != "adamw":
        layouts = [("pmap", 1, 1), ("pmap", 4, 1), ("pmap", 2, 2), ("fsdp=4", 4, 1), ("data=2,fsdp=2", 4, 2)]
    for mode, devices, micro in layouts:
        if mode == "pmap":  # as the loop builds it: Muon splits its products over the pmap devices
            trainer = ParallelTrainer(model, pmap_optimizer(tc, devices), devices, micro)
        else:
            trainer = ShardedTrainer(model, tx, build_mesh(mode), micro, jax.eval_shape(init))
        state = trainer.put_state(init())
        if mode.startswith("fsdp"):  # FSDP really splits the matrices (and their Adam moments)
            kernel = state["params"]["params"]["h_0"]["attn"]["c_attn"]["kernel"]
            assert kernel.addressable_shards[0].data.shape == (32, 96 // 4), kernel.sharding
            mu = jax.tree.leaves(state["opt_state"])
            sharded = sum(1 for leaf in mu if len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated)
            # Adam: two moments per hidden matrix; Muon: one momentum per hidden matrix
            assert sharded >= (1 if optimizer == "muon" else 2) * 4 * cfg.n_layers, sharded
        for x, y in batches:
            state, metrics = trainer(state, x, y)
        key = f"{mode}:{devices}x{micro}"
        one_copy = trainer.get_state(state)
        if mode == "pmap":  # one device's own buffers: no program over all devices (see get_state)
            assert all(len(a.devices()) == 1 for a in jax.tree.leaves(one_copy)), key
        results[key] = jax.tree.map(np.asarray, {"y": one_copy["params"], "x": model_params(one_copy)})
        losses[key] = float(metrics["loss"])
    base = results["pmap:1x1"]
    diffs = {
        key: max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(base)))
        for key, p in results.items()
    }
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(base["x"]), jax.tree.leaves(init_params(cfg))))
    json.dump({"max_abs_diff": diffs, "final_loss": losses, "param_change": moved}, sys.stdout)


if __name__ == "__main__":
    main()
