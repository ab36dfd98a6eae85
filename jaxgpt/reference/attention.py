"""The NumPy reference's attention: the book's steps, multi-head attention and its variants."""

from __future__ import annotations

import numpy as np

from jaxgpt.reference.attention_variants import gate_values, sink_softmax
from jaxgpt.reference.layers import keep, linear, linear_backward, rms_norm, rms_norm_backward, softmax, softmax_backward

# --- attention ------------------------------------------------------------------------------------


def alibi_slopes(n_heads):  # -> [n] float64, ALiBi's per-head slopes (Press et al. 2022), written here anew
    """2^(-8k/n) for k = 1..n when n is a power of two; otherwise the slopes of the largest power of
    two below n, then every other slope of twice that, until there are n."""
    def geometric(n):
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    below = 1 << (n_heads.bit_length() - 1)
    slopes = geometric(below) if below == n_heads else geometric(below) + geometric(2 * below)[0::2][: n_heads - below]
    return np.asarray(slopes, np.float64)

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


LAMBDA_INIT = 0.8  # differential attention's λ_init (a constant; jaxgpt.nn.differential)


# --- differential attention (Ye et al. 2024; jaxgpt.nn.differential) --------------------------------------------------------------------------

def diff_lambda(diff):
    e1 = np.exp(np.sum(diff["lambda_q1"] * diff["lambda_k1"]))
    e2 = np.exp(np.sum(diff["lambda_q2"] * diff["lambda_k2"]))
    return e1 - e2 + LAMBDA_INIT, e1, e2


def differential(q, k, v, attend, diff, eps):  # -> [b, n, t, h]; attend(q_half, k_half, v) -> [b, n, t, h]
    """RMSNorm(attend(q1, k1, v) − λ·attend(q2, k2, v)) · (1 − λ_init), halves of each head's q and k."""
    half = q.shape[-1] // 2
    lam = diff_lambda(diff)[0]
    o1, o2 = attend(q[..., :half], k[..., :half], v), attend(q[..., half:], k[..., half:], v)
    return rms_norm(o1 - lam * o2, diff["sub_norm"]["scale"], eps) * (1.0 - LAMBDA_INIT)


def differential_backward(dout, q, k, v, diff, mask, eps):  # plain causal attention -> dq, dk, dv, {diff grads}
    half = q.shape[-1] // 2
    lam, e1, e2 = diff_lambda(diff)
    (q1, q2), (k1, k2) = (q[..., :half], q[..., half:]), (k[..., :half], k[..., half:])
    o1, o2 = attention(q1, k1, v, mask), attention(q2, k2, v, mask)
    ddiff, g_norm = rms_norm_backward(dout * (1.0 - LAMBDA_INIT), o1 - lam * o2, diff["sub_norm"]["scale"], eps)
    dlam = -np.sum(ddiff * o2)
    dq1, dk1, dv1 = attention_backward(ddiff, q1, k1, v, mask)
    dq2, dk2, dv2 = attention_backward(-lam * ddiff, q2, k2, v, mask)
    grads = {"lambda_q1": dlam * e1 * diff["lambda_k1"], "lambda_k1": dlam * e1 * diff["lambda_q1"],
             "lambda_q2": -dlam * e2 * diff["lambda_k2"], "lambda_k2": -dlam * e2 * diff["lambda_q2"],
             "sub_norm": g_norm}
    return np.concatenate([dq1, dq2], -1), np.concatenate([dk1, dk2], -1), dv1 + dv2, grads


def _split_heads(a, n_heads):  # [b, t, d] -> [b, n, t, h]
    b, t, d = a.shape
    return a.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def _merge_heads(a):  # [b, n, t, h] -> [b, t, d]
    b, n, t, h = a.shape
    return a.transpose(0, 2, 1, 3).reshape(b, t, n * h)


def llama3_inv_freq(inv_freq, scaling):  # [h/2] -> [h/2]; scaling = (factor, low, high, original context)
    factor, low, high, original = scaling
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope(x, pos, base, scaling=None, inverse=False):  # [b, n, t, h], [b, t] -> [b, n, t, h]
    """Rotate pairs (x[i], x[i + h/2]) by position × frequency i; `inverse` rotates back, which is
    also rope's backward (a rotation's transpose is its inverse)."""
    h = x.shape[-1]
    freq = base ** (-np.arange(0, h, 2) / h)  # [h/2]
    if scaling is not None:
        freq = llama3_inv_freq(freq, scaling)
    angle = pos[:, None, :, None] * freq * (-1.0 if inverse else 1.0)  # [b, 1, t, h/2]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)], -1)


def rope_backward(dout, pos, base, scaling=None):  # dout [b, n, t, h] -> dx
    return rope(dout, pos, base, scaling, inverse=True)


def attention_variant(q, k, v, q_pos, k_pos, window=None, slopes=None, scale=None, record=keep, sinks=None):
    """[b, n, t, h], [b, m, s, h] x2, [b, t], [b, s] -> [b, n, t, h]: grouped heads (query head i
    reads kv head i // (n/m)), causal by position, optional window, ALiBi slopes [n], a score
    scale other than 1/sqrt(h) and sink logits [n]. Records "scores" (scaled, before bias and
    mask) and "weights"."""
    n, m = q.shape[1], k.shape[1]
    k, v = np.repeat(k, n // m, axis=1), np.repeat(v, n // m, axis=1)  # [b, n, s, h]
    delta = q_pos[:, None, :, None] - k_pos[:, None, None, :]  # [b, 1, t, s]
    visible = delta >= 0
    if window is not None:
        visible &= delta < window
    scores = q @ np.swapaxes(k, -1, -2) * (1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)  # [b, n, t, s]
    scores = record("scores", scores)
    if slopes is not None:
        scores = scores - np.asarray(slopes, np.float64)[None, :, None, None] * delta
    scores = np.where(visible, scores, -np.inf)
    return record("weights", softmax(scores) if sinks is None else sink_softmax(scores, sinks)) @ v


def _split_qkv(qkv, n, m):  # [b, t, (n + 2m) h] -> q [b, n, t, h], k, v [b, m, t, h]
    h = qkv.shape[-1] // (n + 2 * m)
    return (_split_heads(qkv[..., : n * h], n), _split_heads(qkv[..., n * h:(n + m) * h], m),
            _split_heads(qkv[..., (n + m) * h:], m))


def _rope_halves(x, pos, base, scaling):  # differential attention: each half of a head rotated on its own
    half = x.shape[-1] // 2
    return np.concatenate([rope(x[..., :half], pos, base, scaling), rope(x[..., half:], pos, base, scaling)], -1)


def _softmax_core(q, k, v, c_proj, n_heads, position, rope_base, window, scale=None, rope_scaling=None, record=keep,
                  gate=None, sinks=None, diff=None, norm_eps=1e-6):
    """q, k, v -> [b, t, d]; records q, k, v as they enter the scores (not for differential attention,
    whose two maps have no single "scores"). `gate` [b, n, t, h] multiplies each head's output."""
    b, t = q.shape[0], q.shape[2]
    pos = np.broadcast_to(np.arange(t), (b, t))
    if position == "rope":
        turn = rope if diff is None else _rope_halves
        q, k = turn(q, pos, rope_base, rope_scaling), turn(k, pos, rope_base, rope_scaling)
    slopes = alibi_slopes(n_heads) if position == "alibi" else None
    if diff is None:
        q, k, v = record("q", q), record("k", k), record("v", v)
        context = attention_variant(q, k, v, pos, pos, window, slopes, scale, record, sinks)
    else:
        attend = lambda qh, kh, vh: attention_variant(qh, kh, vh, pos, pos, window, slopes, None, keep, sinks)  # noqa: E731
        context = differential(q, k, v, attend, diff, norm_eps)
    if gate is not None:
        context = context * gate
    return linear(record("context", _merge_heads(context)), **c_proj)


def mha(x, c_attn, c_proj, n_heads, n_kv_heads=None, position="learned", rope_base=10000.0, window=None,
        q_norm=None, k_norm=None, norm_eps=1e-6, qk_unit_offset=False, query_scale=None, rope_scaling=None,
        c_gate=None, sinks=None, diff=None, record=keep):
    """[b, t, d] -> [b, t, d]. The defaults are GPT-2's attention; the keywords select the variants:
    grouped heads, positions, windows, today's families' QK-norm (RMSNorm over each head's q
    and k before RoPE), score scale and Llama 3's RoPE scaling, and the arena's output gate
    (`c_gate`), sink logits (`sinks`) and differential attention (`diff`: its λ vectors and norm)."""
    qkv = record("c_attn", linear(x, **c_attn))  # [b, t, (n + 2m) h]
    q, k, v = _split_qkv(qkv, n_heads, n_kv_heads or n_heads)
    if q_norm is not None:
        q = rms_norm(q, **q_norm, eps=norm_eps, unit_offset=qk_unit_offset)
        k = rms_norm(k, **k_norm, eps=norm_eps, unit_offset=qk_unit_offset)
    gate = None if c_gate is None else gate_values(x, c_gate, n_heads)
    return _softmax_core(q, k, v, c_proj, n_heads, position, rope_base, window, query_scale, rope_scaling, record,
                         gate=gate, sinks=sinks, diff=diff, norm_eps=norm_eps)


def latent_attention(x, c_q, c_kv_down, c_k_up, c_v_up, c_proj, n_heads, n_kv_heads=None, position="learned",
                     rope_base=10000.0, window=None, record=keep):
    """Multi-head latent attention: k, v expanded from the latent x·W_down [b, t, r]."""
    m = n_kv_heads or n_heads
    latent = record("c_kv_down", linear(x, **c_kv_down))  # [b, t, r]
    q = _split_heads(record("c_q", linear(x, **c_q)), n_heads)
    k, v = _split_heads(linear(latent, **c_k_up), m), _split_heads(linear(latent, **c_v_up), m)
    return _softmax_core(q, k, v, c_proj, n_heads, position, rope_base, window, record=record)


def linear_attention(x, c_attn, c_proj, n_heads, n_kv_heads=None, record=keep, **unused):
    """Causal linear attention in its recurrent form, one token at a time (φ = elu + 1)."""
    n = n_heads
    q, k, v = _split_qkv(record("c_attn", linear(x, **c_attn)), n, n_kv_heads or n)
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
