"""`jaxgpt data prepare`: turn text files into what training reads, streaming.

Steps, per document (a text file, or one JSONL record's text field):
1. clean: Unicode NFC normalisation, CRLF -> LF, control characters removed (newline and tab kept);
2. drop empty documents, exact duplicates (hash of the cleaned text) and near duplicates
   (`datasketch` MinHash over word 5-gram shingles with LSH banding; a candidate is dropped when its estimated
   Jaccard similarity to an earlier kept document reaches the threshold);
3. assign the document to train or val (a seeded draw per document), tokenize, append an
   end-of-text token, and append the ids to `train.bin` / `val.bin` (uint16 when the vocabulary fits).
The output directory gets `meta.json` (format, tokenizer) and `stats.json` (counts), and
`jaxgpt train --data DIR` reads it. Memory holds only the MinHash index (a few ints per document).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from jaxgpt.atomic import atomic_directory
from jaxgpt.data.corpus import DataError, TokenFileWriter, open_token_file, write_token_file
from jaxgpt.data.tokenizer import CharTokenizer, Tokenizer, get_tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).strip()


def iter_documents(inputs: Sequence[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(source, raw text) for each document under `inputs` (files or directories, in sorted order)."""
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if not path.is_dir() and not path.is_file():
            raise DataError(f"input {path} is not a regular file or a folder (a device, pipe or socket would be read "
                            "without end): give text, JSONL files or folders of them")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                with open(f, encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{f}:{n}: not valid JSON ({e.msg})") from None
                        if not isinstance(record, dict) or text_field not in record:
                            raise DataError(f"{f}:{n}: record has no {text_field!r} field")
                        yield f"{f}:{n}", str(record[text_field])
            elif f.suffix in TEXT_SUFFIXES or path == f:
                try:
                    yield str(f), f.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{f} is not UTF-8 text: {e}") from None


class NearDuplicateIndex:
    """MinHash + LSH over word 5-gram shingles (`datasketch`): `seen(text)` says whether a text
    whose estimated Jaccard similarity to it is at least `threshold` was added before.

    The LSH index (`MinHashLSH`, bands chosen by datasketch for the threshold) proposes candidates;
    a candidate counts only if its MinHash estimate reaches the threshold, as before the library
    replaced the hand-written index (docs/training.md has the before/after figures)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, bands: int = 16, seed: int = 0) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        if num_perm % bands:
            raise ValueError("num_perm must be divisible by bands")
        self.threshold, self.num_perm = threshold, num_perm
        # 16 bands of 4 rows, as the hand-written index had: a pair at Jaccard 0.8 becomes a candidate
        # with probability 1 − (1 − 0.8⁴)¹⁶ ≈ 0.9990 (datasketch's own choice for 0.8 missed a fifth of
        # planted near duplicates at Jaccard ≥ 0.84)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, num_perm // bands))
        first = MinHash(num_perm=num_perm, seed=seed)
        self._permutations, self._scheme = first.permutations, first.scheme  # drawn once, not per text
        self.signatures: list[np.ndarray] = []  # each added text's MinHash values (num_perm uint64)

    def signature(self, text: str):
        from datasketch import MinHash

        words = text.split()
        n = 5 if len(words) >= 5 else max(len(words), 1)
        shingles = {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}
        minhash = MinHash(num_perm=self.num_perm, permutations=self._permutations, scheme=self._scheme)
        minhash.update_batch([s.encode() for s in shingles])
        return minhash

    def seen(self, text: str) -> bool:
        """True if `text` is a near duplicate of an added text; otherwise add it and return False."""
        minhash = self.signature(text)
        for key in self.lsh.query(minhash):
            if np.mean(self.signatures[key] == minhash.hashvalues) >= self.threshold:
                return True
        self.lsh.insert(len(self.signatures), minhash)
        self.signatures.append(minhash.hashvalues)
        return False


def prepare(
    inputs: Sequence[str],
    out_dir: Path,
    *,
    tokenizer_name: str = "gpt2",
    val_fraction: float = 0.05,
    near_dup_threshold: Optional[float] = 0.8,
    text_field: str = "text",
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Clean, deduplicate, split and tokenize `inputs` into `out_dir`; returns the statistics.

    The corpus is built in a temporary folder and renamed into place when complete: a non-empty
    `out_dir` is refused unless `force`, and an interrupted run leaves the old corpus as it was.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    with atomic_directory(Path(out_dir), force=force) as tmp:
        return _prepare_into(tmp, inputs, tokenizer_name, val_fraction, near_dup_threshold, text_field, seed, progress)


def _prepare_into(out_dir: Path, inputs, tokenizer_name, val_fraction, near_dup_threshold, text_field, seed,
                  progress) -> dict:
    from tqdm import tqdm

    tokenizer: Tokenizer
    if tokenizer_name == "char":  # the vocabulary needs a first pass over the cleaned text
        chars: set[str] = set()
        for _, raw in iter_documents(inputs, text_field):
            chars.update(clean_text(raw))
        tokenizer = CharTokenizer(sorted(chars)) if chars else CharTokenizer.from_text("")
    else:
        tokenizer = get_tokenizer(tokenizer_name)

    stats = {"documents_in": 0, "empty": 0, "exact_duplicates": 0, "near_duplicates": 0, "documents_kept": 0,
             "train_documents": 0, "val_documents": 0, "characters": 0}
    exact: set[bytes] = set()
    near = NearDuplicateIndex(near_dup_threshold, seed=seed) if near_dup_threshold else None
    rng = np.random.default_rng(seed)
    writers = {"train": TokenFileWriter(out_dir / "train.bin", tokenizer.vocab_size),
               "val": TokenFileWriter(out_dir / "val.bin", tokenizer.vocab_size)}
    try:
        for _, raw in tqdm(iter_documents(inputs, text_field), unit="doc", disable=not progress, desc="prepare"):
            stats["documents_in"] += 1
            text = clean_text(raw)
            if not text:
                stats["empty"] += 1
                continue
            digest = hashlib.sha1(text.encode()).digest()
            if digest in exact:
                stats["exact_duplicates"] += 1
                continue
            exact.add(digest)
            if near is not None and near.seen(text):
                stats["near_duplicates"] += 1
                continue
            split = "val" if rng.random() < val_fraction else "train"
            stats[f"{split}_documents"] += 1
            stats["documents_kept"] += 1
            stats["characters"] += len(text)
            writers[split].write(tokenizer.encode(text) + [tokenizer.eot_id])
    finally:
        for w in writers.values():
            w.close()
    if stats["documents_kept"] == 0:
        raise DataError(f"no documents left in {list(inputs)} after cleaning and deduplication")
    if writers["val"].count == 0 or writers["train"].count == 0:
        _split_tail(out_dir, tokenizer.vocab_size, val_fraction)
        stats["split"] = "by tokens (too few documents to split by document)"
    else:
        stats["split"] = "by document"
    stats["train_tokens"] = int(open_token_file(out_dir / "train.bin").size)
    stats["val_tokens"] = int(open_token_file(out_dir / "val.bin").size)
    stats["tokenizer"] = tokenizer.name
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    (out_dir / "meta.json").write_text(json.dumps({"format": "jaxgpt-prepared-v1", "tokenizer": tokenizer.to_dict()}))
    return stats


def _split_tail(out_dir: Path, vocab_size: int, val_fraction: float) -> None:
    """All tokens landed in one split: make the last `val_fraction` of them the validation split."""
    ids = np.concatenate([np.asarray(open_token_file(out_dir / f"{s}.bin")) for s in ("train", "val")])
    cut = int(len(ids) * (1 - val_fraction))
    write_token_file(ids[:cut], out_dir / "train.bin", vocab_size)
    write_token_file(ids[cut:], out_dir / "val.bin", vocab_size)
