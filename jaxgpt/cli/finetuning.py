"""`jaxgpt finetune classify|instruct`, `classify` and `judge`: finetuning and what uses its results."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from jaxgpt.cli.common import add_model_source_args, data_file, load_model


def finetune_config(args):
    from jaxgpt.finetune.loop import FinetuneConfig
    from jaxgpt.finetune.lora import LoRAConfig

    lora = None
    if args.trainable == "lora":
        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(args.lora_targets.split(",")))
    return FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          trainable=args.trainable, lora=lora, lora_train_head=not args.lora_freeze_head,
                          drop_rate=args.drop_rate, seed=args.seed)


def base_source(args) -> dict:
    return {"base": args.checkpoint or args.hf or f"random {args.preset}"}


def finetune_out(args, kind: str) -> Path:
    """The run folder of a finetuning command: --out, or runs/KIND-<time>. Refused when it is, holds or
    sits inside the model it starts from (the finetuned model and its metrics would overwrite it)."""
    out = Path(args.out or time.strftime(f"runs/{kind}-%Y%m%d-%H%M%S")).expanduser().resolve()
    source = args.checkpoint or args.hf
    if source and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ValueError(f"--out {args.out} would write into the model this run starts from ({source}): "
                             "give a folder outside it")
    return out


def _cmd_finetune_classify(args) -> int:
    from jaxgpt.finetune.classify import book_spam_split, finetune_classifier, load_labeled, load_sms_spam, shuffled_split

    path = data_file(args.data)
    if path.name == "SMSSpamCollection":
        rows = load_sms_spam(path)
        splits = book_spam_split(rows, seed=args.seed) if not args.no_balance else shuffled_split(rows, seed=args.seed)
    else:
        splits = shuffled_split(load_labeled(path, args.text_field, args.label_field), seed=args.seed, balance=args.balance)
    params, config, tokenizer = load_model(args)
    shots = [int(k) for k in args.prompt_shots.split(",")] if args.prompt_shots else []
    out = finetune_out(args, "classify")
    results = finetune_classifier(params, config, tokenizer, splits, finetune_config(args), out, pooling=args.pooling,
                                  max_length=args.max_length, progress=not args.no_progress, prompt_shots=shots,
                                  extra_meta=base_source(args))
    if args.json:
        print(json.dumps(results))
    else:
        prompting = ", ".join(f"{k}-shot {v:.1%}" for k, v in results.get("prompting", {}).items())
        print(f"train {results['train_accuracy']:.1%}  val {results['val_accuracy']:.1%}  test {results['test_accuracy']:.1%}"
              f" ({results['params']['trainable']:,} trainable parameters)"
              + (f"; prompting without training: {prompting}" if prompting else "") + f"; run in {out}")
    return 0


def _cmd_finetune_instruct(args) -> int:
    from jaxgpt.finetune.instruct import book_split, finetune_instructions, load_instruction_data

    splits = book_split(load_instruction_data(data_file(args.data)))
    if args.limit:
        splits = tuple(s[:n] for s, n in zip(splits, (args.limit, max(args.limit // 10, 1), max(args.limit // 10, 1))))
    params, config, tokenizer = load_model(args)
    out = finetune_out(args, "instruct")
    results = finetune_instructions(params, config, tokenizer, splits, finetune_config(args), out,
                                    mask_prompt=args.mask_prompt, max_new_tokens=args.max_new_tokens,
                                    progress=not args.no_progress, extra_meta=base_source(args))
    if args.json:
        print(json.dumps(results))
    else:
        scores = results.get("scores", {})
        print(f"val loss {results['history'][-1]['val_loss']:.4f}; test exact match {scores.get('exact_match', 0):.1%}, "
              f"ROUGE-L F1 {scores.get('rouge_l_f1', 0):.3f}; responses in {out}/test-responses.json; model in {out}/model")
    return 0


def _cmd_finetune_dpo(args) -> int:
    from jaxgpt.finetune.dpo import finetune_dpo, load_preferences

    pairs = load_preferences(data_file(args.data))
    pairs = random.Random(args.seed).sample(pairs, len(pairs))[: args.limit or len(pairs)]  # shuffled, then held out
    n_val = max(1, int(round(args.val_fraction * len(pairs))))
    params, config, tokenizer = load_model(args)
    out = finetune_out(args, "dpo")
    results = finetune_dpo(params, config, tokenizer, (pairs[n_val:], pairs[:n_val]), finetune_config(args), out,
                           beta=args.beta, progress=not args.no_progress, extra_meta=base_source(args))
    if args.json:
        print(json.dumps(results))
    else:
        first, last = results["history"][0], results["history"][-1]
        print(f"held-out reward margin {first['val_reward_margin']:.3f} -> {last['val_reward_margin']:.3f}, "
              f"reward accuracy {first['val_reward_accuracy']:.1%} -> {last['val_reward_accuracy']:.1%}; model in {out}/model")
    return 0


def _cmd_dpo_data(args) -> int:
    from jaxgpt.finetune.dpo import judged_preferences, offline_preferences
    from jaxgpt.finetune.instruct import load_instruction_data
    from jaxgpt.atomic import write_json

    entries = load_instruction_data(data_file(args.data))[: args.limit or None]
    pairs = (offline_preferences(entries, args.seed) if args.offline else
             judged_preferences(entries, args.url, args.model, args.seed, progress=not args.no_progress))
    write_json(Path(args.out), pairs)
    print(json.dumps({"pairs": len(pairs), "out": args.out}) if args.json else f"{len(pairs)} preference pairs in {args.out}")
    return 0


def _add_dpo_commands(ft_sub) -> None:
    p = ft_sub.add_parser("dpo", help="preference tuning (DPO) of an instruction model on chosen/rejected pairs")
    add_model_source_args(p, what="tune")
    p.add_argument("--data", required=True, help="JSON list of {instruction, input, chosen, rejected}")
    p.add_argument("--out", default=None)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--trainable", choices=["last-block", "all", "lora"], default="all")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout while tuning")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", default="qkv,attn_out,mlp,head")
    p.add_argument("--lora-freeze-head", action="store_true")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs held out for the metrics")
    p.add_argument("--limit", type=int, default=None, help="use only this many pairs")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_finetune_dpo)

    p = ft_sub.add_parser("dpo-data", help="preference pairs from instruction data (a judge model, or --offline)")
    p.add_argument("--data", default="instruction-data")
    p.add_argument("--out", required=True)
    p.add_argument("--offline", action="store_true", help="no judge: rejected = another entry's answer")
    p.add_argument("--url", default="http://localhost:11434", help="Ollama-compatible server of the judge")
    p.add_argument("--model", default="llama3")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_dpo_data)


def _cmd_judge(args) -> int:
    from jaxgpt.data.corpus import DataError
    from jaxgpt.finetune.instruct import check_entries, judge

    try:
        entries = json.loads(open(args.responses, encoding="utf-8").read())
    except json.JSONDecodeError as e:
        raise DataError(f"{args.responses} is not valid JSON: {e}") from None
    check_entries(entries, args.responses, fields=("instruction", "output", args.key))
    result = judge(entries, args.url, args.model, key=args.key)
    print(json.dumps(result) if args.json else
          f"mean score {result['mean_score']} over {result['scored']} of {result['n']} responses ({result['unparsed']} unparsed)")
    return 0


def _cmd_classify(args) -> int:
    from jaxgpt.finetune.classify import Classifier

    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for row in Classifier(args.checkpoint).predict(texts):
        if args.json:
            print(json.dumps(row))
        else:
            p = row["probabilities"][row["label"]]
            print(f"{row['label']}\t{p:.3f}\t{row['text']}")
    return 0


def _add_finetune_commands(sub) -> None:
    p = sub.add_parser("finetune", help="finetune a model: classification or instruction following")
    ft_sub = p.add_subparsers(dest="finetune_command", required=True)
    for task in ("classify", "instruct"):
        p = ft_sub.add_parser(task, help={"classify": "text classification (default: SMS spam, the book's ch. 6)",
                                          "instruct": "instruction following on Alpaca-style data (the book's ch. 7)"}[task])
        add_model_source_args(p)
        p.add_argument("--data", default="sms-spam" if task == "classify" else "instruction-data",
                       help="named data set or file" + (" (.tsv/.csv/.jsonl with text,label)" if task == "classify" else ""))
        p.add_argument("--out", default=None)
        p.add_argument("--trainable", choices=["head", "last-block", "all", "lora"],
                       default="last-block" if task == "classify" else "all")
        p.add_argument("--epochs", type=int, default=5 if task == "classify" else 2)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--lr", type=float, default=5e-5)
        p.add_argument("--weight-decay", type=float, default=0.1)
        p.add_argument("--drop-rate", type=float, default=None, help="dropout while finetuning (default: the model's)")
        p.add_argument("--lora-rank", type=int, default=16)
        p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale is alpha / rank")
        p.add_argument("--lora-targets", default="qkv,attn_out,mlp,head")
        p.add_argument("--lora-freeze-head", action="store_true", help="with LoRA, keep the head frozen (the book's appendix E)")
        p.add_argument("--seed", type=int, default=123)
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--json", action="store_true")
        if task == "classify":
            p.add_argument("--pooling", choices=["last", "last-nonpad", "mean"], default="last",
                           help="which hidden state feeds the head (default: the book's last position)")
            p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: longest training text)")
            p.add_argument("--prompt-shots", default="0,4",
                           help="also report k-shot prompting accuracy of the base model for these k ('' to skip)")
            p.add_argument("--text-field", default="text")
            p.add_argument("--label-field", default="label")
            p.add_argument("--balance", action="store_true", help="undersample every class to the rarest (own data)")
            p.add_argument("--no-balance", action="store_true", help="SMS spam without the book's undersampling")
            p.set_defaults(func=_cmd_finetune_classify)
        else:
            p.add_argument("--mask-prompt", action="store_true", help="learn the responses only (prompt targets -100)")
            p.add_argument("--max-new-tokens", type=int, default=256, help="longest test response generated")
            p.add_argument("--limit", type=int, default=None, help="use only this many training examples (quick runs)")
            p.set_defaults(func=_cmd_finetune_instruct)
    _add_dpo_commands(ft_sub)


def add_commands(sub) -> None:
    """finetune classify|instruct, classify, judge."""
    _add_finetune_commands(sub)
    p = sub.add_parser("classify", help="classify texts with a finetuned classifier")
    p.add_argument("texts", nargs="*", help="texts to classify (default: one per line on stdin)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("judge", help="score instruction responses with an LLM judge (Ollama-compatible API)")
    p.add_argument("responses", help="a test-responses.json written by `finetune instruct`")
    p.add_argument("--url", default="http://localhost:11434", help="Ollama server")
    p.add_argument("--model", default="llama3")
    p.add_argument("--key", default="model_response", help="entry field holding the response")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_judge)
