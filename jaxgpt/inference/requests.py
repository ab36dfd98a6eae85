"""What both of the server's schedulers share: a request (`Job`), how one token advances it
(`RequestQueue.take_token`: text, stop strings, end of text, `max_tokens`, a client gone), and the
bounded queue in front of the model thread (429 when full, 503 while shutting down).

The schedulers themselves are `jaxgpt.inference.continuous.ContinuousBatcher` (the default: rows
join and leave between decoding steps) and `jaxgpt.inference.batcher.Batcher` (the older dynamic
batching, kept for comparison).
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from jaxgpt.inference.metrics import ServingMetrics


class QueueFull(Exception):
    """The waiting queue is at its bound: answer 429 with Retry-After."""


class ShuttingDown(Exception):
    """The server is draining: answer 503."""


@dataclass
class Job:
    """One completion request as a scheduler sees it; `events` carries its output to the client.

    Events: {"text": piece}, {"done": True} (then `finish_reason` is set), or
    {"error": message, "status": http status} (nothing more follows).
    """

    prompt_ids: list
    max_tokens: int
    temperature: float
    top_p: Optional[float]
    top_k: Optional[int]
    seed: Optional[int]
    stop: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    timeout_s: Optional[float] = None  # from submission to the last token
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list = field(default_factory=list)
    text: str = ""  # the answer's text sent so far
    held: str = ""  # decoded text not sent yet: it may be the start of a stop string
    finish_reason: Optional[str] = None
    submitted_at: float = field(default_factory=time.monotonic)
    last_token_at: Optional[float] = None

    def __post_init__(self) -> None:
        # every row has its own seed: a request without one gets a fresh one, so its samples never
        # depend on which rows it shares a batch with
        self.row_seed = self.seed if self.seed is not None else secrets.randbelow(2**31)

    def group_key(self) -> tuple:
        """(Dynamic batching only.) Jobs decoded together must share sampling settings; a seeded
        sampled job runs alone (its samples would otherwise depend on its row in the batch)."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.temperature, self.top_p, self.top_k)

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.submitted_at > self.timeout_s

    def send(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def finish(self, reason: str) -> None:
        """End the request normally (its text so far is the answer; text held back as the possible
        start of a stop string is sent first: no stop came)."""
        if self.held:
            self.text += self.held
            self.send({"text": self.held})
            self.held = ""
        self.finish_reason = reason
        self.send({"done": True})

    def fail(self, message: str, status: int) -> None:
        """End the request with an error event (the app answers `status`)."""
        self.finish_reason = "error"
        self.send({"error": message, "status": status})


def _could_begin_a_stop(text: str, stops: list, sent: int) -> int:
    """How many characters at the end of `text` (none of its first `sent`) are the beginning of a stop
    string: they are held back until the next tokens say whether the stop string follows, so a
    streamed answer never shows part of a stop string that the whole answer cuts."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - sent), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class RequestQueue:
    """The bounded queue in front of a scheduler's model thread, and the per-token bookkeeping."""

    def __init__(self, tokenizer, *, max_queue: int, metrics: Optional[ServingMetrics]) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.tokenizer = tokenizer
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.metrics = metrics or ServingMetrics()
        self.closing = threading.Event()
        self.cancelled_rows = 0  # rows stopped because their client left

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull (→ 429) when the queue is at its bound, ShuttingDown (→ 503)."""
        if self.closing.is_set():
            raise ShuttingDown("the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        self.metrics.queue_length.set(self.queue.qsize())

    def begin_shutdown(self, drain_s: float = 10.0) -> None:  # the scheduler's own: what draining means
        raise NotImplementedError

    def shutdown(self, drain_s: float = 10.0) -> None:
        """`begin_shutdown`, then wait for the model thread (`self._thread`) to end."""
        self.begin_shutdown(drain_s)
        if self._thread.is_alive():
            self._thread.join(timeout=drain_s + 30)

    def answer_waiting(self, message: str, status: int) -> None:
        """Answer every job still in the queue with an error (shutdown)."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(message, status)
        self.metrics.queue_length.set(0)

    def take_token(self, job: Job, token: int) -> bool:
        """Give `job` its next token (stream the new text, apply stop strings, end of text and
        `max_tokens`); True when the row must stop (it has then been answered)."""
        if job.finish_reason is not None:
            return True
        now = time.monotonic()
        if job.cancelled.is_set():
            self.cancelled_rows += 1
            job.finish_reason = "cancelled"
            return True
        if job.expired(now):
            job.fail(f"request timed out after {job.timeout_s:g} s ({len(job.ids)} tokens generated)", 504)
            return True
        self.metrics.token(job, now)
        if token == self.tokenizer.eot_id:
            job.finish("stop")
            return True
        if token >= self.tokenizer.vocab_size:  # a model wider than its tokenizer (e.g. a padded vocabulary)
            job.fail(f"the model produced token id {token}, which its tokenizer "
                     f"({self.tokenizer.vocab_size} tokens) cannot decode", 500)
            return True
        job.ids.append(token)
        text = self.tokenizer.decode(job.ids)
        if text.endswith("\ufffd") and len(job.ids) < job.max_tokens:
            return False  # the rest of a multi-byte character comes with the next token
        cuts = [cut for s in job.stop if (cut := text.find(s, max(0, len(job.text) - len(s)))) != -1]
        if cuts:  # the earliest stop string ends the answer before it
            cut = min(cuts)
            new, job.text, job.held = text[len(job.text):cut], text[:cut], ""
            if new:
                job.send({"text": new})
            job.finish("stop")
            return True
        ready = len(text) - _could_begin_a_stop(text, job.stop, len(job.text))
        new, job.text, job.held = text[len(job.text):ready], text[:ready], text[ready:]
        if new:
            job.send({"text": new})
        if len(job.ids) >= job.max_tokens:
            job.finish("length")
            return True
        return False
