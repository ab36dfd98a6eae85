"""The NumPy reference of DPO (Rafailov et al., 2023): sequence log-probabilities and the loss,
forward and hand-written backward.

    loss = −mean log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

`sequence_logprob` sums log p(target) over the positions whose target is not `ignore_index` (the
response tokens); its backward is (one-hot − softmax) · mask · upstream.
"""

from __future__ import annotations

import numpy as np

from jaxgpt.reference.layers import softmax


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def sequence_logprob(logits, targets, ignore_index=-100):  # [b, t, v], [b, t] -> [b]
    logp = logits - np.max(logits, axis=-1, keepdims=True)
    logp = logp - np.log(np.sum(np.exp(logp), axis=-1, keepdims=True))
    valid = targets != ignore_index
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return np.sum(picked * valid, axis=-1)


def sequence_logprob_backward(dout, logits, targets, ignore_index=-100):  # dout [b] -> dlogits [b, t, v]
    valid = targets != ignore_index
    dlogits = -softmax(logits)
    np.add.at(dlogits, (*np.indices(targets.shape), np.where(valid, targets, 0)), 1.0)  # one-hot − softmax
    return dlogits * (valid * dout[:, None])[..., None]


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):  # [b] x4 -> scalar, margins [b]
    margins = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return -np.mean(log_sigmoid(margins)), margins


def dpo_loss_backward(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):  # -> d/dpi_chosen, d/dpi_rejected
    _, margins = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    dmargin = -(1.0 - 1.0 / (1.0 + np.exp(-margins))) / margins.shape[0]  # d(−log σ(m))/dm = −(1 − σ(m)), mean
    return beta * dmargin, -beta * dmargin
