"""`jaxgpt data prepare` and `jaxgpt tokenizer train`: corpus tools."""

from __future__ import annotations

import json


def _cmd_data_prepare(args) -> int:
    from jaxgpt.data.prepare import prepare

    stats = prepare(args.inputs, args.out, tokenizer_name=args.tokenizer, val_fraction=args.val_fraction,
                    near_dup_threshold=args.near_dup_threshold or None, text_field=args.text_field,
                    seed=args.seed, progress=not args.no_progress, force=args.force)
    print(json.dumps(stats) if args.json else
          f"{stats['documents_kept']:,} documents kept of {stats['documents_in']:,} "
          f"({stats['exact_duplicates']} exact and {stats['near_duplicates']} near duplicates removed, "
          f"{stats['empty']} empty); {stats['train_tokens']:,} train / {stats['val_tokens']:,} val tokens in {args.out}")
    return 0


def _cmd_tokenizer_train(args) -> int:
    from jaxgpt.data.bpe import train_tokenizer_files

    summary = train_tokenizer_files(args.files, args.vocab_size, args.out, special_tokens=tuple(args.special),
                                    progress=not args.no_progress, force=args.force,
                                    replace_undecodable=args.replace_undecodable)
    print(json.dumps(summary) if args.json else
          f"{summary['vocab_size']:,} tokens ({summary['merges']:,} merges) from {summary['bytes']:,} bytes in "
          f"{summary['seconds']:.1f} s -> {summary['out']}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="corpus tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="clean, deduplicate, split and tokenize text files for training")
    p.add_argument("inputs", nargs="+", help="text files, JSONL files (one document per record) or directories")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, char, or a directory from `jaxgpt tokenizer train`")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity at which a document is a near duplicate (0 disables)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (the old corpus stays until the new one is complete)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_prepare)

    p = sub.add_parser("tokenizer", help="tokenizers trained here")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser("train", help="train a byte-level BPE (GPT-2's pre-tokenisation) on text files")
    p.add_argument("files", nargs="+")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes + merges + special tokens")
    p.add_argument("--out", required=True, help="directory for tokenizer.tiktoken and tokenizer_config.json")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"], help="special tokens (ids after the merges)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (atomically, once training is done)")
    p.add_argument("--replace-undecodable", action="store_true",
                   help="train on U+FFFD where a file is not valid UTF-8 (default: refuse, naming the byte)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_tokenizer_train)
