"""Memory-efficient attention written from scratch: tiles of queries and keys with an online softmax.

The naive backend forms all t × s scores at once: memory quadratic in length. Here queries are
processed a block at a time (`lax.map`, sequential) and, for each, keys a block at a time
(`lax.scan`), keeping only a running maximum m, running sum l and running output per query
(Milakov & Gimelshein 2018; Rabe & Staats 2021; FlashAttention, Dao et al. 2022). A tile whose keys
are all invisible to its queries (the future, or outside the window) is skipped by `lax.cond`.
Peak memory is one (b, n, block_q, block_k) tile plus the inputs and outputs: linear in length.

The backward pass is a custom VJP that keeps only the output and the per-query log-sum-exp from the
forward pass and recomputes each tile's probabilities, so it never materialises the t × s matrix
either. Visibility and ALiBi biases are recomputed per tile from positions (see `jaxgpt.nn.attention`).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from jaxgpt.nn.attention_backends import naive_attention

Array = jax.Array
NEG = -1e30  # a finite "minus infinity": fully masked rows stay NaN-free
FAR = 2**30  # position given to padding keys (never visible) and queries


def _pad_to(x: Array, multiple: int, axis: int, value) -> Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def accumulation_dtype(x: Array):
    """The dtype scores, softmax and sums are computed in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _tile_scores(q_bnqh, k_bnkh, qpos_bq, kpos_bk, slopes_n, window, scale):
    """Scores (b, n, q, k) of one tile with ALiBi bias, and its visibility (b, 1, q, k)."""
    acc = accumulation_dtype(q_bnqh)
    s_bnqk = jnp.einsum("bnqh,bnkh->bnqk", q_bnqh, k_bnkh).astype(acc) * scale
    delta_bqk = qpos_bq[:, :, None] - kpos_bk[:, None, :]
    if slopes_n is not None:
        s_bnqk = s_bnqk - slopes_n[None, :, None, None].astype(acc) * delta_bqk[:, None].astype(acc)
    visible = delta_bqk >= 0
    if window is not None:
        visible = visible & (delta_bqk < window)
    return s_bnqk, visible[:, None]


def _tile_needed(qpos_bq, kpos_bk, window):
    """Whether any key of the tile can be visible to any of its queries (else the tile is skipped)."""
    needed = jnp.min(kpos_bk) <= jnp.max(qpos_bq)
    if window is not None:
        needed = needed & (jnp.max(kpos_bk) > jnp.min(qpos_bq) - window)
    return needed


def _forward(q, k, v, qpos, kpos, slopes, sinks, window, block_q, block_k):
    """q (b, n, T, h), k/v (b, n, S, h), padded to whole blocks -> out (b, n, T, h), lse (b, n, T).
    A head's sink logit starts its running maximum and sum: one more softmax entry, with no value."""
    b, n, t, h = q.shape
    acc = accumulation_dtype(q)
    scale = 1.0 / jnp.sqrt(jnp.asarray(h, acc))
    k_blocks = k.reshape(b, n, -1, block_k, h).transpose(2, 0, 1, 3, 4)  # (nk, b, n, block_k, h)
    v_blocks = v.reshape(b, n, -1, block_k, h).transpose(2, 0, 1, 3, 4)
    kpos_blocks = kpos.reshape(b, -1, block_k).transpose(1, 0, 2)  # (nk, b, block_k)

    def one_query_block(args):
        q_bnqh, qpos_bq = args

        def step(carry, kv):
            k_bnkh, v_bnkh, kpos_bk = kv

            def update(carry):
                m_bnq, l_bnq, acc_bnqh = carry
                s_bnqk, vis = _tile_scores(q_bnqh, k_bnkh, qpos_bq, kpos_bk, slopes, window, scale)
                s_bnqk = jnp.where(vis, s_bnqk, NEG)
                m_new = jnp.maximum(m_bnq, jnp.max(s_bnqk, axis=-1))
                p_bnqk = jnp.exp(s_bnqk - m_new[..., None]) * vis
                correction = jnp.exp(m_bnq - m_new)
                l_new = l_bnq * correction + jnp.sum(p_bnqk, axis=-1)
                acc_new = acc_bnqh * correction[..., None] + jnp.einsum(
                    "bnqk,bnkh->bnqh", p_bnqk, v_bnkh.astype(acc))
                return m_new, l_new, acc_new

            return jax.lax.cond(_tile_needed(qpos_bq, kpos_bk, window), update, lambda c: c, carry), None

        if sinks is None:
            m0, l0 = jnp.full((b, n, block_q), NEG, acc), jnp.zeros((b, n, block_q), acc)
        else:
            m0, l0 = jnp.broadcast_to(sinks[None, :, None].astype(acc), (b, n, block_q)), jnp.ones((b, n, block_q), acc)
        init = (m0, l0, jnp.zeros((b, n, block_q, h), acc))
        (m_bnq, l_bnq, acc_bnqh), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, kpos_blocks))
        seen = l_bnq > 0
        out_bnqh = jnp.where(seen[..., None], acc_bnqh / jnp.where(seen, l_bnq, 1.0)[..., None], 0.0)
        lse_bnq = jnp.where(seen, m_bnq + jnp.log(jnp.where(seen, l_bnq, 1.0)), jnp.inf)  # exp(s - inf) = 0
        return out_bnqh, lse_bnq

    q_blocks = q.reshape(b, n, -1, block_q, h).transpose(2, 0, 1, 3, 4)
    qpos_blocks = qpos.reshape(b, -1, block_q).transpose(1, 0, 2)
    out, lse = jax.lax.map(one_query_block, (q_blocks, qpos_blocks))  # (nq, b, n, block_q, ·)
    return out.transpose(1, 2, 0, 3, 4).reshape(b, n, t, h), lse.transpose(1, 2, 0, 3).reshape(b, n, t)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, qpos, kpos, slopes, sinks, window, block_q, block_k):
    return _forward(q, k, v, qpos, kpos, slopes, sinks, window, block_q, block_k)[0].astype(q.dtype)


def _attention_fwd(q, k, v, qpos, kpos, slopes, sinks, window, block_q, block_k):
    out, lse = _forward(q, k, v, qpos, kpos, slopes, sinks, window, block_q, block_k)
    return out.astype(q.dtype), (q, k, v, qpos, kpos, slopes, sinks, out, lse)


def _attention_bwd(window, block_q, block_k, residuals, dout):
    """Recompute each needed tile's probabilities from the saved log-sum-exp (FlashAttention's
    backward): dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP - rowsum(dO ∘ O)), dQ += dS·K, dK += dSᵀ·Q.
    A sink (value zero, so dP = 0 there) gets d sink = -Σ_t P_sink ∘ rowsum(dO ∘ O)."""
    q, k, v, qpos, kpos, slopes, sinks, out, lse = residuals
    b, n, t, h = q.shape
    s_len = k.shape[2]
    acc = accumulation_dtype(q)
    scale = 1.0 / jnp.sqrt(jnp.asarray(h, acc))
    dout = dout.astype(acc)
    delta_bnt = jnp.sum(dout * out, axis=-1)
    nk = s_len // block_k

    def one_query_block(carry, args):
        dk, dv = carry  # (b, n, S, h) accumulators in `acc`
        q_bnqh, qpos_bq, do_bnqh, lse_bnq, delta_bnq = args

        def step(inner, j):
            dq_bnqh, dk, dv = inner
            start = j * block_k
            k_bnkh = jax.lax.dynamic_slice_in_dim(k, start, block_k, axis=2)
            v_bnkh = jax.lax.dynamic_slice_in_dim(v, start, block_k, axis=2)
            kpos_bk = jax.lax.dynamic_slice_in_dim(kpos, start, block_k, axis=1)

            def update(inner):
                dq_bnqh, dk, dv = inner
                s_bnqk, vis = _tile_scores(q_bnqh, k_bnkh, qpos_bq, kpos_bk, slopes, window, scale)
                p_bnqk = jnp.exp(jnp.where(vis, s_bnqk, NEG) - lse_bnq[..., None]) * vis
                dv_blk = jnp.einsum("bnqk,bnqh->bnkh", p_bnqk, do_bnqh)
                dp_bnqk = jnp.einsum("bnqh,bnkh->bnqk", do_bnqh, v_bnkh.astype(acc))
                ds_bnqk = p_bnqk * (dp_bnqk - delta_bnq[..., None]) * scale
                dq_bnqh = dq_bnqh + jnp.einsum("bnqk,bnkh->bnqh", ds_bnqk, k_bnkh.astype(acc))
                dk_blk = jnp.einsum("bnqk,bnqh->bnkh", ds_bnqk, q_bnqh.astype(acc))
                add = lambda total, blk: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                    total, jax.lax.dynamic_slice_in_dim(total, start, block_k, axis=2) + blk, start, axis=2)
                return dq_bnqh, add(dk, dk_blk), add(dv, dv_blk)

            return jax.lax.cond(_tile_needed(qpos_bq, kpos_bk, window), update, lambda x: x, inner), None

        (dq_bnqh, dk, dv), _ = jax.lax.scan(step, (jnp.zeros_like(do_bnqh), dk, dv), jnp.arange(nk))
        return (dk, dv), dq_bnqh

    split = lambda x: x.reshape(b, n, -1, block_q, *x.shape[3:]).swapaxes(0, 2).swapaxes(1, 2)  # noqa: E731
    qpos_blocks = qpos.reshape(b, -1, block_q).transpose(1, 0, 2)
    zeros = jnp.zeros((b, n, s_len, h), acc)
    (dk, dv), dq_blocks = jax.lax.scan(
        one_query_block, (zeros, zeros),
        (split(q), qpos_blocks, split(dout), split(lse[..., None])[..., 0], split(delta_bnt[..., None])[..., 0]))
    dq = dq_blocks.swapaxes(1, 2).swapaxes(0, 2).reshape(b, n, t, h)
    dsinks = None
    if sinks is not None:
        p_sink_bnt = jnp.exp(sinks[None, :, None].astype(acc) - lse)
        dsinks = (-jnp.sum(p_sink_bnt * delta_bnt, axis=(0, 2))).astype(sinks.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, dsinks


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q_btnh: Array, k_bsmh: Array, v_bsmh: Array, *, q_pos_bt: Array, k_pos_bs: Array,
                        mask_bts: Optional[Array] = None, window: Optional[int] = None,
                        slopes_n: Optional[Array] = None, sinks_n: Optional[Array] = None, dropout=None,
                        block_q: int = 64, block_k: int = 64) -> Array:
    """Same contract as `jaxgpt.nn.attention_backends.naive_attention`, in O(length) memory.

    An explicit `mask_bts` only comes from cached decoding (a few queries against the cache, whose
    score rows are already linear in length): that case is handed to the naive backend.
    """
    if dropout is not None:
        raise ValueError("the 'blockwise' attention backend has no attention dropout; use 'naive' or 'auto'")
    if mask_bts is not None:
        return naive_attention(q_btnh, k_bsmh, v_bsmh, q_pos_bt=q_pos_bt, k_pos_bs=k_pos_bs, mask_bts=mask_bts,
                               window=window, slopes_n=slopes_n, sinks_n=sinks_n)
    b, t, n, h = q_btnh.shape
    s_len, m = k_bsmh.shape[1], k_bsmh.shape[2]
    block_q, block_k = min(block_q, t), min(block_k, s_len)
    # grouped-query: repeat each key/value head for its g query heads (linear memory; its VJP sums them)
    k_bnsh = jnp.repeat(k_bsmh, n // m, axis=2).transpose(0, 2, 1, 3)
    v_bnsh = jnp.repeat(v_bsmh, n // m, axis=2).transpose(0, 2, 1, 3)
    q_bnth = q_btnh.transpose(0, 2, 1, 3)
    q_bnth, qpos = _pad_to(q_bnth, block_q, 2, 0), _pad_to(q_pos_bt.astype(jnp.int32), block_q, 1, -FAR)
    k_bnsh, v_bnsh = _pad_to(k_bnsh, block_k, 2, 0), _pad_to(v_bnsh, block_k, 2, 0)
    kpos = _pad_to(k_pos_bs.astype(jnp.int32), block_k, 1, FAR)
    slopes = None if slopes_n is None else jnp.asarray(slopes_n, accumulation_dtype(q_btnh))
    sinks = None if sinks_n is None else jnp.asarray(sinks_n, accumulation_dtype(q_btnh))
    out_bnth = _attention(q_bnth, k_bnsh, v_bnsh, qpos, kpos, slopes, sinks, window, block_q, block_k)
    return out_bnth[:, :, :t].transpose(0, 2, 1, 3)
