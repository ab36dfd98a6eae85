"""The arena's generated tasks and statistics: each task's hand-built solution scores 100 % at
every length, a wrong one does not; batches are a pure function of (task, seed, step); Welch's
test and the interval agree with their textbook formulas."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxgpt.arena.stats import mean_ci95, summarise, welch_p
from jaxgpt.arena.tasks import IGNORE, TaskError, make_task, token_accuracy

GENERATED = ["mqar", "induction", "passkey", "selective_copy"]


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("length", [64, 128, 512])
def test_hand_built_solution_scores_100_percent_and_a_wrong_one_does_not(name, length):
    task = make_task(name)
    for s in task.eval_sets(length, 16):
        assert s.x_bt.shape == s.y_bt.shape == (16, length)
        assert s.x_bt.min() >= 0 and s.x_bt.max() < task.vocab_size
        scored = s.y_bt != IGNORE
        assert scored.sum(1).min() >= 1  # every sequence asks something
        assert token_accuracy(task.solve(s.x_bt), s.y_bt) == 1.0, s.name
        # the same solution one position late (copying the input) is wrong almost everywhere
        assert token_accuracy(s.x_bt, s.y_bt) < 0.5, s.name
        rng = np.random.default_rng(0)
        assert token_accuracy(rng.integers(0, task.vocab_size, s.x_bt.shape), s.y_bt) < 0.3


@given(seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10**6))
def test_batches_are_a_pure_function_of_task_seed_and_step(seed, step):
    for name in GENERATED:
        task = make_task(name)
        a, b = task.train_batch(seed, step, 4, 64), task.train_batch(seed, step, 4, 64)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        other = task.train_batch(seed, step + 1, 4, 64)
        assert not np.array_equal(a[0], other[0])


def test_evaluation_sets_are_not_training_batches():
    task = make_task("mqar")
    train = {task.train_batch(0, i, 8, 64)[0].tobytes() for i in range(50)}
    assert all(s.x_bt.tobytes() not in train for s in task.eval_sets(64, 8))


def test_task_layouts():
    x, y = make_task("mqar", pairs=[3]).sample(np.random.default_rng(0), 32)
    assert len(set(x[:6:2])) == 3 and (y != IGNORE).sum() == 3  # distinct keys, one target per query
    x, y = make_task("induction", vocab=64).sample(np.random.default_rng(0), 32)
    assert np.array_equal(x[:16], x[16:]) and len(set(x[:16])) == 16 and (y != IGNORE).sum() == 15
    sets = make_task("passkey", depths=[0.0, 1.0]).eval_sets(64, 2)
    assert [s.name for s in sets] == ["depth=0", "depth=1"]
    assert sets[0].x_bt[0, 0] == 10  # the KEY marker opens the sequence at depth 0
    x, y = make_task("selective_copy", tokens=4).sample(np.random.default_rng(0), 20)
    assert list(x[:16][x[:16] >= 2]) == list(y[16:])


def test_bad_task_requests_are_named():
    with pytest.raises(TaskError, match="unknown arena task 'nope'"):
        make_task("nope")
    with pytest.raises(TaskError, match="bad options"):
        make_task("mqar", colour="red")
    with pytest.raises(TaskError, match="at least 64 tokens"):
        make_task("mqar", pairs=[16]).train_batch(0, 0, 2, 32)
    with pytest.raises(TaskError, match="even length"):
        make_task("induction", vocab=8).train_batch(0, 0, 2, 32)


def test_language_task_windows(shared_data_dir):
    task = make_task("lm-tinyshakespeare")
    x, y = task.train_batch(0, 0, 4, 32)
    assert np.array_equal(x[:, 1:], y[:, :-1])  # next-character targets
    (val,) = task.eval_sets(64, 3)
    assert val.x_bt.shape == (3, 64) and task.metric == "loss"
    with pytest.raises(TaskError, match="fewer than a window"):
        task.eval_sets(10**6, 1)


def test_welch_and_interval_match_the_textbook_formulas():
    a, b = [0.81, 0.84, 0.79, 0.88], [0.70, 0.75, 0.71]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    from scipy.stats import t as student_t

    p, degenerate = welch_p(a, b)
    assert p == pytest.approx(2 * student_t.sf(abs(t), dof), rel=1e-10) and not degenerate
    assert 0.001 < p < 0.05
    mean, ci = mean_ci95(a)
    assert mean == pytest.approx(np.mean(a)) and ci == pytest.approx(3.182446305 * np.std(a, ddof=1) / 2, rel=1e-6)
    assert mean_ci95([0.5]) == (0.5, None) and welch_p([1.0], [1.0, 2.0]) == (None, False)
    assert welch_p([1.0, 1.0], [1.0, 1.0]) == (1.0, True) and welch_p([1.0, 1.0], [0.5, 0.5]) == (0.0, True)
    summary = summarise({"base": {"t:acc": b}, "v": {"t:acc": a}}, "base")
    assert summary["base"]["t:acc"]["p_value"] is None and summary["v"]["t:acc"]["p_value"] == pytest.approx(p)
