"""`jaxgpt serve`: an OpenAI-style completions API and a web playground over the KV-cache decoder.

- `Batcher` (one background thread) owns the model. Requests wait in a queue; the thread takes the
  first, waits `batch_wait_s` for more with the same sampling settings, and decodes them together
  with `generate_batch`. Shapes are bucketed (batch 1/2/4/8…, prompt length a power of two) so a
  handful of compiled programs serve every request; they are compiled at start-up.
- From inside the compiled loop, each step's tokens reach the host (`on_token`), are decoded to
  text and pushed to the requests' queues; the host answers which rows must stop (max_tokens
  reached, a stop string seen, the client gone), so a finished or abandoned row frees the batch.
- The FastAPI app validates strictly (unknown fields, ranges, prompt length, body size: 4xx with
  an OpenAI-shaped error) and streams with server-sent events.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model's annotations at
# run time, and the model is built inside `build_app` (its bounds depend on the served config).
import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional, Union

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.inference.generate import Decoder

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_PROMPT_CHARS = 100_000


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

    def shapes(self, n_jobs: int, longest_prompt: int) -> tuple[int, int, int]:
        """(batch, padded prompt length, token budget): bucketed, so few programs are compiled."""
        b = min(_bucket(n_jobs), _bucket(self.max_batch))
        p = min(_bucket(longest_prompt, 16), self.config.context_length - 1)
        return b, p, min(self.max_tokens_limit, self.config.context_length - p)

    def start(self, warmup: bool = True) -> None:
        if warmup:  # compile the decoder for the shortest prompt bucket, alone and in a full batch
            for n in sorted({1, self.max_batch}):
                b, p, budget = self.shapes(n, 1)
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
            (jobs if job.group_key() == first.group_key() else deferred).append(job)
        for job in deferred:
            self.queue.put(job)
        return [j for j in jobs if not j.cancelled.is_set()]

    def _run(self) -> None:
        while True:
            jobs = self._collect()
            if jobs:
                try:
                    self._decode(jobs)
                except Exception as e:  # noqa: BLE001 - report to the clients, keep serving
                    for job in jobs:
                        job.send({"error": f"decoding failed: {e}"})

    def _decode(self, jobs: list) -> None:
        self.batches += 1
        b, longest, budget = self.shapes(len(jobs), max(len(j.prompt_ids) for j in jobs))
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


def build_app(params, config: GPTConfig, tokenizer, *, model_name: str = "jaxgpt", max_batch: int = 8,
              batch_wait_s: float = 0.02, max_tokens_limit: int = 256, warmup: bool = True):
    """The FastAPI app (the batcher thread starts with it)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    batcher = Batcher(params, config, tokenizer, max_batch=max_batch, batch_wait_s=batch_wait_s,
                      max_tokens_limit=max_tokens_limit)
    limit = batcher.max_tokens_limit

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: Optional[str] = None
        prompt: str = Field(max_length=MAX_PROMPT_CHARS)
        max_tokens: int = Field(16, ge=1, le=limit)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: Optional[int] = Field(None, ge=1, le=config.vocab_size)
        stop: Optional[Union[str, list[str]]] = None
        seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
        stream: bool = False

    def error(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
        return JSONResponse(status_code=status, content={
            "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start(warmup=warmup)  # compiles the decoder before the first request is accepted
        yield

    app = FastAPI(title="jaxgpt", version="0.1.0", lifespan=lifespan)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return error(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        kind = first.get("type", "")
        if kind == "json_invalid":
            return error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        if kind == "extra_forbidden":
            return error(400, f"unknown field {where!r}", where)
        return error(400, f"{where}: {first.get('msg', 'invalid value')}", where)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "batches_decoded": batcher.batches,
                "cancelled_rows": batcher.cancelled_rows, "queued": batcher.queue.qsize()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "jaxgpt",
                                            "context_length": config.context_length}]}

    @app.get("/", response_class=HTMLResponse)
    def playground():
        return (resources.files("jaxgpt.inference") / "playground.html").read_text(encoding="utf-8")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.model not in (None, model_name):
            return error(404, f"model {req.model!r} is not served here; GET /v1/models lists {model_name!r}", "model")
        prompt_ids = tokenizer.encode(req.prompt) or [tokenizer.eot_id]
        room = config.context_length - len(prompt_ids)
        if room < 1:
            return error(400, f"prompt is {len(prompt_ids)} tokens; the context window is {config.context_length}", "prompt")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            return error(400, "stop takes at most 4 non-empty strings", "stop")
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, min(req.max_tokens, room), req.temperature, None if req.top_p >= 1.0 else req.top_p,
                  req.top_k, req.seed, stops, loop, asyncio.Queue())
        batcher.submit(job)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: Optional[str]) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def events():
                try:
                    while True:
                        event = await job.events.get()
                        if "error" in event:
                            yield f"data: {json.dumps({'error': {'message': event['error']}})}\n\n"
                            return
                        if event.get("done"):
                            yield f"data: {json.dumps(chunk('', job.finish_reason))}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        yield f"data: {json.dumps(chunk(event['text'], None))}\n\n"
                finally:
                    job.cancelled.set()  # a client that left frees its row at the next step

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        while True:
            event = await job.events.get()
            if "error" in event:
                return JSONResponse(status_code=500, content={"error": {"message": event["error"], "type": "server_error"}})
            if event.get("done"):
                break
        body = chunk(job.text, job.finish_reason)
        body["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.ids),
                         "total_tokens": len(prompt_ids) + len(job.ids)}
        return body

    app.state.batcher = batcher
    return app


def serve(params, config: GPTConfig, tokenizer, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "jaxgpt", **batching) -> None:
    import uvicorn

    app = build_app(params, config, tokenizer, model_name=model_name, **batching)
    uvicorn.run(app, host=host, port=port, log_level="info")
