"""The pretraining loop: data, the compiled step, evaluation, logging, checkpoints, guard rails.

`train(model_cfg, train_cfg, run_dir)` runs (or, with `resume=True`, continues) a run in
`run_dir`, which ends up holding:
    config.json        model + train config + tokenizer
    metrics.jsonl      one record per log step ("train") and per evaluation ("eval")
    checkpoints/ best/ Orbax checkpoints (see `jaxgpt.checkpoint`)
    loss.png           train/val loss against steps and tokens seen
    summary.json       final figures
A run stopped anywhere (Ctrl-C, SIGTERM, kill -9) and resumed ends with bit-identical parameters
to the same run done straight through: the batch, the dropout key and the learning rate of step s
are pure functions of (config, s), and the state restored is the state saved.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import Checkpointer, CheckpointError, check_compatible, read_meta, restore, write_json
from .config import GPTConfig, resolve_dtype
from .data import (
    DataError, EpochSampler, RandomWindowSampler, SlidingWindowDataset, load_text, open_token_file,
)
from .generate import generate, trim_at_eos
from .metrics import JsonlLogger, flops_per_token, measure_peak_flops, plot_losses, read_jsonl
from .model import GPT, count_params, init_params
from .optim import build_optimizer, lr_schedule
from .tokenizer import Tokenizer, get_tokenizer, tokenizer_from_dict
from .train_config import TrainConfig
from .sharding import ShardedTrainer, build_mesh
from .train_step import ParallelTrainer, create_state

PREPARED_META = "meta.json"


# Train-config fields a resumed run may change: the training stays the same function of the step.
RESUMABLE_CHANGES = ("max_steps", "mesh", "devices", "log_every", "eval_every", "eval_batches", "ckpt_every",
                     "keep_checkpoints", "samples", "sample_tokens", "peak_flops", "tensorboard")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunData:
    tokenizer: Tokenizer
    train_source: object  # has .batch(step) -> (x_bt, y_bt)
    val_batches: list  # fixed [(x_bt, y_bt), ...] for evaluation
    n_train_tokens: int
    n_val_tokens: int
    sample_prompt: list  # token ids the end-of-run samples start from


def is_prepared_dir(path: str) -> bool:
    return (Path(path) / PREPARED_META).is_file()


def _val_batches(val_ids, seq_len: int, batch_size: int, max_batches: int) -> list:
    """Consecutive non-overlapping windows of the validation tokens, the same at every evaluation."""
    if len(val_ids) <= seq_len:
        raise DataError(
            f"validation split has {len(val_ids)} tokens, too few for one window of {seq_len}: "
            "lower train.train_ratio or train.context_length, or use more text"
        )
    ds = SlidingWindowDataset(val_ids, seq_len, seq_len)
    batches = list(ds.batches(min(batch_size, len(ds)), drop_last=True))
    return batches[:max_batches]


def build_data(cfg: TrainConfig, seq_len: int, tokenizer: Optional[Tokenizer] = None) -> RunData:
    """Token streams, samplers and the fixed validation batches of a run."""
    if is_prepared_dir(cfg.data):
        meta = json.loads((Path(cfg.data) / PREPARED_META).read_text())
        tokenizer = tokenizer or tokenizer_from_dict(meta["tokenizer"])
        train_ids = open_token_file(Path(cfg.data) / "train.bin")
        val_ids = np.asarray(open_token_file(Path(cfg.data) / "val.bin"))
    else:
        text = load_text(cfg.data)
        tokenizer = tokenizer or get_tokenizer(cfg.tokenizer, corpus_text=text)
        train_text, val_text = text[: int(cfg.train_ratio * len(text))], text[int(cfg.train_ratio * len(text)):]
        train_ids = np.asarray(tokenizer.encode(train_text, allow_special=True), dtype=np.int32)
        val_ids = np.asarray(tokenizer.encode(val_text, allow_special=True), dtype=np.int32)
    if len(train_ids) <= seq_len:
        raise DataError(
            f"training split of {cfg.data!r} has {len(train_ids)} tokens, too few for a context of {seq_len} "
            "(needs at least one window plus one target)"
        )
    if cfg.sampling == "random":
        source = RandomWindowSampler(train_ids, seq_len, cfg.batch_size, seed=cfg.seed)
    else:
        dataset = SlidingWindowDataset(train_ids, seq_len, cfg.stride or seq_len)
        source = EpochSampler(dataset, cfg.batch_size, seed=cfg.seed)
    val = _val_batches(val_ids, seq_len, cfg.batch_size, cfg.eval_batches)
    prompt = [int(i) for i in val_ids[: min(16, seq_len // 2)]]
    return RunData(tokenizer, source, val, len(train_ids), len(val_ids), prompt)


def to_host(x) -> float:
    """A replicated scalar as a Python float (also when the array spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(x)


def evaluate(eval_step: Callable, params, batches: list) -> float:
    """Mean validation cross-entropy over the fixed batches (all have the same size)."""
    losses = [to_host(eval_step(params, x, y)) for x, y in batches]
    return float(np.mean(losses))


class _NullLogger:
    """What processes other than 0 log to."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _run_meta(model_cfg: GPTConfig, cfg: TrainConfig, tokenizer: Tokenizer, step: int, best: float) -> dict:
    return {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "step": step,
        "data_position": {"seed": cfg.seed, "next_step": step, "sampling": cfg.sampling},
        "best_val_loss": best if math.isfinite(best) else None,
    }


class _StopSignals:
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


# On a CPU the local devices are simulated (one per core, see cli._one_cpu_device_per_core) and
# share the cores. Data parallelism over them pays for narrow models, whose small matmuls cannot
# spread over the cores on one device (measured with `jaxgpt bench` workers: nanoGPT's 128-wide
# shape 1.33x, a 192-wide GPT-2-BPE model 1.31x), and loses for wide ones, whose matmuls already
# use every core and which then pay for a replicated optimizer update and the gradient all-reduce
# (gpt2-small, 768 wide: 7.1 s against 4.0 s a step, and 10.2 against 4.3 GB).
CPU_DATA_PARALLEL_MAX_WIDTH = 512


def default_device_count(cfg: TrainConfig, model_cfg: Optional[GPTConfig] = None) -> int:
    """All local devices, or the most that divide the batch evenly (with its micro-batches); on a
    CPU, one device for models `CPU_DATA_PARALLEL_MAX_WIDTH` wide or wider."""
    n = jax.local_device_count()
    if jax.default_backend() == "cpu" and model_cfg is not None and model_cfg.emb_dim >= CPU_DATA_PARALLEL_MAX_WIDTH:
        return 1
    while cfg.batch_size % (n * cfg.micro_batches):
        n -= 1
    return n


def _log(msg: str) -> None:
    print(f"[jaxgpt] {msg}", file=sys.stderr, flush=True)


def train(
    model_cfg: Optional[GPTConfig],
    cfg: Optional[TrainConfig],
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    step_callback: Optional[Callable[[int], None]] = None,
) -> dict:
    """Train (or resume) the run in `run_dir`; returns the summary also written to summary.json.

    On resume the configs stored in the checkpoint are used; `model_cfg`, if given, must match
    them, and `cfg`, if given, may differ from the stored train config only in
    `RESUMABLE_CHANGES` (length of the run, device layout, schedule of side work).
    """
    run_dir = Path(run_dir)
    tokenizer: Optional[Tokenizer] = None
    best_val = float("inf")
    if resume:
        meta = read_meta(run_dir)
        saved_model = GPTConfig.from_dict(meta["model"])
        if model_cfg is not None:
            check_compatible(meta["model"], model_cfg.replace(vocab_size=saved_model.vocab_size))
        model_cfg = saved_model
        saved_train = TrainConfig.from_dict(meta["train"])
        if cfg is not None:
            changed = {k for k, v in cfg.to_dict().items() if v != getattr(saved_train, k)}
            if changed - set(RESUMABLE_CHANGES):
                raise CheckpointError(
                    f"cannot resume with different {sorted(changed - set(RESUMABLE_CHANGES))}: they change the "
                    f"training itself; only {RESUMABLE_CHANGES} may change on resume")
        cfg = cfg or saved_train
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        best_val = meta.get("best_val_loss") or float("inf")
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or use a new --out")
    assert model_cfg is not None and cfg is not None
    run_dir.mkdir(parents=True, exist_ok=True)

    seq_len = cfg.context_length or model_cfg.context_length
    if seq_len > model_cfg.context_length:
        raise DataError(f"train.context_length {seq_len} exceeds the model's context_length {model_cfg.context_length}")
    data = build_data(cfg, seq_len, tokenizer)
    if model_cfg.vocab_size != data.tokenizer.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=data.tokenizer.vocab_size)

    model = GPT(model_cfg)
    tx = build_optimizer(cfg)
    init_state = lambda: create_state(model, tx, init_params(model_cfg, seed=cfg.seed), cfg.seed)  # noqa: E731
    abstract = jax.eval_shape(init_state)
    if cfg.mesh:
        trainer = ShardedTrainer(model, tx, build_mesh(cfg.mesh), cfg.micro_batches, abstract)
        abstract = trainer.abstract_state(abstract)
        init_state = jax.jit(init_state, out_shardings=trainer.state_sharding)
    else:
        trainer = ParallelTrainer(model, tx, cfg.devices or default_device_count(cfg, model_cfg), cfg.micro_batches)
    trainer.check_batch_size(cfg.batch_size)
    n_devices = trainer.n_devices
    is_main = jax.process_index() == 0  # only process 0 writes logs, plots and summaries

    if resume:
        state, _ = restore(run_dir, abstract)
    else:
        state = init_state()
    start_step = int(to_host(state["step"]))
    if is_main:
        if resume:
            _keep_records_up_to(run_dir / "metrics.jsonl", start_step)
        write_json(run_dir / "config.json", _run_meta(model_cfg, cfg, data.tokenizer, start_step, best_val))

    n_params = count_params(abstract["params"])
    flops_tok = flops_per_token(model_cfg, seq_len, n_params)
    if cfg.peak_flops:
        peak, peak_source = cfg.peak_flops * n_devices, "given"
    else:
        compute_dtype = resolve_dtype(model_cfg)
        per_device = measure_peak_flops(dtype=compute_dtype)
        # simulated CPU devices share the host's cores: the probe already measures all of them
        peak = per_device * (1 if jax.default_backend() == "cpu" else n_devices)
        peak_source = f"matmul probe ({jnp.dtype(compute_dtype).name} 2048x2048)"
    _log(
        f"model {n_params:,} params, vocab {model_cfg.vocab_size}, context {seq_len}; "
        f"{data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens; {n_devices} of "
        f"{jax.local_device_count()} local {jax.default_backend()} device(s){' (pmap)' if n_devices > 1 and not cfg.mesh else ''}"
        f"{' (a wide model on CPU trains fastest on one device; train.devices overrides)' if n_devices == 1 and jax.local_device_count() > 1 and not cfg.devices and not cfg.mesh else ''}"
        f"{f' in mesh {cfg.mesh} over {jax.process_count()} process(es)' if cfg.mesh else ''}; "
        f"steps {start_step}->{cfg.max_steps}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})"
    )

    logger = (JsonlLogger(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.tensorboard else None)
              if is_main else _NullLogger())
    ckpt = Checkpointer(run_dir, cfg.keep_checkpoints)
    schedule = lr_schedule(cfg)
    tokens_per_step = cfg.batch_size * seq_len
    state = trainer.put_state(state)
    status, last_loss, val_loss = "completed", float("nan"), None
    t_start = t_last = time.perf_counter()
    steps_since_log = 0

    def save(step: int, *, best: bool = False) -> None:
        ckpt.save(step, trainer.get_state(state), _run_meta(model_cfg, cfg, data.tokenizer, step, best_val), best=best)

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    train_rows = trainer.local_rows(cfg.batch_size)
    val_batches = [(x[trainer.local_eval_rows(len(x))], y[trainer.local_eval_rows(len(x))]) for x, y in data.val_batches]
    try:
        with _StopSignals() as stop:
            for step in range(start_step, cfg.max_steps):
                x_bt, y_bt = data.train_source.batch(step, rows=train_rows)
                state, metrics = trainer(state, x_bt, y_bt)
                loss = to_host(metrics["loss"])
                done = step + 1
                steps_since_log += 1
                bar.update(1)
                if not math.isfinite(loss):
                    logger.log({"kind": "diverged", "step": done, "loss": str(loss)})
                    status = "diverged"
                    raise TrainingDiverged(
                        f"loss became {loss} at step {done}; stopped without saving this state. "
                        f"The last good checkpoint is kept in {run_dir} (step {ckpt.latest_step()}): "
                        "lower train.lr, raise train.warmup_steps, or check the data"
                    )
                last_loss = loss
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    now = time.perf_counter()
                    tok_s = steps_since_log * tokens_per_step / (now - t_last)
                    record = {
                        "kind": "train", "step": done, "tokens_seen": done * tokens_per_step, "loss": loss,
                        "lr": float(schedule(step)), "grad_norm": to_host(metrics["grad_norm"]),
                        "tokens_per_s": tok_s, "mfu": tok_s * flops_tok / peak, "time_s": now - t_start,
                    }
                    logger.log(record)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                    t_last, steps_since_log = now, 0
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    val_loss = evaluate(trainer.eval_step, trainer.params(state), val_batches)
                    improved = val_loss < best_val
                    best_val = min(best_val, val_loss)
                    logger.log({
                        "kind": "eval", "step": done, "tokens_seen": done * tokens_per_step, "val_loss": val_loss,
                        "val_ppl": math.exp(min(val_loss, 50.0)), "best_val_loss": best_val,
                    })
                    if is_main:
                        bar.write(f"step {done}: train loss {loss:.4f}, val loss {val_loss:.4f} (best {best_val:.4f})", file=sys.stderr)
                    if improved:
                        save(done, best=True)
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                    save(done)
                if step_callback is not None:
                    step_callback(done)
                if stop.received is not None:
                    save(done)
                    status = "interrupted"
                    bar.write(f"signal {stop.received}: saved a checkpoint at step {done}; resume with --resume", file=sys.stderr)
                    break
    finally:
        bar.close()
        ckpt.close()
        logger.close()

    final_step = int(to_host(trainer.get_state(state)["step"]))
    if not is_main:
        return {"status": status, "run_dir": str(run_dir), "step": final_step, "process": jax.process_index()}
    records = read_jsonl(run_dir / "metrics.jsonl")
    plot_losses(records, run_dir / "loss.png", title=f"{run_dir.name}: {cfg.data}")
    train_records = [r for r in records if r.get("kind") == "train"]
    summary = {
        "status": status, "run_dir": str(run_dir), "step": final_step, "train_loss": last_loss,
        "val_loss": val_loss, "best_val_loss": best_val if math.isfinite(best_val) else None,
        "wall_s": time.perf_counter() - t_start, "n_params": n_params, "devices": n_devices,
        "tokens_per_s": train_records[-1]["tokens_per_s"] if train_records else None,
        "peak_flops": peak, "peak_flops_source": peak_source,
    }
    if status == "completed" and cfg.samples > 0 and jax.process_count() == 1:
        params = trainer.params(state)
        prompt = np.array([data.sample_prompt] * cfg.samples)
        out = generate(params, model_cfg, prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                       seed=cfg.seed, eos_id=data.tokenizer.eot_id)
        summary["samples"] = [
            data.tokenizer.decode(data.sample_prompt + trim_at_eos(row, data.tokenizer.eot_id, len(data.sample_prompt)))
            for row in out
        ]
    write_json(run_dir / "summary.json", summary)
    return summary


def _keep_records_up_to(path: Path, step: int) -> None:
    """On resume, drop log records of steps after the checkpoint (they will be redone)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def evaluate_checkpoint(path: Path, data: Optional[str] = None, batches: Optional[int] = None) -> dict:
    """Validation loss and perplexity of a checkpoint, on its own data or on `data`."""
    from .checkpoint import load_run
    from .train_step import make_eval_step

    params, model_cfg, cfg, tokenizer = load_run(path)
    if data is not None:
        cfg = cfg.replace(data=data)
    if batches is not None:
        cfg = cfg.replace(eval_batches=batches)
    seq_len = cfg.context_length or model_cfg.context_length
    run_data = build_data(cfg, seq_len, tokenizer)
    loss = evaluate(jax.jit(make_eval_step(GPT(model_cfg))), params, run_data.val_batches)
    n_tokens = sum(x.size for x, _ in run_data.val_batches)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": len(run_data.val_batches),
            "tokens": int(n_tokens), "data": cfg.data}
