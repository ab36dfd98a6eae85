"""GPT-2 weights in the Hugging Face layout (`config.json` + safetensors), in and out.

Reading uses `safetensors` into NumPy only: no torch, no TensorFlow, never pickle. The mapping:

    HF (GPT2LMHeadModel)                      jaxgpt params
    transformer.wte.weight (V, d)             wte/embedding
    transformer.wpe.weight (T, d)             wpe/embedding
    transformer.h.i.ln_1.{weight,bias}        h_i/ln_1/{scale,bias}
    transformer.h.i.attn.c_attn.{weight,bias} h_i/attn/c_attn/{kernel,bias}   Conv1D weight is already (in, out)
    transformer.h.i.attn.c_proj.{weight,bias} h_i/attn/c_proj/{kernel,bias}
    transformer.h.i.ln_2 / mlp.c_fc / mlp.c_proj   likewise
    transformer.ln_f.{weight,bias}            ln_f/{scale,bias}
    lm_head.weight (V, d), if not tied        lm_head/kernel (d, V): transposed (nn.Linear)

The fused `c_attn` is kept fused: its [q | k | v] layout is the one `MultiHeadAttention` splits.
OpenAI's original upload names tensors without the `transformer.` prefix and carries the causal
mask buffers `h.i.attn.bias` / `masked_bias`; both are accepted (the buffers are not parameters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "jaxgpt_tokenizer.json"  # written on export so a character-level model keeps its vocabulary
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class WeightsError(ValueError):
    """A checkpoint cannot be read into (or written from) jaxgpt; the message names the tensor or file."""


# --- locating a checkpoint ------------------------------------------------------------------------

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


# --- reading ----------------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> GPTConfig:
    """The jaxgpt config of a Hugging Face GPT-2 `config.json`."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"config.json has model_type {hf.get('model_type')!r}; only 'gpt2' is supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise WeightsError(f"config.json activation_function {act!r}: jaxgpt implements GELU with the tanh approximation only")
    d = hf["n_embd"]
    n_inner = hf.get("n_inner") or 4 * d
    if n_inner % d:
        raise WeightsError(f"config.json n_inner {n_inner} is not a multiple of n_embd {d}")
    return GPTConfig(
        vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=d, n_heads=hf["n_head"],
        n_layers=hf["n_layer"], drop_rate=float(hf.get("resid_pdrop", 0.1)), qkv_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), mlp_ratio=n_inner // d,
        ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )


def _expected_tensors(cfg: GPTConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], bool]]:
    """HF tensor name -> (HF shape, jaxgpt param path, transpose?)."""
    d, v, t, f = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.mlp_ratio * cfg.emb_dim
    out = {
        "transformer.wte.weight": ((v, d), ("wte", "embedding"), False),
        "transformer.wpe.weight": ((t, d), ("wpe", "embedding"), False),
        "transformer.ln_f.weight": ((d,), ("ln_f", "scale"), False),
        "transformer.ln_f.bias": ((d,), ("ln_f", "bias"), False),
    }
    for i in range(cfg.n_layers):
        pre, blk = f"transformer.h.{i}.", f"h_{i}"
        for hf_name, shape, path in (
            ("ln_1.weight", (d,), ("ln_1", "scale")), ("ln_1.bias", (d,), ("ln_1", "bias")),
            ("attn.c_attn.weight", (d, 3 * d), ("attn", "c_attn", "kernel")),
            ("attn.c_attn.bias", (3 * d,), ("attn", "c_attn", "bias")),
            ("attn.c_proj.weight", (d, d), ("attn", "c_proj", "kernel")),
            ("attn.c_proj.bias", (d,), ("attn", "c_proj", "bias")),
            ("ln_2.weight", (d,), ("ln_2", "scale")), ("ln_2.bias", (d,), ("ln_2", "bias")),
            ("mlp.c_fc.weight", (d, f), ("mlp", "c_fc", "kernel")), ("mlp.c_fc.bias", (f,), ("mlp", "c_fc", "bias")),
            ("mlp.c_proj.weight", (f, d), ("mlp", "c_proj", "kernel")), ("mlp.c_proj.bias", (d,), ("mlp", "c_proj", "bias")),
        ):
            out[pre + hf_name] = (shape, (blk,) + path, False)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ((v, d), ("lm_head", "kernel"), True)
    return out


def _read_safetensors(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards an index names, as NumPy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{directory / INDEX_FILE} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise WeightsError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors are read, never pickle)")
    tensors: dict[str, np.ndarray] = {}
    for fname in files:
        path = directory / fname
        if not path.is_file():
            raise WeightsError(f"shard {path} named in {INDEX_FILE} is missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise WeightsError(f"tensors listed in {INDEX_FILE} but absent from the shards: {missing[:5]}")
    return tensors


def _tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint's safetensors files, from their headers only
    (nothing is allocated), with jaxgpt's `transformer.` naming."""
    from safetensors import SafetensorError, safe_open

    files = ([directory / WEIGHTS_FILE] if (directory / WEIGHTS_FILE).is_file()
             else sorted(directory.glob("model-*.safetensors")))
    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), "numpy") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    return {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in shapes.items()}


def check_config_fits_tensors(cfg: GPTConfig, shapes: dict[str, tuple[int, ...]], config_path: Path) -> None:
    """Compare config.json's sizes with the tensors actually stored, before anything is allocated
    (an absurd `n_layer` in a config would otherwise build a model of that size)."""
    blocks = {int(name.split(".")[2]) for name in shapes if name.startswith("transformer.h.")
              and name.split(".")[2].isdigit()}
    if cfg.n_layers > len(blocks):  # more claimed than stored (extra stored blocks are named further on)
        raise WeightsError(f"{config_path} says n_layer={cfg.n_layers} but the weights hold {len(blocks)} blocks")
    for name, want, field in (("transformer.wte.weight", (cfg.vocab_size, cfg.emb_dim), "vocab_size, n_embd"),
                              ("transformer.wpe.weight", (cfg.context_length, cfg.emb_dim), "n_positions, n_embd")):
        if name in shapes and shapes[name] != want:
            raise WeightsError(f"{config_path} says ({field}) = {want} but {name} has shape {shapes[name]}")


def _to_float32(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind != "f" and str(arr.dtype) != "bfloat16":
        raise WeightsError(f"tensor {name!r} has dtype {arr.dtype}; expected a floating-point type")
    return np.asarray(arr, dtype=np.float32)


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: GPTConfig) -> dict:
    """jaxgpt params {"params": …} from HF-named tensors, with every mismatch named."""
    tensors = {
        (k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
        for k, v in tensors.items() if not k.endswith(_BUFFER_SUFFIXES)
    }
    expected = _expected_tensors(cfg)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head may be stored; it is wte
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}")
    if extra:
        raise WeightsError(f"checkpoint has {len(extra)} tensor(s) this GPT-2 config does not use, e.g. {extra[:5]}")
    params: dict = {}
    for name, (shape, path, transpose) in expected.items():
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise WeightsError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {shape} from config.json")
        arr = _to_float32(name, arr)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = arr.T if transpose else arr
    return {"params": params}


def load_hf(name_or_dir: str, *, download: bool = False) -> tuple[dict, GPTConfig]:
    """(params, config) of a Hugging Face GPT-2 checkpoint (directory or cached model name)."""
    directory = resolve_checkpoint(name_or_dir, download=download)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(f"{directory} has no {CONFIG_FILE}")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_path} is not valid JSON: {e}") from None
    try:
        cfg = config_from_hf(hf_config)
    except KeyError as e:
        raise WeightsError(f"{config_path} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, or a value GPTConfig refuses
        raise WeightsError(f"{config_path}: {e}") from None
    check_config_fits_tensors(cfg, _tensor_shapes(directory), config_path)
    return params_from_tensors(_read_safetensors(directory), cfg), cfg


# --- writing ----------------------------------------------------------------------------------------

def config_to_hf(cfg: GPTConfig) -> dict:
    eot = cfg.vocab_size - 1 if cfg.vocab_size == 50257 else None
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.mlp_ratio * cfg.emb_dim, "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.ln_eps, "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


def load_tokenizer(directory: Path, cfg: GPTConfig):
    """The tokenizer of an HF checkpoint: the exported jaxgpt one if present, else GPT-2 BPE."""
    from jaxgpt.data.tokenizer import GPT2Tokenizer, tokenizer_from_dict

    spec_path = Path(directory) / TOKENIZER_FILE
    if spec_path.is_file():
        return tokenizer_from_dict(json.loads(spec_path.read_text()))
    if cfg.vocab_size != 50257:
        raise WeightsError(f"{directory}: vocabulary of {cfg.vocab_size} is not GPT-2's 50,257 and no {TOKENIZER_FILE} says which tokenizer it uses")
    return GPT2Tokenizer()


def export_problems(cfg: GPTConfig) -> list[str]:
    """The settings of `cfg` that Hugging Face's GPT-2 cannot represent (empty: exportable). A model
    exported despite them would load and silently compute other logits."""
    problems = []
    if cfg.attention != "softmax":
        problems.append(f"attention={cfg.attention!r} (GPT-2 has softmax attention)")
    if cfg.position != "learned":
        problems.append(f"position={cfg.position!r} (GPT-2 has learned position embeddings)")
    if cfg.n_kv_heads not in (None, cfg.n_heads):
        problems.append(f"n_kv_heads={cfg.n_kv_heads} (GPT-2 has as many key/value heads as query heads)")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window} (GPT-2 attends to the whole context)")
    return problems


def save_hf(params: dict, cfg: GPTConfig, out_dir: Path, *, max_shard_bytes: Optional[int] = None,
            tokenizer=None, force: bool = False) -> Path:
    """Write `params` as config.json + model.safetensors (sharded with an index above `max_shard_bytes`).

    A model without qkv bias gets a zero `c_attn.bias`, which is the same function. With a
    tokenizer other than GPT-2's, its spec is written beside (`jaxgpt_tokenizer.json`). A config
    GPT-2 cannot represent is refused by name (`export_problems`). The export is written to a
    temporary folder and renamed into place: a non-empty `out_dir` is refused unless `force`, and
    then replaced whole (no stale shard or index of an older export survives).
    """
    from jaxgpt.atomic import atomic_directory, check_target
    from jaxgpt.nn.layout import unstack_layers

    problems = export_problems(cfg)
    if problems:
        raise WeightsError("this model cannot be exported as Hugging Face GPT-2: " + "; ".join(problems))
    check_target(out_dir, force)

    params = unstack_layers(params)  # GPT-2's h_0 … h_{L-1}, whichever layout the model trained in
    p = params["params"] if "params" in params else params
    tensors: dict[str, np.ndarray] = {}
    for name, (shape, path, transpose) in _expected_tensors(cfg).items():
        node = p
        try:
            for key in path:
                node = node[key]
        except KeyError:
            if path[-1] == "bias" and path[-2] == "c_attn" and not cfg.qkv_bias:
                node = np.zeros(shape, np.float32)
            else:
                raise WeightsError(f"params lack {'/'.join(path)} needed for {name!r}") from None
        arr = np.asarray(node, dtype=np.float32)
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
        if tensors[name].shape != shape:
            raise WeightsError(f"param {'/'.join(path)} has shape {arr.shape}; the config implies {shape}")
    with atomic_directory(out_dir, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(cfg), indent=2))
        if tokenizer is not None and tokenizer.name != "gpt2":
            (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
        _write_safetensors(tensors, tmp, max_shard_bytes)
    return Path(out_dir)


def _write_safetensors(tensors: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: Optional[int]) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` and their index."""
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}  # what transformers expects in the header
    if max_shard_bytes is None or sum(a.nbytes for a in tensors.values()) <= max_shard_bytes:
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata=metadata)
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
        save_file(shard, str(out_dir / fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
