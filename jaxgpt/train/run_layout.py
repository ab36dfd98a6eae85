"""What a run's start-up line says about the hardware: the peak FLOP/s MFU is measured against,
and how the run is spread over devices and processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig, resolve_dtype
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.metrics import measure_peak_flops


def peak_flops(model_cfg: GPTConfig, cfg: TrainConfig, n_devices: int) -> tuple[float, str]:
    """(peak FLOP/s of the devices training, where that figure comes from), for MFU."""
    if cfg.peak_flops:
        return cfg.peak_flops * n_devices, "given"
    compute_dtype = resolve_dtype(model_cfg)
    per_device = measure_peak_flops(dtype=compute_dtype)
    # simulated CPU devices share the host's cores: the probe already measures all of them
    peak = per_device * (1 if jax.default_backend() == "cpu" else n_devices)
    return peak, f"matmul probe ({jnp.dtype(compute_dtype).name} 2048x2048)"


def describe_layout(cfg: TrainConfig, n_devices: int) -> str:
    """How the run is spread over devices and processes, for the start-up line."""
    if cfg.deterministic_reduce:
        return (f"{n_devices} {jax.default_backend()} device(s) over {jax.process_count()} process(es); gradients of "
                f"{cfg.deterministic_reduce} shards summed in a fixed tree (bitwise the same on any device count)")
    text = f"{n_devices} of {jax.local_device_count()} local {jax.default_backend()} device(s)"
    if n_devices > 1 and not cfg.mesh:
        text += " (pmap)"
    if n_devices == 1 and jax.local_device_count() > 1 and not cfg.devices and not cfg.mesh:
        text += " (a wide model on CPU trains fastest on one device; train.devices overrides)"
    if cfg.mesh:
        text += f" in mesh {cfg.mesh} over {jax.process_count()} process(es)"
    return text
