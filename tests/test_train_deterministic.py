"""`train.deterministic_reduce`: bitwise the same parameters on 1, 2 and 4 devices, across two
processes, and when a run stopped on 4 devices is resumed on 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.config import ConfigError
from jaxgpt.train.deterministic import check_shards, tree_pairwise_sum
from jaxgpt.train.fingerprint import compare_runs
from jaxgpt.weights.checkpoint import load_for_inference

HERE = Path(__file__).parent
SETS = ["train.batch_size=8", "train.eval_every=3", "train.eval_batches=2", "train.ckpt_every=3", "train.samples=0",
        "train.peak_flops=1e10", "train.log_every=1", "train.warmup_steps=2", "train.lr=3e-3", "train.decay_steps=6",
        "train.deterministic_reduce=4", "model.drop_rate=0.1"]


def test_the_tree_pairs_fixed_partners():
    calls = []
    total = tree_pairwise_sum(list("abcdefgh"), lambda x, y: calls.append((x, y)) or f"({x}{y})")
    assert total == "(((ab)(cd))((ef)(gh)))"
    # device 1 of 2 sums (e f g h) alone: the same subtree as on one device
    assert tree_pairwise_sum(list("efgh"), lambda x, y: f"({x}{y})") == "((ef)(gh))"


@pytest.mark.parametrize("shards,devices,micro,batch,words", [
    (6, 1, 1, 12, "power of two"), (8, 1, 2, 16, "micro_batches"), (8, 1, 1, 12, "divisible"),
    (4, 8, 1, 16, "device count"), (8, 3, 1, 24, "device count")])
def test_layouts_that_cannot_keep_the_tree_are_refused(shards, devices, micro, batch, words):
    with pytest.raises(ConfigError, match=words):
        check_shards(shards, devices, micro, batch)


def test_a_run_with_micro_batches_is_refused_before_training():
    """The trainer is built from the run's config: micro_batches must reach the check, not be dropped."""
    from jaxgpt.config import get_preset
    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.loop import _build_trainer

    with pytest.raises(ConfigError, match="micro_batches"):
        _build_trainer(get_preset("test"), TrainConfig(batch_size=8, micro_batches=2, deterministic_reduce=4))


def test_bitwise_equal_on_1_2_and_4_devices():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, str(HERE / "deterministic_equivalence.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert set(result["gpt2-dropout"]) >= {"deterministic:1", "deterministic:2", "deterministic:4"}
    for model, runs in result.items():
        assert runs.pop("param_change") > 1e-3, model  # training moved the parameters
        for layout, r in runs.items():
            assert r["bitwise"] and r["loss_bitwise"], (model, layout, r)


def _train(corpus, out, devices, extra=(), new_run=True):
    cmd = [sys.executable, "-m", "jaxgpt.cli", "train", "--out", str(out), "--no-progress", *extra]
    if new_run:  # a resumed run takes its configs from its checkpoint
        cmd += ["--data", str(corpus), "--preset", "test", "--tokenizer", "char"] + [a for s in SETS for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ok(*procs):
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [err for _, err in outs]


def _bitwise(run_a, run_b):
    a, _, _ = load_for_inference(run_a)
    b, _, _ = load_for_inference(run_b)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_two_processes_and_a_resume_from_4_devices_to_1_equal_the_straight_run(tmp_path):
    rng = np.random.default_rng(0)
    corpus = tmp_path / "words.txt"
    corpus.write_text(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"], 3000)))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    straight = _train(corpus, tmp_path / "straight", 1, ["--max-steps", "6"])
    moved = _train(corpus, tmp_path / "moved", 4, ["--max-steps", "3"])
    multi = [_train(corpus, tmp_path / "multi", 2, ["--max-steps", "6", "--coordinator", f"127.0.0.1:{port}",
                                                     "--num-processes", "2", "--process-id", str(i)]) for i in range(2)]
    errs = _ok(straight, moved, *multi)
    assert "4 cpu device(s) over 1 process(es)" in errs[1] and "4 cpu device(s) over 2 process(es)" in errs[2]
    resumed = _train(corpus, tmp_path / "moved", 1, ["--resume", "--max-steps", "6"], new_run=False)
    assert "steps 3->6" in _ok(resumed)[0]
    for run in ("multi", "moved"):
        result = compare_runs(tmp_path / "straight", tmp_path / run)
        assert result["identical"] and result["last_equal_step"] == 6, (run, result)
        assert _bitwise(tmp_path / "straight", tmp_path / run), run
