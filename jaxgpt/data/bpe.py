"""Byte-level BPE, trained from scratch (`jaxgpt tokenizer train`), encoded by tiktoken.

Training (`train_bpe`), as GPT-2's tokenizer was made:
1. pre-tokenise with GPT-2's regex (words with their leading space, numbers, punctuation runs,
   whitespace), so merges never cross those boundaries, and count each distinct piece once
   (`Counter`): a corpus of millions of words has only tens of thousands of distinct pieces;
2. start from the 256 bytes (token i = byte i) and repeatedly merge the most frequent adjacent pair
   of tokens, the pair counts weighted by piece frequency. After a merge only the pieces that held
   the pair change, so the counts are updated incrementally from an index pair -> pieces, and the
   next best pair comes from a max-heap with lazy deletion: no rescan of the corpus per merge.
   Ties go to the smaller pair of ids (the heap orders (−count, pair)).

The result is tiktoken's `mergeable_ranks` (token bytes -> rank = id):
`jaxgpt.data.tokenizer.BPETokenizer` hands it to `tiktoken.Encoding`, so encoding runs at tiktoken's
speed; `encode_piece` is the same algorithm in plain Python (apply the lowest-ranked merge until none
applies), the reference it is tested against. A trained tokenizer is saved as `DIR/tokenizer.tiktoken`
(tiktoken's "base64 rank" lines, `ranks_text`) and `DIR/tokenizer_config.json`.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional


# GPT-2's pre-tokenisation pattern (tiktoken's r50k_base)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def count_pieces(texts: Iterable[str], pattern: str = GPT2_PATTERN) -> Counter:
    """How often each pre-tokenised piece (as bytes) occurs in `texts`."""
    import regex

    compiled = regex.compile(pattern)
    counts: Counter = Counter()
    for text in texts:
        counts.update(m.encode("utf-8") for m in compiled.findall(text))
    return counts


def train_bpe(piece_counts: Counter, vocab_size: int, n_special: int = 1,
              progress: Optional[Callable[[int], None]] = None) -> dict[bytes, int]:
    """Mergeable ranks of `vocab_size` − `n_special` tokens: the 256 bytes, then the merges in order.

    `progress(n)` is called after each merge (a progress bar's update)."""
    n_merges = vocab_size - n_special - 256
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens + {n_special} special token(s)")
    vocab = [bytes([i]) for i in range(256)]
    words = [list(piece) for piece in piece_counts]  # each distinct piece as a list of token ids
    freqs = list(piece_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> the pieces that contain it
    for w, (ids, f) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += f
            where[pair].add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    for _ in range(n_merges):
        best = _pop_best(heap, pair_counts)
        if best is None:
            break  # every piece is a single token: the corpus has no more pairs to merge
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for w in list(where.pop(best, ())):
            _merge_in_word(words, freqs[w], w, best, new_id, pair_counts, where, heap)
        pair_counts.pop(best, None)
        if progress is not None:
            progress(1)
    return {token: rank for rank, token in enumerate(vocab)}


def _pop_best(heap: list, pair_counts: dict) -> Optional[tuple[int, int]]:
    while heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count > 0 and -neg == count:  # an up-to-date entry (stale ones are skipped)
            return pair
        if count > 0:  # the count changed since this entry was pushed: requeue at its true count
            heapq.heappush(heap, (-count, pair))
    return None


def _merge_in_word(words, freq, w, pair, new_id, pair_counts, where, heap) -> None:
    """Replace `pair` by `new_id` in piece w, moving its pair counts (weighted by its frequency)."""
    ids = words[w]
    for old in zip(ids, ids[1:]):
        pair_counts[old] -= freq
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    words[w] = merged
    changed = set()
    for new in zip(merged, merged[1:]):
        pair_counts[new] += freq
        where[new].add(w)
        changed.add(new)
    for new in changed:
        heapq.heappush(heap, (-pair_counts[new], new))


def encode_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """One pre-tokenised piece by the ranks: merge the lowest-ranked adjacent pair until none is in
    the vocabulary (what tiktoken does, in plain Python: the reference for tests)."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        ranked = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        ranked = [(r, i) for r, i in ranked if r is not None]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def ranks_text(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(text: str, where: str) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{where}: line {n} is not 'base64-token rank': {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{where}: the ranks are not 0..{len(ranks) - 1} each once (a damaged file?)")
    return ranks


def save_tokenizer_files(directory, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str) -> Path:
    """DIR/tokenizer.tiktoken and DIR/tokenizer_config.json, each written atomically."""
    from jaxgpt.atomic import write_json, write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "tokenizer.tiktoken", ranks_text(ranks))
    write_json(directory / "tokenizer_config.json", {"kind": "bpe", "special_tokens": special_tokens, "pattern": pattern,
                                                     "vocab_size": len(ranks) + len(special_tokens)})
    return directory


def read_tokenizer_files(directory) -> tuple[dict[bytes, int], Optional[dict[str, int]], str]:
    """(ranks, special tokens, pattern) of a saved tokenizer; ValueError saying what is wrong."""
    directory = Path(directory)
    ranks_path, config_path = directory / "tokenizer.tiktoken", directory / "tokenizer_config.json"
    for path in (ranks_path, config_path):
        if not path.is_file():
            raise ValueError(f"{directory} is not a trained tokenizer: {path.name} is missing "
                             "(make one with `jaxgpt tokenizer train`)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    return parse_ranks(ranks_path.read_text(), str(ranks_path)), config.get("special_tokens"), config.get("pattern", GPT2_PATTERN)


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (its files' alphabet) -> the byte: the
    printable ASCII and Latin-1 bytes stand for themselves, the other 68 are shifted to 256 + n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def ranks_from_gpt2_encoder(encoder: dict[str, int]) -> dict[bytes, int]:
    """Mergeable ranks from GPT-2's encoder.json (token string in GPT-2's alphabet -> id), without
    its special token: the id of a token is its rank, as in the merges of vocab.bpe."""
    decode = gpt2_byte_decoder()
    return {bytes(decode[ch] for ch in token): rank for token, rank in encoder.items() if token != "<|endoftext|>"}


def train_tokenizer_files(paths, vocab_size: int, out_dir, special_tokens=("<|endoftext|>",), progress: bool = True,
                          force: bool = False, replace_undecodable: bool = False) -> dict:
    """`jaxgpt tokenizer train`: count the files' pieces, learn the merges (a progress bar over
    them), save DIR/tokenizer.tiktoken and DIR/tokenizer_config.json; returns a summary.

    Refused before any work: a repeated or empty special token (two names for one id, or an id
    decoding cannot map), a non-empty `out_dir` without `force`, a file that is not valid UTF-8
    (named with the byte where it stops) unless `replace_undecodable`, which trains on U+FFFD in
    place of those bytes and reports how many there were. The folder is written atomically."""
    import sys
    import time

    from tqdm import tqdm

    from jaxgpt.atomic import atomic_directory, check_target

    t0 = time.perf_counter()
    repeated = sorted({t for t in special_tokens if list(special_tokens).count(t) > 1})
    if repeated or any(not t for t in special_tokens):
        raise ValueError(f"special tokens must be distinct and non-empty, got {list(special_tokens)}")
    check_target(Path(out_dir), force, "tokenizer folder")
    texts, replaced = [], 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file to train a tokenizer on" if not path.exists() else
                                    f"{path} is not a regular file (a device, pipe or socket would be read without "
                                    "end): give text files")
        data = path.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            if not replace_undecodable:
                raise ValueError(f"{path}: not valid UTF-8 at byte {e.start} ({e.reason}); fix the file, or pass "
                                 "--replace-undecodable to train on U+FFFD in place of such bytes") from None
            text = data.decode("utf-8", errors="replace")
            replaced += text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
            texts.append(text)
    if replaced:
        print(f"[jaxgpt] {replaced:,} undecodable byte sequence(s) trained as U+FFFD", file=sys.stderr)
    counts = count_pieces(texts)
    n_special = len(special_tokens)
    with tqdm(total=max(vocab_size - n_special - 256, 0), desc="merges", disable=not progress, file=sys.stderr) as bar:
        ranks = train_bpe(counts, vocab_size, n_special, progress=bar.update)
    special = {tok: len(ranks) + i for i, tok in enumerate(special_tokens)}
    with atomic_directory(Path(out_dir), force=force, what="tokenizer folder") as tmp:
        save_tokenizer_files(tmp, ranks, special, GPT2_PATTERN)
    return {"out": str(out_dir), "vocab_size": len(ranks) + n_special, "merges": len(ranks) - 256,
            "distinct_pieces": len(counts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "undecodable_replaced": replaced, "seconds": time.perf_counter() - t0}
