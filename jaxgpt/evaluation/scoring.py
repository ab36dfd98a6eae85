"""The three requests every task evaluation reduces to (the lm-evaluation-harness's model API):

- `loglikelihood(context_ids, continuation_ids)` -> (log p(continuation | context), whether the
  continuation is the greedy one): multiple-choice and cloze tasks;
- `rolling_loglikelihood(ids)` -> the log-probability of a whole document, every token scored once
  (windows of the context length, each conditioned on the tokens before it within the window; the
  first token on end-of-text): perplexity tasks;
- `generate(prompts, …)` -> greedy continuations cut at stop strings (KV-cached, batched): generation tasks.

Requests are batched, right-padded to a multiple of `PAD_TO` tokens (few compiled shapes); padded
positions are masked out of every sum.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPT

PAD_TO = 32


class Scorer:
    def __init__(self, params, config: GPTConfig, tokenizer, batch_size: int = 8) -> None:
        self.params, self.config, self.tokenizer, self.batch_size = params, config, tokenizer, batch_size

        def score(p, x_bt, y_bt, mask_bt):
            logp_btv = jax.nn.log_softmax(GPT(config).apply(p, x_bt).astype(jnp.float32), axis=-1)
            picked_bt = jnp.take_along_axis(logp_btv, y_bt[..., None], axis=-1)[..., 0]
            greedy_bt = jnp.argmax(logp_btv, axis=-1) == y_bt
            return jnp.sum(picked_bt * mask_bt, axis=-1), jnp.all(greedy_bt | ~mask_bt, axis=-1)

        self._score = jax.jit(score)
        self._decoder = None

    def _rows(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Score rows (tokens, n_scored): the last n_scored tokens of each given the ones before."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(t) - 1 for t, _ in chunk)
            width = min(-(-width // PAD_TO) * PAD_TO, self.config.context_length)
            x = np.zeros((self.batch_size, width), np.int32)  # a full batch always: one compiled shape per width
            y, mask = np.zeros_like(x), np.zeros(x.shape, bool)
            for r, (tokens, n) in enumerate(chunk):
                x[r, :len(tokens) - 1], y[r, :len(tokens) - 1] = tokens[:-1], tokens[1:]
                mask[r, len(tokens) - 1 - n:len(tokens) - 1] = True
            logp, greedy = self._score(self.params, x, y, mask)
            out += [(float(lp), bool(g)) for lp, g in zip(np.asarray(logp)[:len(chunk)], np.asarray(greedy)[:len(chunk)])]
        return out

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per request; contexts are cut from the left to fit."""
        limit = self.config.context_length + 1
        rows = []
        for context, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request needs a non-empty continuation")
            context = list(context) or [self.tokenizer.eot_id]
            tokens = (context + list(continuation))[-limit:]
            rows.append((tokens, min(len(continuation), len(tokens) - 1)))
        return self._rows(rows)

    def rolling_loglikelihood(self, ids: Sequence[int]) -> float:
        """log p(document): windows of `context_length` predicted tokens, each conditioned on the
        window's own earlier tokens (the first on end-of-text)."""
        tokens = [self.tokenizer.eot_id] + list(ids)
        t = self.config.context_length
        rows = [(tokens[i:i + t + 1], len(tokens[i:i + t + 1]) - 1) for i in range(0, len(tokens) - 1, t)]
        return sum(lp for lp, _ in self._rows(rows))

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations (text), each cut at the first stop string or end-of-text."""
        from jaxgpt.inference.generate import Decoder

        room = self.config.context_length - max_new_tokens
        if room < 1:
            raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in a {self.config.context_length}-token context")
        self._decoder = self._decoder or Decoder(self.params, self.config)
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [list(p)[-room:] or [self.tokenizer.eot_id] for p in prompts[start:start + self.batch_size]]
            pad_to = min(-(-max(len(p) for p in batch) // PAD_TO) * PAD_TO, room)  # a few compiled prompt lengths
            new = self._decoder.generate_batch(batch, max_new_tokens, eos_id=self.tokenizer.eot_id, pad_to=pad_to)
            texts += [cut_at_stop(self.tokenizer.decode(row), stop) for row in new]
        return texts


def cut_at_stop(text: str, stop: Optional[Sequence[str]]) -> str:
    ends = [text.find(s) for s in stop or () if s and s in text]
    return text[:min(ends)] if ends else text
