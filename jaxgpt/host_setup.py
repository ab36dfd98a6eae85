"""Process set-up that must happen before JAX is imported (so this module never imports jax).

XLA reads `XLA_FLAGS` once, when JAX starts its CPU backend: a command that wants one simulated CPU
device per core (data parallelism on a CPU host) sets the flag here first. Import this module and
call its functions before anything that imports jax.
"""

from __future__ import annotations

import os
import sys

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# XLA's CPU collectives abort the process when one device's thread waits 40 s for the others; on a
# busy machine (other jobs on the same cores) that kills healthy training runs, so wait longer.
COLLECTIVE_TIMEOUT_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800",
                            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")


def one_cpu_device_per_core() -> None:
    """Before JAX starts: expose one XLA CPU device per core, so `train` can data-parallelise.

    On small models one multi-threaded CPU device leaves cores idle; pmap over a device per core
    measured 1.33× the tokens/s on nanoGPT's CPU recipe here (same loss). It only changes the CPU
    platform (a GPU/TPU stays the default backend), and is skipped when the user set the flag,
    `JAXGPT_CPU_DEVICES=1`, or JAX is already running (e.g. `main()` called from Python).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    cores = os.cpu_count() or 1
    if "jax" in sys.modules or CPU_DEVICES_FLAG in flags or cores < 2 or os.environ.get("JAXGPT_CPU_DEVICES") == "1":
        return
    extra = [f for f in COLLECTIVE_TIMEOUT_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, f"{CPU_DEVICES_FLAG}={cores}", *extra]).strip()
