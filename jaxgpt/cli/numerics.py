"""`jaxgpt numerics` (the float64 divergence finder) and `jaxgpt selfcheck` (the accelerator self-check)."""

from __future__ import annotations

import json
import math

from jaxgpt.cli.common import add_model_source_args, load_model


def jsonable(tree):
    """A report with NaN/inf floats as the strings "nan"/"inf" (strict JSON has no such numbers)."""
    if isinstance(tree, dict):
        return {k: jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [jsonable(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return str(tree)
    return tree


def _cmd_numerics(args) -> int:
    from jaxgpt.numerics.report import format_table, plot_errors, progress_to_stderr, run_numerics, sample_batch

    if args.batch < 1 or (args.length is not None and args.length < 1):
        raise ValueError(f"--batch and --length must be at least 1, got "
                         f"--batch {args.batch}" + (f" --length {args.length}" if args.length is not None else ""))
    params, config, tokenizer = load_model(args)
    overrides = {k: v for k, v in (("dtype", args.dtype), ("attn_impl", args.attn_impl)) if v is not None}
    config = config.replace(**overrides, drop_rate=0.0)
    length = args.length or min(64, config.context_length)
    ids, targets = sample_batch(config, tokenizer, args.batch, length, seed=args.seed)
    report = run_numerics(config, params, ids, targets, grads=args.grads, progress=progress_to_stderr)
    if args.plot:
        report["plot"] = str(plot_errors(report, args.plot))
    print(json.dumps(jsonable(report)) if args.json else format_table(report))
    if args.plot and not args.json:
        print(f"plot: {report['plot']}")
    return 0 if report["first_divergence"] is None else 1


def _cmd_selfcheck(args) -> int:
    from pathlib import Path

    from jaxgpt.atomic import write_json
    from jaxgpt.numerics.report import progress_to_stderr
    from jaxgpt.numerics.selfcheck import format_selfcheck, run_selfcheck

    report = jsonable(run_selfcheck(quick=args.quick, progress=progress_to_stderr))
    if args.out:
        write_json(Path(args.out), report)
    print(json.dumps(report) if args.json else format_selfcheck(report))
    return 0 if report["passed"] else 1


def _cmd_variant_check(args) -> int:
    import sys

    from jaxgpt.registry import attention_kind, attention_kinds

    if args.list or not args.kind:
        kinds = {name: {"summary": attention_kind(name).summary, "plugin": attention_kind(name).plugin}
                 for name in attention_kinds()}
        print(json.dumps(kinds) if args.json else "\n".join(f"{k:16s} {v['summary']}" + (f"  [{v['plugin']}]" if
                                                                                         v["plugin"] else "")
                                                            for k, v in kinds.items()))
        return 0 if args.list else 2
    from jaxgpt.numerics.variant_check import variant_check

    attention_kind(args.kind)  # an unknown kind: one line, before JAX starts
    report = variant_check(args.kind, progress=lambda name: print(f"[variant-check] {args.kind}: {name}",
                                                                   file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(jsonable(report)))
    else:
        for row in report["checks"]:
            detail = {k: v for k, v in row.items() if k not in ("name", "ok")}
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['name']}: {json.dumps(jsonable(detail))}")
    return 0 if report["ok"] else 1


def add_commands(sub) -> None:
    p = sub.add_parser("variant-check", help="the property checks (reference parity, causality, cached decoding, "
                                             "backends, gradients) on any registered attention kind")
    p.add_argument("kind", nargs="?", default=None, help="an attention kind (--list: the registered ones)")
    p.add_argument("--list", action="store_true", help="list the registered attention kinds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_variant_check)

    p = sub.add_parser("numerics", help="find where a JAX run leaves the float64 NumPy reference, op by op")
    add_model_source_args(p, what="check")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the JAX model (default: the model's)")
    p.add_argument("--attn-impl", default=None, choices=["naive", "xla", "blockwise", "auto"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=None, help="tokens per row (default: min(64, context length))")
    p.add_argument("--seed", type=int, default=0, help="a random model's initialisation and random ids")
    p.add_argument("--grads", action="store_true", help="also every parameter's gradient")
    p.add_argument("--plot", default="numerics.png", help="where to draw the errors ('' for no plot)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_numerics)

    p = sub.add_parser("selfcheck", help="check and time this backend: reference parity, devices, training, speed")
    p.add_argument("--quick", action="store_true", help="the short mode (small models, fewer cases)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=_cmd_selfcheck)
