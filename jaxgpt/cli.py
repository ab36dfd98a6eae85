"""The `jaxgpt` command line: argument parsing and dispatch only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_params(args) -> int:
    from .config import get_preset
    from .model import param_counts

    cfg = get_preset(args.preset)
    counts = param_counts(cfg)
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"{args.preset}: {counts['total']:,} parameters ({counts['total_tied']:,} with tied embeddings)")
    return 0


def _load_for_generation(args):
    """(params, config, tokenizer) from a checkpoint, or a random model of a preset."""
    from .config import get_preset
    from .model import init_params
    from .tokenizer import get_tokenizer

    if args.checkpoint:
        from .checkpoint import load_for_inference

        return load_for_inference(args.checkpoint)
    tokenizer = get_tokenizer("gpt2")
    config = get_preset(args.preset, vocab_size=tokenizer.vocab_size)
    print(f"[jaxgpt] no --checkpoint: randomly initialised {args.preset!r} model (expect gibberish)", file=sys.stderr)
    return init_params(config, seed=args.seed), config, tokenizer


def _cmd_generate(args) -> int:
    from .generate import generate_text

    params, config, tokenizer = _load_for_generation(args)
    t0 = time.perf_counter()
    text = generate_text(
        params, config, tokenizer, args.prompt, args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "seconds": round(seconds, 3)}))
    else:
        print(text)
    return 0


def _cmd_train(args) -> int:
    from .config import get_preset
    from .train_config import TrainConfig, apply_overrides
    from .trainer import TrainingDiverged, train

    model_given = args.preset is not None or any(o.startswith("model.") for o in args.set)
    model_cfg = get_preset(args.preset or "small")
    train_cfg = TrainConfig()
    direct = {k: v for k, v in {"data": args.data, "tokenizer": args.tokenizer, "max_steps": args.max_steps,
                                 "devices": args.devices, "seed": args.seed}.items() if v is not None}
    train_cfg = train_cfg.replace(**direct)
    model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, args.set)
    if args.out is None:
        if args.resume:
            raise ValueError("--resume needs --out: the run directory to continue")
        args.out = time.strftime("runs/train-%Y%m%d-%H%M%S")
    try:
        summary = train(model_cfg if (model_given or not args.resume) else None,
                        train_cfg if (not args.resume or args.max_steps is not None) else None,
                        args.out, resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"jaxgpt train: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n{summary['status']} at step {summary['step']}: train loss {summary['train_loss']:.4f}, "
              f"best val loss {summary['best_val_loss']}, {summary['wall_s']:.0f} s; run in {summary['run_dir']}")
        for i, sample in enumerate(summary.get("samples", [])):
            print(f"\n--- sample {i + 1} ---\n{sample}")
    return 0 if summary["status"] == "completed" else 130


def _cmd_eval(args) -> int:
    from .trainer import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, batches=args.batches)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"val loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"({result['batches']} batches, {result['tokens']:,} tokens of {result['data']})")
    return 0


def _cmd_plot(args) -> int:
    from pathlib import Path

    from .metrics import plot_losses, read_jsonl

    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {args.run_dir} a jaxgpt run directory?")
    out = plot_losses(read_jsonl(path), Path(args.out or Path(args.run_dir) / "loss.png"), title=Path(args.run_dir).name)
    print(out)
    return 0


def _cmd_data_prepare(args) -> int:
    from .prepare import prepare

    stats = prepare(args.inputs, args.out, tokenizer_name=args.tokenizer, val_fraction=args.val_fraction,
                    near_dup_threshold=args.near_dup_threshold or None, text_field=args.text_field,
                    seed=args.seed, progress=not args.no_progress)
    print(json.dumps(stats) if args.json else
          f"{stats['documents_kept']:,} documents kept of {stats['documents_in']:,} "
          f"({stats['exact_duplicates']} exact and {stats['near_duplicates']} near duplicates removed, "
          f"{stats['empty']} empty); {stats['train_tokens']:,} train / {stats['val_tokens']:,} val tokens in {args.out}")
    return 0


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgpt", description="A GPT built from scratch in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="parameter counts of a preset")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("generate", help="generate text from a checkpoint (or a random model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--checkpoint", default=None, help="run directory or checkpoint directory")
    p.add_argument("--preset", default="small", help="model preset when no --checkpoint is given")
    _add_sampling_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("train", help="pretrain a model (no arguments: a small model on the embedded corpus)")
    p.add_argument("--preset", default=None, help="model preset (default: small)")
    p.add_argument("--data", default=None, help="named corpus, text file, or prepared directory")
    p.add_argument("--tokenizer", choices=["char", "gpt2"], default=None)
    p.add_argument("--out", default=None, help="run directory (default: a new runs/train-YYYYmmdd-HHMMSS)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--devices", type=int, default=None, help="local devices for data parallelism (default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set train.lr=3e-4 --set model.n_layers=6")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="evaluate on this corpus instead of the run's own")
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="(re)draw the loss curves of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("data", help="corpus tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="clean, deduplicate, split and tokenize text files for training")
    p.add_argument("inputs", nargs="+", help="text files, JSONL files (one document per record) or directories")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity at which a document is a near duplicate (0 disables)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_prepare)

    return parser


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, TokenizerError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
