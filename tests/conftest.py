"""Shared test settings: derandomised hypothesis, the data directory, small configs."""

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _fast_compiles_for_the_suite() -> None:
    """Most of the suite's time is XLA compiling tiny programs, not running them: compile with
    XLA's cheap pass pipeline and keep compiled programs in a cache shared by the whole session
    (its xdist workers and the subprocesses tests start inherit these variables). The cheap
    pipeline fuses less, so a result can differ from an optimised build's in its last bits, which
    the tests' tolerances allow; bitwise comparisons compare two programs built the same way.
    Export JAX_DISABLE_MOST_OPTIMIZATIONS=0 to run the suite as users compile."""
    if "jax" in sys.modules:  # JAX reads these variables when it is imported
        raise RuntimeError("tests/conftest.py must run before jax is imported: a plugin imported it")
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache_dir = tempfile.mkdtemp(prefix="jaxgpt-tests-xla-cache-")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


_fast_compiles_for_the_suite()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
    if hasattr(app.state, "batcher"):  # `jaxgpt serve`'s app: its draining server, reachable by the test
        from jaxgpt.inference.serve import make_server

        server = app.state.server = make_server(app, "127.0.0.1", port, drain_s=2.0, log_level="warning")
    else:
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
        thread.join(timeout=30)


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


def random_hf_model(config_cls, model_cls, seed: int = 0, router_scale: float = 1.0, **config):
    """A randomly initialised transformers model in eval mode, its norms moved off their initial 1
    (or Gemma's 0) so that every weight matters; MoE routers scaled by `router_scale` (random
    routers are near-uniform, where float rounding could flip a top-k choice between two
    implementations)."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("gate.weight") and "proj" not in name:  # a router (Mixtral, Qwen3-MoE)
                p.mul_(router_scale)
    return model


def assert_causal_and_decodes_like_uncached(params, cfg, new_tokens: int = 12) -> None:
    """The model is causal (changing later tokens leaves earlier logits), and a ragged batch decoded
    with the KV cache gives each row the tokens it gets decoded alone without a cache."""
    import numpy as np

    from jaxgpt.inference.generate import generate, generate_batch
    from jaxgpt.nn.model import GPT

    rng = np.random.default_rng(6)
    ids = rng.integers(0, cfg.vocab_size, (1, 20))
    changed = ids.copy()
    changed[0, 11:] = rng.integers(0, cfg.vocab_size, 9)
    a, b = GPT(cfg).apply(params, ids), GPT(cfg).apply(params, changed)
    np.testing.assert_allclose(a[:, :11], b[:, :11], rtol=1e-6, atol=1e-6)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13], [5, 9]]  # ragged: padded rows share the batch
    for prompt, new in zip(prompts, generate_batch(params, cfg, prompts, new_tokens)):
        assert new == generate(params, cfg, [prompt], new_tokens, use_cache=False)[0, len(prompt):].tolist()
