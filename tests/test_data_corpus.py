import numpy as np
import pytest

from jaxgpt.data.corpus import (
    DataError, RandomWindowSampler, SlidingWindowDataset, corpus_path, embedded_corpus_text, load_text,
    open_token_file, split_train_val, write_token_file,
)
from jaxgpt.data.tokenizer import GPT2Tokenizer


def test_the_verdict_sliding_window_matches_book(shared_data_dir, monkeypatch):
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(shared_data_dir))
    text = load_text("the-verdict")
    assert len(text) == 20479
    ids = GPT2Tokenizer().encode(text)
    assert len(ids) == 5145
    ds = SlidingWindowDataset(ids, max_length=4, stride=1)
    x, y = next(ds.batches(1, shuffle=False))
    assert x.tolist() == [[40, 367, 2885, 1464]]
    assert y.tolist() == [[367, 2885, 1464, 1807]]


def test_sliding_window_counts_and_drop_last():
    ids = np.arange(21)
    ds = SlidingWindowDataset(ids, max_length=4, stride=4)
    assert len(ds) == len(range(0, 21 - 4, 4)) == 5
    np.testing.assert_array_equal(ds.targets, ds.inputs + 1)
    assert sum(1 for _ in ds.batches(2, drop_last=True)) == 2
    assert sum(1 for _ in ds.batches(2, drop_last=False)) == 3
    shuffled = np.concatenate([x for x, _ in ds.batches(1, shuffle=True, seed=1)])
    assert sorted(shuffled[:, 0].tolist()) == [0, 4, 8, 12, 16]


def test_too_short_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="too short"):
        SlidingWindowDataset(np.arange(4), max_length=4, stride=1)
    with pytest.raises(DataError, match="too short"):
        RandomWindowSampler(np.arange(8), context_length=8, batch_size=2)


def test_missing_corpus_names_file_and_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"tinyshakespeare\.txt.*JAXGPT_DATA_DIR"):
        corpus_path("tinyshakespeare")
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(DataError, match="sha256"):
        corpus_path("tinyshakespeare")
    with pytest.raises(DataError, match="neither a named corpus"):
        load_text(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))


def test_embedded_corpus_needs_nothing():
    text = embedded_corpus_text()
    assert len(text) > 100_000 and load_text("python-docs") == text


def test_random_windows_are_a_pure_function_of_seed_and_step(tmp_path):
    ids = np.arange(1000) % 500
    path = write_token_file(ids, tmp_path / "tokens.bin", vocab_size=500)
    tokens = open_token_file(path)
    assert tokens.dtype == np.dtype("<u2")
    s1 = RandomWindowSampler(tokens, context_length=16, batch_size=4, seed=7)
    s2 = RandomWindowSampler(np.asarray(ids), context_length=16, batch_size=4, seed=7)
    x1, y1 = s1.batch(3)
    x2, y2 = s2.batch(3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])
    assert not np.array_equal(s1.batch(4)[0], x1)
    # a slice of rows is the same as slicing the global batch
    np.testing.assert_array_equal(s1.batch(3, rows=slice(2, 4))[0], x1[2:4])


def test_truncated_token_file_is_detected(tmp_path):
    path = write_token_file(np.arange(100), tmp_path / "t.bin", vocab_size=100)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        open_token_file(path)


def test_split_train_val():
    train, val = split_train_val("abcdefghij", 0.9)
    assert (train, val) == ("abcdefghi", "j")
    with pytest.raises(DataError):
        split_train_val("abc", 1.0)
