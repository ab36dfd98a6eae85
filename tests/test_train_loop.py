"""The training loop: exact resume (Ctrl-C and kill -9), NaN guard, checkpoint errors, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.weights.checkpoint import locate, CheckpointError, load_for_inference, read_meta
from jaxgpt.cli.main import main
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.data.corpus import DataError
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.loop import TrainingDiverged, train

MODEL = GPTConfig(vocab_size=1, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    text = " ".join(rng.choice(words, 3000)) + "\n"
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(text)
    return path


def _cfg(corpus: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), tokenizer="char", batch_size=4, micro_batches=2, max_steps=8, decay_steps=8,
                warmup_steps=2, log_every=2, eval_every=4, eval_batches=2, ckpt_every=4, samples=0,
                peak_flops=1e10, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _params(run_dir):
    return jax.tree.leaves(load_for_inference(run_dir)[0])


def _assert_identical(a, b):
    for x, y in zip(_params(a), _params(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_writes_everything_and_resume_after_ctrl_c_is_bit_identical(corpus, tmp_path):
    straight = train(MODEL, _cfg(corpus), tmp_path / "straight", progress=False)
    assert straight["status"] == "completed" and straight["step"] == 8
    for name in ("config.json", "metrics.jsonl", "loss.png", "summary.json"):
        assert (tmp_path / "straight" / name).is_file()
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen"} <= set(records[0])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = train(MODEL, _cfg(corpus), tmp_path / "resumed", progress=False, step_callback=interrupt)
    assert first["status"] == "interrupted" and first["step"] == 3
    with pytest.raises(CheckpointError, match="--resume"):
        train(MODEL, _cfg(corpus), tmp_path / "resumed", progress=False)
    second = train(None, None, tmp_path / "resumed", resume=True, progress=False)
    assert second["status"] == "completed" and second["step"] == 8
    _assert_identical(tmp_path / "straight", tmp_path / "resumed")
    assert read_meta(tmp_path / "resumed")["data_position"]["next_step"] == 8


def test_resume_after_kill_9_is_bit_identical(corpus, tmp_path):
    cfg = _cfg(corpus, max_steps=40, decay_steps=40, ckpt_every=5, eval_every=20)
    train(MODEL, cfg, tmp_path / "straight", progress=False)

    run = tmp_path / "killed"
    sets = [f"train.{k}={v}" for k, v in cfg.to_dict().items() if v is not None and k not in ("data", "tokenizer")]
    sets += [f"model.{k}={v}" for k, v in MODEL.to_dict().items()]
    cmd = [sys.executable, "-m", "jaxgpt.cli", "train", "--out", str(run), "--data", str(corpus),
           "--tokenizer", "char", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    # one CPU device, like this test process, so the two runs are bit-for-bit comparable
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        steps = [p.name for p in (run / "checkpoints").glob("*") if p.name.isdigit()] if run.exists() else []
        if any(int(s) >= 10 for s in steps):
            break
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    # killed at once when step 10 appeared: often before its integrity record was written, so
    # step 10 is then refused as unverifiable and the resume falls back to step 5
    step_at_kill = read_meta(locate(run, fallback=True, quiet=True))["step"]
    assert 5 <= step_at_kill < 40, step_at_kill
    summary = train(None, None, run, resume=True, progress=False)
    assert summary["step"] == 40
    _assert_identical(tmp_path / "straight", run)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    cfg = _cfg(corpus, lr=1e30, min_lr=0.0, max_steps=30, decay_steps=30, warmup_steps=0, ckpt_every=1,
               eval_every=100, grad_clip=0.0, micro_batches=1)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(MODEL, cfg, tmp_path / "nan", progress=False)
    meta = read_meta(tmp_path / "nan")
    params = _params(tmp_path / "nan")
    assert all(np.isfinite(np.asarray(p)).all() for p in params)
    assert meta["step"] >= 1


def test_checkpoint_errors_name_the_problem(corpus, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint path"):
        load_for_inference(tmp_path / "nowhere")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_for_inference(tmp_path / "empty")
    run = tmp_path / "run"
    train(MODEL, _cfg(corpus, max_steps=4, decay_steps=4), run, progress=False)
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2 vs requested 3"):
        train(MODEL.replace(n_layers=3), _cfg(corpus), run, resume=True, progress=False)
    # corrupt the saved arrays: a clear error, not a crash deep inside
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_for_inference(run / "checkpoints" / "4")


def test_corpus_shorter_than_context_is_a_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    with pytest.raises(DataError, match="too few"):
        train(MODEL, TrainConfig(data=str(short), peak_flops=1e10), tmp_path / "r", progress=False)


def test_cli_eval_generate_and_plot(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train(MODEL, _cfg(corpus, max_steps=4, decay_steps=4), run, progress=False)
    assert main(["eval", "--checkpoint", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_loss"] > 0 and np.isclose(result["perplexity"], np.exp(result["val_loss"]))
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the cat", "--max-new-tokens", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "the cat" and len(out["tokens"]) <= 10
    (run / "loss.png").unlink()
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").is_file()
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint path" in capsys.readouterr().err


def test_tensorboard_logging_writes_event_files(corpus, tmp_path):
    pytest.importorskip("tensorboardX", reason="TensorBoard logging is optional (pip install 'jaxgpt[tensorboard]')")
    run = tmp_path / "tb"
    train(MODEL, _cfg(corpus, max_steps=4, decay_steps=4, tensorboard=True), run, progress=False)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_resume_refuses_changes_that_alter_the_training(corpus, tmp_path):
    cfg = _cfg(corpus, max_steps=2, decay_steps=4)
    train(MODEL, cfg, tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match=r"cannot resume with different \['lr'\]"):
        train(None, cfg.replace(lr=1e-2), tmp_path / "r", resume=True, progress=False)
    summary = train(None, cfg.replace(max_steps=4, log_every=1), tmp_path / "r", resume=True, progress=False)
    assert summary["step"] == 4


def test_resume_takes_the_newest_saved_state_and_old_metadata(tmp_path):
    """A run killed before its first periodic save resumes from its best (evaluation) checkpoint,
    and checkpoints written before a config field existed still match that field's default."""
    from jaxgpt.weights.checkpoint import _candidates, check_compatible
    from jaxgpt.config import get_preset

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "best" / "100").mkdir(parents=True)
    (tmp_path / "checkpoints" / "200.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    assert _candidates(tmp_path)[0] == (tmp_path / "best", 100)
    (tmp_path / "checkpoints" / "150").mkdir()
    assert _candidates(tmp_path)[0] == (tmp_path / "checkpoints", 150)
    old = {k: v for k, v in get_preset("test").to_dict().items() if k not in ("attention", "position", "n_kv_heads")}
    check_compatible(old, get_preset("test"))
    with pytest.raises(CheckpointError, match="position"):
        check_compatible(old, get_preset("test", position="rope"))


def test_extending_a_run_keeps_its_schedule(corpus, tmp_path):
    """Train 4 steps (the cosine fitted to 4), then --resume to 8: the learning rate stays at min_lr
    past the schedule (it jumped back up before), bit-identical to a straight run with that schedule."""
    short = _cfg(corpus, max_steps=4, decay_steps=None, log_every=1, eval_every=2, ckpt_every=2)
    train(MODEL, short, tmp_path / "extended", progress=False)
    assert read_meta(tmp_path / "extended")["train"]["decay_steps"] == 4  # recorded at the start
    train(None, short.replace(max_steps=8), tmp_path / "extended", resume=True, progress=False)
    train(MODEL, short.replace(max_steps=8, decay_steps=4), tmp_path / "straight", progress=False)
    _assert_identical(tmp_path / "extended", tmp_path / "straight")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "extended" / "metrics.jsonl").read_text().splitlines()
           if '"kind": "train"' in line]
    assert lrs[4:] == pytest.approx([short.min_lr] * 4), lrs


def test_divergence_before_any_save_says_so(corpus, tmp_path):
    cfg = _cfg(corpus, lr=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0, micro_batches=1, ckpt_every=100,
               eval_every=100, max_steps=30, decay_steps=30)
    with pytest.raises(TrainingDiverged, match="no checkpoint had been saved yet"):
        train(MODEL, cfg, tmp_path / "nan0", progress=False)


def test_interrupt_before_the_first_log_line_ends_cleanly(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C before anything was logged: a saved checkpoint and a summary, exit 130 (it failed on a
    missing metrics.jsonl); Ctrl-C during start-up: one line and exit 130, no traceback."""
    cfg = _cfg(corpus, log_every=100, eval_every=100, ckpt_every=100)
    summary = train(MODEL, cfg, tmp_path / "early", progress=False,
                    step_callback=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 1 else None)
    assert summary["status"] == "interrupted" and summary["step"] == 1
    import jaxgpt.train.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_data", interrupted)
    code = main(["train", "--out", str(tmp_path / "startup"), "--data", str(corpus), "--tokenizer", "char",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 130 and "jaxgpt train: interrupted" in err and "Traceback" not in err


def test_resume_overrides_apply_to_the_checkpoint_config(corpus, tmp_path, capsys):
    """--resume --set model.n_layers=2 on a 2-layer run is the same model: accepted (it was compared
    with the default preset and refused)."""
    run = tmp_path / "r"
    train(MODEL, _cfg(corpus, max_steps=2, decay_steps=2, eval_every=2, ckpt_every=2), run, progress=False)
    code = main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--set", "model.n_layers=2",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_a_converted_model_is_saved_without_optimizer_state_and_trains_on(corpus, tmp_path):
    """`convert from-hf` writes the weights alone (no optimizer state is built: about one copy of the
    model in memory); --resume then trains them with the train config given, from step 0."""
    from jaxgpt.data.tokenizer import CharTokenizer
    from jaxgpt.nn.model import init_params
    from jaxgpt.train.run_dir import save_for_inference

    tok = CharTokenizer.from_text(corpus.read_text())
    model = MODEL.replace(vocab_size=tok.vocab_size)
    params = init_params(model, seed=3)
    save_for_inference(params, model, tok, tmp_path / "run")
    assert read_meta(tmp_path / "run")["params_only"] is True
    saved_tree = (tmp_path / "run" / "checkpoints" / "0" / "state" / "_METADATA").read_text()  # Orbax's tree record
    assert "params" in saved_tree and "opt_state" not in saved_tree
    for a, b in zip(jax.tree.leaves(params), _params(tmp_path / "run")):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    summary = train(None, _cfg(corpus, max_steps=3, decay_steps=3), tmp_path / "run", resume=True, progress=False)
    assert summary["status"] == "completed" and summary["step"] == 3


@pytest.mark.parametrize("optimizer", ["muon", "schedule_free_adamw"])
def test_muon_and_schedule_free_resume_bit_identically(optimizer, corpus, tmp_path, capsys):
    """Muon's state (momentum) and AdamW's, partitioned by name, and schedule-free AdamW's (z, the
    averaging weights) survive a checkpoint: interrupted at step 3 and resumed equals straight
    through. A schedule-free run is evaluated, saved for inference and reloaded at its average x."""
    cfg = _cfg(corpus, optimizer=optimizer, schedule="wsd", muon_lr=0.02)
    straight = train(MODEL, cfg, tmp_path / "straight", progress=False)
    assert straight["status"] == "completed"
    err = capsys.readouterr().err
    if optimizer == "muon":
        assert "parameter groups: muon: 8 tensors" in err
    else:
        assert "schedule warmup then constant (schedule-free)" in err
        from jaxgpt.train.evaluate import evaluate_checkpoint
        from jaxgpt.weights.checkpoint import find_checkpoint, model_params_entry

        manager, step = find_checkpoint(tmp_path / "straight")
        assert model_params_entry(manager, step) == "eval_params"
        manager.close()
        # the run's last evaluation (at x, in the loop) = the loss of the parameters inference loads
        assert evaluate_checkpoint(tmp_path / "straight")["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)

    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(MODEL, cfg, tmp_path / "resumed", progress=False, step_callback=interrupt)["step"] == 3
    assert train(None, None, tmp_path / "resumed", resume=True, progress=False)["step"] == 8
    _assert_identical(tmp_path / "straight", tmp_path / "resumed")
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(("muon_lr" in r) == (optimizer == "muon") for r in records if r["kind"] == "train")


def test_mfu_counts_the_compiled_steps_flops(corpus, tmp_path):
    """FLOPs per token come from XLA's cost analysis of the compiled step (close to, and a little
    above, the 6·N + attention formula: it also counts softmax, norms, the loss and the update);
    MFU uses them and `mfu_6n` keeps the formula's figure. With micro-batches (a loop whose body the
    cost analysis counts once) the formula is used."""
    summary = train(MODEL, _cfg(corpus, micro_batches=1, max_steps=2, log_every=1), tmp_path / "one", progress=False)
    ratio = summary["flops_per_token"] / summary["flops_per_token_6n"]
    assert 1.0 < ratio < 1.5, ratio
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in records if r["kind"] == "train"):
        np.testing.assert_allclose(r["mfu"] / r["mfu_6n"], ratio, rtol=1e-9)
    accumulated = train(MODEL, _cfg(corpus, max_steps=2), tmp_path / "two", progress=False)
    assert accumulated["flops_per_token"] is None and accumulated["flops_per_token_6n"] > 0


def test_training_stops_at_the_target_validation_loss(corpus, tmp_path):
    """train.target_val_loss: the first evaluation at or below it ends the run (saved, logged, timed)."""
    train(MODEL, _cfg(corpus, max_steps=12, decay_steps=12, eval_every=2, micro_batches=1), tmp_path / "free",
          progress=False)
    evals = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["val_loss"]) for r in evals if r["kind"] == "eval"]
    target = min(loss for _, loss in losses[:3]) + 1e-6  # reached by the third evaluation at the latest
    first = next(s for s, loss in losses if loss <= target)
    hit = train(MODEL, _cfg(corpus, max_steps=12, decay_steps=12, eval_every=2, micro_batches=1, target_val_loss=target),
                tmp_path / "hit", progress=False)
    assert hit["status"] == "target reached" and hit["step"] == first and hit["target_reached_s"] > 0
    assert read_meta(tmp_path / "hit")["step"] == first
    records = [json.loads(line) for line in (tmp_path / "hit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "target"] == [first]


def test_several_steps_per_call_train_the_same_run(corpus, tmp_path, monkeypatch):
    """train.steps_per_call=3: runs of three steps in one compiled call where no side work falls
    inside them, single steps up to each log/eval/checkpoint, so every record sees its own step's
    state; the run equals the one-step-per-call run (same losses, parameters, checkpoints)."""
    from jaxgpt.train.step import ParallelTrainer

    calls = []
    run_steps = ParallelTrainer.run_steps
    monkeypatch.setattr(ParallelTrainer, "run_steps", lambda self, state, batches: (
        calls.append(len(batches)), run_steps(self, state, batches))[1])
    one = train(MODEL, _cfg(corpus, log_every=4, micro_batches=1), tmp_path / "one", progress=False)
    three = train(MODEL, _cfg(corpus, log_every=4, micro_batches=1, steps_per_call=3), tmp_path / "three",
                  progress=False)
    assert one["step"] == three["step"] == 8
    assert calls == [3, 3]  # steps 1-3 and 5-7 (4 and 8 have side work: single steps end there)

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    pick = ("kind", "step", "loss", "val_loss", "grad_norm", "checksum")
    assert [{k: r.get(k) for k in pick} for r in records("one")] == [{k: r.get(k) for k in pick} for r in records("three")]
    _assert_identical(tmp_path / "one", tmp_path / "three")
    with pytest.raises(ConfigError, match="steps_per_call=3 runs with the jit/pmap trainer only"):
        train(MODEL, _cfg(corpus, steps_per_call=3, mesh="data=-1"), tmp_path / "mesh", progress=False)
    moe = MODEL.replace(moe_experts=4, moe_top_k=2, moe_router="sigmoid", moe_bias_rate=0.01)
    with pytest.raises(ConfigError, match="balancing bias"):  # its average would be scaled by 1/beta1
        train(moe, _cfg(corpus, optimizer="schedule_free_adamw"), tmp_path / "moe", progress=False)
