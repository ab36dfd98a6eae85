"""Sharded jit training across processes: two processes × 2 simulated CPU devices (gloo over
127.0.0.1) match one process × 4 devices, and the checkpoint written on a 4-device mesh restores
onto the single device of this test process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.weights.checkpoint import load_for_inference

ROOT = Path(__file__).parent.parent
TRAIN = ["--preset", "test", "--tokenizer", "char", "--max-steps", "6", "--no-progress", "--mesh", "data=2,fsdp=2"]
SETS = ["train.batch_size=8", "train.eval_every=3", "train.eval_batches=2", "train.ckpt_every=3", "train.samples=0",
        "train.peak_flops=1e10", "train.log_every=1", "train.warmup_steps=2", "train.lr=3e-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(corpus: Path, out: Path, extra=()) -> list[str]:
    args = [sys.executable, "-m", "jaxgpt.cli", "train", "--data", str(corpus), "--out", str(out), *TRAIN, *extra]
    return args + [a for s in SETS for a in ("--set", s)]


def _env(devices: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(rng.choice(words, 3000)))
    return path


def test_two_processes_match_one_and_checkpoint_restores_on_one_device(corpus, tmp_path):
    single = subprocess.run(_cmd(corpus, tmp_path / "single"), env=_env(4), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [subprocess.Popen(_cmd(corpus, tmp_path / "multi", ["--coordinator", f"127.0.0.1:{port}",
                                                                "--num-processes", "2", "--process-id", str(i)]),
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][1]
    assert (tmp_path / "multi" / "metrics.jsonl").is_file()  # written by process 0 only
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in line for line in lines) == 6  # not twice

    assert jax.device_count() == 1  # this test process: the 4-device checkpoints restore onto 1 device
    p_single, cfg, _ = load_for_inference(tmp_path / "single")
    p_multi, cfg2, _ = load_for_inference(tmp_path / "multi")
    assert cfg == cfg2
    for a, b in zip(jax.tree.leaves(p_single), jax.tree.leaves(p_multi)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)  # float32, O(0.1) params
    moved = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(p_single))
    assert moved > 0.0


def test_resume_on_another_layout_continues_the_same_run(corpus, tmp_path):
    """3 steps on a 4-device FSDP mesh, then resumed on 1 device (no mesh) = 6 steps on 1 device."""
    base = [sys.executable, "-m", "jaxgpt.cli", "train", "--data", str(corpus), "--preset", "test", "--tokenizer",
            "char", "--no-progress"] + [a for s in SETS + ["train.decay_steps=6"] for a in ("--set", s)]
    run, straight = tmp_path / "moved", tmp_path / "straight"

    def ok(cmd, devices):
        out = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    ok(base + ["--out", str(run), "--max-steps", "3", "--mesh", "data=2,fsdp=2"], 4)
    resumed = ok([sys.executable, "-m", "jaxgpt.cli", "train", "--out", str(run), "--resume", "--max-steps", "6",
                  "--set", "train.mesh=none", "--no-progress"], 1)
    assert "steps 3->6" in resumed.stderr
    ok(base + ["--out", str(straight), "--max-steps", "6"], 1)
    p_moved, _, _ = load_for_inference(run)
    p_straight, _, _ = load_for_inference(straight)
    for a, b in zip(jax.tree.leaves(p_moved), jax.tree.leaves(p_straight)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_two_processes_without_a_mesh_train_and_save(corpus, tmp_path):
    """No --mesh across processes: pmap state could not be saved (it died at its first checkpoint);
    the sharded step is chosen instead, and said so."""
    port = _free_port()
    no_mesh = [a for a in TRAIN if a not in ("--mesh", "data=2,fsdp=2")]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxgpt.cli", "train", "--data", str(corpus), "--out", str(tmp_path / "run"), *no_mesh,
         "--max-steps", "3", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        + [a for s in SETS for a in ("--set", s)], env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "no --mesh: training with the sharded step over mesh data=-1" in outs[0][1]
    params, _, _ = load_for_inference(tmp_path / "run")
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(params))


MOE = ["model.mlp=swiglu", "model.moe_experts=4", "model.moe_top_k=2", "model.moe_hidden=48", "model.norm=rmsnorm"]


def test_two_processes_split_the_experts_and_match_one_device(corpus, tmp_path):
    """A mixture of experts with its experts split over two processes (`--mesh expert=2`, one CPU
    device each, tokens moved by all-to-all over gloo) trains as one device without a mesh does."""
    moe_sets = [a for s in MOE for a in ("--set", s)]
    single_cmd = [a if a != "data=2,fsdp=2" else "data=1" for a in _cmd(corpus, tmp_path / "single", moe_sets)]
    single = subprocess.run(single_cmd, env=_env(1), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([a if a != "data=2,fsdp=2" else "expert=2" for a in _cmd(
        corpus, tmp_path / "multi", [*moe_sets, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)])], env=_env(1), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train[-1]["moe_load"]) == 2 and len(train[-1]["moe_load"][0]) == 4  # (layers, experts) shares
    assert abs(sum(train[-1]["moe_load"][0]) - 1.0) < 1e-3 and train[-1]["moe_imbalance"] >= 1.0
    p_single, cfg, _ = load_for_inference(tmp_path / "single")
    p_multi, cfg2, _ = load_for_inference(tmp_path / "multi")
    assert cfg == cfg2 and cfg.moe_experts == 4
    for a, b in zip(jax.tree.leaves(p_single), jax.tree.leaves(p_multi)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
