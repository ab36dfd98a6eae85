"""The NumPy reference of the mixture-of-experts layer (`jaxgpt.nn.moe`): routing, capacity,
dispatch, the experts' MLPs, the router losses, forward and hand-written backward.

Written the plain way on purpose: a loop over the tokens' choices for the capacity slots, a loop
over the experts for their MLPs, so that it checks the JAX layer's sorting, grouped matmuls and
scatter/gather rather than repeating them. Tokens are rows x (N, d); `params` is the layer's tree
(router/kernel, router/balance_bias, experts/{c_gate, c_fc, c_proj}/kernel, shared/…).
"""

from __future__ import annotations

import math

import numpy as np

from jaxgpt.reference.layers import mlp, mlp_backward, softmax, softmax_backward


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def route(x, params, top_k, router="softmax", renormalize=True):
    """(gates (N, k), experts (N, k), probs (N, E), logits (N, E)): the top-k by logits (softmax) or
    by score + bias (sigmoid), ties to the lower expert index; probs is what the balancing loss averages."""
    logits = x @ params["router"]["kernel"]  # [N, E]
    if router == "softmax":
        probs = softmax(logits)
        chosen_by, gate_source = logits, probs
    else:
        scores = sigmoid(logits)
        probs = scores / scores.sum(-1, keepdims=True)
        chosen_by, gate_source = scores + params["router"]["balance_bias"], scores
    experts = np.argsort(-chosen_by, axis=-1, kind="stable")[:, :top_k]  # [N, k], descending, ties: lower index
    gates = np.take_along_axis(gate_source, experts, axis=-1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdims=True)
    return gates, experts, probs, logits


def capacity_slots(experts, n_experts, capacity):
    """(slot (N, k), keep (N, k)): first choices of all tokens, then second choices, each in token order."""
    n, k = experts.shape
    slot, seen = np.zeros((n, k), dtype=np.int64), np.zeros(n_experts, dtype=np.int64)
    for j in range(k):
        for i in range(n):
            slot[i, j] = seen[experts[i, j]]
            seen[experts[i, j]] += 1
    return slot, slot < capacity


def capacity_of(n_tokens, top_k, n_experts, factor):
    return n_tokens if factor is None else max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


def _expert(params, e):  # expert e's weights as a dense MLP's
    return {name: {"kernel": params["experts"][name]["kernel"][e]} for name in params["experts"]}


def moe(x, params, top_k, kind="swiglu", router="softmax", renormalize=True, capacity_factor=None):
    """x (N, d) -> (y (N, d), stats {aux_loss, z_loss, counts (E,), dropped})."""
    n_experts = params["router"]["kernel"].shape[1]
    gates, experts, probs, logits = route(x, params, top_k, router, renormalize)
    keep = capacity_slots(experts, n_experts, capacity_of(len(x), top_k, n_experts, capacity_factor))[1]
    y = np.zeros_like(x)
    for e in range(n_experts):
        rows, slots = np.nonzero((experts == e) & keep)
        if len(rows):
            y[rows] += gates[rows, slots][:, None] * mlp(x[rows], **_expert(params, e), kind=kind)
    if "shared" in params:
        y = y + mlp(x, **params["shared"], kind=kind)
    counts = np.bincount(experts.reshape(-1), minlength=n_experts)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    stats = {"aux_loss": n_experts * np.sum(counts / len(x) * probs.mean(0)), "z_loss": np.mean(lse**2),
             "counts": counts, "dropped": int(np.sum(~keep))}
    return y, stats


def _normalise_backward(dout, values):  # out = values / Σ values (last axis) -> d values
    total = values.sum(-1, keepdims=True)
    out = values / total
    return (dout - np.sum(dout * out, -1, keepdims=True)) / total


def moe_backward(dy, x, params, top_k, kind="swiglu", router="softmax", renormalize=True, capacity_factor=None,
                 aux_coef=0.0, z_coef=0.0):
    """Gradients of Σ dy·y + aux_coef · aux_loss + z_coef · z_loss: (dx (N, d), grads in `params`' tree).

    The choice of experts and the capacity drops are piecewise constant (no gradient); the gates,
    the experts, the router probabilities inside the losses and the logits inside the z-loss carry it."""
    n, n_experts = len(x), params["router"]["kernel"].shape[1]
    gates, experts, probs, logits = route(x, params, top_k, router, renormalize)
    keep = capacity_slots(experts, n_experts, capacity_of(n, top_k, n_experts, capacity_factor))[1]
    dx = np.zeros_like(x)
    dgates = np.zeros_like(gates)  # [N, k]
    expert_grads = {name: np.zeros_like(w["kernel"]) for name, w in params["experts"].items()}
    for e in range(n_experts):
        rows, slots = np.nonzero((experts == e) & keep)
        if not len(rows):
            continue
        dgates[rows, slots] = np.sum(dy[rows] * mlp(x[rows], **_expert(params, e), kind=kind), -1)
        dx_e, g_e = mlp_backward(gates[rows, slots][:, None] * dy[rows], x[rows], **_expert(params, e), kind=kind)
        np.add.at(dx, rows, dx_e)
        for name in expert_grads:
            expert_grads[name][e] = g_e[name]["kernel"]
    grads = {"experts": {name: {"kernel": g} for name, g in expert_grads.items()}}
    if "shared" in params:
        dx_shared, grads["shared"] = mlp_backward(dy, x, **params["shared"], kind=kind)
        dx += dx_shared

    raw = np.take_along_axis(probs if router == "softmax" else sigmoid(logits), experts, -1)  # gates before renorm
    draw = _normalise_backward(dgates, raw) if renormalize else dgates
    dsource = np.zeros_like(logits)  # d of what the gates are taken from: probs (softmax) or scores (sigmoid)
    np.add.at(dsource, (np.arange(n)[:, None], experts), draw)
    counts = np.bincount(experts.reshape(-1), minlength=n_experts)
    dprobs = np.broadcast_to(aux_coef * n_experts * counts / n / n, probs.shape)  # aux = E Σ_e f_e · mean_n p_ne
    if router == "softmax":
        dlogits = softmax_backward(dsource + dprobs, probs)
    else:
        scores = sigmoid(logits)
        dscores = dsource + _normalise_backward(dprobs, scores)
        dlogits = dscores * scores * (1.0 - scores)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) + logits.max(-1, keepdims=True)
    dlogits = dlogits + z_coef * 2.0 * lse * softmax(logits) / n  # z = mean_n lse_n²
    dx += dlogits @ params["router"]["kernel"].T
    grads["router"] = {"kernel": x.T @ dlogits}
    if "balance_bias" in params["router"]:
        grads["router"]["balance_bias"] = np.zeros(n_experts)  # moved by the train step, not by gradients
    return dx, grads

