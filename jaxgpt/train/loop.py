"""The pretraining loop: data, the compiled step, evaluation, logging, checkpoints, guard rails.

`train(model_cfg, train_cfg, run_dir)` runs (or, with `resume=True`, continues) a run in
`run_dir` (its files: `jaxgpt.train.run_dir`). A run stopped anywhere (Ctrl-C, SIGTERM, kill -9)
and resumed ends with bit-identical parameters to the same run done straight through: the batch,
the dropout key and the learning rate of step s are pure functions of (config, s), and the state
restored is the state saved.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.data.corpus import DataError
from jaxgpt.inference.generate import generate, trim_at_eos
from jaxgpt.nn.model import GPT, count_params, init_params
from jaxgpt.evaluation.during_training import TrainingTasks
from jaxgpt.train.batches import RunData, build_data
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.fingerprint import fingerprint
from jaxgpt.train.host import NullLogger, StopSignals, moe_log, to_host
from jaxgpt.train.run_layout import describe_layout, peak_flops
from jaxgpt.train.metrics import (JsonlLogger, flops_per_token, plot_expert_load, plot_losses,
                                  read_jsonl)
from jaxgpt.train.optimizer import build_optimizer, checkpoint_abstract, checkpoint_tree, describe_groups, lr_schedule
from jaxgpt.train.run_dir import keep_records_up_to, run_configs, run_meta
from jaxgpt.train.deterministic import DeterministicTrainer
from jaxgpt.train.sharding import MeshError, ShardedTrainer, build_mesh, parse_mesh
from jaxgpt.train.step import ParallelTrainer, create_state, pmap_optimizer
from jaxgpt.atomic import write_json
from jaxgpt.weights.checkpoint import Checkpointer, restore, restore_params


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def evaluate(eval_step: Callable, params, batches: list) -> float:
    """Mean validation cross-entropy over the fixed batches (all have the same size). Every batch is
    dispatched before the first loss is read, so the host never waits between batches."""
    losses = [eval_step(params, x, y) for x, y in batches]
    return float(np.mean([to_host(loss) for loss in losses]))


# On a CPU the local devices are simulated (one per core, see jaxgpt.host_setup) and
# share the cores. Data parallelism over them pays for narrow models, whose small matmuls cannot
# spread over the cores on one device (measured with `python -m benchmarks.bench` workers: nanoGPT's
# 128-wide shape 1.33x, a 192-wide GPT-2-BPE model 1.31x), and loses for wide ones, whose matmuls
# already use every core and which then pay for a replicated optimizer update and the gradient
# all-reduce (gpt2-small, 768 wide: 7.1 s against 4.0 s a step, and 10.2 against 4.3 GB).
CPU_DATA_PARALLEL_MAX_WIDTH = 512


def default_device_count(cfg: TrainConfig, model_cfg: Optional[GPTConfig] = None) -> int:
    """All local devices, or the most that divide the batch evenly (with its micro-batches; with
    deterministic_reduce, a power of two dividing the shards); on a CPU, one device for models
    `CPU_DATA_PARALLEL_MAX_WIDTH` wide or wider."""
    n = jax.local_device_count()
    if jax.default_backend() == "cpu" and model_cfg is not None and model_cfg.emb_dim >= CPU_DATA_PARALLEL_MAX_WIDTH:
        return 1
    shards = cfg.deterministic_reduce
    while cfg.batch_size % (n * cfg.micro_batches) or (shards and (shards % n or n & (n - 1))):
        n -= 1
    return n


def _log(msg: str) -> None:
    print(f"[jaxgpt] {msg}", file=sys.stderr, flush=True)


def _build_trainer(model_cfg: GPTConfig, cfg: TrainConfig):
    """(trainer, abstract state, a function making the initial state) for this run's parallel mode."""
    model = GPT(model_cfg)
    tx = build_optimizer(cfg)
    init_state = lambda: create_state(model, tx, init_params(model_cfg, seed=cfg.seed), cfg.seed)  # noqa: E731
    abstract = jax.eval_shape(init_state)
    if cfg.optimizer == "schedule_free_adamw" and model_cfg.moe_experts and model_cfg.moe_bias_rate > 0:
        raise ConfigError("schedule-free AdamW evaluates the average of its iterates, and the sigmoid router's balancing "
                          "bias is moved outside the optimizer, so the average would scale it by 1/beta1: use "
                          "train.optimizer=adamw or muon, or model.moe_bias_rate=0")
    if cfg.steps_per_call > 1 and (cfg.deterministic_reduce or cfg.mesh):
        raise ConfigError(f"train.steps_per_call={cfg.steps_per_call} runs with the jit/pmap trainer only: not with "
                          "train.mesh or train.deterministic_reduce (set steps_per_call=1 there)")
    if cfg.deterministic_reduce:
        trainer = DeterministicTrainer(model, tx, _deterministic_devices(cfg, model_cfg), cfg.deterministic_reduce,
                                       cfg.micro_batches)
        abstract = trainer.abstract_state(abstract)
    elif cfg.mesh:
        trainer = ShardedTrainer(model, tx, build_mesh(cfg.mesh), cfg.micro_batches, abstract)
        abstract = trainer.abstract_state(abstract)
        init_state = jax.jit(init_state, out_shardings=trainer.state_sharding)
    else:
        n_devices = cfg.devices or default_device_count(cfg, model_cfg)
        trainer = ParallelTrainer(model, pmap_optimizer(cfg, n_devices), n_devices, cfg.micro_batches,
                                  cfg.steps_per_call)
    trainer.check_batch_size(cfg.batch_size)
    return trainer, abstract, init_state


def _deterministic_devices(cfg: TrainConfig, model_cfg: GPTConfig) -> int:
    """Local devices of a deterministic_reduce run: all of them under a (data-only) mesh, else as pmap's."""
    if cfg.mesh:
        sizes = parse_mesh(cfg.mesh)
        if sizes["fsdp"] > 1 or sizes["expert"] > 1:
            raise MeshError(f"train.deterministic_reduce splits the batch over devices only; mesh {cfg.mesh!r} also "
                            "shards parameters (fsdp/expert): use a data-only mesh such as data=-1")
        return jax.local_device_count()
    return cfg.devices or default_device_count(cfg, model_cfg)


class _Loop:
    """The steps of one run, with their side work: logging, evaluation, checkpoints, signals."""

    def __init__(self, run_dir: Path, model_cfg: GPTConfig, cfg: TrainConfig, data: RunData, trainer, state,
                 seq_len: int, flops_tok: float, peak: float, best_val: float) -> None:
        self.run_dir, self.model_cfg, self.cfg, self.data, self.trainer = run_dir, model_cfg, cfg, data, trainer
        self.state, self.best_val = trainer.put_state(state), best_val
        self.is_main = jax.process_index() == 0  # only process 0 writes logs, plots and summaries
        self.logger = (JsonlLogger(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.tensorboard else None)
                       if self.is_main else NullLogger())
        self.ckpt = Checkpointer(run_dir, cfg.keep_checkpoints)
        self.schedule = lr_schedule(cfg)
        self.muon_schedule = lr_schedule(cfg, cfg.muon_lr) if cfg.optimizer == "muon" else None
        self.tokens_per_step, self.flops_tok, self.peak = cfg.batch_size * seq_len, flops_tok, peak
        self.flops_tok_compiled: Optional[float] = None  # after the first step (`_count_step_flops`)
        self.status, self.last_loss, self.val_loss = "completed", float("nan"), None
        self.target_reached_s: Optional[float] = None  # train.target_val_loss: when the evaluation reached it
        self.t_start = self.t_last = time.perf_counter()
        self.steps_since_log = 0
        self.val_batches = [(x[trainer.local_eval_rows(len(x))], y[trainer.local_eval_rows(len(x))])
                            for x, y in data.val_batches]
        self.tasks = None
        if cfg.eval_tasks and jax.process_count() == 1:  # (scored on one process's full parameters)
            self.tasks = TrainingTasks(cfg.eval_tasks, cfg.eval_tasks_every or cfg.eval_every, cfg.eval_tasks_limit,
                                       model_cfg.replace(drop_rate=0.0), data.tokenizer)
        elif cfg.eval_tasks:
            _log("train.eval_tasks runs in single-process runs only; use `jaxgpt evaluate` on the checkpoints")

    def save(self, step: int, *, best: bool = False) -> None:
        meta = run_meta(self.model_cfg, self.cfg, self.data.tokenizer, step, self.best_val, self.data.fingerprint)
        self.ckpt.save(step, checkpoint_tree(self.trainer.get_state(self.state)), meta, best=best)

    def run(self, start_step: int, progress: bool, step_callback: Optional[Callable[[int], None]]) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and self.is_main), unit="step",
                   dynamic_ncols=True)
        train_rows = self.trainer.local_rows(cfg.batch_size)
        try:
            with StopSignals() as stop:
                step = start_step
                while step < cfg.max_steps:
                    k = self._steps_this_call(step)
                    batches = [self.data.train_source.batch(s, rows=train_rows) for s in range(step, step + k)]
                    if k == 1:
                        self.state, metrics = self.trainer(self.state, *batches[0])
                        per_step = [metrics]
                    else:
                        self.state, metrics_k = self.trainer.run_steps(self.state, batches)
                        metrics_k = jax.device_get(metrics_k)  # one transfer for the call's K steps
                        per_step = [jax.tree.map(lambda m: m[i], metrics_k) for i in range(k)]  # noqa: B023
                    if step == start_step:
                        self._count_step_flops(*batches[0])
                    for i, metrics in enumerate(per_step):  # side work only after the call's last step
                        self._after_step(step + i, to_host(metrics["loss"]), metrics, bar)
                    step = done = step + k
                    if step_callback is not None:
                        step_callback(done)
                    if self.status == "target reached":
                        self.save(done)
                        break
                    if stop.received is not None:
                        self.save(done)
                        self.status = "interrupted"
                        bar.write(f"signal {stop.received}: saved a checkpoint at step {done}; resume with --resume",
                                  file=sys.stderr)
                        break
        finally:
            bar.close()
            self.ckpt.close()
            self.logger.close()

    def _steps_this_call(self, step: int) -> int:
        """`steps_per_call` steps from `step` when no side work falls due before the last of them,
        else one (so evaluations, logs and checkpoints see the state of exactly their step)."""
        k = min(self.cfg.steps_per_call, self.cfg.max_steps - step)
        return k if k > 1 and not any(any(self._due(done).values()) for done in range(step + 1, step + k)) else 1

    def _due(self, done: int) -> dict[str, bool]:
        """Which side work falls due after step `done`: what `_after_step` does, and what a
        several-step call must not skip over (`_steps_this_call`)."""
        cfg, last = self.cfg, done == self.cfg.max_steps
        every = cfg.log_every if cfg.fingerprint_every is None else cfg.fingerprint_every
        return {"log": done % cfg.log_every == 0 or last,
                "fingerprint": bool(every) and (done % every == 0 or last),
                "eval": done % cfg.eval_every == 0 or last,
                "tasks": self.tasks is not None and self.tasks.due(done, cfg.max_steps),
                "ckpt": done % cfg.ckpt_every == 0 or last}

    def _count_step_flops(self, x_bt, y_bt) -> None:
        """FLOPs per token from the compiled step's cost analysis (the executable the first step
        compiled: nothing is compiled again), beside the 6·N + attention formula; MFU uses it."""
        flops = self.trainer.step_flops(self.state, x_bt, y_bt)
        if flops is None:
            _log(f"FLOPs per token: {self.flops_tok:.4g} by the 6·N + 12·L·T·d formula (no cost analysis for this "
                 "step: a loop over micro-batches or scanned layers, whose body XLA's cost analysis counts once, or a "
                 "deterministic reduce)")
            return
        self.flops_tok_compiled = flops / self.tokens_per_step
        _log(f"FLOPs per token: {self.flops_tok_compiled:.4g} in the compiled step (XLA cost analysis; MFU uses "
             f"it), {self.flops_tok:.4g} by the 6·N + 12·L·T·d formula ({self.flops_tok_compiled / self.flops_tok:.3f}x)")

    def _after_step(self, step: int, loss: float, metrics: dict, bar) -> None:
        """Check the loss, then log, evaluate and save on their schedules."""
        done = step + 1
        self.steps_since_log += 1
        bar.update(1)
        if not math.isfinite(loss):
            self._diverged(done, f"loss became {loss}")
        self.last_loss = loss
        due = self._due(done)
        if due["log"]:
            self._log_train(step, loss, metrics, bar)
        if due["fingerprint"]:
            self.logger.log({"kind": "fingerprint", "step": done, **fingerprint(self.trainer.params(self.state))})
        if due["eval"]:
            self._evaluate(done, loss, bar)
        if due["tasks"]:
            self.logger.log(self.tasks.run(done, self.trainer.params(self.state)))
            self.t_last = time.perf_counter()  # evaluation time is not training throughput
        if due["ckpt"]:
            self.save(done)

    def _diverged(self, done: int, what: str) -> None:
        """Stop without saving the state of step `done`, saying which saved state is still good."""
        self.logger.log({"kind": "diverged", "step": done, "what": what})
        self.status = "diverged"
        self.ckpt.wait()
        saved = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is kept in {self.run_dir} (step {saved})" if saved is not None
                else "no checkpoint had been saved yet")
        raise TrainingDiverged(f"{what} at step {done}; stopped without saving this state, and {kept}. Lower "
                               "train.lr, raise train.warmup_steps, or check the data")

    def _log_train(self, step: int, loss: float, metrics: dict, bar) -> None:
        now = time.perf_counter()
        tok_s = self.steps_since_log * self.tokens_per_step / (now - self.t_last)
        done = step + 1
        self.logger.log({
            "kind": "train", "step": done, "tokens_seen": done * self.tokens_per_step, "loss": loss,
            "lr": float(self.schedule(step)), "grad_norm": to_host(metrics["grad_norm"]),
            **({"muon_lr": float(self.muon_schedule(step))} if self.muon_schedule is not None else {}),
            "tokens_per_s": tok_s, "mfu": tok_s * (self.flops_tok_compiled or self.flops_tok) / self.peak,
            "mfu_6n": tok_s * self.flops_tok / self.peak, "time_s": now - self.t_start,
            **moe_log(metrics),
        })
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        self.t_last, self.steps_since_log = now, 0

    def _evaluate(self, done: int, loss: float, bar) -> None:
        self.val_loss = evaluate(self.trainer.eval_step, self.trainer.params(self.state), self.val_batches)
        if not math.isfinite(self.val_loss):  # never saved, and never called best
            self._diverged(done, f"validation loss became {self.val_loss}")
        improved = self.val_loss < self.best_val
        self.best_val = min(self.best_val, self.val_loss)
        self.logger.log({
            "kind": "eval", "step": done, "tokens_seen": done * self.tokens_per_step, "val_loss": self.val_loss,
            "val_ppl": math.exp(min(self.val_loss, 50.0)), "best_val_loss": self.best_val,
        })
        if self.is_main:
            bar.write(f"step {done}: train loss {loss:.4f}, val loss {self.val_loss:.4f} (best {self.best_val:.4f})",
                      file=sys.stderr)
        if improved:
            self.save(done, best=True)
        if self.cfg.target_val_loss is not None and self.val_loss <= self.cfg.target_val_loss:
            self.status, self.target_reached_s = "target reached", time.perf_counter() - self.t_start
            self.logger.log({"kind": "target", "step": done, "val_loss": self.val_loss,
                             "target_val_loss": self.cfg.target_val_loss, "time_s": self.target_reached_s})
        self.t_last = time.perf_counter()  # evaluation time is not training throughput


def _samples(params, model_cfg: GPTConfig, cfg: TrainConfig, data: RunData) -> list[str]:
    """The end-of-run samples: `cfg.samples` continuations of the start of the validation text."""
    prompt = np.array([data.sample_prompt] * cfg.samples)
    out = generate(params, model_cfg, prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                   seed=cfg.seed, eos_id=data.tokenizer.eot_id)
    eot, n = data.tokenizer.eot_id, len(data.sample_prompt)
    return [data.tokenizer.decode(data.sample_prompt + trim_at_eos(row, eot, n)) for row in out]


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
    start = run_configs(run_dir, model_cfg, cfg, resume)
    model_cfg, cfg, best_val = start.model, start.train, start.best_val
    run_dir.mkdir(parents=True, exist_ok=True)
    seq_len = cfg.context_length or model_cfg.context_length
    if seq_len > model_cfg.context_length:
        raise DataError(f"train.context_length {seq_len} exceeds the model's context_length {model_cfg.context_length}")
    data = build_data(cfg, seq_len, start.tokenizer)
    start.check_data(data.fingerprint, cfg.data)
    if model_cfg.vocab_size != data.tokenizer.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=data.tokenizer.vocab_size)

    if jax.process_count() > 1 and not cfg.mesh and not cfg.deterministic_reduce:  # pmap state is per process
        _log(f"{jax.process_count()} processes and no --mesh: training with the sharded step over mesh data=-1")
        cfg = cfg.replace(mesh="data=-1")
    trainer, abstract, init_state = _build_trainer(model_cfg, cfg)
    if resume and start.params_only:  # converted weights: a fresh optimizer on them, at step 0
        params = restore_params(start.resume_from, abstract["params"])
        state = create_state(GPT(model_cfg), build_optimizer(cfg), params, cfg.seed)
    else:
        state = restore(start.resume_from, checkpoint_abstract(abstract))[0] if resume else init_state()
        state.pop("eval_params", None)  # (schedule-free's average, saved for inference; recomputed from the state)
    start_step = int(to_host(state["step"]))
    if jax.process_index() == 0:
        if resume:
            keep_records_up_to(run_dir / "metrics.jsonl", start_step)
        write_json(run_dir / "config.json", run_meta(model_cfg, cfg, data.tokenizer, start_step, best_val,
                                                          data.fingerprint))

    n_params = count_params(abstract["params"])
    flops_tok = flops_per_token(model_cfg, seq_len, n_params)
    peak, peak_source = peak_flops(model_cfg, cfg, trainer.n_devices)
    _log(f"model {n_params:,} params, vocab {model_cfg.vocab_size}, context {seq_len}; "
         f"{data.n_train_tokens:,} train / {data.n_val_tokens:,} val tokens; {describe_layout(cfg, trainer.n_devices)}; "
         f"steps {start_step}->{cfg.max_steps}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")
    _log(f"optimizer {cfg.optimizer}, schedule "
         + ("warmup then constant (schedule-free)" if cfg.optimizer == "schedule_free_adamw" else cfg.schedule)
         + (f"; parameter groups: {describe_groups(abstract['params'])}" if cfg.optimizer == "muon" else ""))

    loop = _Loop(run_dir, model_cfg, cfg, data, trainer, state, seq_len, flops_tok, peak, best_val)
    loop.run(start_step, progress, step_callback)

    final_step = int(to_host(trainer.get_state(loop.state)["step"]))
    if not loop.is_main:
        return {"status": loop.status, "run_dir": str(run_dir), "step": final_step, "process": jax.process_index()}
    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    plot_losses(records, run_dir / "loss.png", title=f"{run_dir.name}: {cfg.data}")
    plot_expert_load(records, run_dir / "expert_load.png", title=f"{run_dir.name}: expert load")
    train_records = [r for r in records if r.get("kind") == "train"]
    summary = {
        "status": loop.status, "run_dir": str(run_dir), "step": final_step, "train_loss": loop.last_loss,
        "val_loss": loop.val_loss, "best_val_loss": loop.best_val if math.isfinite(loop.best_val) else None,
        "wall_s": time.perf_counter() - loop.t_start, "n_params": n_params, "devices": trainer.n_devices,
        "tokens_per_s": train_records[-1]["tokens_per_s"] if train_records else None,
        "peak_flops": peak, "peak_flops_source": peak_source,
        "flops_per_token": loop.flops_tok_compiled, "flops_per_token_6n": flops_tok,
        "target_reached_s": loop.target_reached_s,
    }
    if loop.status in ("completed", "target reached") and cfg.samples > 0 and jax.process_count() == 1:
        summary["samples"] = _samples(trainer.params(loop.state), model_cfg, cfg, data)
    write_json(run_dir / "summary.json", summary)
    return summary
