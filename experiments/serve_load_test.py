"""Load test of `jaxgpt serve`: open-loop Poisson arrivals, continuous batching against the dynamic
batcher, same model, same machine, one invocation.

For each arrival rate, one seeded schedule of requests (Poisson arrival times; a mix of prompt
lengths, completion lengths and sampling settings: greedy, temperature + top-p, temperature +
top-k, seeded) is played against each scheduler in turn; a request is sent at its arrival time
whatever the server is doing (open loop), streamed, and timed: latency, time to first token,
completion tokens. Then the staggered case: a 5-token request sent while a 200-token one decodes.
Writes JSON (every request's timings and the summaries), a table and a plot.

    python experiments/serve_load_test.py --rates 1,2,4 --seconds 15   # the committed run
    python experiments/serve_load_test.py --rates 1,4 --seconds 10 --out /tmp/load   # a quick look
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLING_MIX = [  # (share, settings)
    (0.4, {"temperature": 0.0}),
    (0.3, {"temperature": 0.8, "top_p": 0.95}),
    (0.2, {"temperature": 1.0, "top_k": 40}),
    (0.1, {"temperature": 0.7, "seed": 7}),
]
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def make_schedule(rate: float, seconds: float, seed: int) -> list[dict]:
    """Poisson arrivals at `rate` per second for `seconds`, each with its prompt, length and sampling."""
    rng = np.random.default_rng(seed)
    t, schedule = 0.0, []
    while True:
        t += rng.exponential(1.0 / rate)
        if t > seconds:
            return schedule
        prompt_words = int(rng.choice([4, 16, 48, 96], p=[0.3, 0.3, 0.25, 0.15]))
        max_tokens = int(rng.choice([8, 32, 64, 128], p=[0.3, 0.35, 0.25, 0.1]))
        share = rng.random()
        for p, settings in SAMPLING_MIX:
            share -= p
            if share <= 0:
                break
        prompt = " ".join(rng.choice(WORDS, prompt_words))
        schedule.append({"at": t, "body": {"prompt": prompt, "max_tokens": max_tokens, **settings}})


def stream_request(port: int, body: dict, path: str = "/v1/completions") -> dict:
    """Send one streamed request; its status, latency, time to first token and completion tokens."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"status": resp.status, "latency_s": time.perf_counter() - t0, "error": resp.read().decode()[:200]}
        ttft, usage = None, None
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"status": event["error"].get("code", 500), "latency_s": time.perf_counter() - t0,
                        "error": event["error"]["message"]}
            if ttft is None and event["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            usage = event.get("usage", usage)
        return {"status": 200, "latency_s": time.perf_counter() - t0, "ttft_s": ttft,
                "tokens": usage["completion_tokens"] if usage else 0}
    finally:
        conn.close()


def play(port: int, schedule: list[dict]) -> tuple[list[dict], float]:
    """Send every request at its arrival time (open loop); (results in schedule order, makespan)."""
    results: list = [None] * len(schedule)

    def send(i):
        results[i] = {"at": schedule[i]["at"], **stream_request(port, schedule[i]["body"])}
        results[i]["done_at"] = time.perf_counter() - start

    threads = []
    start = time.perf_counter()
    for i, item in enumerate(schedule):
        time.sleep(max(0.0, item["at"] - (time.perf_counter() - start)))
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summarise(results: list[dict], makespan: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else None  # noqa: E731
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "throughput_tokens_per_s": sum(r["tokens"] for r in ok) / makespan,
            "requests_per_s": len(ok) / makespan, "makespan_s": makespan,
            "latency_p50_s": q(lat, 50), "latency_p99_s": q(lat, 99), "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99)}


def staggered(port: int) -> dict:
    """A 5-token request sent 0.3 s into a 200-token one: both latencies."""
    out = {}
    long = threading.Thread(target=lambda: out.update(long=stream_request(port, {
        "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0})))
    long.start()
    time.sleep(0.3)
    out["short"] = stream_request(port, {"prompt": "Hi", "max_tokens": 5, "temperature": 0})
    long.join()
    return {"long_s": out["long"]["latency_s"], "short_s": out["short"]["latency_s"],
            "short_over_long": out["short"]["latency_s"] / out["long"]["latency_s"]}


class Server:
    """`jaxgpt serve`'s app on a free loopback port, in this process."""

    def __init__(self, params, config, tokenizer, batching: str, slots: int) -> None:
        from jaxgpt.inference.serve import build_app, make_server

        self.app = build_app(params, config, tokenizer, model_name="load-test", batching=batching, max_batch=slots,
                             max_tokens_limit=200, max_queue=1024, request_timeout_s=None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = make_server(self.app, "127.0.0.1", self.port, drain_s=1.0, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        stream_request(self.port, {"prompt": "warm up", "max_tokens": 4, "temperature": 0})
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for batching, rows in report["runs"].items():
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["throughput_tokens_per_s"] for r in rows], "o-", label=batching)
        axes[1].plot(rates, [r["latency_p50_s"] for r in rows], "o-", label=f"{batching} p50")
        axes[1].plot(rates, [r["latency_p99_s"] for r in rows], "x--", label=f"{batching} p99")
        axes[2].plot(rates, [r["ttft_p50_s"] for r in rows], "o-", label=f"{batching} p50")
    for ax, title in zip(axes, ("completion tokens/s served", "latency (s)", "time to first token (s)")):
        ax.set_xlabel("arrival rate (requests/s, Poisson)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(report["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(report: dict) -> str:
    lines = ["| rate (req/s) | batching | requests | errors | tokens/s | latency p50 / p99 (s) | TTFT p50 / p99 (s) |",
             "|---|---|---|---|---|---|---|"]
    for batching, rows in report["runs"].items():
        for r in rows:
            lines.append(f"| {r['rate']:g} | {batching} | {r['requests']} | {r['errors']} | "
                         f"{r['throughput_tokens_per_s']:.0f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | "
                         f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rates", default="1,2,4,8", help="arrival rates, requests per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="arrivals per rate span this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-seconds", type=float, default=10.0,
                        help="an unmeasured schedule (another seed, rate 2) first: the dynamic batcher compiles its "
                             "shapes on first use, and would otherwise be timed compiling")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve_load_test"))
    args = parser.parse_args()

    from tqdm import tqdm

    from jaxgpt.config import get_preset
    from jaxgpt.data.tokenizer import GPT2Tokenizer
    from jaxgpt.nn.model import init_params

    tok = GPT2Tokenizer()
    cfg = get_preset(args.preset, vocab_size=tok.vocab_size, context_length=args.context)
    params = init_params(cfg, seed=0)
    rates = [float(r) for r in args.rates.split(",")]
    report = {"model": f"random {args.preset} preset, GPT-2 vocabulary, context {args.context}, {args.slots} slots/rows",
              "warmup_seconds": args.warmup_seconds,
              "rates": rates, "seconds": args.seconds, "sampling_mix": SAMPLING_MIX, "runs": {}, "requests": {},
              "staggered": {}}
    with tqdm(total=len(rates) * 2, desc="load test", unit="run") as bar:
        for batching in ("continuous", "dynamic"):
            with Server(params, cfg, tok, batching, args.slots) as server:
                if args.warmup_seconds > 0:
                    play(server.port, make_schedule(2.0, args.warmup_seconds, args.seed + 1000))
                report["staggered"][batching] = staggered(server.port)
                report["runs"][batching], report["requests"][batching] = [], {}
                for rate in rates:
                    results, makespan = play(server.port, make_schedule(rate, args.seconds, args.seed))
                    report["runs"][batching].append({"rate": rate, **summarise(results, makespan)})
                    report["requests"][batching][str(rate)] = results
                    bar.set_postfix(batching=batching, rate=rate, p50=f"{report['runs'][batching][-1]['latency_p50_s']:.2f}s")
                    bar.update()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(table(report))
    print(json.dumps({"staggered": report["staggered"]}, indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
