"""Shared test settings: derandomised hypothesis, the data directory, small configs."""

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "jaxgpt", derandomize=True, deadline=None, max_examples=10,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jaxgpt")


@pytest.fixture
def shared_data_dir() -> Path:
    """The public data sets (JAXGPT_DATA_DIR); tests needing them skip with a reason when unset."""
    value = os.environ.get("JAXGPT_DATA_DIR")
    if not value:
        pytest.skip("JAXGPT_DATA_DIR is not set: the public data sets (../shared/data) are needed")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"JAXGPT_DATA_DIR={value} is not a directory")
    return path


@contextlib.contextmanager
def running_server(app, start_timeout_s: float = 120):
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields the port."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + start_timeout_s
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def assert_serves_greedy_like_the_decoder(params, cfg, tok, prompt: str = "abc", max_tokens: int = 6) -> None:
    """`jaxgpt serve`'s app answers a greedy completion with the decoder's own tokens."""
    import http.client
    import json

    from jaxgpt.inference.generate import generate_batch
    from jaxgpt.inference.serve import build_app

    app = build_app(params, cfg, tok, model_name="m", max_tokens_limit=max_tokens + 2, warmup=False)
    with running_server(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))
        body = json.loads(conn.getresponse().read())
    want = generate_batch(params, cfg, [tok.encode(prompt)], body["usage"]["completion_tokens"], eos_id=tok.eot_id)[0]
    assert body["choices"][0]["text"] == tok.decode(want)
