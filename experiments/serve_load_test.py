"""Load test for `jaxgpt serve`: N concurrent clients for T seconds against a loopback server.

Each client sends completions back to back (greedy by default) until the time is up; the run is
bounded by --seconds and --max-requests. Reports requests/s, completion tokens/s and latency
percentiles (and time to first token for streaming), as JSON.

    # in one terminal (a random gpt2-small-shaped model, or --checkpoint / --hf):
    jaxgpt serve --preset small --port 8000
    # in another:
    python experiments/serve_load_test.py --url http://127.0.0.1:8000 --clients 8 --seconds 30
    # or let the script start its own server in-process:
    python experiments/serve_load_test.py --self-serve --preset small --clients 8 --seconds 30
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:8000")
parser.add_argument("--clients", type=int, default=8)
parser.add_argument("--seconds", type=float, default=30)
parser.add_argument("--max-requests", type=int, default=10_000)
parser.add_argument("--max-tokens", type=int, default=32)
parser.add_argument("--temperature", type=float, default=0.0)
parser.add_argument("--stream", action="store_true")
parser.add_argument("--self-serve", action="store_true", help="start a server in this process first")
parser.add_argument("--preset", default="small")
parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve_load_test.json"))
args = parser.parse_args()

url = urllib.parse.urlparse(args.url)
host, port = url.hostname, url.port or 80
if host not in ("127.0.0.1", "localhost", "::1"):
    raise SystemExit("this load test only targets loopback addresses")

if args.self_serve:
    import socket

    import uvicorn

    from jaxgpt.config import get_preset
    from jaxgpt.nn.model import init_params
    from jaxgpt.inference.serve import build_app
    from jaxgpt.data.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    cfg = get_preset(args.preset, vocab_size=tok.vocab_size)
    app = build_app(init_params(cfg), cfg, tok, model_name=f"random-{args.preset}", max_batch=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)

latencies, first_token, tokens, errors = [], [], [], []
lock = threading.Lock()
deadline = time.monotonic() + args.seconds
sent = [0]


def client(k: int) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    i = 0
    while time.monotonic() < deadline:
        with lock:
            if sent[0] >= args.max_requests:
                return
            sent[0] += 1
        body = {"prompt": f"Client {k} request {i}: once upon a time", "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": args.stream}
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if args.stream:
                ttft, n = None, 0
                for line in resp:
                    line = line.decode().strip()
                    if line.startswith("data: {"):
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        n += 1 if json.loads(line[6:])["choices"][0]["text"] else 0
                used = n
            else:
                payload = json.loads(resp.read())
                if resp.status != 200:
                    raise RuntimeError(payload)
                used, ttft = payload["usage"]["completion_tokens"], None
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(used)
                if ttft is not None:
                    first_token.append(ttft)
        except Exception as e:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=120)


t_start = time.monotonic()
threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - t_start


def pct(values, q):
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else None)


result = {
    "clients": args.clients, "seconds": elapsed, "requests": len(latencies), "errors": len(errors),
    "requests_per_s": len(latencies) / elapsed, "completion_tokens_per_s": sum(tokens) / elapsed,
    "latency_s": {"p50": pct(latencies, 50), "p90": pct(latencies, 90), "p99": pct(latencies, 99)},
    "time_to_first_token_s": {"p50": pct(first_token, 50), "p90": pct(first_token, 90)} if first_token else None,
    "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": args.stream,
    "server": "self-serve random " + args.preset if args.self_serve else args.url,
    "first_errors": errors[:3],
}
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
