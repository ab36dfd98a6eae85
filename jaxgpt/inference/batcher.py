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

import asyncio
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.generate import Decoder


@dataclass
class Job:
    """One completion request as the batcher sees it; `events` carries its output to the client."""

    prompt_ids: list
    max_tokens: int
    temperature: float
    top_p: Optional[float]
    top_k: Optional[int]
    seed: Optional[int]
    stop: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None

    def group_key(self) -> tuple:
        """Jobs decoded together must share sampling settings; a seeded sampled job runs alone
        (its samples would otherwise depend on its row in the batch)."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.temperature, self.top_p, self.top_k)

    def send(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _bucket(n: int, smallest: int = 1) -> int:
    size = smallest
    while size < n:
        size *= 2
    return size


class Batcher:
    """Dynamic batching over `Decoder.generate_batch`, in one thread that owns the model."""

    def __init__(self, params, config: GPTConfig, tokenizer, *, max_batch: int = 8, batch_wait_s: float = 0.02,
                 max_tokens_limit: int = 256) -> None:
        # the decoding copy once (GPT-2's blocks, kernels transposed on CPU), not per batch
        self.decoder = Decoder(params, config)
        self.config = self.decoder.config
        self.tokenizer = tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.max_tokens_limit = min(max_tokens_limit, config.context_length - 1)
        self.queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="jaxgpt-batcher", daemon=True)
        self.batches = 0  # decode calls so far
        self.cancelled_rows = 0  # rows stopped because their client left

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

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _collect(self) -> list:
        first = self.queue.get()
        jobs, deferred = [first], []
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            same = job.group_key() == first.group_key() and self.fits(jobs + [job])
            (jobs if same else deferred).append(job)
        for job in deferred:
            self.queue.put(job)
        return [j for j in jobs if not j.cancelled.is_set()]

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs:
                try:
                    self._decode(jobs)
                except Exception as e:  # noqa: BLE001 - report to the clients (no internals), keep serving
                    traceback.print_exception(e, file=sys.stderr)
                    for job in jobs:
                        job.send({"error": "decoding failed (details are in the server's log)"})

    def _decode(self, jobs: list) -> None:
        self.batches += 1
        b, longest, budget = self.shapes(len(jobs), max(len(j.prompt_ids) for j in jobs),
                                         max(j.max_tokens for j in jobs))
        rows = [j.prompt_ids for j in jobs] + [[self.tokenizer.eot_id]] * (b - len(jobs))  # filler rows
        first = jobs[0]

        def on_token(tokens_b, step):
            stop = np.ones(len(tokens_b), bool)  # padding rows stop at once
            for r, job in enumerate(jobs):
                stop[r] = self._advance(job, int(tokens_b[r]), step)
            return stop

        self.decoder.generate_batch(rows, budget, temperature=first.temperature, top_k=first.top_k,
                       top_p=first.top_p, seed=first.seed if first.seed is not None else int(time.time_ns() % 2**31),
                       eos_id=self.tokenizer.eot_id, on_token=on_token, pad_to=longest)
        for job in jobs:
            if job.finish_reason is None:
                job.finish_reason = "length"
            job.send({"done": True})

    def _advance(self, job: Job, token: int, step: int) -> bool:
        """Take one token for `job`; True when the row must stop."""
        if job.finish_reason is not None:
            return True
        if job.cancelled.is_set():
            job.finish_reason = "cancelled"
            self.cancelled_rows += 1
            return True
        if token == self.tokenizer.eot_id:
            job.finish_reason = "stop"
            return True
        if token >= self.tokenizer.vocab_size:  # a model wider than its tokenizer (e.g. a padded vocabulary)
            job.send({"error": f"the model produced token id {token}, which its tokenizer "
                               f"({self.tokenizer.vocab_size} tokens) cannot decode"})
            job.finish_reason = "error"
            return True
        job.ids.append(token)
        text = self.tokenizer.decode(job.ids)
        if text.endswith("\ufffd") and len(job.ids) < job.max_tokens:
            return False  # the rest of a multi-byte character comes with the next token
        new = text[len(job.text):]
        for s in job.stop:
            cut = text.find(s, max(0, len(job.text) - len(s)))
            if cut != -1:
                new = text[len(job.text):cut]
                job.text = text[:cut]
                job.finish_reason = "stop"
                if new:
                    job.send({"text": new})
                return True
        job.text = text
        if new:
            job.send({"text": new})
        if len(job.ids) >= job.max_tokens:
            job.finish_reason = "length"
            return True
        return False
