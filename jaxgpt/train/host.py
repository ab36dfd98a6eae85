"""The training loop's host side: scalars off the device, MoE metrics as JSON, the logger of
processes other than 0, and Ctrl-C/SIGTERM turned into a flag the loop checks between calls."""

from __future__ import annotations

import signal
from typing import Optional

import jax
import numpy as np


def to_host(x) -> float:
    """A replicated scalar as a Python float (also when the array spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(x)


def moe_log(metrics: dict) -> dict:
    """A step's router metrics as JSON values: losses, dropped share, each MoE layer's tokens per
    expert (moe_counts) and load (their share of the layer's assignments), and the imbalance
    max_e load_e · E averaged over layers (1: even)."""
    if "moe_counts" not in metrics:
        return {}
    counts_le = metrics["moe_counts"]
    if isinstance(counts_le, jax.Array) and not counts_le.is_fully_addressable:
        counts_le = counts_le.addressable_data(0)
    counts_le = np.asarray(counts_le, dtype=np.float64)
    load_le = counts_le / np.maximum(counts_le.sum(-1, keepdims=True), 1)
    return {"moe_aux_loss": to_host(metrics["moe_aux_loss"]), "moe_z_loss": to_host(metrics["moe_z_loss"]),
            "moe_dropped_frac": to_host(metrics["moe_dropped_frac"]),
            "moe_imbalance": float(np.mean(load_le.max(-1) * load_le.shape[-1])),
            "moe_counts": counts_le.astype(np.int64).tolist(), "moe_load": np.round(load_le, 5).tolist()}


class NullLogger:
    """What processes other than 0 log to."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (so it can save first)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second Ctrl-C: give up saving
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
