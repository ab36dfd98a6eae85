"""`jaxgpt serve`: OpenAI-style completions and chat APIs, Prometheus metrics and a web playground
over the KV-cache decoder.

Requests are decoded by one thread that owns the model: `ContinuousBatcher` (default; rows join and
leave between decoding steps) or the older dynamic `Batcher` (`--batching dynamic`). The FastAPI
app validates strictly (unknown fields, ranges, prompt length, body size: 4xx with an OpenAI-shaped
error), bounds the waiting queue (429 with Retry-After), times requests out (504), streams with
server-sent events, and on shutdown answers every waiting client (503) and lets running rows finish.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model's annotations at
# run time, and the model is built inside `build_app` (its bounds depend on the served config).
import asyncio
import contextlib
import json
import time
import uuid
from importlib import resources
from typing import Optional, Sequence, Union

from jaxgpt.config import GPTConfig
from jaxgpt.inference.batcher import Batcher
from jaxgpt.inference.chat import ROLES, ChatError, NoTokenizer, chat_prompt
from jaxgpt.inference.continuous import ContinuousBatcher
from jaxgpt.inference.http_plumbing import (
    LOOPBACK_HOSTS, CountResponses, add_request_checks, allowed_hosts_for, error_response, server_error,
)
from jaxgpt.inference.requests import Job, QueueFull, ShuttingDown

MAX_PROMPT_CHARS = 100_000
RETRY_AFTER_S = 1  # what a 429 asks the client to wait
RETRY_AFTER_S = 1  # what a 429 asks the client to wait


def _request_models(limit: int, vocab_size: int):
    """The pydantic models of a completion and a chat request, with bounds from the served model."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: Optional[str] = None
        max_tokens: int = Field(16, ge=1, le=limit)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: Optional[int] = Field(None, ge=1, le=vocab_size)
        stop: Optional[Union[str, list[str]]] = None
        seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
        stream: bool = False

    class CompletionRequest(Sampling):
        prompt: Union[str, list[int]] = Field(max_length=MAX_PROMPT_CHARS)  # text, or token ids (OpenAI's too)

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal[ROLES]
        content: str = Field(max_length=MAX_PROMPT_CHARS)

    class ChatRequest(Sampling):
        messages: list[Message] = Field(max_length=256)

    return CompletionRequest, ChatRequest


def _add_info_routes(app, batcher, config: GPTConfig, model_name: str) -> None:
    """/health, /metrics, /v1/models and the playground at /."""
    from fastapi.responses import HTMLResponse, Response

    @app.get("/health")
    def health():
        return {"status": "shutting down" if batcher.closing.is_set() else "ok", "model": model_name,
                "batching": batcher.kind, "batches_decoded": batcher.batches,
                "cancelled_rows": batcher.cancelled_rows, "queued": batcher.queue.qsize()}

    @app.get("/metrics")
    def metrics():
        body, content_type = batcher.metrics.render()
        return Response(content=body, media_type=content_type)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "jaxgpt",
                                            "context_length": config.context_length}]}

    @app.get("/", response_class=HTMLResponse)
    def playground():
        return (resources.files("jaxgpt.inference") / "playground.html").read_text(encoding="utf-8")


async def _next_event(job: Job) -> dict:
    """The job's next event, or a timeout error once its time is up (the row is then cancelled)."""
    left = None if job.timeout_s is None else job.timeout_s - (time.monotonic() - job.submitted_at)
    try:
        return await asyncio.wait_for(job.events.get(), timeout=None if left is None else max(left, 0.0))
    except asyncio.TimeoutError:
        job.cancelled.set()
        return {"error": f"request timed out after {job.timeout_s:g} s ({len(job.ids)} tokens generated)",
                "status": 504}


def _usage(job: Job) -> dict:
    n_prompt = len(job.prompt_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": len(job.ids), "total_tokens": n_prompt + len(job.ids)}


def _sse_events(job: Job, chunk):
    """The server-sent events of a streamed answer; a client that leaves cancels its row."""
    async def events():
        try:
            first = chunk(None, None)  # the opening chunk (chat: the assistant role), or None
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                event = await _next_event(job)
                if "error" in event:
                    yield f"data: {json.dumps({'error': {'message': event['error'], 'code': event['status']}})}\n\n"
                    return
                if event.get("done"):  # the last chunk carries the usage too (jaxgpt's addition)
                    yield f"data: {json.dumps({**chunk('', job.finish_reason), 'usage': _usage(job)})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield f"data: {json.dumps(chunk(event['text'], None))}\n\n"
        finally:
            job.cancelled.set()  # a client that left frees its row at the next step

    return events()


class _Answering:
    """Turns a checked request into a job, queues it, and answers it (JSON or a stream)."""

    def __init__(self, batcher, config: GPTConfig, tokenizer, model_name: str, timeout_s: Optional[float]) -> None:
        self.batcher, self.config, self.tokenizer = batcher, config, tokenizer
        self.model_name, self.timeout_s = model_name, timeout_s

    def job(self, req, prompt: Union[str, list], extra_stops: list, param: str):
        """(job, None) or (None, the 4xx response saying what is wrong)."""
        if req.model not in (None, self.model_name):
            return None, error_response(404, f"model {req.model!r} is not served here; GET /v1/models lists "
                                f"{self.model_name!r}", "model")
        if isinstance(prompt, list):  # token ids, as given
            if not prompt or min(prompt) < 0:
                return None, error_response(400, f"{param} as token ids must be a non-empty list of ids >= 0", param)
            prompt_ids = list(prompt)
        elif self.tokenizer.name == "ids":
            return None, error_response(400, f"the served model has no tokenizer (its folder holds no tokenizer.json), "
                                             f"so {param} must be a list of token ids, not text", param)
        else:
            try:
                prompt_ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]
            except Exception as e:  # noqa: BLE001 - a character outside a char vocabulary, a special token, ...
                return None, error_response(400, f"{param} cannot be encoded by this model's tokenizer: "
                                                 f"{str(e).splitlines()[0][:200]}", param)
        if max(prompt_ids) >= self.config.vocab_size:
            return None, error_response(400, f"{param} encodes to token id {max(prompt_ids)}, outside the model's "
                                f"vocabulary of {self.config.vocab_size}", param)
        room = self.config.context_length - len(prompt_ids)
        if room < 1:
            return None, error_response(400, f"{param} is {len(prompt_ids)} tokens; the context window is "
                                f"{self.config.context_length}", param)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            return None, error_response(400, "stop takes at most 4 non-empty strings", "stop")
        return Job(prompt_ids, min(req.max_tokens, room), req.temperature, None if req.top_p >= 1.0 else req.top_p,
                   req.top_k, req.seed, stops + extra_stops, asyncio.get_running_loop(), asyncio.Queue(),
                   timeout_s=self.timeout_s), None

    async def answer(self, job: Job, stream: bool, chunk, body):
        """Queue `job`; stream `chunk(text, finish)` events, or answer `body(text, finish, usage)`."""
        from fastapi.responses import StreamingResponse

        try:
            self.batcher.submit(job)
        except QueueFull as e:
            return error_response(429, f"the server is busy ({e}); retry in {RETRY_AFTER_S} s",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
        except ShuttingDown as e:
            return error_response(503, str(e))
        if stream:
            return StreamingResponse(_sse_events(job, chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            event = await _next_event(job)
            if "error" in event:
                return server_error(event["error"]) if event["status"] == 500 else error_response(event["status"],
                                                                                           event["error"])
            if event.get("done"):
                break
        return body(job.text, job.finish_reason, _usage(job))


def _add_completion_routes(app, answering: _Answering, limit: int, vocab_size: int) -> None:
    """POST /v1/completions and POST /v1/chat/completions."""
    CompletionRequest, ChatRequest = _request_models(limit, vocab_size)
    name = answering.model_name

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        job, refusal = answering.job(req, req.prompt, [], "prompt")
        if refusal is not None:
            return refusal
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text, finish):
            if text is None:
                return None
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        def body(text, finish, usage):
            return {**chunk(text, finish), "usage": usage}

        return await answering.answer(job, req.stream, chunk, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = [m.model_dump() for m in req.messages]
        try:
            prompt, stops = chat_prompt(answering.tokenizer, messages)
        except NoTokenizer as e:  # the server cannot do chat for this model: not the request's fault
            return error_response(501, str(e), "messages")
        except ChatError as e:
            return error_response(400, str(e), "messages")
        job, refusal = answering.job(req, prompt, stops, "messages")
        if refusal is not None:
            return refusal
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": name}

        def chunk(text, finish):
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def body(text, finish, usage):
            return {**head, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}]}

        return await answering.answer(job, req.stream, chunk, body)


def make_batcher(params, config: GPTConfig, tokenizer, *, batching: str = "continuous", max_batch: int = 8,
                 batch_wait_s: float = 0.02, max_tokens_limit: int = 256, max_queue: int = 64,
                 prefill_chunk: int = 64):
    """The scheduler that owns the model: "continuous" (slots = `max_batch`) or "dynamic"."""
    if batching == "continuous":
        return ContinuousBatcher(params, config, tokenizer, slots=max_batch, prefill_chunk=prefill_chunk,
                                 max_tokens_limit=max_tokens_limit, max_queue=max_queue)
    if batching == "dynamic":
        return Batcher(params, config, tokenizer, max_batch=max_batch, batch_wait_s=batch_wait_s,
                       max_tokens_limit=max_tokens_limit, max_queue=max_queue)
    raise ValueError(f"batching must be 'continuous' or 'dynamic', got {batching!r}")


def build_app(params, config: GPTConfig, tokenizer, *, model_name: str = "jaxgpt", warmup: bool = True,
              request_timeout_s: Optional[float] = 300.0, drain_s: float = 10.0,
              allowed_hosts: Sequence[str] = LOOPBACK_HOSTS, **batching):
    """The FastAPI app; its scheduler thread starts (after compiling) and stops (draining) with it.
    `allowed_hosts`: the Host names it answers (`http_plumbing.allowed_hosts_for`); `batching`: the
    keyword arguments of `make_batcher`."""
    from fastapi import FastAPI

    batcher = make_batcher(params, config, tokenizer, **batching)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start(warmup=warmup)  # compiles the decoder before the first request is accepted
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.shutdown, drain_s)

    app = FastAPI(title="jaxgpt", version="0.1.0", lifespan=lifespan)
    add_request_checks(app, allowed_hosts)
    app.add_middleware(CountResponses, metrics=batcher.metrics)
    _add_info_routes(app, batcher, config, model_name)
    answering = _Answering(batcher, config, tokenizer, model_name, request_timeout_s)
    _add_completion_routes(app, answering, batcher.max_tokens_limit, config.vocab_size)
    app.state.batcher = batcher
    return app


def check_serving_options(port: int, max_batch: int, batch_wait_s: float, max_tokens_limit: int,
                          max_queue: int = 64, request_timeout_s: Optional[float] = 300.0,
                          prefill_chunk: int = 64, batching: str = "continuous", drain_s: float = 10.0) -> None:
    """Refuse at start-up what would serve something else than announced."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    if not 0 <= batch_wait_s <= 10:
        raise ValueError(f"--batch-wait-ms must be in [0, 10000], got {batch_wait_s * 1000:g}")
    if max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")
    if max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {max_queue}")
    if request_timeout_s is not None and request_timeout_s <= 0:
        raise ValueError(f"--request-timeout-s must be positive, got {request_timeout_s:g}")
    if prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
        raise ValueError(f"--prefill-chunk must be a power of two, got {prefill_chunk}")
    if drain_s < 0:
        raise ValueError(f"--drain-s must be >= 0, got {drain_s:g}")
    if batching not in ("continuous", "dynamic"):
        raise ValueError(f"--batching must be 'continuous' or 'dynamic', got {batching!r}")


def make_server(app, host: str, port: int, drain_s: float = 10.0, log_level: str = "info"):
    """A uvicorn server for `app` that, on shutdown (Ctrl-C, SIGTERM, `should_exit`), first tells the
    scheduler (waiting clients get 503 at once, running rows get `drain_s` to finish), and only then
    waits for the open connections, which the scheduler is ending."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.batcher.begin_shutdown(drain_s)
            await super().shutdown(sockets)

    return DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=int(drain_s) + 5))


def serve(params, config: GPTConfig, tokenizer, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "jaxgpt", request_timeout_s: Optional[float] = 300.0, drain_s: float = 10.0,
          allowed_hosts: Sequence[str] = (), **batching) -> None:
    """Serve until stopped; Host headers are checked against `host` and `allowed_hosts`."""
    app = build_app(params, config, tokenizer, model_name=model_name, request_timeout_s=request_timeout_s,
                    drain_s=drain_s, allowed_hosts=allowed_hosts_for(host, allowed_hosts), **batching)
    make_server(app, host, port, drain_s).run()
