"""`jaxgpt serve`: an OpenAI-style completions API and a web playground over the KV-cache decoder.

Requests are decoded by a `jaxgpt.inference.batcher.Batcher` (one thread that owns the model).
The FastAPI app validates strictly (unknown fields, ranges, prompt length, body size: 4xx with an
OpenAI-shaped error) and streams with server-sent events.
"""

# No `from __future__ import annotations` here: FastAPI reads the request model's annotations at
# run time, and the model is built inside `build_app` (its bounds depend on the served config).
import asyncio
import contextlib
import json
import sys
import time
import traceback
import uuid
from importlib import resources
from typing import Optional, Union

from jaxgpt.config import GPTConfig
from jaxgpt.inference.batcher import Batcher, Job

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_PROMPT_CHARS = 100_000


def _error(status: int, message: str, param: Optional[str] = None):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}})


def _server_error(message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=500, content={"error": {"message": message, "type": "server_error",
                                                            "param": None, "code": None}})


def _request_model(limit: int, vocab_size: int):
    """The pydantic model of a completion request, with bounds from the served model."""
    from pydantic import BaseModel, ConfigDict, Field

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: Optional[str] = None
        prompt: str = Field(max_length=MAX_PROMPT_CHARS)
        max_tokens: int = Field(16, ge=1, le=limit)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: Optional[int] = Field(None, ge=1, le=vocab_size)
        stop: Optional[Union[str, list[str]]] = None
        seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
        stream: bool = False

    return CompletionRequest


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 while it is being read, whether
    it announces its length or comes in chunks (it is never read past the limit)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.limit:
            return await _error(413, f"request body of {size} bytes exceeds the limit of {self.limit} bytes")(
                scope, receive, send)
        messages, total = [], 0
        while True:  # read the whole (bounded) body first, then replay it to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.limit:
                return await _error(413, f"request body exceeds the limit of {self.limit} bytes")(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def _add_request_checks(app) -> None:
    """Body-size limit, validation errors as 4xx responses that say what is wrong, and no internal
    detail in any other error (it goes to the server's log)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        kind = first.get("type", "")
        if kind == "json_invalid":
            return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        if kind == "extra_forbidden":
            return _error(400, f"unknown field {where!r}", where)
        return _error(400, f"{where}: {first.get('msg', 'invalid value')}", where)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return _server_error("internal server error (details are in the server's log)")


def _add_info_routes(app, batcher: Batcher, config: GPTConfig, model_name: str) -> None:
    """/health, /v1/models and the playground at /."""
    from fastapi.responses import HTMLResponse

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


def _sse_events(job: Job, chunk):
    """The server-sent events of a streamed completion; a client that leaves cancels its row."""
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

    return events()


def build_app(params, config: GPTConfig, tokenizer, *, model_name: str = "jaxgpt", max_batch: int = 8,
              batch_wait_s: float = 0.02, max_tokens_limit: int = 256, warmup: bool = True):
    """The FastAPI app (the batcher thread starts with it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    batcher = Batcher(params, config, tokenizer, max_batch=max_batch, batch_wait_s=batch_wait_s,
                      max_tokens_limit=max_tokens_limit)
    CompletionRequest = _request_model(batcher.max_tokens_limit, config.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start(warmup=warmup)  # compiles the decoder before the first request is accepted
        yield

    app = FastAPI(title="jaxgpt", version="0.1.0", lifespan=lifespan)
    _add_request_checks(app)
    _add_info_routes(app, batcher, config, model_name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.model not in (None, model_name):
            return _error(404, f"model {req.model!r} is not served here; GET /v1/models lists {model_name!r}", "model")
        try:
            prompt_ids = tokenizer.encode(req.prompt) or [tokenizer.eot_id]
        except Exception as e:  # noqa: BLE001 - a character outside a char vocabulary, a special token, ...
            return _error(400, f"prompt cannot be encoded by this model's tokenizer: {str(e).splitlines()[0][:200]}",
                          "prompt")
        if max(prompt_ids) >= config.vocab_size:
            return _error(400, f"prompt encodes to token id {max(prompt_ids)}, outside the model's vocabulary of "
                          f"{config.vocab_size}", "prompt")
        room = config.context_length - len(prompt_ids)
        if room < 1:
            return _error(400, f"prompt is {len(prompt_ids)} tokens; the context window is {config.context_length}", "prompt")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            return _error(400, "stop takes at most 4 non-empty strings", "stop")
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, min(req.max_tokens, room), req.temperature, None if req.top_p >= 1.0 else req.top_p,
                  req.top_k, req.seed, stops, loop, asyncio.Queue())
        batcher.submit(job)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: Optional[str]) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return StreamingResponse(_sse_events(job, chunk), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        while True:
            event = await job.events.get()
            if "error" in event:
                return _server_error(event["error"])
            if event.get("done"):
                break
        body = chunk(job.text, job.finish_reason)
        body["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.ids),
                         "total_tokens": len(prompt_ids) + len(job.ids)}
        return body

    app.state.batcher = batcher
    return app


def check_serving_options(port: int, max_batch: int, batch_wait_s: float, max_tokens_limit: int) -> None:
    """Refuse at start-up what would serve something else than announced."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    if not 0 <= batch_wait_s <= 10:
        raise ValueError(f"--batch-wait-ms must be in [0, 10000], got {batch_wait_s * 1000:g}")
    if max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")


def serve(params, config: GPTConfig, tokenizer, *, host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "jaxgpt", **batching) -> None:
    import uvicorn

    check_serving_options(port, batching.get("max_batch", 8), batching.get("batch_wait_s", 0.02),
                          batching.get("max_tokens_limit", 256))
    app = build_app(params, config, tokenizer, model_name=model_name, **batching)
    uvicorn.run(app, host=host, port=port, log_level="info")
