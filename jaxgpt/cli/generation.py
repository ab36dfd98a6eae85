"""`jaxgpt params`, `generate`, `serve` and `attention-map`: commands that run a model."""

from __future__ import annotations

import json
import sys
import time

from jaxgpt.cli.common import add_model_source_args, add_sampling_args, load_model


def _cmd_params(args) -> int:
    from jaxgpt.config import get_preset
    from jaxgpt.nn.model import param_counts

    cfg = get_preset(args.preset)
    counts = param_counts(cfg)
    if args.json:
        print(json.dumps(counts))
    else:
        active = f"; {counts['active']:,} active per token" if cfg.moe_experts else ""
        print(f"{args.preset}: {counts['total']:,} parameters ({counts['total_tied']:,} with tied embeddings{active})")
    return 0


class _TokenPrinter:
    """Prints a single prompt's continuation as it is made, keeping only the ids of a multi-byte
    character not yet complete (memory does not grow with the length of the output)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.pending, self.stopped = tokenizer, [], False

    def feed(self, tokens) -> None:
        for token in tokens:
            if self.stopped or int(token) == self.tokenizer.eot_id:
                self.stopped = True
                return
            self.pending.append(int(token))
            text = self.tokenizer.decode(self.pending)
            if not text.endswith("\ufffd"):  # else wait for the rest of a multi-byte character
                sys.stdout.write(text)
                sys.stdout.flush()
                self.pending = []

    def __call__(self, tokens_b, step) -> None:  # `on_token` of the cached decoder
        self.feed([tokens_b[0]])


def _cmd_generate(args) -> int:
    from jaxgpt.inference.generate import Decoder, trim_at_eos

    if sum(x is not None for x in (args.prompt, args.batch_file, args.prompt_ids)) != 1:
        raise ValueError("give exactly one of --prompt, --batch-file or --prompt-ids")
    params, config, tokenizer = load_model(args)
    if args.prompt_ids is not None:
        encoded = [_parse_ids(args.prompt_ids, config.vocab_size)]
        return _generate_ids(Decoder(params, config), encoded[0], tokenizer, args)
    prompts = [args.prompt] if args.prompt is not None else [
        line.rstrip("\n") for line in open(args.batch_file, encoding="utf-8") if line.strip()]
    if args.chat:  # each prompt as one user message, by the model folder's chat template
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("--chat needs a model folder tokenizer with a chat template (tokenizer_config.json)")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    decoder = Decoder(params, config)
    encoded = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    eos_id=tokenizer.eot_id)
    fits = max(len(e) for e in encoded) + args.max_new_tokens <= config.context_length and not args.no_cache
    t0 = time.perf_counter()
    if len(prompts) == 1 and not args.json:  # text as it is made
        sys.stdout.write(prompts[0])
        printer = _TokenPrinter(tokenizer)
        if fits:
            decoder.generate_batch(encoded, args.max_new_tokens, on_token=printer, **sampling)
        else:  # the sliding window, chunk by chunk
            for chunk_bn in decoder.window_chunks([encoded[0]], args.max_new_tokens, **sampling):
                printer.feed(chunk_bn[0])
                if printer.stopped:
                    break
        sys.stdout.write(tokenizer.decode(printer.pending) + "\n")
        return 0
    if fits:
        new = decoder.generate_batch(encoded, args.max_new_tokens, **sampling)
    else:  # one at a time through the sliding-window decoder (prompt + new tokens exceed the context)
        new = [trim_at_eos(decoder.generate([e], args.max_new_tokens, use_cache=False, **sampling)[0],
                           tokenizer.eot_id, start=len(e)) for e in encoded]
    seconds = time.perf_counter() - t0
    for prompt, tokens in zip(prompts, new):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": tokenizer.decode(tokens), "tokens": tokens,
                              "seconds": round(seconds, 3)}))
        else:
            print(prompt + tokenizer.decode(tokens))
    return 0


def _parse_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids or min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"--prompt-ids must be non-empty ids in [0, {vocab_size})")
    return ids


def _generate_ids(decoder, prompt_ids: list[int], tokenizer, args) -> int:
    """Generate from token ids (a model folder without a tokenizer): the new ids, and text when the
    tokenizer can say it."""
    from jaxgpt.data.tokenizer import TokenizerError
    from jaxgpt.inference.generate import trim_at_eos

    try:
        eos = tokenizer.eot_id
    except TokenizerError:
        eos = None
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos)
    out = decoder.generate([prompt_ids], args.max_new_tokens, use_cache=not args.no_cache, **sampling)
    new = trim_at_eos(out[0], eos, start=len(prompt_ids))
    text = tokenizer.decode(new)
    print(json.dumps({"prompt_ids": prompt_ids, "tokens": new, "text": text}) if args.json else text)
    return 0


def _cmd_serve(args) -> int:
    from jaxgpt.inference.serve import check_serving_options, serve

    timeout_s = args.request_timeout_s or None  # 0: no timeout
    check_serving_options(args.port, args.max_batch, args.batch_wait_ms / 1000, args.max_tokens_limit,  # before loading
                          max_queue=args.max_queue, request_timeout_s=timeout_s, prefill_chunk=args.prefill_chunk,
                          batching=args.batching, drain_s=args.drain_s)
    args.seed = 0
    params, config, tokenizer = load_model(args)
    name = args.model_name or (args.hf or args.checkpoint or f"random-{args.preset}").rstrip("/").split("/")[-1]
    print(f"[jaxgpt] serving {name!r} on http://{args.host}:{args.port} (compiling the decoder first)", file=sys.stderr)
    serve(params, config, tokenizer, host=args.host, port=args.port, model_name=name, max_batch=args.max_batch,
          batch_wait_s=args.batch_wait_ms / 1000, max_tokens_limit=args.max_tokens_limit, batching=args.batching,
          max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, request_timeout_s=timeout_s,
          drain_s=args.drain_s, allowed_hosts=[h for h in args.allowed_hosts.split(",") if h])
    return 0


def _cmd_attention_map(args) -> int:
    from jaxgpt.inference.attention_map import attention_maps, plot_attention_maps

    params, config, tokenizer = load_model(args)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    if layers and not all(0 <= x < config.n_layers for x in layers):
        raise ValueError(f"--layers must lie in [0, {config.n_layers})")
    ids = (tokenizer.encode(args.prompt) or [tokenizer.eot_id])[-config.context_length:]
    maps = attention_maps(params, config, ids)
    out = plot_attention_maps(maps, [tokenizer.decode([i]) for i in ids], args.out, layers=layers,
                              title=f"attention weights: {args.prompt[:60]!r}")
    if args.json:
        print(json.dumps({"out": str(out), "tokens": ids, "layers": config.n_layers, "heads": config.n_heads,
                          "weights": maps.round(5).tolist()}))
    else:
        print(out)
    return 0


def add_commands(sub) -> None:
    """params, generate, serve, attention-map."""
    p = sub.add_parser("params", help="parameter counts of a preset")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("generate", help="generate text from a checkpoint, GPT-2 weights, or a random model")
    p.add_argument("--prompt", default=None)
    p.add_argument("--batch-file", default=None, help="a file with one prompt per line, decoded as one batch")
    p.add_argument("--prompt-ids", default=None, help="a prompt as comma-separated token ids (for a model without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the model's chat template")
    add_model_source_args(p, "generate with")
    p.add_argument("--no-cache", action="store_true", help="recompute the window each step (no KV cache)")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-style HTTP API and a web playground for a model")
    add_model_source_args(p, "serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host names to answer besides --host (and, on loopback, localhost); "
                        "others get 421 (DNS rebinding). With --host 0.0.0.0 and none given, any host is answered")
    p.add_argument("--model-name", default=None)
    p.add_argument("--batching", choices=("continuous", "dynamic"), default="continuous",
                   help="continuous: rows join and leave between decoding steps; dynamic: the older whole-batch "
                        "scheduler (kept for comparison)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (continuous: slots)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="continuous: prompt tokens prefilled per turn at most (a power of two)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="dynamic: how long the first request waits for company")
    p.add_argument("--max-tokens-limit", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests at most; more get 429 + Retry-After")
    p.add_argument("--request-timeout-s", type=float, default=300.0,
                   help="a request still unanswered after this long gets 504 (0: never)")
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="on shutdown, how long running requests may take to finish")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("attention-map", help="heat maps of a model's attention weights for a prompt")
    add_model_source_args(p, "draw")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--layers", default=None, help="comma-separated layers to draw (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the weights as JSON")
    p.set_defaults(func=_cmd_attention_map)
