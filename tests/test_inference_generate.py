"""Generation: greedy equals step-by-step argmax, top-k/top-p support, per-row stopping, cropping."""

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxgpt.config import get_preset
from jaxgpt.inference.generate import generate, generate_text, sample_next, trim_at_eos
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.data.tokenizer import CharTokenizer

CFG = get_preset("test")
SAMPLE = jax.jit(sample_next)  # one compilation per logits shape instead of op-by-op dispatch
PARAMS = init_params(CFG, seed=1)


def test_greedy_equals_argmax_step_by_step_with_cropping():
    prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 13))
    out = generate(PARAMS, CFG, prompt, 8)  # 21 > context 16: the window slides
    ids = prompt.copy()
    apply = jax.jit(GPT(CFG).apply)
    for _ in range(8):
        logits = apply(PARAMS, ids[:, -CFG.context_length:])
        ids = np.concatenate([ids, np.argmax(logits[:, -1], axis=-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)


@given(k=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_top_k_never_samples_outside_the_k_largest(k, seed):
    logits = jax.random.normal(jax.random.key(seed), (4, 30))
    keys = jax.random.split(jax.random.key(seed + 1), 8)
    topk = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    for key in keys:
        tok = np.asarray(SAMPLE(key, logits, 1.5, k, 1.0))
        assert all(tok[i] in topk[i] for i in range(4))


@given(p=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_top_p_samples_only_from_the_nucleus(p, seed):
    logits = 2 * jax.random.normal(jax.random.key(seed), (3, 20))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for key in jax.random.split(jax.random.key(seed + 1), 8):
        tok = np.asarray(SAMPLE(key, logits, 1.0, 0, p))
        for i in range(3):
            order = np.argsort(-probs[i])
            mass_before = np.cumsum(probs[i][order]) - probs[i][order]
            nucleus = set(order[mass_before < p].tolist()) | {order[0]}
            assert tok[i] in nucleus


def test_sampling_is_reproducible_by_seed_and_temperature_zero_is_greedy():
    prompt = np.array([[1, 2, 3]])
    a = generate(PARAMS, CFG, prompt, 10, temperature=1.0, seed=5)
    b = generate(PARAMS, CFG, prompt, 10, temperature=1.0, seed=5)
    c = generate(PARAMS, CFG, prompt, 10, temperature=1.0, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(generate(PARAMS, CFG, prompt, 10, temperature=0.0, top_k=3),
                                  generate(PARAMS, CFG, prompt, 10))


def test_each_row_stops_at_its_own_eos():
    prompt = np.random.default_rng(3).integers(0, CFG.vocab_size, (3, 4))
    free = generate(PARAMS, CFG, prompt, 12)
    eos = int(free[0, 6])  # row 0 emits this token at its 3rd step; pick it as end-of-text
    out = generate(PARAMS, CFG, prompt, 12, eos_id=eos)
    for row_free, row in zip(free, out):
        new = row_free[4:].tolist()
        stop = new.index(eos) if eos in new else len(new)
        assert row[4:4 + stop].tolist() == new[:stop]
        assert (row[4 + stop:] == eos).all()
    assert trim_at_eos(out[0], eos, start=4) == free[0, 4:6].tolist()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        generate(PARAMS, CFG, [[1]], 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(PARAMS, CFG, [[1]], 2, top_p=1.5)
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 64\)"):
        generate(PARAMS, CFG, [[64]], 2)


def test_generate_text_with_char_tokenizer():
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,!?ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    cfg = CFG.replace(vocab_size=tok.vocab_size)
    text = generate_text(init_params(cfg), cfg, tok, "hello", 8, temperature=1.0, seed=0)
    assert text.startswith("hello") and len(text) <= 5 + 8 + len("<|endoftext|>")


def test_the_sliding_window_decodes_in_bounded_chunks(monkeypatch):
    """Beyond the context the window decoder runs chunk by chunk (its memory no longer grows with
    the tokens asked for): the chunks are bounded and give the tokens of a single pass."""
    import jaxgpt.inference.generate as gen

    prompt = [[1, 2, 3], [4, 5, 6]]
    whole = generate(PARAMS, CFG, prompt, 40, use_cache=False)
    monkeypatch.setattr(gen, "WINDOW_CHUNK", 7)
    chunks = list(gen.Decoder(PARAMS, CFG).window_chunks(prompt, 40))
    assert [c.shape[1] for c in chunks] == [7] * 5 + [5]
    np.testing.assert_array_equal(np.concatenate([np.asarray(prompt), *chunks], axis=1), whole)
    eos = int(whole[0, 10])  # a row that stops stays stopped across chunks
    stopped = generate(PARAMS, CFG, prompt, 40, use_cache=False, eos_id=eos)
    first = int(np.argmax(stopped[0, 3:] == eos)) + 3
    assert (stopped[0, first:] == eos).all()
