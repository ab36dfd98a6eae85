"""The HTTP plumbing of `jaxgpt serve`: OpenAI-shaped errors, the request-body limit, validation
errors as 4xx answers that say what is wrong, and counting answers for `/metrics`."""

# No `from __future__ import annotations`: FastAPI reads the exception handlers' annotations.
import sys
import time
import traceback
from typing import Optional

MAX_BODY_BYTES = 1 << 20  # 1 MiB


def error_response(status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse

    kind = {429: "rate_limit_error", 501: "not_supported", 503: "server_unavailable", 504: "timeout"}.get(
        status, "invalid_request_error")
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": kind, "param": param, "code": None}})


def server_error(message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=500, content={"error": {"message": message, "type": "server_error",
                                                            "param": None, "code": None}})


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
            return await error_response(413, f"request body of {size} bytes exceeds the limit of {self.limit} bytes")(
                scope, receive, send)
        messages, total = [], 0
        while True:  # read the whole (bounded) body first, then replay it to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.limit:
                too_big = error_response(413, f"request body exceeds the limit of {self.limit} bytes")
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def allowed_hosts_for(bind: str, extra=()) -> tuple[str, ...]:
    """The Host names a server bound to `bind` answers: the bound address (and, for loopback, the
    loopback names) plus `extra`. A wildcard bind (0.0.0.0, ::) answers any host unless `extra` names
    some: the server is then reachable under names it cannot know."""
    if bind in WILDCARD_BINDS:
        return tuple(extra) or ("*",)
    loopback = bind in LOOPBACK_HOSTS or bind.startswith("127.")
    return tuple(dict.fromkeys([bind, *(LOOPBACK_HOSTS if loopback else ()), *extra]))


def host_name(header: str) -> str:
    """The host of a Host header, without its port: `example.com:80` → `example.com`, `[::1]:80` → `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: a request whose Host header names none of `allowed` gets a 421 (a DNS
    rebinding page in a browser would otherwise reach a server on localhost under its own name)."""

    def __init__(self, app, allowed) -> None:
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_name(header) not in self.allowed:
            message = (f"Host {header!r} is not served here (allowed: {', '.join(sorted(self.allowed))}); "
                       "start the server with --allowed-hosts to add a name")
            return await error_response(421, message)(scope, receive, send)
        return await self.app(scope, receive, send)


def add_request_checks(app, allowed_hosts=LOOPBACK_HOSTS) -> None:
    """Host check, body-size limit, validation errors as 4xx responses that say what is wrong, and
    no internal detail in any other error (it goes to the server's log)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    app.add_middleware(BodyLimit)
    app.add_middleware(HostCheck, allowed=allowed_hosts)  # added last: runs first

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        kind = first.get("type", "")
        if kind == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return error_response(400, f"request body is not valid JSON: {reason}".strip())
        if kind == "extra_forbidden":
            return error_response(400, f"unknown field {where!r}", where)
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}", where)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return server_error("internal server error (details are in the server's log)")


class CountResponses:
    """ASGI middleware: every /v1/ answer counted by HTTP status, and its duration observed."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(status=str(status[0])).inc()
            self.metrics.request_duration.observe(time.monotonic() - started)
