"""A pure-NumPy float64 reference of every layer: forward, hand-written backward, and AdamW.

In the style of picoGPT: one small function per operation, parameters as plain dicts, a shape
comment where shapes change. It takes the very same parameter pytree as `jaxgpt.model.GPT`
(converted with `to_numpy`), so any JAX result can be checked against it.

Each forward function `f(x, …)` has its backward `f_backward(dout, x, …)` beside it: it takes the
upstream gradient and the forward's *inputs* (recomputing what it needs rather than caching), and
returns the gradients of the inputs and parameters. `gpt_loss_and_grads` chains them into the
gradient of the whole model; `adamw_step` is the optimizer step that `jaxgpt.optim` builds in Optax.
Dropout is not modelled: the reference is the deterministic pass.
"""

from __future__ import annotations

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.layout import unstack_layers
from jaxgpt.nn.positions import alibi_slopes  # a table of constants (the slopes), shared with the model

GELU_C = np.sqrt(2.0 / np.pi)


def to_numpy(tree, dtype=np.float64):
    """A nested dict of arrays (e.g. Flax params) as NumPy arrays of `dtype`."""
    if isinstance(tree, dict):
        return {k: to_numpy(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype=dtype)


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


# --- attention ------------------------------------------------------------------------------------

def simplified_self_attention(x):  # [t, d] -> [t, t], [t, t], [t, d]
    scores = x @ x.T
    weights = softmax(scores)
    return scores, weights, weights @ x


def causal_mask(t):  # -> [t, t] bool, True where attending is allowed
    return np.tril(np.ones((t, t), dtype=bool))


def attention_weights(q, k, mask):  # [b, n, t, h], [b, n, s, h], [t, s] -> [b, n, t, s]
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    return softmax(np.where(mask, scores, -np.inf))


def attention(q, k, v, mask):  # [b, n, t, h], [b, n, s, h], [b, n, s, h], [t, s] -> [b, n, t, h]
    return attention_weights(q, k, mask) @ v


def attention_backward(dout, q, k, v, mask):  # dout [b, n, t, h] -> dq, dk, dv
    w = attention_weights(q, k, mask)  # [b, n, t, s]
    dv = np.swapaxes(w, -1, -2) @ dout  # [b, n, s, h]
    dscores = softmax_backward(dout @ np.swapaxes(v, -1, -2), w) / np.sqrt(q.shape[-1])  # [b, n, t, s]
    return dscores @ k, np.swapaxes(dscores, -1, -2) @ q, dv


def _split_heads(a, n_heads):  # [b, t, d] -> [b, n, t, h]
    b, t, d = a.shape
    return a.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def _merge_heads(a):  # [b, n, t, h] -> [b, t, d]
    b, n, t, h = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, n * h)


def rope(x, pos, base):  # [b, n, t, h], [b, t] -> [b, n, t, h]: rotate pairs (x[i], x[i + h/2])
    h = x.shape[-1]
    freq = base ** (-np.arange(0, h, 2) / h)  # [h/2]
    angle = pos[:, None, :, None] * freq  # [b, 1, t, h/2]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)], -1)


def attention_variant(q, k, v, q_pos, k_pos, window=None, slopes=None):
    """[b, n, t, h], [b, m, s, h] x2, [b, t], [b, s] -> [b, n, t, h]: grouped heads (query head i
    reads kv head i // (n/m)), causal by position, optional window and ALiBi slopes [n]."""
    n, m = q.shape[1], k.shape[1]
    k, v = np.repeat(k, n // m, axis=1), np.repeat(v, n // m, axis=1)  # [b, n, s, h]
    delta = q_pos[:, None, :, None] - k_pos[:, None, None, :]  # [b, 1, t, s]
    visible = delta >= 0
    if window is not None:
        visible &= delta < window
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # [b, n, t, s]
    if slopes is not None:
        scores = scores - np.asarray(slopes, np.float64)[None, :, None, None] * delta
    return softmax(np.where(visible, scores, -np.inf)) @ v


def _split_qkv(qkv, n, m):  # [b, t, (n + 2m) h] -> q [b, n, t, h], k, v [b, m, t, h]
    h = qkv.shape[-1] // (n + 2 * m)
    return (_split_heads(qkv[..., : n * h], n), _split_heads(qkv[..., n * h:(n + m) * h], m),
            _split_heads(qkv[..., (n + m) * h:], m))


def _softmax_core(q, k, v, c_proj, n_heads, position, rope_base, window):  # q, k, v -> [b, t, d]
    b, t = q.shape[0], q.shape[2]
    pos = np.broadcast_to(np.arange(t), (b, t))
    if position == "rope":
        q, k = rope(q, pos, rope_base), rope(k, pos, rope_base)
    slopes = alibi_slopes(n_heads) if position == "alibi" else None
    return linear(_merge_heads(attention_variant(q, k, v, pos, pos, window, slopes)), **c_proj)


def mha(x, c_attn, c_proj, n_heads, n_kv_heads=None, position="learned", rope_base=10000.0, window=None):
    """[b, t, d] -> [b, t, d]. The defaults are GPT-2's attention; the keywords select the variants."""
    q, k, v = _split_qkv(linear(x, **c_attn), n_heads, n_kv_heads or n_heads)  # from [b, t, (n + 2m) h]
    return _softmax_core(q, k, v, c_proj, n_heads, position, rope_base, window)


def latent_attention(x, c_q, c_kv_down, c_k_up, c_v_up, c_proj, n_heads, n_kv_heads=None, position="learned",
                     rope_base=10000.0, window=None):
    """Multi-head latent attention: k, v expanded from the latent x·W_down [b, t, r]."""
    m = n_kv_heads or n_heads
    latent = linear(x, **c_kv_down)  # [b, t, r]
    q = _split_heads(linear(x, **c_q), n_heads)
    k, v = _split_heads(linear(latent, **c_k_up), m), _split_heads(linear(latent, **c_v_up), m)
    return _softmax_core(q, k, v, c_proj, n_heads, position, rope_base, window)


def linear_attention(x, c_attn, c_proj, n_heads, n_kv_heads=None, **unused):
    """Causal linear attention in its recurrent form, one token at a time (φ = elu + 1)."""
    n = n_heads
    q, k, v = _split_qkv(linear(x, **c_attn), n, n_kv_heads or n)
    k, v = np.repeat(k, n // k.shape[1], axis=1), np.repeat(v, n // v.shape[1], axis=1)  # [b, n, t, h]
    phi = lambda a: np.where(a > 0, a + 1.0, np.exp(a))  # noqa: E731  elu(a) + 1
    state = np.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]))  # [b, n, h, h]
    norm = np.zeros(q.shape[:2] + (q.shape[-1],))  # [b, n, h]
    out = np.zeros_like(q)
    for i in range(q.shape[2]):
        state = state + phi(k[:, :, i])[..., :, None] * v[:, :, i][..., None, :]
        norm = norm + phi(k[:, :, i])
        out[:, :, i] = np.einsum("bnh,bnhe->bne", phi(q[:, :, i]), state) / np.einsum("bnh,bnh->bn", phi(q[:, :, i]), norm)[..., None]
    return linear(_merge_heads(out), **c_proj)


ATTENTION = {"softmax": mha, "mla": latent_attention, "linear": linear_attention}


def mha_backward(dout, x, c_attn, c_proj, n_heads):  # dout [b, t, d] -> dx [b, t, d], {c_attn, c_proj}
    mask = causal_mask(x.shape[1])
    qkv = linear(x, **c_attn)  # [b, t, 3d]
    q, k, v = (_split_heads(a, n_heads) for a in np.split(qkv, 3, axis=-1))  # [b, n, t, h]
    out = _merge_heads(attention(q, k, v, mask))  # [b, t, d]
    dout_heads, g_proj = linear_backward(dout, out, c_proj["kernel"], "bias" in c_proj)
    dq, dk, dv = attention_backward(_split_heads(dout_heads, n_heads), q, k, v, mask)
    dqkv = np.concatenate([_merge_heads(a) for a in (dq, dk, dv)], axis=-1)  # [b, t, 3d]
    dx, g_attn = linear_backward(dqkv, x, c_attn["kernel"], "bias" in c_attn)
    return dx, {"c_attn": g_attn, "c_proj": g_proj}


# --- MLP and block ----------------------------------------------------------------------------------

def mlp(x, c_fc, c_proj):  # [b, t, d] -> [b, t, d]
    return linear(gelu(linear(x, **c_fc)), **c_proj)  # via [b, t, 4d]


def mlp_backward(dout, x, c_fc, c_proj):  # dout [b, t, d] -> dx, {c_fc, c_proj}
    hidden = linear(x, **c_fc)  # [b, t, 4d]
    dact, g_proj = linear_backward(dout, gelu(hidden), c_proj["kernel"], "bias" in c_proj)
    dx, g_fc = linear_backward(gelu_backward(dact, hidden), x, c_fc["kernel"], "bias" in c_fc)
    return dx, {"c_fc": g_fc, "c_proj": g_proj}


def transformer_block(x, ln_1, attn, ln_2, mlp_params, n_heads, eps, attention="softmax", **variant):  # [b, t, d] -> [b, t, d]
    x = x + ATTENTION[attention](layer_norm(x, **ln_1, eps=eps), **attn, n_heads=n_heads, **variant)
    x = x + mlp(layer_norm(x, **ln_2, eps=eps), **mlp_params)
    return x


def transformer_block_backward(dout, x, ln_1, attn, ln_2, mlp_params, n_heads, eps):  # -> dx, grads
    h1 = layer_norm(x, **ln_1, eps=eps)
    x_mid = x + mha(h1, **attn, n_heads=n_heads)  # the input of the MLP branch
    h2 = layer_norm(x_mid, **ln_2, eps=eps)
    dh2, g_mlp = mlp_backward(dout, h2, **mlp_params)
    dx_mid, g_ln_2 = layer_norm_backward(dh2, x_mid, ln_2["scale"], eps)
    dx_mid = dx_mid + dout  # residual
    dh1, g_attn = mha_backward(dx_mid, h1, **attn, n_heads=n_heads)
    dx, g_ln_1 = layer_norm_backward(dh1, x, ln_1["scale"], eps)
    return dx + dx_mid, {"ln_1": g_ln_1, "attn": g_attn, "ln_2": g_ln_2, "mlp": g_mlp}


# --- the whole model and the loss ------------------------------------------------------------------

def _block_params(blk):
    return blk["ln_1"], blk["attn"], blk["ln_2"], blk["mlp"]


def gpt_forward(params, ids, config: GPTConfig):  # {"params": …}, [b, t] -> [b, t, v]
    params = unstack_layers(params)  # a scan_layers model's stacked blocks, one tree per block
    p = params["params"] if "params" in params else params
    ids = np.asarray(ids)
    t = ids.shape[1]
    if t > config.context_length:
        raise ValueError(f"input of {t} tokens exceeds context_length {config.context_length}")
    x = embedding(ids, p["wte"]["embedding"])  # [b, t, d]
    if config.position == "learned":
        x = x + p["wpe"]["embedding"][:t]
    for i in range(config.n_layers):
        variant = dict(n_kv_heads=config.n_kv_heads, position=config.position, rope_base=config.rope_base,
                       window=config.layer_window(i))
        x = transformer_block(x, *_block_params(p[f"h_{i}"]), config.n_heads, config.ln_eps,
                              attention=config.attention, **variant)
    x = layer_norm(x, **p["ln_f"], eps=config.ln_eps)
    head = p["wte"]["embedding"].T if config.tie_embeddings else p["lm_head"]["kernel"]  # [d, v]
    return x @ head  # [b, t, v]


def cross_entropy(logits, targets, ignore_index=-100):  # [b, t, v], [b, t] -> scalar
    logp = logits - np.max(logits, axis=-1, keepdims=True)
    logp = logp - np.log(np.sum(np.exp(logp), axis=-1, keepdims=True))
    valid = targets != ignore_index
    nll = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return np.sum(nll * valid) / max(int(np.sum(valid)), 1)


def cross_entropy_backward(logits, targets, ignore_index=-100):  # -> dlogits [b, t, v]
    valid = targets != ignore_index
    dlogits = softmax(logits)
    dlogits[..., :] -= np.eye(logits.shape[-1])[np.where(valid, targets, 0)]  # softmax - onehot
    return dlogits * valid[..., None] / max(int(np.sum(valid)), 1)


def gpt_loss_and_grads(params, ids, targets, config: GPTConfig, ignore_index=-100):
    """(mean cross-entropy, gradients in the same tree as `params`) by the hand-written backward.

    The backward covers GPT-2's architecture (the attention variants have forward references only;
    their gradients are checked against finite differences of those)."""
    default = GPTConfig()
    if any(getattr(config, f) != getattr(default, f) for f in ("n_kv_heads", "position", "sliding_window", "attention")):
        raise NotImplementedError("the hand-written backward covers GPT-2's attention only (no variants)")
    params = unstack_layers(params)  # a scan_layers model's stacked blocks, one tree per block
    p = params["params"] if "params" in params else params
    ids, targets = np.asarray(ids), np.asarray(targets)
    t, eps = ids.shape[1], config.ln_eps
    x = embedding(ids, p["wte"]["embedding"]) + p["wpe"]["embedding"][:t]  # [b, t, d]
    block_inputs = []
    for i in range(config.n_layers):
        block_inputs.append(x)
        x = transformer_block(x, *_block_params(p[f"h_{i}"]), config.n_heads, eps)
    h = layer_norm(x, **p["ln_f"], eps=eps)  # [b, t, d]
    head = p["wte"]["embedding"].T if config.tie_embeddings else p["lm_head"]["kernel"]  # [d, v]
    logits = h @ head  # [b, t, v]
    loss = cross_entropy(logits, targets, ignore_index)

    grads = {}
    dlogits = cross_entropy_backward(logits, targets, ignore_index)
    dh, g_head = linear_backward(dlogits, h, head, has_bias=False)
    dwte = g_head["kernel"].T if config.tie_embeddings else 0.0  # the tied head's share, [v, d]
    if not config.tie_embeddings:
        grads["lm_head"] = g_head
    dx, grads["ln_f"] = layer_norm_backward(dh, x, p["ln_f"]["scale"], eps)
    for i in reversed(range(config.n_layers)):
        dx, grads[f"h_{i}"] = transformer_block_backward(
            dx, block_inputs[i], *_block_params(p[f"h_{i}"]), config.n_heads, eps)
    grads["wte"] = {"embedding": dwte + embedding_backward(dx, ids, config.vocab_size)}
    dwpe = np.zeros_like(p["wpe"]["embedding"])
    dwpe[:t] = dx.sum(axis=0)
    grads["wpe"] = {"embedding": dwpe}
    return loss, ({"params": grads} if "params" in params else grads)


# --- the optimizer -----------------------------------------------------------------------------------

def tree_map(fn, *trees, path=()):
    """fn(path, *leaves) over nested dicts of arrays (path: the tuple of keys)."""
    if isinstance(trees[0], dict):
        return {k: tree_map(fn, *(t[k] for t in trees), path=path + (k,)) for k in trees[0]}
    return fn(path, *trees)


def tree_leaves(tree) -> list:
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in tree_leaves(tree[k])]
    return [tree]


def decays(path, decay_embeddings=False) -> bool:
    """The weight-decay mask of `jaxgpt.optim.decay_mask`: kernels, and embeddings if asked."""
    return decay_embeddings if "embedding" in path else path[-1] == "kernel"


def adamw_init(params):
    zeros = lambda path, p: np.zeros_like(p)  # noqa: E731
    return {"step": 0, "mu": tree_map(zeros, params), "nu": tree_map(zeros, params)}


def adamw_step(params, grads, state, lr, *, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
               grad_clip=1.0, decay_embeddings=False):
    """One step of `jaxgpt.optim.build_optimizer` as Optax computes it: clip by global norm,
    bias-corrected Adam moments, decoupled weight decay on the masked parameters, all times `lr`
    (the schedule's value at this step). Returns (params, state)."""
    if grad_clip > 0:
        norm = np.sqrt(sum(np.sum(g**2) for g in tree_leaves(grads)))
        factor = min(1.0, grad_clip / norm) if norm > 0 else 1.0
        grads = tree_map(lambda _, g: g * factor, grads)
    t = state["step"] + 1
    mu = tree_map(lambda _, m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
    nu = tree_map(lambda _, v, g: b2 * v + (1 - b2) * g**2, state["nu"], grads)

    def update(path, p, m, v):
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if decays(path, decay_embeddings):
            u = u + weight_decay * p
        return p - lr * u

    return tree_map(update, params, mu, nu), {"step": t, "mu": mu, "nu": nu}
