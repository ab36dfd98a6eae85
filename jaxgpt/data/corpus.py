"""Corpora, the book's sliding-window dataset, and a random-window sampler for pretraining.

- Named corpora (`the-verdict`, `tinyshakespeare`, …) are files in the data directory
  (`JAXGPT_DATA_DIR`, default a user cache dir), verified by sha256. `python-docs` is embedded: it is
  CPython's own reference text (`pydoc_data.topics`), so the default job needs no download at all.
- `SlidingWindowDataset` is the book's `GPTDatasetV1` (chapter 2) with batching.
- `RandomWindowSampler` draws windows from a token array (a NumPy memmap works) so that the batch
  at step s is a pure function of (seed, s): resuming at step s needs no iterator state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

DATA_DIR_ENV = "JAXGPT_DATA_DIR"
DEFAULT_CORPUS = "python-docs"


class DataError(ValueError):
    """A corpus is missing, corrupt, or too short for what was asked of it."""


@dataclass(frozen=True)
class CorpusInfo:
    filename: str
    sha256: str
    url: str
    description: str


CORPORA: dict[str, CorpusInfo] = {
    "the-verdict": CorpusInfo(
        "the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        "Edith Wharton, 'The Verdict' (1908): the corpus of the book's chapters 2 and 5",
    ),
    "tinyshakespeare": CorpusInfo(
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "tiny Shakespeare, 1,115,394 characters: nanoGPT's shakespeare_char",
    ),
    "sms-spam": CorpusInfo(
        "SMSSpamCollection",
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        "https://archive.ics.uci.edu/dataset/228/sms+spam+collection",
        "UCI SMS Spam Collection (label<TAB>text)",
    ),
    "instruction-data": CorpusInfo(
        "instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
        "1,100 Alpaca-style instruction examples (the book's chapter 7)",
    ),
}


def data_dir() -> Path:
    """The data directory: `$JAXGPT_DATA_DIR`, else the user cache dir (e.g. ~/.cache/jaxgpt/data)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("jaxgpt")) / "data"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def corpus_path(name: str, *, verify: bool = True) -> Path:
    """The verified local file of a named corpus, or a `DataError` that says where it looked."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; named corpora: {sorted(CORPORA) + [DEFAULT_CORPUS]}")
    info = CORPORA[name]
    path = data_dir() / info.filename
    if not path.is_file():
        raise DataError(
            f"corpus {name!r} not found: expected {path} (set {DATA_DIR_ENV} to the folder holding "
            f"{info.filename}; canonical source: {info.url})"
        )
    if verify:
        digest = sha256_file(path)
        if digest != info.sha256:
            raise DataError(f"{path}: sha256 {digest} does not match {name!r} ({info.sha256}); the file is corrupt or a different version")
    return path


def embedded_corpus_text() -> str:
    """CPython's own reference documentation (`pydoc_data.topics`): English prose and code.

    Runs of spaces (table padding, indentation) are squeezed to one and blank-line runs to one blank
    line, so a small character model spends its capacity on words rather than on whitespace.
    """
    import re

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text)


def load_text(name_or_path: str) -> str:
    """Text of a named corpus, the embedded default (`python-docs`), or a UTF-8 file path."""
    if name_or_path == DEFAULT_CORPUS:
        text = embedded_corpus_text()
    elif name_or_path in CORPORA:
        text = corpus_path(name_or_path).read_text(encoding="utf-8")
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise DataError(
                f"{name_or_path!r} is neither a named corpus ({sorted(CORPORA) + [DEFAULT_CORPUS]}) nor a file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text: {e}") from None
    if not text:
        raise DataError(f"corpus {name_or_path!r} is empty")
    return text


def split_train_val(data, train_ratio: float):
    """The book's split: the first `train_ratio` of the sequence (characters or tokens) trains."""
    if not 0.0 < train_ratio < 1.0:
        raise DataError(f"train_ratio must be in (0, 1), got {train_ratio}")
    cut = int(train_ratio * len(data))
    return data[:cut], data[cut:]


class SlidingWindowDataset:
    """The book's GPTDatasetV1: windows ids[i:i+L] and ids[i+1:i+L+1] for i in range(0, N-L, stride)."""

    def __init__(self, ids, max_length: int, stride: int) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        if max_length <= 0 or stride <= 0:
            raise DataError(f"max_length and stride must be positive, got {max_length} and {stride}")
        if len(ids) <= max_length:
            raise DataError(
                f"corpus of {len(ids)} tokens is too short for windows of {max_length} tokens "
                f"(needs at least {max_length + 1}): use a shorter context or more text"
            )
        starts = np.arange(0, len(ids) - max_length, stride)
        offsets = starts[:, None] + np.arange(max_length)[None, :]  # (N, L)
        self.inputs = ids[offsets]  # (N, L)
        self.targets = ids[offsets + 1]  # (N, L)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs[i], self.targets[i]

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self) // batch_size
        return n if drop_last or len(self) % batch_size == 0 else n + 1

    def batches(
        self, batch_size: int, *, shuffle: bool = False, drop_last: bool = True, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x_bt, y_bt) int32 batches in order, or shuffled by `seed` (one epoch)."""
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for b in range(self.num_batches(batch_size, drop_last)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield self.inputs[idx], self.targets[idx]


class RandomWindowSampler:
    """Random context windows from a 1-D token array; the batch of step s depends only on (seed, s).

    `tokens` may be a `np.memmap` (see `open_token_file`): only the rows drawn are read, so corpora
    larger than memory work. `rows` selects a slice of the global batch, so each process of a
    multi-host run reads only its share while all processes agree on the global batch.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int = 0) -> None:
        if tokens.ndim != 1:
            raise DataError(f"token array must be 1-D, got shape {tokens.shape}")
        if len(tokens) <= context_length:
            raise DataError(
                f"corpus of {len(tokens)} tokens is too short for a context of {context_length} "
                f"(needs at least {context_length + 1} tokens)"
            )
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets of the global batch at `step`, shape (batch_size,)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.context_length, size=self.batch_size)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(x_bt, y_bt) int32 for `step` (rows `rows` of the global batch)."""
        starts = self.starts(step)[rows]
        windows = np.stack([np.asarray(self.tokens[s : s + self.context_length + 1]) for s in starts])
        windows = windows.astype(np.int32)  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenFileWriter:
    """Appends token ids to a raw little-endian file; `close` writes the JSON sidecar (dtype, count).

    Streaming: memory stays bounded however many tokens are written.
    """

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size).newbyteorder("<")
        self.count = 0
        self._sha256 = hashlib.sha256()
        self._file = open(self.path, "wb")

    def write(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token id out of range [0, {self.vocab_size}) while writing {self.path}")
        data = arr.astype(self.dtype).tobytes()
        self._file.write(data)
        self._sha256.update(data)
        self.count += arr.size

    def close(self) -> Path:
        self._file.close()
        meta = {"dtype": self.dtype.name, "count": self.count, "vocab_size": self.vocab_size,
                "sha256": self._sha256.hexdigest()}
        self.path.with_suffix(self.path.suffix + ".json").write_text(json.dumps(meta))
        return self.path


def write_token_file(ids, path: Path, vocab_size: int) -> Path:
    """Write ids as a raw little-endian token file plus a JSON sidecar naming dtype and count."""
    writer = TokenFileWriter(path, vocab_size)
    writer.write(ids)
    return writer.close()


def open_token_file(path: Path, vocab_size: Optional[int] = None) -> np.memmap:
    """Memory-map a token file written by `write_token_file`: its size is checked against the
    sidecar, and every id against the sidecar's vocabulary and `vocab_size` (the tokenizer's)."""
    path = Path(path)
    meta_path = path.with_suffix(path.suffix + ".json")
    if not path.is_file() or not meta_path.is_file():
        raise DataError(f"token file {path} or its sidecar {meta_path.name} is missing")
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta["count"] * dtype.itemsize
    if path.stat().st_size != expected:
        raise DataError(f"token file {path} has {path.stat().st_size} bytes, expected {expected}: truncated or corrupt")
    if meta["count"] == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    ids = np.memmap(path, dtype=dtype, mode="r", shape=(meta["count"],))
    limits = [v for v in (meta.get("vocab_size"), vocab_size) if v is not None]
    if limits:
        limit = min(limits)
        top = int(ids.max())  # one pass over the file: ids beyond the vocabulary would train on garbage
        if top >= limit:
            raise DataError(f"token file {path} holds id {top}, outside the vocabulary of {limit}: it was written "
                            "for another tokenizer; prepare the corpus again")
    return ids


class EpochSampler:
    """The book's DataLoader(shuffle=True, drop_last=True) over a `SlidingWindowDataset`, by step.

    Step s is batch s mod n of epoch s // n, with the epoch's order drawn from (seed, epoch): a pure
    function of (seed, s), like `RandomWindowSampler`, so resuming needs no iterator state.
    """

    def __init__(self, dataset: SlidingWindowDataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if len(dataset) < batch_size:
            raise DataError(f"only {len(dataset)} training windows, fewer than batch_size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = len(dataset) // batch_size

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(step, self.batches_per_epoch)
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        idx = order[i * self.batch_size : (i + 1) * self.batch_size][rows]
        return self.dataset.inputs[idx], self.dataset.targets[idx]
