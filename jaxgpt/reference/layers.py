"""The NumPy reference's elementwise, normalisation, linear and embedding layers, forward and backward."""

from __future__ import annotations

import numpy as np

GELU_C = np.sqrt(2.0 / np.pi)


def to_numpy(tree, dtype=np.float64):
    """A nested dict of arrays (e.g. Flax params) as NumPy arrays of `dtype`."""
    if isinstance(tree, dict):
        return {k: to_numpy(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype=dtype)


def keep(op, value):
    """The default `record` of the forward functions that take one: they call `record(op, value)` on
    each named intermediate and go on with what it returns (`jaxgpt.numerics` records them, or swaps
    in a JAX model's own values to measure each operation on its own)."""
    return value


# --- elementwise and normalisation --------------------------------------------------------------

def gelu(x):  # tanh approximation, as GPT-2 and the book
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x**3)))


def gelu_backward(dout, x):  # d/dx of the tanh approximation
    u = GELU_C * (x + 0.044715 * x**3)
    t = np.tanh(u)
    du = GELU_C * (1.0 + 3 * 0.044715 * x**2)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du)


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def softmax_backward(dout, y, axis=-1):  # y = softmax(x); masked entries (y = 0) get 0
    return y * (dout - np.sum(dout * y, axis=axis, keepdims=True))


def layer_norm(x, scale, bias, eps=1e-5):  # [..., d] -> [..., d]
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)  # biased variance, as torch and Flax
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def layer_norm_backward(dout, x, scale, eps=1e-5):  # [..., d] -> dx [..., d], dscale [d], dbias [d]
    d = x.shape[-1]
    rstd = 1.0 / np.sqrt(np.var(x, axis=-1, keepdims=True) + eps)
    xhat = (x - np.mean(x, axis=-1, keepdims=True)) * rstd
    lead = tuple(range(x.ndim - 1))
    dscale, dbias = np.sum(dout * xhat, axis=lead), np.sum(dout, axis=lead)
    dxhat = dout * scale
    dx = rstd / d * (d * dxhat - np.sum(dxhat, -1, keepdims=True) - xhat * np.sum(dxhat * xhat, -1, keepdims=True))
    return dx, {"scale": dscale, "bias": dbias}


# --- linear, embedding ----------------------------------------------------------------------------

def linear(x, kernel, bias=None):  # [..., d_in], [d_in, d_out] -> [..., d_out]
    y = x @ kernel
    return y if bias is None else y + bias


def linear_backward(dout, x, kernel, has_bias):  # dout [..., d_out] -> dx [..., d_in], {kernel, bias}
    x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])  # [n, d_in], [n, d_out]
    grads = {"kernel": x2.T @ d2}
    if has_bias:
        grads["bias"] = d2.sum(axis=0)
    return dout @ kernel.T, grads


def embedding(ids, table):  # [b, t], [v, d] -> [b, t, d]
    return table[ids]


def embedding_backward(dout, ids, vocab_size):  # [b, t, d] -> [v, d], scatter-add of rows
    dtable = np.zeros((vocab_size, dout.shape[-1]))
    np.add.at(dtable, ids.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    return dtable


# --- today's families: RMSNorm, gated and squared activations, soft-capping -------------------------

def rms_norm(x, scale, eps=1e-6, unit_offset=False):  # [..., d] -> [..., d]; Gemma multiplies by (1 + scale)
    gain = 1.0 + scale if unit_offset else scale
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * gain


def rms_norm_backward(dout, x, scale, eps=1e-6, unit_offset=False):  # -> dx [..., d], {"scale": [d]}
    d = x.shape[-1]
    rstd = 1.0 / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    gain = 1.0 + scale if unit_offset else scale
    dxhat = dout * gain
    dx = rstd * (dxhat - xhat * np.sum(dxhat * xhat, axis=-1, keepdims=True) / d)
    return dx, {"scale": np.sum(dout * xhat, axis=tuple(range(x.ndim - 1)))}


def silu(x):
    return x / (1.0 + np.exp(-x))


def silu_backward(dout, x):
    s = 1.0 / (1.0 + np.exp(-x))
    return dout * s * (1.0 + x * (1.0 - s))


def relu2(x):  # relu(x)² (modded-nanogpt)
    return np.maximum(x, 0.0) ** 2


def relu2_backward(dout, x):
    return dout * 2.0 * np.maximum(x, 0.0)


# `GPTConfig.mlp` -> (activation, its backward, gated?)
ACTIVATIONS = {"gelu": (gelu, gelu_backward, False), "swiglu": (silu, silu_backward, True),
               "geglu": (gelu, gelu_backward, True), "relu2": (relu2, relu2_backward, False)}


# --- the position-wise MLP --------------------------------------------------------------------------

def mlp(x, c_fc, c_proj, c_gate=None, kind="gelu", record=keep):  # [b, t, d] -> [b, t, d] via [b, t, f]
    act = ACTIVATIONS[kind][0]
    up = record("c_fc", linear(x, **c_fc))
    hidden = act(record("c_gate", linear(x, **c_gate))) * up if c_gate is not None else act(up)
    return linear(hidden, **c_proj)


def mlp_backward(dout, x, c_fc, c_proj, c_gate=None, kind="gelu"):  # dout [b, t, d] -> dx, {c_fc, c_proj[, c_gate]}
    act, act_backward, _ = ACTIVATIONS[kind]
    up = linear(x, **c_fc)  # [b, t, f]
    if c_gate is None:
        dact, g_proj = linear_backward(dout, act(up), c_proj["kernel"], "bias" in c_proj)
        dx, g_fc = linear_backward(act_backward(dact, up), x, c_fc["kernel"], "bias" in c_fc)
        return dx, {"c_fc": g_fc, "c_proj": g_proj}
    gate = linear(x, **c_gate)  # [b, t, f]
    dhidden, g_proj = linear_backward(dout, act(gate) * up, c_proj["kernel"], "bias" in c_proj)
    dx_up, g_fc = linear_backward(dhidden * act(gate), x, c_fc["kernel"], "bias" in c_fc)
    dx_gate, g_gate = linear_backward(act_backward(dhidden * up, gate), x, c_gate["kernel"], "bias" in c_gate)
    return dx_up + dx_gate, {"c_fc": g_fc, "c_gate": g_gate, "c_proj": g_proj}


def softcap(x, cap):  # cap · tanh(x / cap): logits bounded by ±cap
    return cap * np.tanh(x / cap)


def softcap_backward(dout, x, cap):
    return dout * (1.0 - np.tanh(x / cap) ** 2)
