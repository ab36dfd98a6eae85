"""pmap over 4 simulated devices equals 1 device; micro-batching keeps the global batch semantics."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_pmap_4_devices_and_accumulation_match_single_device():
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, str(HERE / "parallel_equivalence.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["param_change"] > 1e-3  # training did move the parameters
    # same global batch, same lr schedule: equal up to float32 summation order (params are O(0.1))
    for layout, diff in result["max_abs_diff"].items():
        assert diff < 1e-6, (layout, diff)
    losses = list(result["final_loss"].values())
    assert max(losses) - min(losses) < 1e-5
