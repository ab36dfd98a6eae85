"""Decode speed: jaxgpt with and without the KV cache, and transformers' GPT2LMHeadModel.generate,
side by side on the same machine. gpt2-small shape, random weights, a 16-token prompt, 128 new
tokens, greedy, batch 1 and 8. Each figure is the median of --repeats timed runs after one warm-up
(which includes jaxgpt's compilation; compile time is reported separately).

    python experiments/decode_benchmark.py [--repeats 3] [--new-tokens 128] [--skip-uncached-batch8]
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from jaxgpt.config import get_preset
from jaxgpt.inference.generate import generate
from jaxgpt.weights.hf import save_hf
from jaxgpt.nn.model import init_params

ROOT = Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser()
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--prompt-tokens", type=int, default=16)
parser.add_argument("--batches", default="1,8")
parser.add_argument("--skip-uncached-batch8", action="store_true")
parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "decode_benchmark.json"))
args = parser.parse_args()

cfg = get_preset("gpt2-small", tie_embeddings=True, qkv_bias=True, drop_rate=0.0)
params = init_params(cfg, seed=0)
n = args.new_tokens


def timed(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


results = []
hf_model = None
try:
    import tempfile

    import torch
    import transformers

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as d:
        save_hf(params, cfg, Path(d))
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
except ImportError as e:
    print(f"transformers/torch not installed ({e}); measuring jaxgpt only")

for b in [int(x) for x in args.batches.split(",")]:
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, args.prompt_tokens))
    row = {"batch": b, "new_tokens": n, "prompt_tokens": args.prompt_tokens}
    for name, use_cache in (("jaxgpt_cached", True), ("jaxgpt_uncached", False)):
        if name == "jaxgpt_uncached" and b > 1 and args.skip_uncached_batch8:
            continue
        first, med = timed(lambda: generate(params, cfg, prompt, n, use_cache=use_cache), args.repeats)
        row[name] = {"seconds": med, "tokens_per_s": b * n / med, "first_call_s": first}
        print(name, b, row[name], flush=True)
    if hf_model is not None:
        inp = torch.tensor(prompt)

        def hf_run(cache):
            with torch.no_grad():
                out = hf_model.generate(inp, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        use_cache=cache, pad_token_id=0)
            assert out.shape[1] == args.prompt_tokens + n

        for name, cache in (("transformers_cached", True),):
            first, med = timed(lambda: hf_run(cache), args.repeats)
            row[name] = {"seconds": med, "tokens_per_s": b * n / med, "first_call_s": first}
            print(name, b, row[name], flush=True)
        row["cached_vs_transformers"] = row["jaxgpt_cached"]["tokens_per_s"] / row["transformers_cached"]["tokens_per_s"]
    if "jaxgpt_uncached" in row:
        row["cache_speedup"] = row["jaxgpt_cached"]["tokens_per_s"] / row["jaxgpt_uncached"]["tokens_per_s"]
    results.append(row)

report = {"results": results, "jax": jax.__version__, "backend": jax.default_backend(),
          "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
          "torch": getattr(__import__("sys").modules.get("torch"), "__version__", None),
          "transformers": getattr(__import__("sys").modules.get("transformers"), "__version__", None)}
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(report, indent=2))
print(json.dumps(results, indent=1))
