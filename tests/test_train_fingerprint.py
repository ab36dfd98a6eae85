"""Run fingerprints: bit-exact parameter checksums in metrics.jsonl and `jaxgpt compare-runs`.
(That a sharded tree has the same fingerprint as on one device: test_train_parallel.py.)"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.cli.main import main
from jaxgpt.train.fingerprint import compare_runs, fingerprint

TRAIN = ["--preset", "test", "--tokenizer", "char", "--max-steps", "6", "--no-progress", "--devices", "1",
         "--set", "train.batch_size=4", "--set", "train.log_every=2", "--set", "train.eval_every=6",
         "--set", "train.samples=0", "--set", "train.peak_flops=1e9", "--set", "train.context_length=16"]


def test_fingerprint_sees_one_flipped_bit_and_names_its_leaf():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.normal(size=(5, 7)).astype(np.float32)}, "b": rng.normal(size=3).astype(np.float32)}
    base = fingerprint(params)
    as_jax = {"a": {"kernel": jnp.asarray(params["a"]["kernel"])}, "b": jnp.asarray(params["b"])}
    assert fingerprint(as_jax) == base  # the values decide, not where they are held
    flipped = {**params, "a": {"kernel": params["a"]["kernel"].copy()}}
    flipped["a"]["kernel"][3, 4] = np.nextafter(flipped["a"]["kernel"][3, 4], np.float32(np.inf))  # one ulp
    other = fingerprint(flipped)
    assert other["checksum"] != base["checksum"]
    assert other["leaves"]["b"] == base["leaves"]["b"] and other["leaves"]["a/kernel"][0] != base["leaves"]["a/kernel"][0]
    swapped = {**params, "a": {"kernel": params["a"]["kernel"][::-1].copy()}}  # same values, other places
    assert fingerprint(swapped)["checksum"] != base["checksum"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    return path


def test_compare_runs_finds_the_first_step_where_runs_part(corpus, tmp_path, capsys):
    runs = {}
    for name, extra in [("a", []), ("a_again", []), ("b", ["--set", "train.lr=2e-3"])]:
        assert main(["train", "--data", str(corpus), "--out", str(tmp_path / name), *TRAIN, *extra]) == 0
        runs[name] = tmp_path / name
    capsys.readouterr()
    records = [json.loads(line) for line in (runs["a"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "fingerprint"] == [2, 4, 6]
    assert compare_runs(runs["a"], runs["a_again"])["identical"]  # same seed, same data: bitwise the same
    assert main(["compare-runs", str(runs["a"]), str(runs["a_again"])]) == 0
    assert "bitwise identical" in capsys.readouterr().out
    result = compare_runs(runs["a"], runs["b"])  # the learning rate differs from the first update on
    assert not result["identical"] and result["first_difference_step"] == 2 and result["last_equal_step"] is None
    assert 0 < result["params_differing"] <= result["params_total"] and result["moved"][0]["rel_norm_diff"] > 0
    assert result["moved"] == sorted(result["moved"], key=lambda m: -m["rel_norm_diff"])  # largest change first
    assert main(["compare-runs", str(runs["a"]), str(runs["b"]), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_difference_step"] == 2
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        compare_runs(runs["a"], tmp_path / "nothing")
