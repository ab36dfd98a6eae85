"""Hugging Face checkpoint folders: where they are, and their safetensors files read and written.

Reading uses `safetensors` into NumPy only: no torch, no TensorFlow, never pickle. Headers are read
without loading (`tensor_shapes`), and tensors one at a time (`TensorReader`), so a loader can check
a config against the files before allocating anything and hold about one copy of the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import ml_dtypes  # bfloat16 for NumPy (installed with jax)
import numpy as np

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "jaxgpt_tokenizer.json"  # written on export so a character-level model keeps its vocabulary
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightsError(ValueError):
    """A checkpoint cannot be read into (or written from) jaxgpt; the message names the tensor or file."""


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_checkpoint(name_or_dir: str, *, download: bool = False) -> Path:
    """A local directory holding config.json and safetensors weights.

    `name_or_dir` is a directory, or a model name (`gpt2`, `openai-community/gpt2-medium`, …) looked
    up in the local Hugging Face cache. Nothing is downloaded unless `download=True`.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    looked = [str(path)]
    repo_ids = [name_or_dir] if "/" in name_or_dir else [name_or_dir, f"openai-community/{name_or_dir}"]
    for repo_id in repo_ids:
        repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
        looked.append(str(repo_dir))
        snapshots = repo_dir / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = repo_dir / "refs" / "main"
        candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in candidates:
            if (snap / CONFIG_FILE).is_file() and ((snap / WEIGHTS_FILE).is_file() or (snap / INDEX_FILE).is_file()):
                return snap
    if download:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise WeightsError("downloading needs the huggingface_hub package: pip install huggingface_hub") from None
        return Path(snapshot_download(repo_ids[-1], allow_patterns=[CONFIG_FILE, "*.safetensors", INDEX_FILE]))
    raise WeightsError(
        f"no local checkpoint for {name_or_dir!r}: looked in {', '.join(looked)}. "
        "Pass a directory with config.json + model.safetensors, or allow a download explicitly (--download)."
    )


def _files(directory: Path) -> tuple[Optional[dict], list[str]]:
    """(the index's weight map or None, the safetensors files to read).

    A folder with both a single weights file and a shard index is refused: they can hold different
    weights, and which one a loader reads differs between libraries. Shard names in an index must
    name files inside the folder (no path separators, no `..`)."""
    index, single = directory / INDEX_FILE, directory / WEIGHTS_FILE
    if index.is_file() and single.is_file():
        raise WeightsError(f"{directory} holds both {WEIGHTS_FILE} and {INDEX_FILE}: they may hold different "
                           f"weights, and libraries disagree on which to read; remove the one that is stale")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index: {e!r}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise WeightsError(f"{index}: weight_map must map tensor names to shard file names (strings)")
        for fname in set(weight_map.values()):
            if Path(fname).name != fname or fname in ("", ".", ".."):
                raise WeightsError(f"{index} names the shard {fname!r}, which is not a file name inside {directory} "
                                   "(shards must sit in the model folder itself)")
        return weight_map, sorted(set(weight_map.values()))
    if single.is_file():
        return None, [WEIGHTS_FILE]
    raise WeightsError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors are read, never pickle)")


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every stored tensor, from the files' headers only (nothing is allocated)."""
    from safetensors import SafetensorError, safe_open

    weight_map, files = _files(directory)
    shapes = {}
    for fname in files:
        path = directory / fname
        if not path.is_file():
            raise WeightsError(f"shard {path} named in {INDEX_FILE} is missing")
        try:
            with safe_open(str(path), "numpy") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    if weight_map is not None and set(weight_map) - set(shapes):
        raise WeightsError(f"tensors listed in {INDEX_FILE} but absent from the shards: {sorted(set(weight_map) - set(shapes))[:5]}")
    return shapes


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class TensorReader:
    """`reader(name)` -> that tensor as float32 NumPy, read alone from whichever shard holds it
    (use as a context manager: the files stay open while loading).

    It reads the safetensors format itself (an 8-byte header length, a JSON header of dtypes,
    shapes and byte offsets, then the data) with plain reads rather than a memory map, so only the
    tensor asked for is in memory: a whole model costs about one copy of its weights to load."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._where: dict[str, tuple] = {}  # name -> (file, dtype, shape, start, end)
        self._files: dict[str, object] = {}

    def __enter__(self):
        for fname in _files(self.directory)[1]:
            path = self.directory / fname
            f = open(path, "rb")
            self._files[fname] = f
            try:
                (size,) = np.frombuffer(f.read(8), "<u8")
                header = json.loads(f.read(int(size)))
            except (ValueError, TypeError) as e:
                raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
            base = 8 + int(size)
            for name, info in header.items():
                if name != "__metadata__":
                    start, end = info["data_offsets"]
                    self._where[name] = (fname, info["dtype"], tuple(info["shape"]), base + start, base + end)
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise WeightsError(f"checkpoint lacks the tensor {name!r}")
        fname, dtype, shape, start, end = self._where[name]
        if dtype not in _DTYPES:
            raise WeightsError(f"tensor {name!r} has dtype {dtype}, which jaxgpt does not read")
        np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "BF16" else np.dtype(_DTYPES[dtype])
        f = self._files[fname]
        f.seek(start)
        arr = np.empty(shape, np_dtype)
        if end - start != arr.nbytes or f.readinto(arr.reshape(-1).view(np.uint8)) != arr.nbytes:
            raise WeightsError(f"tensor {name!r} in {self.directory / fname} is truncated")
        return to_float32(name, arr)


def to_float32(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind != "f" and str(arr.dtype) != "bfloat16":
        raise WeightsError(f"tensor {name!r} has dtype {arr.dtype}; expected a floating-point type")
    return np.asarray(arr, dtype=np.float32)


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: Optional[int]) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` and their index. A write that fails
    (a full disk) is a WeightsError naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}  # what transformers expects in the header

    def save(shard: dict, path: Path) -> None:
        try:
            save_file(shard, str(path), metadata=metadata)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"could not write {path.name}: {str(e).splitlines()[0][:200]}") from None

    if max_shard_bytes is None or sum(a.nbytes for a in tensors.values()) <= max_shard_bytes:
        save(tensors, out_dir / WEIGHTS_FILE)
        return
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save(shard, out_dir / fname)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
