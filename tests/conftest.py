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
