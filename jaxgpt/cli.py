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

    return parser


def main(argv=None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .tokenizer import TokenizerError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"jaxgpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
