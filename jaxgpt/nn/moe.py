"""The mixture-of-experts feed-forward layer (docs/moe.md): a router sends each token to `top_k` of
`n_experts` expert MLPs and adds their outputs, weighted by its gates.

Routers (`GPTConfig.moe_router`):
- "softmax" (Mixtral, Qwen3-MoE): p = softmax(x·W_r); the k largest logits choose the experts, the
  gates are their p (divided by their sum with `renormalize`);
- "sigmoid" (DeepSeek-V3): s = sigmoid(x·W_r); the experts are the k largest s + b, where b is a
  per-expert bias that no gradient touches (`balance_bias`): the train step nudges it towards an
  even load (`update_balance_bias`, auxiliary-loss-free balancing); the gates are s (renormalised).
Ties between experts go to the lower index (`lax.top_k`, as the NumPy reference's stable sort).

Dispatch:
- dropless (default): the N·k (token, expert) assignments are sorted by expert and every expert's
  rows multiplied in one grouped matmul (`jax.lax.ragged_dot`, or tiles on CPU: `grouped_matmul`);
  nothing is dropped;
- capacity (`moe_capacity_factor`, training only): each expert takes at most
  C = ceil(factor · N · k / E) assignments, first choices of all tokens before second choices, each
  in token order (Switch Transformer, GShard); the rest are dropped (their token keeps only the
  residual) and counted. Evaluation and decoding are always dropless, so a row's output never
  depends on the other rows of its batch.
- with an `expert` axis in the current mesh (`jaxgpt.train.sharding`), experts are split over it and
  tokens travel to them with all-to-all (`_expert_parallel`).

Every MoE layer sows, into the "moe" collection, what the loss and the metrics need: the
load-balancing loss (Switch: E · Σ_e f_e · P_e, f_e the share of tokens that chose e, P_e the mean
router probability), the router z-loss (mean logsumexp² of the logits), the tokens per expert
and the dropped assignments. `moe_stats` gathers them from `apply(..., mutable=["moe"])`.

Parameters (under the block's "mlp"): router/kernel (d, E), router/balance_bias (E,) for the
sigmoid router, experts/{c_gate, c_fc, c_proj}/kernel (E, d, f) and (E, f, d), and shared/… — a
dense MLP (`jaxgpt.nn.mlp.MLP`) of width moe_shared_experts · f — with shared experts.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.mlp import ACTIVATIONS, GATED, MLP

Array = jax.Array
EXPERT_AXIS = "expert"  # the mesh axis that splits the experts (jaxgpt.train.sharding)
STAT_NAMES = ("aux_loss", "z_loss", "counts", "dropped")
MOE_PARAM_GROUPS = ("router", "experts")  # the layer's own parameter groups (not `Dense` layers)


# --- routing ------------------------------------------------------------------------------------------

def route(logits_ne: Array, bias_e: Optional[Array], *, top_k: int, router: str, renormalize: bool):
    """(gates_nk, experts_nk, probs_ne): the chosen experts of every token, their gate weights, and
    the router's probabilities over all experts (what the balancing loss averages)."""
    if router == "softmax":
        probs_ne = jax.nn.softmax(logits_ne, axis=-1)
        _, experts_nk = jax.lax.top_k(logits_ne, top_k)  # the same order as the probabilities
        gates_nk = jnp.take_along_axis(probs_ne, experts_nk, axis=-1)
    else:  # sigmoid scores; the bias steers the choice only, never the gates
        scores_ne = jax.nn.sigmoid(logits_ne)
        _, experts_nk = jax.lax.top_k(scores_ne + jax.lax.stop_gradient(bias_e), top_k)
        gates_nk = jnp.take_along_axis(scores_ne, experts_nk, axis=-1)
        probs_ne = scores_ne / jnp.sum(scores_ne, axis=-1, keepdims=True)
    if renormalize:
        gates_nk = gates_nk / jnp.sum(gates_nk, axis=-1, keepdims=True)
    return gates_nk, experts_nk, probs_ne


def router_losses(logits_ne: Array, probs_ne: Array, counts_e: Array, n_tokens, total: Callable = lambda a: a):
    """(load-balancing loss, z-loss). `total` sums over the devices that hold other tokens (a psum
    under expert parallelism), so both are the losses of the whole batch."""
    n_experts = probs_ne.shape[-1]
    share_e = counts_e / n_tokens  # f_e: tokens that chose e (no gradient: a count)
    mean_prob_e = total(jnp.sum(probs_ne, axis=0)) / n_tokens  # P_e
    aux = n_experts * jnp.sum(share_e * mean_prob_e)
    z = total(jnp.sum(jax.nn.logsumexp(logits_ne, axis=-1) ** 2)) / n_tokens
    return aux, z


# --- the expert MLPs ----------------------------------------------------------------------------------

def expert_mlp(x, weights: dict, kind: str, matmul: Callable):
    """The experts' MLP with `matmul(x, kernel)` doing each expert's product (grouped or batched)."""
    act = ACTIVATIONS[kind]
    if kind in GATED:
        hidden = act(matmul(x, weights["c_gate"])) * matmul(x, weights["c_fc"])
    else:
        hidden = act(matmul(x, weights["c_fc"]))
    return matmul(hidden, weights["c_proj"])


TILED_BACKENDS = ("cpu",)  # where `grouped_matmul` multiplies tiles instead of calling ragged_dot
TILED_WEIGHT_BYTES = 256 * 2**20  # ... as long as the tiles' gathered weights stay below this


def grouped_matmul(x_md: Array, w_edf: Array, group_sizes: Array, *, acc=jnp.float32) -> Array:
    """Rows x (M, d) sorted by group, group e's rows times w[e] (d, f) -> (M, f), accumulated in `acc`.

    `jax.lax.ragged_dot` is the op for this, and accelerators have kernels for it. XLA's CPU backend
    lowers it to a dense product with every group's weight, masked (E times the FLOPs: 6.5 ms against
    2.2 ms for the tiled form on 2048 rows, d = f = 128, 8 groups, here; docs/moe.md). So on CPU the
    rows are padded group by group to whole tiles of T rows, every tile multiplied by its group's
    weight (one batched product over the gathered weights), and the rows taken back out: M + E·T
    rows of work. Chosen at run time from the backend JAX reports (`TILED_BACKENDS`).
    """
    m, d = x_md.shape
    n_groups = w_edf.shape[0]
    tile = int(min(64, max(8, 2 ** math.ceil(math.log2(max(1, m // n_groups))))))
    padded_rows = -(-(m + n_groups * (tile - 1)) // tile) * tile
    gathered_bytes = padded_rows // tile * w_edf.shape[1] * w_edf.shape[2] * w_edf.dtype.itemsize
    if jax.default_backend() not in TILED_BACKENDS or gathered_bytes > TILED_WEIGHT_BYTES:
        return jax.lax.ragged_dot(x_md, w_edf, group_sizes, preferred_element_type=acc)
    starts_e = jnp.cumsum(group_sizes) - group_sizes
    padded_e = (group_sizes + tile - 1) // tile * tile
    padded_ends_e = jnp.cumsum(padded_e)
    group_m = jnp.repeat(jnp.arange(n_groups), group_sizes, total_repeat_length=m)  # each row's group
    row_m = padded_ends_e[group_m] - padded_e[group_m] + jnp.arange(m) - starts_e[group_m]  # its padded row
    x_pd = jnp.zeros((padded_rows, d), x_md.dtype).at[row_m].set(x_md, unique_indices=True)
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends_e, jnp.arange(padded_rows // tile) * tile, side="right"),
                             n_groups - 1)  # trailing empty tiles: any group, their rows are 0
    y_tcf = jnp.einsum("tcd,tdf->tcf", x_pd.reshape(-1, tile, d), w_edf[tile_group], preferred_element_type=acc)
    return y_tcf.reshape(padded_rows, -1)[row_m]


def _cast(weights: dict, dtype) -> dict:
    return {name: w.astype(dtype) for name, w in weights.items()}


def dropless(x_nd: Array, gates_nk: Array, experts_nk: Array, weights: dict, kind: str, dtype) -> Array:
    """Σ_k gate · expert(x) for every token, all assignments computed: sort by expert, one grouped
    matmul per projection (`ragged_dot`), unsort. -> (N, d)"""
    n, k = experts_nk.shape
    n_experts = weights["c_fc"].shape[0]
    flat_e = experts_nk.reshape(-1)  # (N·k,) assignment a = token · k + slot
    order = jnp.argsort(flat_e, stable=True)  # assignments grouped by expert
    group_sizes = jnp.bincount(flat_e, length=n_experts).astype(jnp.int32)
    acc = jnp.promote_types(dtype, jnp.float32)
    matmul = lambda x, w: grouped_matmul(x.astype(dtype), w, group_sizes, acc=acc).astype(dtype)  # noqa: E731
    y_sorted = expert_mlp(x_nd[order // k], _cast(weights, dtype), kind, matmul)  # (N·k, d)
    y_nkd = y_sorted[jnp.argsort(order)].reshape(n, k, -1)  # back to assignment order
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(acc), gates_nk.astype(acc))


def capacity_slots(experts_nk: Array, n_experts: int, capacity: int):
    """(slot_nk, keep_nk): each assignment's row in its expert's buffer — first choices of all tokens
    before second choices, each in token order — and whether it fits under `capacity`."""
    onehot_kne = jax.nn.one_hot(experts_nk.T, n_experts, dtype=jnp.int32)  # (k, N, E), slot-major priority
    seen_kne = jnp.cumsum(onehot_kne.reshape(-1, n_experts), axis=0).reshape(onehot_kne.shape) - onehot_kne
    slot_nk = jnp.sum(seen_kne * onehot_kne, axis=-1).T  # assignments to the same expert before this one
    return slot_nk, slot_nk < capacity


def dispatch(x_nd: Array, experts_nk: Array, slot_nk: Array, keep_nk: Array, n_experts: int, capacity: int):
    """The experts' input buffers (E, C, d): row slot of expert e holds its token; empty rows are 0."""
    rows_nk = jnp.where(keep_nk, slot_nk, capacity)  # dropped: out of range, so not written
    buffer = jnp.zeros((n_experts, capacity, x_nd.shape[-1]), x_nd.dtype)
    rows_nkd = jnp.broadcast_to(x_nd[:, None], (*experts_nk.shape, x_nd.shape[-1]))
    return buffer.at[experts_nk, rows_nk].add(rows_nkd, mode="drop")  # kept (expert, row) pairs are distinct


def combine(y_ecd: Array, gates_nk: Array, experts_nk: Array, slot_nk: Array, keep_nk: Array) -> Array:
    """Σ_k gate · (the expert's output row of the assignment), dropped assignments giving 0. -> (N, d)"""
    y_nkd = y_ecd[experts_nk, jnp.minimum(slot_nk, y_ecd.shape[1] - 1)]
    weights_nk = jnp.where(keep_nk, gates_nk, 0).astype(jnp.promote_types(y_ecd.dtype, jnp.float32))
    return jnp.einsum("nkd,nk->nd", y_nkd.astype(weights_nk.dtype), weights_nk)


def batched_matmul(dtype):
    acc = jnp.promote_types(dtype, jnp.float32)
    return lambda x_ecd, w_edf: jnp.einsum("ecd,edf->ecf", x_ecd.astype(dtype), w_edf,  # noqa: E731
                                           preferred_element_type=acc).astype(dtype)


def capacity_of(n_tokens: int, top_k: int, n_experts: int, factor: Optional[float]) -> int:
    """Rows of each expert's buffer: ceil(factor · N · k / E), or N (no token is ever dropped)."""
    if factor is None:
        return n_tokens  # a token picks an expert at most once
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


# --- the layer ----------------------------------------------------------------------------------------

class Router(nn.Module):
    """The router's parameters: kernel (d, E), and the sigmoid router's balancing bias (E,)."""

    n_experts: int
    kind: str = "softmax"

    @nn.compact
    def __call__(self, d: int) -> dict:
        params = {"kernel": self.param("kernel", nn.initializers.normal(0.02), (d, self.n_experts), jnp.float32)}
        if self.kind == "sigmoid":
            params["balance_bias"] = self.param("balance_bias", nn.initializers.zeros_init(), (self.n_experts,),
                                                jnp.float32)
        return params


class ExpertKernel(nn.Module):
    """One projection of all experts: kernel (E, in, out), each expert initialised like a dense kernel."""

    shape: tuple
    std: float

    @nn.compact
    def __call__(self) -> Array:
        return self.param("kernel", nn.initializers.normal(self.std), self.shape, jnp.float32)


class Experts(nn.Module):
    """All experts' weights as {"c_gate"?, "c_fc", "c_proj"} -> (E, d, f), (E, d, f), (E, f, d)."""

    n_experts: int
    hidden: int
    gated: bool
    out_init_std: float

    @nn.compact
    def __call__(self, d: int) -> dict:
        e, f = self.n_experts, self.hidden
        weights = {"c_fc": ExpertKernel((e, d, f), 0.02, name="c_fc")(),
                   "c_proj": ExpertKernel((e, f, d), self.out_init_std, name="c_proj")()}
        if self.gated:
            weights["c_gate"] = ExpertKernel((e, d, f), 0.02, name="c_gate")()
        return weights


def expert_mesh():
    """The current mesh when it splits the experts (an `expert` axis of size > 1), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
        return None
    return mesh


class MoE(nn.Module):
    """The routed MLP: (B, T, d) -> (B, T, d), with the router's statistics sown into "moe"."""

    n_experts: int
    top_k: int
    hidden: int  # one expert's width
    kind: str = "swiglu"  # a key of jaxgpt.nn.mlp.ACTIVATIONS
    router: str = "softmax"
    renormalize: bool = True
    capacity_factor: Optional[float] = None
    shared_hidden: int = 0  # width of the shared experts' MLP (0: none)
    shared_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x_btd: Array, *, deterministic: bool = True) -> Array:
        b, t, d = x_btd.shape
        router_params = Router(self.n_experts, self.router, name="router")(d)
        weights = Experts(self.n_experts, self.hidden, self.kind in GATED, self.out_init_std, name="experts")(d)
        factor = None if deterministic else self.capacity_factor
        if expert_mesh() is not None:
            y_btd, stats = _expert_parallel(self, x_btd, router_params, weights, factor)
        else:
            y_nd, stats = self.tokens(x_btd.reshape(b * t, d), router_params, weights, factor)
            y_btd = y_nd.reshape(b, t, d).astype(self.dtype)
        if not self.is_initializing():  # init returns parameters only
            self.sow("moe", "stats", stats)
        if self.shared_hidden:
            y_btd = y_btd + MLP(self.shared_hidden, self.kind, self.shared_bias, self.dtype, self.out_init_std,
                                name="shared")(x_btd)
        return y_btd

    def tokens(self, x_nd: Array, router_params: dict, weights: dict, factor: Optional[float],
               total: Callable = lambda a: a, exchange: Optional[Callable] = None):
        """The layer on a set of tokens (N, d) -> ((N, d), stats): route, dispatch, the experts, combine.

        `total` sums a statistic over the devices holding the batch's other tokens, and `exchange`
        runs the experts' buffers (E, C, d) through the experts elsewhere (expert parallelism); by
        default both act on this device's tokens alone."""
        n = x_nd.shape[0]
        kernel_de = router_params["kernel"]
        acc = jnp.promote_types(x_nd.dtype, jnp.float32)
        logits_ne = x_nd.astype(acc) @ kernel_de.astype(acc)
        gates_nk, experts_nk, probs_ne = route(logits_ne, router_params.get("balance_bias"), top_k=self.top_k,
                                               router=self.router, renormalize=self.renormalize)
        counts_e = total(jnp.bincount(experts_nk.reshape(-1), length=self.n_experts))
        aux, z = router_losses(logits_ne, probs_ne, counts_e, total(jnp.asarray(n, acc)), total)
        if factor is None and exchange is None:
            y_nd, dropped = dropless(x_nd, gates_nk, experts_nk, weights, self.kind, self.dtype), jnp.zeros((), jnp.int32)
        else:
            capacity = capacity_of(n, self.top_k, self.n_experts, factor)
            slot_nk, keep_nk = capacity_slots(experts_nk, self.n_experts, capacity)
            buffer_ecd = dispatch(x_nd.astype(self.dtype), experts_nk, slot_nk, keep_nk, self.n_experts, capacity)
            run = lambda buf, w: expert_mlp(buf, _cast(w, self.dtype), self.kind, batched_matmul(self.dtype))  # noqa: E731
            y_ecd = run(buffer_ecd, weights) if exchange is None else exchange(run, buffer_ecd, weights)
            y_nd = combine(y_ecd, gates_nk, experts_nk, slot_nk, keep_nk)
            dropped = total(jnp.sum(~keep_nk).astype(jnp.int32))
        stats = {"aux_loss": aux, "z_loss": z, "counts": counts_e.astype(jnp.int32), "dropped": dropped}
        return y_nd, stats


def _expert_parallel(layer: MoE, x_btd: Array, router_params: dict, weights: dict, factor: Optional[float]):
    """The layer with the experts split over the mesh's `expert` axis (GShard-style).

    Every device routes its own tokens (the batch is split over all mesh axes) into per-expert
    buffers (E, C, d); an all-to-all over `expert` hands each device the rows of its E/n experts
    from every peer, which it runs through its experts' weights, and a second all-to-all returns
    them. Without a capacity factor C is the device's token count, so nothing is dropped and the
    result equals the single-device layer's. Statistics are summed over all devices (psum).
    """
    mesh = expert_mesh()
    batch_axes = tuple(mesh.axis_names)
    n_shards = mesh.shape[EXPERT_AXIS]
    if layer.n_experts % n_shards:
        raise ValueError(f"{layer.n_experts} experts cannot be split over an expert axis of {n_shards} devices")
    b, t, d = x_btd.shape

    def exchange(run, buffer_ecd, local_weights):
        e, c, _ = buffer_ecd.shape
        sent = buffer_ecd.reshape(n_shards, e // n_shards, c, d)  # chunk j goes to the device holding experts j
        got = jax.lax.all_to_all(sent, EXPERT_AXIS, 0, 0)  # (source device, E/n, C, d)
        rows = got.transpose(1, 0, 2, 3).reshape(e // n_shards, n_shards * c, d)  # my experts' rows from everyone
        y = run(rows, local_weights).reshape(e // n_shards, n_shards, c, d).transpose(1, 0, 2, 3)
        return jax.lax.all_to_all(y, EXPERT_AXIS, 0, 0).reshape(e, c, d)  # back to the tokens' devices

    def local(x_btd, router_params, weights):
        total = lambda a: jax.lax.psum(a, batch_axes)  # noqa: E731
        y_nd, stats = layer.tokens(x_btd.reshape(-1, d), router_params, weights, factor, total, exchange)
        return y_nd.reshape(x_btd.shape).astype(layer.dtype), stats

    from jax.sharding import PartitionSpec as P

    expert_spec = jax.tree.map(lambda _: P(EXPERT_AXIS), weights)
    router_spec = jax.tree.map(lambda _: P(), router_params)
    stats_spec = {name: P() for name in STAT_NAMES}
    return jax.shard_map(local, mesh=mesh, in_specs=(P(batch_axes), router_spec, expert_spec),
                         out_specs=(P(batch_axes), stats_spec))(x_btd, router_params, weights)


# --- statistics and the balancing bias -----------------------------------------------------------------

def _layer_order(name: str) -> int:
    return int(name[2:]) if name.startswith("h_") and name[2:].isdigit() else -1


def moe_stats(variables: Optional[dict]) -> Optional[dict]:
    """The MoE layers' statistics from `apply(..., mutable=["moe"])`, in layer order and stacked:
    {"aux_loss": (L,), "z_loss": (L,), "counts": (L, E), "dropped": (L,)}; None for a dense model."""
    found = []

    def walk(node):
        if isinstance(node, tuple):
            for item in node:
                walk(item)
        elif isinstance(node, dict) and set(node) == set(STAT_NAMES):
            found.append(node if node["counts"].ndim == 2 else jax.tree.map(lambda a: a[None], node))
        elif isinstance(node, dict):
            for key in sorted(node, key=_layer_order):
                walk(node[key])

    walk((variables or {}).get("moe", {}))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *found) if found else None


def moe_loss(stats: Optional[dict], aux_coef: float, z_coef: float):
    """The routers' share of the training loss: aux_coef · mean load-balancing loss + z_coef · mean z-loss."""
    if stats is None:
        return 0.0
    return aux_coef * jnp.mean(stats["aux_loss"]) + z_coef * jnp.mean(stats["z_loss"])


def update_balance_bias(params: dict, counts_le: Array, rate: float) -> dict:
    """Auxiliary-loss-free balancing (DeepSeek-V3): every MoE layer's router bias moves by `rate`
    towards its under-loaded experts, bias_e += rate · sign(mean load − load_e). `counts_le` is
    `moe_stats(...)["counts"]` (layer order), summed over the whole batch."""
    delta_le = rate * jnp.sign(jnp.mean(counts_le, axis=-1, keepdims=True) - counts_le)
    p = dict(params["params"])
    names = ["h"] if "h" in p else sorted((k for k in p if "router" in p[k].get("mlp", {})), key=_layer_order)
    for j, name in enumerate(names):
        router = p[name]["mlp"]["router"]
        delta = delta_le if name == "h" else delta_le[j]  # scanned layers: one (L, E) leaf
        new_router = {**router, "balance_bias": router["balance_bias"] + delta.astype(router["balance_bias"].dtype)}
        p[name] = {**p[name], "mlp": {**p[name]["mlp"], "router": new_router}}
    return {**params, "params": p}
