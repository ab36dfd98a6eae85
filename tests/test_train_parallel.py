"""pmap over 4 simulated devices equals 1 device; micro-batching keeps the global batch semantics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "schedule_free_adamw"])
def test_pmap_4_devices_and_accumulation_match_single_device(optimizer):
    """AdamW over every layout; Muon + AdamW and schedule-free AdamW over data parallelism with
    accumulation and FSDP (Muon's Newton–Schulz products on sharded matrices; schedule-free's
    parameters and their average both)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, str(HERE / "parallel_equivalence.py"), optimizer], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["param_change"] > 1e-3  # training did move the parameters
    # same global batch, same lr schedule: equal up to float32 summation order (params are O(0.1))
    for layout, diff in result["max_abs_diff"].items():
        assert diff < 1e-6, (layout, diff)
    losses = list(result["final_loss"].values())
    assert max(losses) - min(losses) < 1e-5


def test_train_cli_gives_one_cpu_device_per_core_unless_told_otherwise():
    code = ("from jaxgpt.host_setup import one_cpu_device_per_core; one_cpu_device_per_core(); "
            "import jax; print(jax.local_device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(os.cpu_count()), out.stderr[-2000:]
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-2000:]


def test_building_the_cli_does_not_start_jax():
    """`jaxgpt train` sets one CPU device per core before JAX starts; a command module that imports
    JAX while the parser is built (it happened: the task list of `jaxgpt evaluate`) silently leaves
    the main job on one device."""
    code = "import sys; from jaxgpt.cli.main import build_parser; build_parser(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(HERE.parent)),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_default_device_count_divides_the_batch(monkeypatch):
    import jax

    from jaxgpt.train.config import TrainConfig
    from jaxgpt.train.loop import default_device_count

    monkeypatch.setattr(jax, "local_device_count", lambda: 4)
    assert default_device_count(TrainConfig(batch_size=16)) == 4
    assert default_device_count(TrainConfig(batch_size=6)) == 3
    assert default_device_count(TrainConfig(batch_size=10, micro_batches=5)) == 2
    assert default_device_count(TrainConfig(batch_size=7)) == 1
    # on a CPU a wide model trains on one device (its matmuls already use every core)
    from jaxgpt.config import get_preset

    assert default_device_count(TrainConfig(batch_size=16), get_preset("tiny")) == 4
    assert default_device_count(TrainConfig(batch_size=16), get_preset("gpt2-small")) == 1


def test_train_cli_end_to_end_with_pmap_over_2_devices(tmp_path):
    """`jaxgpt train` over 2 simulated devices, two steps per compiled call (pmap'ed `lax.scan`:
    evaluations every 2 steps fall between calls)."""
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "jaxgpt.cli", "train", "--preset", "test", "--data", str(corpus), "--max-steps", "4",
           "--out", str(tmp_path / "run"), "--no-progress", "--json", "--set", "train.batch_size=4",
           "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.samples=1",
           "--set", "train.sample_tokens=5", "--set", "train.peak_flops=1e10", "--set", "train.steps_per_call=2",
           "--set", "train.log_every=2"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 of 2 local cpu device(s) (pmap)" in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["step"] == 4 and summary["devices"] == 2
    assert len(summary["samples"]) == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[1] < losses[0]


def test_expert_parallel_on_4_devices_matches_one_device():
    """Experts split over an `expert` mesh axis (alone, with data parallelism, with FSDP and
    micro-batches) give the one-device run's parameters and losses after several steps."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, str(HERE / "expert_parallel_equivalence.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["param_change"] > 1e-3
    for layout, diff in result["max_abs_diff"].items():
        assert diff < 1e-5, (layout, diff)
    for layout, loss in result["final_loss"].items():
        base = result["final_loss"]["one:micro=" + layout.split("=")[-1]]
        assert abs(loss - base) < 1e-5, layout
    assert result["counts"]["expert=4:micro=1"] == result["counts"]["one:micro=1"]  # the same routing
    # each device holds its own experts: E=4 over expert=4 -> 1 each; with FSDP the hidden dim is split too
    assert result["placement"]["expert=4:micro=1"] == [[1, 64, 32]] * 4
    assert result["placement"]["fsdp=2,expert=2:micro=2"] == [[2, 64, 16]] * 4
    assert any(b != 0 for b in result["balance_bias"])  # the sigmoid router's bias was balanced
    assert all(result["fingerprint_layout_independent"].values()), result["fingerprint_layout_independent"]
