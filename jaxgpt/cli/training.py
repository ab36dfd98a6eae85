"""`jaxgpt train`, `eval`, `plot` and `compare-runs`: pretraining runs."""

from __future__ import annotations

import json
import sys
import time

from jaxgpt.host_setup import one_cpu_device_per_core


def _cmd_train(args) -> int:
    from jaxgpt.train.sharding import initialize_distributed

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # before JAX starts
    from jaxgpt.config import get_preset
    from jaxgpt.train.config import TrainConfig, apply_overrides
    from jaxgpt.train.loop import TrainingDiverged, train
    from jaxgpt.train.recipes import recipe_configs

    model_cfg, train_cfg = recipe_configs(args.recipe)
    if args.preset is not None:
        model_cfg = get_preset(args.preset)
    if args.resume:  # start from the run's own configs; --preset, flags and --set change them from there
        from jaxgpt.config import GPTConfig
        from jaxgpt.weights.checkpoint import locate, read_meta

        if args.out is None:
            raise ValueError("--resume needs --out: the run directory to continue")
        meta = read_meta(locate(args.out, fallback=True, quiet=True))
        train_cfg = TrainConfig.from_dict(meta["train"])
        if args.preset is None:
            model_cfg = GPTConfig.from_dict(meta["model"])
    direct = {k: v for k, v in {"data": args.data, "tokenizer": args.tokenizer, "max_steps": args.max_steps,
                                 "devices": args.devices, "seed": args.seed, "mesh": args.mesh}.items() if v is not None}
    train_cfg = train_cfg.replace(**direct)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, args.set)
    if args.out is None:
        args.out = time.strftime("runs/train-%Y%m%d-%H%M%S")
    try:
        summary = train(model_cfg, train_cfg, args.out, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"jaxgpt train: {e}", file=sys.stderr)
        return 3
    if "process" in summary:  # a process other than 0: process 0 reports for the run
        pass
    elif args.json:
        print(json.dumps(summary))
    else:
        print(f"\n{summary['status']} at step {summary['step']}: train loss {summary['train_loss']:.4f}, "
              f"best val loss {summary['best_val_loss']}, {summary['wall_s']:.0f} s; run in {summary['run_dir']}")
        for i, sample in enumerate(summary.get("samples", [])):
            print(f"\n--- sample {i + 1} ---\n{sample}")
    return 0 if summary["status"] in ("completed", "target reached") else 130


def _cmd_eval(args) -> int:
    from jaxgpt.train.evaluate import evaluate_checkpoint, evaluate_hf

    if (args.checkpoint is None) == (args.hf is None):
        raise ValueError("give exactly one of --checkpoint or --hf")
    if args.hf is not None and args.data is None:
        raise ValueError("--hf needs --data: the corpus to evaluate on")
    result = (evaluate_checkpoint(args.checkpoint, data=args.data, batches=args.batches) if args.checkpoint else
              evaluate_hf(args.hf, args.data, args.batches))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"val loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"({result['batches']} batches, {result['tokens']:,} tokens of {result['data']})")
    return 0


def _cmd_plot(args) -> int:
    from pathlib import Path

    from jaxgpt.train.metrics import plot_losses, read_jsonl

    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {args.run_dir} a jaxgpt run directory?")
    out = plot_losses(read_jsonl(path), Path(args.out or Path(args.run_dir) / "loss.png"), title=Path(args.run_dir).name)
    print(out)
    return 0


def _cmd_compare_runs(args) -> int:
    from jaxgpt.train.fingerprint import compare_runs

    result = compare_runs(args.run_a, args.run_b)
    if args.json:
        print(json.dumps(result))
    elif result["identical"]:
        print(f"bitwise identical parameters at all {len(result['steps_compared'])} fingerprinted steps in common "
              f"(last: step {result['last_equal_step']})")
    else:
        print(f"first difference at step {result['first_difference_step']} (bitwise equal up to step "
              f"{result['last_equal_step']}); {result['params_differing']} of {result['params_total']} parameters "
              "differ there, most first:")
        for m in result["moved"][:10]:
            print(f"  {m['param']}: norm {m['norm_a']:.6g} vs {m['norm_b']:.6g} (relative {m['rel_norm_diff']:.2e})")
    return 0 if result["identical"] else 1


def add_commands(sub) -> None:
    """train, eval, plot, compare-runs."""
    p = sub.add_parser("train", help="pretrain a model (no arguments: a small model on the embedded corpus)")
    p.add_argument("--recipe", default="default",
                   help="model preset + train settings to start from: default (small + Muon) or gpt2-classic "
                        "(small + AdamW, the book's recipe); --preset, flags and --set change it")
    p.add_argument("--preset", default=None, help="model preset (default: the recipe's, small)")
    p.add_argument("--data", default=None, help="named corpus, text file, or prepared directory")
    p.add_argument("--tokenizer", default=None, help="char, gpt2, or a directory from `jaxgpt tokenizer train`")
    p.add_argument("--out", default=None, help="run directory (default: a new runs/train-YYYYmmdd-HHMMSS)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--devices", type=int, default=None, help="local devices for data parallelism (default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mesh", default=None, help="sharded jit instead of pmap over axes data, fsdp, expert, "
                   "e.g. data=2,fsdp=2 or data=2,expert=2 (-1: the rest)")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port (process 0)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.lr=3e-4 --set model.n_layers=6")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=_cmd_train, before_jax=one_cpu_device_per_core)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint or Hugging Face weights")
    p.add_argument("--checkpoint", default=None, help="a jaxgpt run or checkpoint directory")
    p.add_argument("--hf", default=None, help="Hugging Face weights (GPT-2, Llama, Qwen3, Gemma 3) with --data")
    p.add_argument("--data", default=None, help="evaluate on this corpus instead of the run's own")
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="(re)draw the loss curves of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("compare-runs", help="the first step where two runs' parameters differ (exit 1), from "
                                            "their logged fingerprints")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_compare_runs)
