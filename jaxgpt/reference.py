"""A pure-NumPy float64 reference of every layer and of the whole GPT forward pass.

In the style of picoGPT: one small function per operation, parameters as plain dicts, a shape
comment where shapes change. It takes the very same parameter pytree as `jaxgpt.model.GPT`
(converted with `to_numpy`), so any JAX result can be checked against it.
Dropout is not modelled: the reference is the deterministic (evaluation) forward pass.
"""

from __future__ import annotations

import numpy as np

from .config import GPTConfig


def to_numpy(tree, dtype=np.float64):
    """A nested dict of arrays (e.g. Flax params) as NumPy arrays of `dtype`."""
    if isinstance(tree, dict):
        return {k: to_numpy(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype=dtype)


def gelu(x):  # tanh approximation, as GPT-2 and the book
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def layer_norm(x, scale, bias, eps=1e-5):  # [..., d] -> [..., d]
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)  # biased variance, as torch and Flax
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def linear(x, kernel, bias=None):  # [..., d_in], [d_in, d_out] -> [..., d_out]
    y = x @ kernel
    return y if bias is None else y + bias


def embedding(ids, table):  # [b, t], [v, d] -> [b, t, d]
    return table[ids]


def simplified_self_attention(x):  # [t, d] -> [t, t], [t, t], [t, d]
    scores = x @ x.T
    weights = softmax(scores)
    return scores, weights, weights @ x


def causal_mask(t):  # -> [t, t] bool, True where attending is allowed
    return np.tril(np.ones((t, t), dtype=bool))


def attention(q, k, v, mask):  # [b, n, t, h], [b, n, s, h], [b, n, s, h], [t, s] -> [b, n, t, h]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # [b, n, t, s]
    scores = np.where(mask, scores, -np.inf)
    return softmax(scores) @ v


def mha(x, c_attn, c_proj, n_heads):  # [b, t, d] -> [b, t, d]
    b, t, d = x.shape
    qkv = linear(x, **c_attn)  # [b, t, 3d]
    q, k, v = np.split(qkv, 3, axis=-1)  # 3 x [b, t, d]
    heads = lambda a: a.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)  # noqa: E731  [b, n, t, h]
    out = attention(heads(q), heads(k), heads(v), causal_mask(t))  # [b, n, t, h]
    out = out.transpose(0, 2, 1, 3).reshape(b, t, d)  # [b, t, d]
    return linear(out, **c_proj)


def mlp(x, c_fc, c_proj):  # [b, t, d] -> [b, t, d]
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # via [b, t, 4d]


def transformer_block(x, ln_1, attn, ln_2, mlp_params, n_heads, eps):  # [b, t, d] -> [b, t, d]
    x = x + mha(layer_norm(x, **ln_1, eps=eps), **attn, n_heads=n_heads)
    x = x + mlp(layer_norm(x, **ln_2, eps=eps), **mlp_params)
    return x


def gpt_forward(params, ids, config: GPTConfig):  # {"params": …}, [b, t] -> [b, t, v]
    p = params["params"] if "params" in params else params
    ids = np.asarray(ids)
    t = ids.shape[1]
    if t > config.context_length:
        raise ValueError(f"input of {t} tokens exceeds context_length {config.context_length}")
    x = embedding(ids, p["wte"]["embedding"]) + p["wpe"]["embedding"][:t]  # [b, t, d]
    for i in range(config.n_layers):
        blk = p[f"h_{i}"]
        x = transformer_block(x, blk["ln_1"], blk["attn"], blk["ln_2"], blk["mlp"], config.n_heads, config.ln_eps)
    x = layer_norm(x, **p["ln_f"], eps=config.ln_eps)
    head = p["wte"]["embedding"].T if config.tie_embeddings else p["lm_head"]["kernel"]  # [d, v]
    return x @ head  # [b, t, v]


def cross_entropy(logits, targets, ignore_index=-100):  # [b, t, v], [b, t] -> scalar
    logp = logits - np.max(logits, axis=-1, keepdims=True)
    logp = logp - np.log(np.sum(np.exp(logp), axis=-1, keepdims=True))
    valid = targets != ignore_index
    nll = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return np.sum(nll * valid) / max(int(np.sum(valid)), 1)
