"""What a variant costs, measured on this machine in the sweep itself: parameters, training FLOPs
per token (XLA's count of the compiled forward + backward), KV-cache bytes per token, training
tokens/s, prefill and decode tokens/s at batch 1 and 8, and the training step's peak memory
(XLA's account of the compiled step: arguments + outputs + temporaries).

Weights are random (speed does not depend on them); timings are medians of `repeats` timed
rounds after a warm-up call that compiles. Decode speed is a difference of two timings (prefill +
1 token, prefill + 1 + DECODE_TOKENS tokens); when timing noise makes it non-positive the figure
is None (n/a), never a number from a negative or zero interval.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from jaxgpt.arena.matching import stored_params, train_flops_per_token
from jaxgpt.arena.trainer import compiled_train_step, train_config
from jaxgpt.config import GPTConfig
from jaxgpt.inference.generate import Decoder
from jaxgpt.inference.kv_cache import kv_cache_bytes_per_token
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.train.step import create_state

DECODE_TOKENS = 64  # new tokens of the decode timing (after a prefill of the training length)
CALLS_PER_ROUND = 5  # calls timed together in one round (short calls are below timer noise alone)


def _median_s(fn, repeats: int, calls: int = CALLS_PER_ROUND) -> float:
    """Median seconds of one call of `fn` over `repeats` rounds of `calls` calls, after a warm-up."""
    fn()  # compiles
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def decode_speeds(config: GPTConfig, params, length: int, batch: int, repeats: int, seed: int) -> dict:
    """Prefill tokens/s (a prompt of `length` + one step) and decode tokens/s (the next DECODE_TOKENS
    steps: the difference of two runs) at this batch size, greedy, KV-cached. `config`'s context
    holds length + 1 + DECODE_TOKENS."""
    decoder = Decoder(params, config)
    prompt_bt = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length), dtype=np.int32)
    one = _median_s(lambda: decoder.generate(prompt_bt, 1), repeats)
    many = _median_s(lambda: decoder.generate(prompt_bt, 1 + DECODE_TOKENS), repeats)
    decode_s = many - one
    return {f"prefill_tokens_per_s_b{batch}": batch * length / one,
            f"decode_tokens_per_s_b{batch}": batch * DECODE_TOKENS / decode_s if decode_s > 0 else None}


def train_step_cost(config: GPTConfig, train: dict, seed: int, repeats: int) -> dict:
    """Training tokens/s of the sweep's step and its compiled peak memory."""
    tx, step_fn = compiled_train_step(config, train_config(train))
    state = create_state(GPT(config), tx, init_params(config, seed), seed)
    rng = np.random.default_rng(seed)
    x_mbt = rng.integers(0, config.vocab_size, (1, train["batch_size"], train["length"]), dtype=np.int32)
    memory = step_fn.lower(state, x_mbt, x_mbt).compile().memory_analysis()
    peak = None if memory is None else int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                           + memory.temp_size_in_bytes)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step_fn(holder["state"], x_mbt, x_mbt)
        jax.block_until_ready(metrics["loss"])

    seconds = _median_s(one_step, repeats)
    return {"train_tokens_per_s": train["batch_size"] * train["length"] / seconds, "train_peak_bytes": peak}


def measure_cost(config: GPTConfig, train: dict, seed: int) -> dict:
    """Every cost figure of one variant (its config at the first task's vocabulary)."""
    length, repeats = train["length"], train["cost_repeats"]
    decode_config = config.replace(context_length=length + 1 + DECODE_TOKENS)
    params = init_params(decode_config, seed)
    out = {"params": stored_params(config), "flops_per_token": train_flops_per_token(config, length),
           "kv_bytes_per_token": kv_cache_bytes_per_token(config, length)}
    out.update(train_step_cost(config, train, seed, repeats))
    for batch in (1, 8):
        out.update(decode_speeds(decode_config, params, length, batch, repeats, seed))
    return out
