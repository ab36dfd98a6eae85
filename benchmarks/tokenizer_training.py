"""`python -m benchmarks.tokenizer_training` (from a checkout): jaxgpt's BPE trainer against the
`tokenizers` library's, on the same corpus and vocabulary sizes.

Both learn a byte-level BPE with GPT-2's pre-tokenisation from the first 90 % of tinyshakespeare
(`JAXGPT_DATA_DIR`); reported: training time (best of `--rounds`), and compression on the held-out
10 % (tokens per byte: lower is better) — each tokenizer's own encoder. Writes
docs/results/bench_tokenizer.json and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_jaxgpt(text: str, vocab_size: int):
    from jaxgpt.data.bpe import count_pieces, train_bpe
    from jaxgpt.data.tokenizer import BPETokenizer

    return BPETokenizer(train_bpe(count_pieces([text]), vocab_size, 1))


def train_hf(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def measure(text: str, held_out: str, vocab_size: int, rounds: int) -> dict:
    row = {"vocab_size": vocab_size, "held_out_bytes": len(held_out.encode())}
    for name, train, encode in (("jaxgpt", train_jaxgpt, lambda t, s: t.encode(s)),
                                ("tokenizers", train_hf, lambda t, s: t.encode(s).ids)):
        best, tok = float("inf"), None
        for _ in range(rounds):
            t0 = time.perf_counter()
            tok = train(text, vocab_size)
            best = min(best, time.perf_counter() - t0)
        n = len(encode(tok, held_out))
        row[name] = {"train_s": best, "tokens": n, "tokens_per_byte": n / row["held_out_bytes"]}
    row["time_ratio"] = row["jaxgpt"]["train_s"] / row["tokenizers"]["train_s"]
    row["compression_diff"] = row["jaxgpt"]["tokens_per_byte"] / row["tokenizers"]["tokens_per_byte"] - 1
    return row


def markdown(report: dict) -> str:
    lines = [f"Byte-level BPE trained on {report['train_bytes']:,} bytes of tinyshakespeare, compression on the "
             f"held-out {report['rows'][0]['held_out_bytes']:,} bytes (2-core CPU).", "",
             "| vocab | jaxgpt train s | tokenizers train s | time ratio | jaxgpt tokens/byte | tokenizers tokens/byte | difference |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['vocab_size']:,} | {r['jaxgpt']['train_s']:.2f} | {r['tokenizers']['train_s']:.2f} | "
                     f"{r['time_ratio']:.1f}× | {r['jaxgpt']['tokens_per_byte']:.4f} | "
                     f"{r['tokenizers']['tokens_per_byte']:.4f} | {100 * r['compression_diff']:+.2f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-sizes", default="512,1024,4096")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = parser.parse_args()
    from jaxgpt.data.corpus import corpus_path

    text = corpus_path("tinyshakespeare").read_text()
    split = int(0.9 * len(text))
    rows = [measure(text[:split], text[split:], int(v), args.rounds) for v in args.vocab_sizes.split(",")]
    from benchmarks.bench import publish

    report = {"train_bytes": len(text[:split].encode()), "rows": rows}
    publish(report, markdown(report), Path(args.out), "bench_tokenizer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
