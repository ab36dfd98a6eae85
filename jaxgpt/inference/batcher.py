"""The server's batcher: requests queue up, one background thread that owns the model decodes them.

`Batcher` takes the first waiting request, waits `batch_wait_s` for more with the same sampling
settings, and decodes them together with `Decoder.generate_batch`. Shapes are bucketed (batch
1/2/4/8…, prompt length a power of two) so a handful of compiled programs serve every request; they
are compiled at start-up. From inside the compiled loop, each step's tokens reach the host
(`on_token`), are decoded to text and pushed to the requests' queues; the host answers which rows
must stop (max_tokens reached, a stop string seen, the client gone), so a finished or abandoned
row frees the batch.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
import traceback
from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.generate import Decoder
from jaxgpt.inference.metrics import ServingMetrics
from jaxgpt.inference.requests import RequestQueue


def _bucket(n: int, smallest: int = 1) -> int:
    size = smallest
    while size < n:
        size *= 2
    return size


class Batcher(RequestQueue):
    """Dynamic batching over `Decoder.generate_batch`, in one thread that owns the model."""

    kind = "dynamic"

    def __init__(self, params, config: GPTConfig, tokenizer, *, max_batch: int = 8, batch_wait_s: float = 0.02,
                 max_tokens_limit: int = 256, max_queue: int = 64, metrics: Optional[ServingMetrics] = None) -> None:
        super().__init__(tokenizer, max_queue=max_queue, metrics=metrics)
        # the decoding copy once (GPT-2's blocks, kernels transposed on CPU), not per batch
        self.decoder = Decoder(params, config)
        self.config = self.decoder.config
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.max_tokens_limit = min(max_tokens_limit, config.context_length - 1)
        self._thread = threading.Thread(target=self._run, name="jaxgpt-batcher", daemon=True)
        self.batches = 0  # decode calls so far
        self._set_aside: list = []  # jobs that did not fit the last batch, oldest first

    def shapes(self, n_jobs: int, longest_prompt: int, most_tokens: int) -> tuple[int, int, int]:
        """(batch, padded prompt length, token budget), bucketed so that few programs are compiled.

        Every row gets what it asked for: the budget covers the largest `max_tokens` (each row
        stops at its own), and the padding of the prompts is cut back so that padded prompt +
        budget fit the context. Jobs are only batched together when their longest prompt and
        their largest request fit together (`fits`).
        """
        context = self.config.context_length
        b = min(_bucket(n_jobs), _bucket(self.max_batch))
        budget = min(_bucket(most_tokens, 16), context - longest_prompt)
        p = min(_bucket(longest_prompt, 16), context - budget)
        return b, p, budget

    def fits(self, jobs: list) -> bool:
        """Whether these jobs can share one batch: longest prompt + largest request within the context."""
        return max(len(j.prompt_ids) for j in jobs) + max(j.max_tokens for j in jobs) <= self.config.context_length

    def start(self, warmup: bool = True) -> None:
        if warmup:  # compile the decoder for the shortest prompt and answer buckets, alone and in a full batch
            for n in sorted({1, self.max_batch}):
                b, p, budget = self.shapes(n, 1, 1)
                self.decoder.generate_batch([[self.tokenizer.eot_id]] * b, budget, pad_to=p,
                                            eos_id=self.tokenizer.eot_id, on_token=lambda t, s: np.ones(len(t), bool))
        self._thread.start()

    def begin_shutdown(self, drain_s: float = 10.0) -> None:
        """Refuse new requests and answer the waiting ones (503); the running batch finishes."""
        self.closing.set()
        self.answer_waiting("the server is shutting down", 503)
        for job in self._set_aside:
            if job is not None:
                job.fail("the server is shutting down", 503)
        self._set_aside = [None]  # wakes the thread, which then ends
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def _next(self, timeout: Optional[float] = None):
        """The next job: one set aside by an earlier batch first (in arrival order), then the queue."""
        if self._set_aside:
            return self._set_aside.pop(0)
        return self.queue.get(timeout=timeout)

    def _collect(self) -> Optional[list]:
        first = self._next()
        if first is None:  # shutdown
            return None
        jobs, deferred = [first], []
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self._next(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                deferred.append(job)
                break
            same = job.group_key() == first.group_key() and self.fits(jobs + [job])
            (jobs if same else deferred).append(job)
        self._set_aside = deferred + self._set_aside  # never back into the bounded queue (it may be full)
        self.metrics.queue_length.set(self.queue.qsize() + len(self._set_aside))
        return [j for j in jobs if not j.cancelled.is_set()]

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            if jobs:
                self.metrics.running_rows.set(len(jobs))
                try:
                    self._decode(jobs)
                except Exception as e:  # noqa: BLE001 - report to the clients (no internals), keep serving
                    traceback.print_exception(e, file=sys.stderr)
                    for job in jobs:
                        if job.finish_reason is None:
                            job.fail("decoding failed (details are in the server's log)", 500)
                self.metrics.running_rows.set(0)

    def _decode(self, jobs: list) -> None:
        self.batches += 1
        for job in jobs:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        b, longest, budget = self.shapes(len(jobs), max(len(j.prompt_ids) for j in jobs),
                                         max(j.max_tokens for j in jobs))
        rows = [j.prompt_ids for j in jobs] + [[self.tokenizer.eot_id]] * (b - len(jobs))  # filler rows
        first = jobs[0]

        def on_token(tokens_b, step):
            stop = np.ones(len(tokens_b), bool)  # padding rows stop at once
            for r, job in enumerate(jobs):
                stop[r] = self.take_token(job, int(tokens_b[r]))
            return stop

        self.decoder.generate_batch(rows, budget, temperature=first.temperature, top_k=first.top_k,
                                    top_p=first.top_p, seed=first.row_seed, eos_id=self.tokenizer.eot_id,
                                    on_token=on_token, pad_to=longest)
        for job in jobs:
            if job.finish_reason is None:  # the budget ran out (or every row stopped) before it did
                job.finish("length")
