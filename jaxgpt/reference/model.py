"""The NumPy reference's block and whole model: forward, the loss, and the hand-written backward."""

from __future__ import annotations

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.registry import attention_kind
from jaxgpt.reference.attention import mha, mha_backward
from jaxgpt.reference.moe import moe
from jaxgpt.reference.layers import (
    embedding, embedding_backward, keep, layer_norm, layer_norm_backward, linear_backward, mlp,
    mlp_backward, rms_norm, softcap, softmax,
)

# --- MLP and block ----------------------------------------------------------------------------------

def norm(x, params, eps, kind="layernorm", unit_offset=False):  # [..., d] -> [..., d], `GPTConfig.norm`
    if kind == "rmsnorm":
        return rms_norm(x, params["scale"], eps, unit_offset)
    return layer_norm(x, **params, eps=eps)


def transformer_block(x, ln_1, attn, ln_2, mlp_params, n_heads, eps, attend=None, norm_kind="layernorm",
                      unit_offset=False, mlp_kind="gelu", ln_post_attn=None, ln_post_mlp=None, moe_options=None,
                      record=keep):
    """[b, t, d] -> [b, t, d]: x + attn(norm(x)), then x + mlp(norm(x)); each branch normalised
    again when its post-norm is given (Gemma 3). `attend(h, attn, record)` is the block's attention
    (its kind's reference; default GPT-2's). With `moe_options` (top_k, router, renormalize)
    the MLP is a mixture of experts (`jaxgpt.reference.moe`), run as evaluation does: dropless.
    `record(op, value)` sees the norms' outputs, each branch ("attn", "mlp") and its insides
    ("attn.q", "mlp.c_fc", …) and the block's output ("residual"); see `jaxgpt.reference.layers.keep`."""
    nrm = lambda name, y, params: record(name, norm(y, params, eps, norm_kind, unit_offset))  # noqa: E731
    inside = lambda branch_name: lambda op, value: record(f"{branch_name}.{op}", value)  # noqa: E731
    attend = attend or (lambda h, p, rec: mha(h, **p, n_heads=n_heads, record=rec))
    branch = record("attn", attend(nrm("ln_1", x, ln_1), attn, inside("attn")))
    x = x + (branch if ln_post_attn is None else nrm("ln_post_attn", branch, ln_post_attn))
    h = nrm("ln_2", x, ln_2)
    if moe_options is None:
        branch = mlp(h, **mlp_params, kind=mlp_kind, record=inside("mlp"))
    else:
        branch = moe(h.reshape(-1, h.shape[-1]), mlp_params, kind=mlp_kind, **moe_options)[0].reshape(h.shape)
    branch = record("mlp", branch)
    return record("residual", x + (branch if ln_post_mlp is None else nrm("ln_post_mlp", branch, ln_post_mlp)))


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


def _layer_options(config: GPTConfig, i: int) -> dict:
    """The keyword options of block i's `transformer_block` call."""
    kind = attention_kind(config.attention)
    options = dict(attend=lambda h, attn, rec: kind.reference(h, attn, config, i, rec), norm_kind=config.norm,
                   unit_offset=config.norm_unit_offset, mlp_kind=config.mlp)
    if config.is_moe_layer(i):
        options["moe_options"] = dict(top_k=config.moe_top_k, router=config.moe_router,
                                      renormalize=config.moe_renormalize)
    return options


def per_block(p):  # {"h": leaves [L, …]} (a scan_layers model) -> {"h_0": …, …, "h_{L-1}": …}; else as is
    if "h" not in p:
        return p
    stacked = p["h"]
    n_layers = len(next(iter(_leaves(stacked))))
    blocks = {f"h_{i}": _map(lambda a, i=i: a[i], stacked) for i in range(n_layers)}
    return {**{k: v for k, v in p.items() if k != "h"}, **blocks}


def _leaves(tree):
    return [leaf for v in tree.values() for leaf in (_leaves(v) if isinstance(v, dict) else [v])]


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def gpt_forward(params, ids, config: GPTConfig, record=None):  # {"params": …}, [b, t] -> [b, t, v]
    """The logits of the whole model. `record(layer, op, value)` (layer None outside the blocks)
    sees every intermediate: "embed", each block's (`transformer_block`), "ln_f", "logits"."""
    record = record or (lambda layer, op, value: value)
    p = per_block(params["params"] if "params" in params else params)
    ids = np.asarray(ids)
    t = ids.shape[1]
    if t > config.context_length:
        raise ValueError(f"input of {t} tokens exceeds context_length {config.context_length}")
    x = embedding(ids, p["wte"]["embedding"])  # [b, t, d]
    if config.emb_scale:
        x = x * np.sqrt(config.emb_dim)
    if config.position == "learned":
        x = x + p["wpe"]["embedding"][:t]
    x = record(None, "embed", x)
    for i in range(config.n_layers):
        blk = p[f"h_{i}"]
        x = transformer_block(x, *_block_params(blk), config.n_heads, config.ln_eps, ln_post_attn=blk.get("ln_post_attn"),
                              ln_post_mlp=blk.get("ln_post_mlp"), record=lambda op, v, i=i: record(i, op, v),
                              **_layer_options(config, i))
    x = record(None, "ln_f", norm(x, p["ln_f"], config.ln_eps, config.norm, config.norm_unit_offset))
    head = p["wte"]["embedding"].T if config.tie_embeddings else p["lm_head"]["kernel"]  # [d, v]
    logits = x @ head  # [b, t, v]
    return record(None, "logits", logits if config.logit_softcap is None else softcap(logits, config.logit_softcap))


def cross_entropy(logits, targets, ignore_index=-100):  # [b, t, v], [b, t] -> scalar
    logp = logits - np.max(logits, axis=-1, keepdims=True)
    logp = logp - np.log(np.sum(np.exp(logp), axis=-1, keepdims=True))
    valid = targets != ignore_index
    nll = -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return np.sum(nll * valid) / max(int(np.sum(valid)), 1)


def cross_entropy_backward(logits, targets, ignore_index=-100):  # -> dlogits [b, t, v]
    valid = targets != ignore_index
    dlogits = softmax(logits)
    np.subtract.at(dlogits, (*np.indices(targets.shape), np.where(valid, targets, 0)), 1.0)  # softmax - onehot
    return dlogits * valid[..., None] / max(int(np.sum(valid)), 1)


def gpt_loss_and_grads(params, ids, targets, config: GPTConfig, ignore_index=-100):
    """(mean cross-entropy, gradients in the same tree as `params`) by the hand-written backward.

    The backward covers GPT-2's architecture (the attention variants and today's families have
    forward references of the whole model and backward references of their pieces: RMSNorm, gated
    MLPs, soft-capping, RoPE)."""
    default = GPTConfig()
    variant_fields = ("n_kv_heads", "position", "sliding_window", "attention", "norm", "post_norms", "mlp",
                      "mlp_bias", "attn_out_bias", "head_size", "qk_norm", "query_scale", "emb_scale", "logit_softcap",
                      "moe_experts")
    changed = [f for f in variant_fields if getattr(config, f) != getattr(default, f)]
    if changed:
        raise NotImplementedError(f"the hand-written backward of the whole model covers GPT-2 only; {changed} differ")
    p = per_block(params["params"] if "params" in params else params)
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
