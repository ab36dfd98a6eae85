"""Continuous batching: requests join and leave the decoding batch between steps.

One thread owns the model (`SlotDecoder`: `slots` rows of KV cache, one compiled step for all of
them). Each turn of its loop:

1. answer waiting requests whose client left or whose time ran out;
2. if a slot is free, take the next waiting request and prefill one chunk of its prompt
   (`prefill_chunk` tokens at most: a long prompt is spread over several turns, so the running rows
   are held up for one chunk at a time); when its whole prompt is in, its first token is sampled
   and the row joins the batch;
3. run one decoding step for every slot; each running row takes its token (text streamed, stop
   strings, end of text, `max_tokens`, a client gone, a deadline) and a finished row frees its
   slot at once, for the next waiting request.

Sampling settings and seeds are per row (`sampling.sample_rows`), so requests with different
settings share the batch, and a seeded request gives the same text whatever shares it.
Shutdown (`shutdown`): new requests get 503, waiting ones are answered 503 at once, running rows
get `drain_s` seconds to finish and are then ended with an error.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.generate import Decoder
from jaxgpt.inference.metrics import ServingMetrics
from jaxgpt.inference.requests import Job, RequestQueue
from jaxgpt.inference.slots import SlotDecoder, chunk_lengths


@dataclass
class _Row:
    """A request in a slot: where its next token goes (`col`) and how many it has sampled."""

    job: Job
    token: int = 0  # the last sampled token, written into the cache by the next step
    col: int = 0
    count: int = 0
    prefilled: int = 0  # prompt tokens written so far (a row joins the batch when all are)
    logits: Optional[object] = None  # the last prefilled chunk's logits of its last token


class ContinuousBatcher(RequestQueue):
    """Step-level scheduling over a `SlotDecoder`, in one thread that owns the model."""

    kind = "continuous"

    def __init__(self, params, config: GPTConfig, tokenizer, *, slots: int = 8, prefill_chunk: int = 64,
                 max_tokens_limit: int = 256, max_queue: int = 64, metrics: Optional[ServingMetrics] = None) -> None:
        super().__init__(tokenizer, max_queue=max_queue, metrics=metrics)
        decoder = Decoder(params, config)  # the decoding copy of the weights
        self.config = decoder.config
        self.engine = SlotDecoder(decoder.params, decoder.config, slots, prefill_chunk)
        self.max_batch = slots
        self.max_tokens_limit = min(max_tokens_limit, config.context_length - 1)
        self.rows: list[Optional[_Row]] = [None] * slots
        self.prefilling: Optional[tuple[int, _Row]] = None  # (slot, row) whose prompt is going in
        self.steps = 0  # decoding steps so far
        self.drain_deadline: Optional[float] = None
        self._thread = threading.Thread(target=self._run, name="jaxgpt-continuous-batcher", daemon=True)

    @property
    def batches(self) -> int:  # /health's "batches_decoded": here, decoding steps
        return self.steps

    def start(self, warmup: bool = True) -> None:
        if warmup:
            self.engine.compile_all()
        self._thread.start()

    def begin_shutdown(self, drain_s: float = 10.0) -> None:
        """Refuse new requests, answer the waiting ones (503), give running rows `drain_s` to finish
        (then they are ended with a 503 error); returns at once."""
        if not self.closing.is_set():
            self.drain_deadline = time.monotonic() + drain_s
            self.closing.set()
        self.answer_waiting("the server is shutting down", 503)

    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception as e:  # noqa: BLE001 - report to the clients (no internals), keep serving
                traceback.print_exception(e, file=sys.stderr)
                self._fail_all("decoding failed (details are in the server's log)", 500)

    def _turn(self) -> bool:
        """One turn of the loop; False when the thread should end (shut down and drained)."""
        now = time.monotonic()
        if self.closing.is_set():
            self.answer_waiting("the server is shutting down", 503)
            if now > self.drain_deadline:
                self._fail_all("the server shut down before this request finished", 503)
            if self.prefilling is None and not any(self.rows):
                return False
        self._admit(block=not any(self.rows) and self.prefilling is None)
        if self.prefilling is not None:
            self._prefill_one_chunk()
        if any(self.rows):
            self._decode_step()
        self.metrics.running_rows.set(sum(r is not None for r in self.rows))
        self.metrics.queue_length.set(self.queue.qsize())
        return True

    def _admit(self, block: bool) -> None:
        """Start prefilling the next live waiting request when a slot is free."""
        while self.prefilling is None and None in self.rows:
            try:
                job = self.queue.get(timeout=0.05) if block else self.queue.get_nowait()
            except queue.Empty:
                return
            if job is None or job.cancelled.is_set():
                continue
            if job.expired(time.monotonic()):
                job.fail(f"request timed out after {job.timeout_s:g} s waiting for a decoding slot", 504)
                continue
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
            self.prefilling = (self.rows.index(None), _Row(job))

    def _prefill_one_chunk(self) -> None:
        slot, row = self.prefilling
        if row.job.cancelled.is_set():
            self.prefilling = None
            return
        prompt = row.job.prompt_ids
        size = chunk_lengths(len(prompt) - row.prefilled, self.engine.prefill_chunk)[0]
        row.logits = self.engine.prefill(slot, prompt[row.prefilled: row.prefilled + size], row.prefilled)
        row.prefilled += size
        if row.prefilled < len(prompt):
            return
        self.prefilling = None
        job = row.job
        row.token = self.engine.first_token(row.logits, job.row_seed, job.temperature, job.top_k or 0,
                                            job.top_p if job.top_p is not None else 1.0)
        row.col, row.count, row.logits = len(prompt), 1, None
        if not self.take_token(job, row.token):
            self.rows[slot] = row

    def _decode_step(self) -> None:
        live = [(s, r) for s, r in enumerate(self.rows) if r is not None]
        n = self.engine.slots
        tokens, cols, counts = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.uint32)
        seeds, temperature = np.zeros(n, np.uint32), np.zeros(n, np.float32)
        top_k, top_p, active = np.zeros(n, np.int32), np.ones(n, np.float32), np.zeros(n, bool)
        for s, r in live:
            active[s] = True
            tokens[s], cols[s], counts[s], seeds[s] = r.token, r.col, r.count, r.job.row_seed
            temperature[s], top_k[s] = r.job.temperature, r.job.top_k or 0
            top_p[s] = r.job.top_p if r.job.top_p is not None else 1.0
        next_s = self.engine.step(active, tokens, cols, seeds, counts, temperature, top_k, top_p)
        self.steps += 1
        for s, r in live:
            r.token, r.col, r.count = int(next_s[s]), r.col + 1, r.count + 1
            if self.take_token(r.job, r.token):
                self.rows[s] = None

    def _fail_all(self, message: str, status: int) -> None:
        """End every running and prefilling request with an error (their clients get an answer)."""
        rows = [r for r in self.rows if r is not None] + ([self.prefilling[1]] if self.prefilling else [])
        for r in rows:
            if r.job.finish_reason is None:
                r.job.fail(message, status)
        self.rows = [None] * self.engine.slots
        self.prefilling = None
