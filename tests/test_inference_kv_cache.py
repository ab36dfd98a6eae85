"""KV-cache decoding: same tokens and logits as recomputing the window, ragged batches, streaming."""

import jax
import numpy as np
import pytest

from jaxgpt.cli.main import main
from jaxgpt.config import get_preset
from jaxgpt.inference.generate import generate, generate_batch
from jaxgpt.nn.model import GPT, init_params

CFG = get_preset("test")
PARAMS = init_params(CFG, seed=1)


def test_cached_equals_uncached_greedy_and_sampled():
    prompt = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 5))
    for kw in ({}, {"temperature": 1.0, "top_k": 8, "seed": 3}):
        np.testing.assert_array_equal(generate(PARAMS, CFG, prompt, 10, use_cache=True, **kw),
                                      generate(PARAMS, CFG, prompt, 10, use_cache=False, **kw))


def test_ragged_batch_matches_each_prompt_alone_with_logits_every_step():
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    new, logits = generate_batch(PARAMS, CFG, prompts, 6, return_logits=True)
    apply = jax.jit(GPT(CFG).apply)
    for r, prompt in enumerate(prompts):
        alone = generate(PARAMS, CFG, [prompt], 6, use_cache=False)[0, len(prompt):].tolist()
        assert new[r] == alone
        full = np.asarray(apply(PARAMS, np.array([prompt + new[r]])))[0]
        # float32: the cached path attends over a longer, masked key axis; same math up to rounding
        np.testing.assert_allclose(logits[r], full[len(prompt) - 1: len(prompt) + 5], atol=1e-5)


def test_eos_stops_each_row_and_streaming_reports_every_step():
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = generate_batch(PARAMS, CFG, prompts, 8)
    eos = free[1][2]
    seen = []
    new = generate_batch(PARAMS, CFG, prompts, 8, eos_id=eos, on_token=lambda t, s: seen.append((s, t.tolist())))
    for row_free, row in zip(free, new):
        cut = row_free.index(eos) if eos in row_free else len(row_free)
        assert row == row_free[:cut]
    assert [s for s, _ in seen] == list(range(len(seen))) and len(seen) <= 8
    assert [t[1] for _, t in seen[:3]] == free[1][:3]


def test_context_limits():
    with pytest.raises(ValueError, match="exceeds the context window"):
        generate_batch(PARAMS, CFG, [[1] * 10], 7)  # 10 + 7 > 16
    # generate() falls back to the sliding window there, with the book's cropping semantics
    out = generate(PARAMS, CFG, [[1] * 10], 7)
    assert out.shape == (1, 17)


def test_cli_batch_file_and_streaming(tmp_path, capsys):
    batch = tmp_path / "prompts.txt"
    batch.write_text("Hello there\nA longer prompt, with more words in it\n")
    assert main(["generate", "--preset", "test", "--batch-file", str(batch), "--max-new-tokens", "4", "--json"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 2
    import json
    records = [json.loads(line) for line in lines]
    assert records[1]["prompt"].startswith("A longer") and len(records[0]["tokens"]) <= 4
    assert main(["generate", "--preset", "test", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Hi")


def test_on_token_can_stop_rows_early():
    prompts = [[1, 2, 3], [4, 5, 6]]
    full = generate_batch(PARAMS, CFG, prompts, 8)
    stop_row0_at_step2 = lambda tokens, step: np.array([step >= 2, False])  # noqa: E731
    new = generate_batch(PARAMS, CFG, prompts, 8, on_token=stop_row0_at_step2, eos_id=CFG.vocab_size - 1)
    assert new[0] == [t for t in full[0][:3]] and new[1] == full[1][: len(new[1])]
    assert len(new[1]) == 8 or CFG.vocab_size - 1 in full[1]
