"""The server's Prometheus metrics (`GET /metrics`), kept in a registry of the app's own (so two
apps in one process, as in the tests, do not share counters).

Gauges: waiting requests, running rows, generated tokens/s over the last `RATE_WINDOW_S` seconds.
Counters: generated and prompt tokens, requests by HTTP status. Histograms: time to first token,
time per output token after the first, whole request duration.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RATE_WINDOW_S = 10.0
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    """What `/metrics` reports; the schedulers and the app update it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("jaxgpt_queue_length", "requests waiting for a decoding slot", registry=r)
        self.running_rows = Gauge("jaxgpt_running_rows", "requests being decoded now", registry=r)
        self.tokens_per_second = Gauge("jaxgpt_generated_tokens_per_second",
                                       f"generated tokens per second over the last {RATE_WINDOW_S:g} s", registry=r)
        self.tokens_per_second.set_function(self._rate)
        self.generated_tokens = Counter("jaxgpt_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("jaxgpt_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.requests = Counter("jaxgpt_requests", "requests answered, by HTTP status", ["status"], registry=r)
        self.time_to_first_token = Histogram("jaxgpt_time_to_first_token_seconds",
                                             "from a request's arrival to its first token", buckets=_LATENCY_BUCKETS,
                                             registry=r)
        self.time_per_output_token = Histogram("jaxgpt_time_per_output_token_seconds",
                                               "between consecutive tokens of one request", buckets=_TOKEN_BUCKETS,
                                               registry=r)
        self.request_duration = Histogram("jaxgpt_request_duration_seconds", "from arrival to the answer's end",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self._recent = collections.deque()  # monotonic times of recent tokens
        self._lock = threading.Lock()

    def token(self, job, now: float) -> None:
        """A token for `job` at `now` (monotonic): first-token or per-token latency, and the rate."""
        if job.last_token_at is None:
            self.time_to_first_token.observe(now - job.submitted_at)
        else:
            self.time_per_output_token.observe(now - job.last_token_at)
        job.last_token_at = now
        self.generated_tokens.inc()
        with self._lock:
            self._recent.append(now)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return len(self._recent) / RATE_WINDOW_S

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
