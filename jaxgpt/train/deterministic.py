"""Bit-identical data-parallel training on any device count (`TrainConfig.deterministic_reduce`).

An all-reduce sums the devices' gradients in an order the library picks (ring, tree, by device
count), and float addition is not associative: a run on 4 devices leaves the same run on 1 bitwise
from the first step. Worse, the program XLA compiles for several devices is not the one it compiles
for one (measured: a shard's gradient computed in a 2- or 4-device pmap or shard_map differs in the
last bits from the same shard's in a 1-device jit, though the two multi-device programs agree), so
summing in a fixed order inside a pmap is not enough.

`DeterministicTrainer` therefore runs the step as a few small programs that are the same
executable on every device and every device count:

1. the global batch is split into S shards (a power of two) of B/S rows; device j of D (over all
   processes) holds the S/D contiguous shards [j·S/D, (j+1)·S/D) and computes each one's gradient
   with one jitted `shard_grad` (dropout key from the shard's global index, not the device's);
2. the S shard gradients are summed in one fixed balanced binary tree, (0+1), (2+3), … then
   ((0+1)+(2+3)), …: device j's shards are an aligned subtree, which it sums locally; the D subtree
   sums are copied (data movement only: `device_put` within a process, an all-gather across
   processes) to each process's first device, which sums the top of the tree. Each addition pairs
   the same two partial sums as on one device, and an elementwise IEEE add is exact-rounded in any
   program, so the sum is bitwise the same;
3. one jitted `finish` (divide by S, the optimizer update) on each process's first device, where the
   train state lives.

The cost (docs/numerics.md): the step is dispatched shard by shard from Python, the parameters are
copied to every device and the gradients back each step, and there is no compute/communication
overlap. It is a setting for reproducing and debugging runs, not the fast path.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt import xla_tuning
from jaxgpt.config import ConfigError, resolve_dtype
from jaxgpt.nn.model import GPT
from jaxgpt.train.optimizer import model_params
from jaxgpt.train.step import apply_update, make_eval_step, make_loss_and_grad


def check_shards(shards: int, n_devices: int, micro_batches: int, batch_size: int) -> None:
    """Refuse, by name, a layout whose shards cannot be summed in the same tree as on one device."""
    if shards < 1 or shards & (shards - 1):
        raise ConfigError(f"train.deterministic_reduce must be a power of two (the number of gradient shards), got {shards}")
    if micro_batches != 1:
        raise ConfigError("train.deterministic_reduce computes the shards one after another, which is gradient "
                          f"accumulation already: leave train.micro_batches at 1 (got {micro_batches})")
    if batch_size % shards:
        raise ConfigError(f"batch_size {batch_size} must be divisible by train.deterministic_reduce = {shards}")
    if shards % n_devices or n_devices & (n_devices - 1):
        raise ConfigError(f"train.deterministic_reduce = {shards} shards over {n_devices} devices: the device count "
                          "must be a power of two that divides the shards (each device an aligned block of the tree)")


def tree_pairwise_sum(items: list, add: Callable):
    """Sum a power-of-two list of pytrees as a balanced binary tree of `add`: (0+1), (2+3), … then
    ((0+1)+(2+3)), … — fixed partners, whichever device holds which part."""
    while len(items) > 1:
        items = [add(items[i], items[i + 1]) for i in range(0, len(items), 2)]
    return items[0]


class DeterministicTrainer:
    """The train step as `shard_grad` per shard, a fixed-tree sum and `finish`: bitwise the same
    parameters on any number of devices and processes. The interface of `ParallelTrainer`."""

    def __init__(self, model: GPT, tx: optax.GradientTransformation, n_devices: int, shards: int,
                 micro_batches: int = 1) -> None:
        available = jax.local_device_count()
        if not 1 <= n_devices <= available:
            raise ValueError(f"asked for {n_devices} devices but JAX sees {available} local device(s)")
        self.devices = jax.local_devices()[:n_devices]
        self.n_devices, self.shards, self.micro_batches = n_devices * jax.process_count(), shards, 1
        self._configured_micro_batches = micro_batches  # refused by check_batch_size unless 1
        cfg, compute_dtype = model.config, resolve_dtype(model.config)
        grad_fn = make_loss_and_grad(model)

        def shard_grad(params, rng, step, shard_index, x_bt, y_bt):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), step), shard_index)
            (_, (ce, stats)), grads = grad_fn(params, x_bt, y_bt, key)
            return ce, grads, stats

        def finish(state, sums):
            ce_sum, grads_sum, stats = sums
            if stats is not None:  # router losses averaged over shards; token counts stay sums
                stats = {**stats, "aux_loss": stats["aux_loss"] / shards, "z_loss": stats["z_loss"] / shards}
            grads = jax.tree.map(lambda g: g / shards, grads_sum)
            return apply_update(tx, cfg, state, grads, ce_sum / shards, stats)

        jit = lambda f, **kw: xla_tuning.jit(f, compute_dtype=compute_dtype, **kw)  # noqa: E731
        self._shard_grad = jit(shard_grad)
        self._add = jit(lambda a, b: jax.tree.map(jnp.add, a, b))
        self._finish = jit(finish, donate_argnums=0)
        self.eval_step = jit(make_eval_step(model))
        self._processes = _ProcessExchange() if jax.process_count() > 1 else None

    def check_batch_size(self, batch_size: int) -> None:
        check_shards(self.shards, self.n_devices, self._configured_micro_batches, batch_size)

    def abstract_state(self, abstract):
        return abstract if self._processes is None else self._processes.abstract(abstract)

    def put_state(self, state):
        if self._processes is not None:
            state = self._processes.to_local(state)
        return jax.device_put(state, self.devices[0])

    def get_state(self, state):
        """The state to save: this process's copy (replicated over the processes' first devices
        when there are several, so that Orbax writes it once)."""
        return state if self._processes is None else self._processes.to_global(state)

    def params(self, state):
        return model_params(state)

    def step_flops(self, state, x_local, y_local) -> None:
        """Several executables make one step here: MFU uses the 6·N formula."""
        return None

    def local_rows(self, batch_size: int) -> np.ndarray:
        """This process's contiguous block of whole shards."""
        per_process = batch_size // jax.process_count()
        return np.arange(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

    def local_eval_rows(self, batch_size: int) -> slice:
        return slice(None)  # every process evaluates the whole batch (the parameters are the same)

    def __call__(self, state, x_local: np.ndarray, y_local: np.ndarray):
        rows = x_local.shape[0]
        shard_rows = rows * jax.process_count() // self.shards
        per_device = rows // shard_rows // len(self.devices)
        first = jax.process_index() * len(self.devices) * per_device  # this process's first global shard
        replica = (state["params"], state["rng"], state["step"])
        replicas = [replica] + [jax.device_put(replica, d) for d in self.devices[1:]]  # exact copies
        subtrees = []
        for j, device in enumerate(self.devices):  # dispatched asynchronously: the devices run side by side
            outs = []
            for i in range(per_device):
                shard = first + j * per_device + i
                x = jax.device_put(x_local[(shard - first) * shard_rows:(shard - first + 1) * shard_rows], device)
                y = jax.device_put(y_local[(shard - first) * shard_rows:(shard - first + 1) * shard_rows], device)
                outs.append(self._shard_grad(*replicas[j], np.int32(shard), x, y))
            subtrees.append(jax.device_put(tree_pairwise_sum(outs, self._add), self.devices[0]))
        sums = tree_pairwise_sum(subtrees, self._add)  # this process's aligned subtree
        if self._processes is not None:
            sums = tree_pairwise_sum(self._processes.gather(sums), self._add)
        return self._finish(state, sums)


class _ProcessExchange:
    """Copies between processes over a mesh of one device per process (each process's first)."""

    def __init__(self) -> None:
        firsts = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                  for p in range(jax.process_count())]
        self.mesh = jax.sharding.Mesh(np.array(firsts), ("process",))
        self.replicated = NamedSharding(self.mesh, P())
        self._gather = jax.jit(lambda a: a, out_shardings=self.replicated)  # an all-gather: data movement only

    def gather(self, local_tree) -> list:
        """Every process's tree, in process order, on this process's first device."""
        stacked = jax.tree.map(lambda a: jax.make_array_from_single_device_arrays(
            (self.mesh.size,) + a.shape, NamedSharding(self.mesh, P("process")), [a[None]]), local_tree)
        local = jax.tree.map(lambda a: a.addressable_data(0), self._gather(stacked))
        return [jax.tree.map(lambda a: a[p], local) for p in range(self.mesh.size)]

    def to_global(self, tree):
        return jax.tree.map(lambda a: jax.make_array_from_single_device_arrays(np.shape(a), self.replicated, [a]), tree)

    def to_local(self, tree):
        return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) and not a.is_fully_addressable
                            else a, tree)

    def abstract(self, abstract):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), abstract)
