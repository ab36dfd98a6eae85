"""Sharded training with `jax.jit` over a device mesh: data, FSDP and expert parallelism, one or many hosts.

The mesh has three named axes, `data`, `fsdp` and `expert`. The batch is split over all of them
(FSDP and expert parallelism are data parallel too); parameters and optimizer state are split
over `fsdp` by a small rule table (parameter path pattern -> PartitionSpec) and replicated over
`data`; a mixture of experts' expert weights are split over `expert` (each expert on one shard),
and its layers move tokens to them with all-to-all (`jaxgpt.nn.moe`, which finds the mesh through
`jax.set_mesh`). XLA (GSPMD) inserts the all-gathers and reduce-scatters. The step is
`train_step.make_train_step` unchanged: the same pure function the pmap path wraps.

Multi-host: every process runs the same program; `jax.distributed.initialize` connects them, the
mesh spans all processes' devices, and each process feeds only its rows of every global batch
(`ShardedTrainer.local_rows`), assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import re
from typing import Optional

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt import xla_tuning
from jaxgpt.config import resolve_dtype
from jaxgpt.nn.model import GPT
from jaxgpt.train.metrics import compiled_flops
from jaxgpt.train.optimizer import model_params
from jaxgpt.train.step import make_eval_step, make_train_step

MESH_AXES = ("data", "fsdp", "expert")
BATCH_AXES = MESH_AXES  # the batch dimension is split over every device

# Parameter path (keys joined by "/", matched at the end) -> how to split it over `fsdp`.
# Matrices are split along their larger "model" dimension; vectors (biases, LayerNorm) are small
# and replicated. The same rules apply to the optimizer state, whose moment trees mirror the params.
SHARDING_RULES: list[tuple[str, P]] = [
    (r"(wte|wpe)/embedding$", P("fsdp", None)),  # (V or T, d): rows
    (r"lm_head/kernel$", P(None, "fsdp")),  # (d, V): vocabulary
    (r"attn/c_attn/kernel$", P(None, "fsdp")),  # (d, 3d)
    (r"mlp/(c_fc|c_gate)/kernel$", P(None, "fsdp")),  # (d, f): the up and gate projections
    (r"(attn|mlp)/c_proj/kernel$", P("fsdp", None)),  # (d or 4d, d)
    (r"experts/(c_fc|c_gate)/kernel$", P("expert", None, "fsdp")),  # (E, d, f): experts, then as c_fc
    (r"experts/c_proj/kernel$", P("expert", "fsdp", None)),  # (E, f, d)
    (r"shared/(c_fc|c_gate)/kernel$", P(None, "fsdp")),  # the shared experts' MLP, as the dense one
    (r"shared/c_proj/kernel$", P("fsdp", None)),
    (r".*", P()),  # everything else: replicated
]


class MeshError(ValueError):
    """A mesh description does not fit the devices or the model."""


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,fsdp=2" -> {"data": 2, "fsdp": 2, "expert": 1}; a missing axis is 1; `-1` means "the rest"."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise MeshError(f"mesh entry {part!r} must look like axis=size (axes: {MESH_AXES})")
        name, value = part.split("=", 1)
        if name not in sizes:
            raise MeshError(f"unknown mesh axis {name!r}; axes: {MESH_AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name}: size {value!r} is not an integer") from None
    n = jax.device_count()
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise MeshError("only one mesh axis may be -1")
    if rest:
        known = int(np.prod([v for v in sizes.values() if v != -1]))
        sizes[rest[0]] = n // known
    if any(v <= 0 for v in sizes.values()) or int(np.prod(list(sizes.values()))) != n:
        raise MeshError(f"mesh {spec!r} = {sizes} needs {int(np.prod(list(sizes.values())))} devices; JAX sees {n}")
    return sizes


def build_mesh(spec: str) -> jax.sharding.Mesh:
    sizes = parse_mesh(spec)
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def path_str(path) -> str:
    """A pytree key path as a/b/0 (dict keys, sequence indices, attribute names)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh) -> P:
    """The first matching rule's spec, or replicated when the split dimension does not divide."""
    for pattern, spec in SHARDING_RULES:
        if re.search(pattern, path):
            if re.search(r"(^|/)h/", path) and len(shape) == len(spec) + 1:  # scan_layers: leading layer axis
                spec = P(None, *spec)
            if len(spec) != len(shape):
                return P()
            # an axis that does not divide its dimension leaves that dimension whole
            return P(*(axis if axis is None or dim % mesh.shape[axis] == 0 else None
                       for dim, axis in zip(shape, spec)))
    return P()


def tree_shardings(tree, mesh):
    """NamedShardings for every leaf of a (params or train state) pytree, by the rule table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_str(path), np.shape(leaf), mesh)), tree)


class ShardedTrainer:
    """The train step jitted over a mesh; the same interface as `train_step.ParallelTrainer`."""

    def __init__(self, model: GPT, tx: optax.GradientTransformation, mesh, micro_batches: int,
                 abstract_state) -> None:
        experts, expert_shards = model.config.moe_experts, mesh.shape.get("expert", 1)
        if experts is not None and experts % expert_shards:
            raise MeshError(f"the mesh's expert axis has {expert_shards} devices but the model has {experts} experts "
                            "per MoE layer: the axis must divide them (each expert lives on one shard)")
        self.mesh = mesh
        self.micro_batches = micro_batches
        self.scan_layers = model.config.scan_layers
        self.n_devices = mesh.size
        self.state_sharding = tree_shardings(abstract_state, mesh)
        self.batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES, None))  # (M, B/M, T)
        self.eval_batch_sharding = NamedSharding(mesh, P(BATCH_AXES, None))  # (B, T)
        replicated = NamedSharding(mesh, P())
        compute_dtype = resolve_dtype(model.config)  # picks the XLA options (jaxgpt.xla_tuning)
        self.step = xla_tuning.jit(
            make_train_step(model, tx), compute_dtype=compute_dtype, in_shardings=(self.state_sharding, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, replicated), donate_argnums=0,
        )
        param_sharding = self.state_sharding["params"]
        self._eval = xla_tuning.jit(make_eval_step(model), compute_dtype=compute_dtype, in_shardings=(param_sharding, self.eval_batch_sharding,
                                                                 self.eval_batch_sharding), out_shardings=replicated)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % (self.micro_batches * self.n_devices):
            raise MeshError(f"batch_size {batch_size} must be divisible by micro_batches × mesh devices "
                            f"= {self.micro_batches} × {self.n_devices}")

    def abstract_state(self, abstract):
        """`abstract` with each leaf's target sharding (what Orbax restores onto)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            self.state_sharding)

    def put_state(self, state):
        return jax.device_put(state, self.state_sharding)

    def get_state(self, state):
        return state  # Orbax saves sharded arrays as they are, from every process

    def params(self, state):
        return model_params(state)

    def local_rows(self, batch_size: int) -> np.ndarray:
        """Rows of the global batch that this process feeds: its slice of each micro-batch."""
        micro = batch_size // self.micro_batches
        per_process = micro // jax.process_count()
        start = jax.process_index() * per_process
        return np.concatenate([np.arange(m * micro + start, m * micro + start + per_process)
                               for m in range(self.micro_batches)])

    def local_eval_rows(self, batch_size: int) -> slice:
        per_process = batch_size // jax.process_count()
        return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

    def _global(self, local: np.ndarray, sharding, global_shape) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def _global_batch(self, x_local: np.ndarray, y_local: np.ndarray):
        rows, t = x_local.shape
        shape = (self.micro_batches, rows * jax.process_count() // self.micro_batches, t)
        local_shape = (self.micro_batches, rows // self.micro_batches, t)
        return (self._global(x_local.reshape(local_shape), self.batch_sharding, shape),
                self._global(y_local.reshape(local_shape), self.batch_sharding, shape))

    def step_flops(self, state, x_local: np.ndarray, y_local: np.ndarray) -> Optional[float]:
        """FLOPs of one step, from the compiled SPMD program's cost analysis (one device's share ×
        the devices)."""
        if self.micro_batches > 1 or self.scan_layers:  # a loop (over micro-batches, over layers): XLA's cost
            return None  # analysis counts its body once
        with jax.set_mesh(self.mesh):
            flops = compiled_flops(self.step, state, *self._global_batch(x_local, y_local))
        return None if flops is None else flops * self.n_devices

    def __call__(self, state, x_local: np.ndarray, y_local: np.ndarray):
        """One step from this process's rows (`local_rows` order); returns (state, metrics)."""
        x, y = self._global_batch(x_local, y_local)
        with jax.set_mesh(self.mesh):  # the mesh an MoE layer splits its experts over (jaxgpt.nn.moe)
            return self.step(state, x, y)

    def eval_step(self, params, x_local: np.ndarray, y_local: np.ndarray):
        rows, t = x_local.shape
        shape = (rows * jax.process_count(), t)
        with jax.set_mesh(self.mesh):
            return self._eval(params, self._global(x_local, self.eval_batch_sharding, shape),
                              self._global(y_local, self.eval_batch_sharding, shape))


def initialize_distributed(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> None:
    """`jax.distributed.initialize` from flags, else from the environment JAX itself reads.

    With no flags, JAX's own detection applies (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID); on a plain machine with none of these it does nothing.
    On CPU, the gloo collectives are selected so several processes can talk over TCP.
    """
    import os

    if coordinator is None and num_processes is None and process_id is None:
        if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID")
                or os.environ.get("TPU_WORKER_HOSTNAMES")):
            return
        jax.distributed.initialize()
        return
    if None in (coordinator, num_processes, process_id):
        raise MeshError("--coordinator, --num-processes and --process-id go together")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by the CPU backend only
    jax.distributed.initialize(coordinator, num_processes, process_id)
