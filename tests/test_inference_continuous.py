"""Continuous batching: the slot decoder against the decoder, per-row sampling, and the scheduler
over HTTP (staggered arrivals against the dynamic batcher, seeds that ignore their company,
backpressure, timeouts, shutdown)."""

import http.client
import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt.config import get_preset
from jaxgpt.inference.generate import Decoder
from jaxgpt.inference.sampling import _filter_top_k_top_p, sample_rows
from jaxgpt.inference.slots import SlotDecoder, chunk_lengths
from jaxgpt.nn.model import init_params


@settings(derandomize=True, deadline=None, max_examples=60)
@given(n=st.integers(1, 500), chunk_log2=st.integers(0, 7))
def test_prefill_chunks_are_exact_powers_of_two(n, chunk_log2):
    chunks = chunk_lengths(n, 1 << chunk_log2)
    assert sum(chunks) == n
    assert all(c & (c - 1) == 0 and c <= 1 << chunk_log2 for c in chunks)
    assert chunks == sorted(chunks, reverse=True)


FILTER = jax.jit(_filter_top_k_top_p)
SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 3, 0.9)]  # (temperature, k, p)


def test_sampling_follows_the_numpy_reference_distribution():
    """Five rows with their own settings, 20,000 draws each: the frequencies are the reference's
    probabilities within 0.015, and no draw falls outside the kept set."""
    from jaxgpt.reference.sampling import distribution

    logits_bv = jax.random.normal(jax.random.key(0), (5, 12)) * 1.5
    t_b, k_b, p_b = (jnp.array(c, dt) for c, dt in zip(zip(*SETTINGS), (jnp.float32, jnp.int32, jnp.float32)))
    draw = jax.jit(jax.vmap(lambda key: sample_rows(jax.random.split(key, 5), logits_bv, t_b, k_b, p_b)))
    draws_nb = np.asarray(draw(jax.random.split(jax.random.key(1), 20_000)))
    for r, (t, k, p) in enumerate(SETTINGS):
        want_v = distribution(np.asarray(logits_bv[r]), t, k, p)
        freq_v = np.bincount(draws_nb[:, r], minlength=12) / len(draws_nb)
        assert np.abs(freq_v - want_v).max() < 0.015, (r, freq_v.round(3), want_v.round(3))
        assert freq_v[want_v == 0].sum() == 0


@settings(derandomize=True, deadline=None, max_examples=40)
@given(seed=st.integers(0, 10_000), k=st.integers(0, 12), p=st.floats(0.05, 1.0), ties=st.booleans())
def test_filter_keeps_exactly_the_reference_set(seed, k, p, ties):
    """The bisection thresholds keep the tokens the sorting reference keeps (ties included);
    a p within 1e-5 of a cumulative mass is skipped (float32 and float64 sums may round apart)."""
    from jaxgpt.reference.sampling import kept

    logits = np.asarray(jax.random.normal(jax.random.key(seed), (16,)), np.float32) * 2
    if ties:
        logits = np.round(logits)  # many equal logits
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if min(abs(probs[logits > x].sum() - p) for x in logits) < 1e-5:  # the masses above each value
        return
    got = np.asarray(FILTER(jnp.asarray(logits)[None], jnp.int32(k), jnp.float32(p)))[0] > -np.inf
    np.testing.assert_array_equal(got, kept(logits, 1.0, k, p))


def test_a_row_draws_the_same_token_whatever_shares_its_batch():
    logits_bv = jax.random.normal(jax.random.key(2), (5, 50)) * 2
    t_b, k_b, p_b = (jnp.array(c, dt) for c, dt in zip(zip(*SETTINGS), (jnp.float32, jnp.int32, jnp.float32)))
    rows = jax.jit(sample_rows)
    for trial in range(3):
        keys = jax.random.split(jax.random.key(trial), 5)
        together = rows(keys, logits_bv, t_b, k_b, p_b)
        for r in range(5):
            alone = rows(keys[r:r + 1], logits_bv[r:r + 1], t_b[r:r + 1], k_b[r:r + 1], p_b[r:r + 1])
            assert int(alone[0]) == int(together[r])


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(position="rope", sliding_window=8, global_every=2, n_kv_heads=2),  # a ring cache and GQA
    dict(attention="linear"),  # a recurrent state: chunked prefill must not feed it padding
])
def test_slot_decoder_greedy_equals_the_decoder(overrides):
    """Three prompts prefilled in exact chunks into three slots (one reused after another request),
    decoded together, give each prompt's own greedy continuation from `Decoder`."""
    cfg = get_preset("test", context_length=48, **overrides)
    params = init_params(cfg, seed=0)
    dec = Decoder(params, cfg)
    engine = SlotDecoder(dec.params, dec.config, slots=3, prefill_chunk=8)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (13, 5, 21)]
    want = dec.generate_batch(prompts, 10)  # left-padded together: each row as if alone (tested elsewhere)
    # slot 1 first holds another request, so the new one must not see its cache
    engine.prefill(1, list(rng.integers(0, cfg.vocab_size, 16)), 0)
    tokens, cols, out = np.zeros(3, np.int32), np.zeros(3, np.int32), [[] for _ in prompts]
    for s, p in enumerate(prompts):
        start = 0
        for c in chunk_lengths(len(p), 8):
            logits = engine.prefill(s, p[start:start + c], start)
            start += c
        tokens[s], cols[s] = engine.first_token(logits, 0, 0.0, 0, 1.0), len(p)
        out[s].append(int(tokens[s]))
    zeros = np.zeros(3, np.uint32)
    for i in range(9):
        tokens = engine.step(np.ones(3, bool), tokens, cols, zeros, zeros + i + 1, np.zeros(3, np.float32), np.zeros(3, np.int32),
                             np.ones(3, np.float32)).astype(np.int32)
        cols += 1
        for s in range(3):
            out[s].append(int(tokens[s]))
    assert out == want


# --- the scheduler over HTTP -------------------------------------------------------------------

from jaxgpt.data.tokenizer import GPT2Tokenizer  # noqa: E402
from jaxgpt.inference.requests import RequestQueue  # noqa: E402
from jaxgpt.inference.serve import build_app  # noqa: E402
from conftest import running_server  # noqa: E402

TOK = GPT2Tokenizer()
CFG = get_preset("test", vocab_size=TOK.vocab_size, context_length=256)
PARAMS = init_params(CFG, seed=0)


def _post(port, path, body, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null"), dict(resp.getheaders())
    conn.close()
    return out


def _health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


@pytest.fixture
def paced(monkeypatch):
    """Every token takes at least `seconds` on the host, so timings do not hinge on this machine."""
    def pace(seconds):
        take = RequestQueue.take_token
        monkeypatch.setattr(RequestQueue, "take_token", lambda self, *a: (time.sleep(seconds), take(self, *a))[1])
    return pace


def _timed(port, results, key, body):
    start = time.monotonic()
    status, answer, _ = _post(port, "/v1/completions", body)
    results[key] = (status, answer, time.monotonic() - start, time.monotonic())


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_short_request_does_not_wait_for_a_long_one(batching, paced):
    """A 5-token request sent while a 200-token one decodes: with continuous batching it finishes in
    under a quarter of the long one's time; the dynamic batcher makes it wait for the long one."""
    paced(0.004)
    app = build_app(PARAMS, CFG, TOK, model_name="m", batching=batching, max_batch=4, prefill_chunk=16,
                    max_tokens_limit=220, batch_wait_s=0.0)
    with running_server(app) as port:
        long_body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
        _post(port, "/v1/completions", {"prompt": "warm", "max_tokens": 2, "temperature": 0})
        results = {}
        long_thread = threading.Thread(target=_timed, args=(port, results, "long", long_body))
        long_thread.start()
        time.sleep(0.15)  # the long request is decoding
        _timed(port, results, "short", {"prompt": "Hi", "max_tokens": 5, "temperature": 0})
        long_thread.join()
    (s_long, a_long, t_long, end_long), (s_short, _, t_short, end_short) = results["long"], results["short"]
    assert s_long == s_short == 200 and a_long["usage"]["completion_tokens"] == 200
    if batching == "continuous":
        assert t_short < t_long / 4, (t_short, t_long)
        assert end_short < end_long
    else:
        assert end_short >= end_long - 0.05  # it waited for the whole long batch


def test_seeded_request_gives_the_same_text_whatever_shares_its_batch():
    app = build_app(PARAMS, CFG, TOK, model_name="m", max_batch=4, prefill_chunk=16, max_tokens_limit=32)
    seeded = {"prompt": "The weather", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    with running_server(app) as port:
        alone = _post(port, "/v1/completions", seeded)[1]["choices"][0]["text"]
        assert _post(port, "/v1/completions", seeded)[1]["choices"][0]["text"] == alone  # and again
        results = {}
        others = [{"prompt": f"Other {i}", "max_tokens": 24, "temperature": t, "top_k": k}
                  for i, (t, k) in enumerate([(0.0, None), (1.2, 5), (0.7, None)])]
        threads = [threading.Thread(target=_timed, args=(port, results, i, b)) for i, b in enumerate(others)]
        threads.append(threading.Thread(target=_timed, args=(port, results, "seeded", seeded)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = _health(port)["batches_decoded"]
    assert results["seeded"][1]["choices"][0]["text"] == alone
    assert all(r[0] == 200 for r in results.values())
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results.values())
    assert steps < tokens + 2 * 16  # the four requests, whatever their settings, shared steps


def test_backpressure_timeout_and_shutdown(paced):
    """One slot, a queue of one: the third request gets 429 with Retry-After; a request past its
    time gets 504; on shutdown the waiting client gets 503 and the running row its answer."""
    paced(0.05)
    app = build_app(PARAMS, CFG, TOK, model_name="m", max_batch=1, max_queue=1, prefill_chunk=16,
                    max_tokens_limit=64, request_timeout_s=30.0)
    results = {}
    with running_server(app) as port:
        running = threading.Thread(target=_timed, args=(port, results, "running",
                                                        {"prompt": "a", "max_tokens": 30, "temperature": 0}))
        running.start()
        deadline = time.time() + 30
        while _health(port)["queued"] or not app.state.batcher.rows[0]:  # the first one holds the slot
            assert time.time() < deadline
            time.sleep(0.02)
        waiting = threading.Thread(target=_timed, args=(port, results, "waiting",
                                                        {"prompt": "b", "max_tokens": 4, "temperature": 0}))
        waiting.start()
        while _health(port)["queued"] < 1:
            assert time.time() < deadline
            time.sleep(0.02)
        status, body, headers = _post(port, "/v1/completions", {"prompt": "c", "max_tokens": 4})
        assert status == 429 and headers.get("retry-after") == "1", (status, body, headers)
        assert "busy" in body["error"]["message"] and body["error"]["type"] == "rate_limit_error"
        app.state.server.should_exit = True  # shutdown: the waiting client is answered at once
        waiting.join(timeout=10)
        running.join(timeout=30)
    assert results["waiting"][0] == 503 and "shutting down" in results["waiting"][1]["error"]["message"]
    status, body = results["running"][:2]
    assert status == 200 and body["usage"]["completion_tokens"] == 30  # it finished within the drain time
    # a request that outlives its time limit
    app = build_app(PARAMS, CFG, TOK, model_name="m", max_batch=1, prefill_chunk=16, max_tokens_limit=64,
                    request_timeout_s=0.5)
    with running_server(app) as port:
        status, body, _ = _post(port, "/v1/completions", {"prompt": "a", "max_tokens": 60, "temperature": 0})
    assert status == 504 and "timed out after 0.5 s" in body["error"]["message"], body
