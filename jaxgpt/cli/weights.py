"""`jaxgpt convert`: weights between jaxgpt runs and the Hugging Face layout."""

from __future__ import annotations

import json


def _cmd_convert(args) -> int:
    from jaxgpt.weights.hf import load_hf, load_tokenizer, resolve_checkpoint, save_hf

    if args.direction == "to-hf":
        from jaxgpt.weights.checkpoint import load_for_inference

        params, config, tokenizer = load_for_inference(args.source)
        out = save_hf(params, config, args.out, max_shard_bytes=args.max_shard_bytes, tokenizer=tokenizer,
                      force=args.force)
    else:
        from jaxgpt.train.run_dir import save_for_inference

        params, config = load_hf(args.source, download=args.download)
        tokenizer = load_tokenizer(resolve_checkpoint(args.source), config)
        out = save_for_inference(params, config, tokenizer, args.out)
    print(json.dumps({"direction": args.direction, "source": str(args.source), "out": str(out),
                      "config": config.to_dict()}) if args.json else f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="GPT-2 weights between jaxgpt checkpoints and the Hugging Face layout")
    p.add_argument("direction", choices=["to-hf", "from-hf"])
    p.add_argument("source", help="to-hf: a jaxgpt run/checkpoint dir; from-hf: an HF dir or cached model name")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-bytes", type=int, default=None, help="to-hf: shard the safetensors above this size")
    p.add_argument("--download", action="store_true", help="from-hf: allow downloading when not cached")
    p.add_argument("--force", action="store_true", help="to-hf: replace a non-empty --out folder (whole)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_convert)
