"""`jaxgpt selfcheck --quick` on this machine's CPU, as two devices: every check runs or says why not."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_selfcheck_quick_on_two_cpu_devices(tmp_path):
    out_file = tmp_path / "selfcheck.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.cli", "selfcheck", "--quick", "--json", "--out", str(out_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads(out_file.read_text())
    assert report["passed"] and report["backend"] == "cpu" and report["devices"] == 2
    status = {c["check"]: c["status"] for c in report["checks"]}
    assert status["parity gpt2 xla float32"] == status["parity gpt2 xla bfloat16"] == "pass"
    assert status["gradients test float32"] == "pass"
    assert status["pmap over 2 devices vs 1"] == status["mesh data axis over 2 devices vs 1"] == "pass"
    assert status["deterministic_reduce over 2 devices vs 1"] == "pass"
    assert status["cudnn attention vs xla"] == status["training run vs the CPU's"] == "skip"  # said why, not faked
    speed = {c["check"]: c for c in report["checks"] if c["check"].startswith(("train step", "decode"))}
    assert len(speed) == 3 and all(c.get("tokens_per_s", 0) > 0 for c in speed.values())
    assert 0 < speed["train step small"]["mfu"] < 1.5
    assert "[6/6] speed" in proc.stderr  # progress
