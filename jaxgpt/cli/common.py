"""What several commands share: where a model comes from, the sampling options, named data files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def add_model_source_args(p: argparse.ArgumentParser, what: str = "start from") -> None:
    """--checkpoint / --hf / --download / --preset: where a command's model comes from."""
    p.add_argument("--checkpoint", default=None, help=f"{what} this jaxgpt run or checkpoint directory")
    p.add_argument("--hf", default=None, help=f"{what} Hugging Face GPT-2 weights (directory or cached name: gpt2, …)")
    p.add_argument("--download", action="store_true", help="allow downloading --hf weights when not cached")
    p.add_argument("--preset", default="small", help="a random model of this preset when neither is given")


def load_model(args):
    """(params, config, tokenizer) from a checkpoint, HF weights, or a random model of a preset."""
    from jaxgpt.config import get_preset
    from jaxgpt.nn.model import init_params
    from jaxgpt.data.tokenizer import get_tokenizer

    if args.checkpoint and args.hf:
        raise ValueError("give --checkpoint or --hf, not both")
    if args.checkpoint:
        from jaxgpt.weights.checkpoint import load_for_inference

        return load_for_inference(args.checkpoint)
    if args.hf:
        from jaxgpt.weights.hf import load_hf, load_tokenizer, resolve_checkpoint

        params, config = load_hf(args.hf, download=args.download)
        return params, config, load_tokenizer(resolve_checkpoint(args.hf), config)
    tokenizer = get_tokenizer("gpt2")
    config = get_preset(args.preset, vocab_size=tokenizer.vocab_size)
    print(f"[jaxgpt] no --checkpoint/--hf: randomly initialised {args.preset!r} model (expect gibberish)", file=sys.stderr)
    return init_params(config, seed=args.seed), config, tokenizer


def data_file(name_or_path: str) -> Path:
    """A named data set of `JAXGPT_DATA_DIR` (`jaxgpt.data.corpus.CORPORA`) or a path."""
    from jaxgpt.data.corpus import CORPORA, corpus_path

    return corpus_path(name_or_path) if name_or_path in CORPORA else Path(name_or_path).expanduser()
