"""The server's own property: a request answers the same whatever else is being served.

For every cache layout the server can hold (softmax columns, a sliding window's ring with GQA,
MLA's latent cache, linear attention's state, Gated DeltaNet's state) and both schedulers, greedy
requests with prompts of odd lengths (several prefill chunks each), different `max_tokens` and an
end-of-text id that stops some of them early arrive while others prefill and decode; each one's
tokens must equal the same request served alone by the same scheduler. The continuous scheduler
is driven turn by turn (`_turn`), so the interleavings hypothesis draws are reproduced exactly:
a prompt between two of its prefill chunks while other rows decode is the case that once lost a
prompt's first position.
"""

import threading
import time

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt.config import get_preset
from jaxgpt.data.tokenizer import IdsTokenizer
from jaxgpt.inference.batcher import Batcher
from jaxgpt.inference.continuous import ContinuousBatcher
from jaxgpt.inference.requests import Job
from jaxgpt.nn.model import init_params

CACHE_LAYOUTS = {
    "softmax": dict(),
    "ring+gqa": dict(position="rope", sliding_window=6, global_every=2, n_kv_heads=2),
    "mla": dict(attention="mla", latent_dim=16, position="rope"),
    "linear": dict(attention="linear", position="none"),
    "gated_deltanet": dict(attention="gated_deltanet", position="none"),
}
EOT = 34  # a token these random models pick now and then, so some requests stop before max_tokens
SLOTS, CHUNK = 3, 4
SCALE = 8.0  # all weights × 8: at init scale a random model's greedy tokens hardly depend on its context

class _Inbox:
    """Stands in for the app's event loop and queue: events are kept, in order."""

    def __init__(self) -> None:
        self.events: list = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)

    def put_nowait(self, event) -> None:
        self.events.append(event)


def _job(prompt: list, max_tokens: int) -> Job:
    inbox = _Inbox()
    return Job(prompt_ids=list(prompt), max_tokens=max_tokens, temperature=0.0, top_p=None, top_k=None, seed=None,
               stop=[], loop=inbox, events=inbox)


def _answer(job: Job) -> tuple:
    assert job.finish_reason in ("stop", "length"), (job.finish_reason, job.events.events[-1])
    return tuple(job.ids), job.finish_reason


def _serve_continuous(batcher: ContinuousBatcher, requests: list) -> list:
    """Requests (arrival turn, prompt, max_tokens) submitted at their turns; the answers."""
    jobs = [_job(p, m) for _, p, m in requests]
    turn = 0
    while any(j.finish_reason is None for j in jobs):
        for (arrival, _, _), job in zip(requests, jobs):
            if arrival == turn:
                batcher.submit(job)
        batcher._turn()
        turn += 1
        assert turn < 2000, "the scheduler stopped making progress"
    assert batcher.prefilling is None and not any(batcher.rows)
    return [_answer(j) for j in jobs]


def _serve_dynamic(batcher: Batcher, requests: list) -> list:
    """Requests submitted `arrival` × 5 ms apart to the running batcher thread; the answers."""
    jobs = [_job(p, m) for _, p, m in requests]
    start = time.monotonic()
    for (arrival, _, _), job in sorted(zip(requests, jobs), key=lambda aj: aj[0][0]):
        time.sleep(max(0.0, start + arrival * 0.005 - time.monotonic()))
        batcher.submit(job)
    deadline = time.monotonic() + 300
    while any(j.finish_reason is None for j in jobs):
        assert time.monotonic() < deadline, "the dynamic batcher did not answer"
        time.sleep(0.005)
    return [_answer(j) for j in jobs]


_BATCHERS: dict = {}


def _batcher(layout: str, batching: str):
    """One scheduler per (layout, batching) for the whole module: compiled once, reused by every
    example (so slots are also reused by requests after others)."""
    key = (layout, batching)
    if key not in _BATCHERS:
        cfg = get_preset("test", context_length=40, **CACHE_LAYOUTS[layout])
        params = jax.tree.map(lambda w: w * SCALE, init_params(cfg, seed=1))
        tok = IdsTokenizer(cfg.vocab_size, eos=EOT)
        if batching == "continuous":
            _BATCHERS[key] = ContinuousBatcher(params, cfg, tok, slots=SLOTS, prefill_chunk=CHUNK, max_tokens_limit=16)
        else:
            b = Batcher(params, cfg, tok, max_batch=4, batch_wait_s=0.01, max_tokens_limit=16)
            b.start(warmup=False)
            _BATCHERS[key] = b
    return _BATCHERS[key]


@pytest.fixture(scope="module", autouse=True)
def _stop_batcher_threads():
    yield
    for batcher in _BATCHERS.values():
        if isinstance(batcher, Batcher):
            batcher.shutdown(drain_s=1.0)
    _BATCHERS.clear()


requests_st = st.lists(
    st.tuples(st.integers(0, 12), st.integers(1, 19), st.integers(1, 12), st.integers(0, 2**31 - 1)),
    min_size=2, max_size=6,
).map(lambda rows: [(t, np.random.default_rng(s).integers(0, 64, n).tolist(), m) for t, n, m, s in rows])


def _check_each_answers_as_alone(batching: str, layout: str, requests: list, serve) -> None:
    batcher = _batcher(layout, batching)
    alone = [serve(batcher, [(0, p, m)])[0] for _, p, m in requests]
    together = serve(batcher, requests)
    for r, (got, want) in enumerate(zip(together, alone)):
        assert got == want, (f"request {r} of {len(requests)} (arrival, prompt length, max_tokens) = "
                             f"{requests[r][0], len(requests[r][1]), requests[r][2]}: {got} served together, "
                             f"{want} alone")


@pytest.mark.parametrize("layout", list(CACHE_LAYOUTS))
@settings(max_examples=6)
@given(requests=requests_st)
def test_continuous_batching_answers_each_request_as_if_alone(layout, requests):
    _check_each_answers_as_alone("continuous", layout, requests, _serve_continuous)


def test_continuous_batching_same_prompt_twice_at_once():
    """The audit's case: the same multi-chunk prompt sent twice while a third request decodes."""
    prompt = np.random.default_rng(0).integers(0, 64, 13).tolist()  # chunks 4 + 4 + 4 + 1
    requests = [(0, [5, 6], 12), (1, prompt, 10), (1, prompt, 10)]
    _check_each_answers_as_alone("continuous", "softmax", requests, _serve_continuous)
    twice = _serve_continuous(_batcher("softmax", "continuous"), requests)
    assert twice[1] == twice[2]


@pytest.mark.parametrize("layout", list(CACHE_LAYOUTS))
@settings(max_examples=2)
@given(requests=requests_st)
def test_dynamic_batching_answers_each_request_as_if_alone(layout, requests):
    _check_each_answers_as_alone("dynamic", layout, requests, _serve_dynamic)


def test_a_free_slot_is_left_untouched_by_the_decoding_step():
    """The mechanism under the property: after steps in which a slot is inactive, its cache row is
    bit for bit what it was, for every cache layout."""
    import jax

    for layout in CACHE_LAYOUTS:
        engine = _batcher(layout, "continuous").engine
        engine.prefill(1, [1, 2, 3, 4], 0)
        row = lambda r: jax.tree.map(lambda c: np.asarray(c[r]), engine.cache)  # noqa: E731
        before, before_active = row(1), row(0)
        s = engine.slots
        active = np.arange(s) != 1
        zeros = np.zeros(s, np.int32)
        engine.step(active, zeros + 9, zeros + 4, zeros.astype(np.uint32), zeros.astype(np.uint32),
                    np.zeros(s, np.float32), zeros, np.ones(s, np.float32))
        jax.tree.map(np.testing.assert_array_equal, before, row(1))
        written = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(a != b), before_active, row(0)))
        assert any(written), layout  # the active row was written


@settings(max_examples=200)
@given(tokens=st.lists(st.sampled_from("ab o\n"), min_size=1, max_size=12),
       stops=st.lists(st.text("ab o\n", min_size=1, max_size=3), max_size=3), max_tokens=st.integers(1, 12))
def test_streamed_text_is_the_answer_cut_at_the_first_stop(tokens, stops, max_tokens):
    """What a stream sends, joined, is the whole answer: the text up to the earliest stop string
    (never a piece of the stop string itself), or all of it when no stop string comes."""
    from jaxgpt.data.tokenizer import CharTokenizer
    from jaxgpt.inference.requests import RequestQueue

    tok = CharTokenizer(list("ab o\n"))
    queue = RequestQueue(tok, max_queue=1, metrics=None)
    job = _job([0], max_tokens)
    job.stop = stops
    for t in tokens:
        if queue.take_token(job, tok.encode(t)[0]):
            break
    else:
        job.finish("length")
    full = "".join(tokens[:max_tokens])
    cuts = [full.find(s) for s in stops if s in full]
    want = full[:min(cuts)] if cuts else full
    assert job.text == "".join(e["text"] for e in job.events.events if "text" in e)
    assert job.text == want, (job.text, want)
