"""Weights in and out of the Hugging Face layout (`config.json` + safetensors), for every family.

`load_hf` reads the folder's `config.json` and picks the mapping by `model_type`: GPT-2
(`jaxgpt.weights.hf_gpt2`) or Llama 3, Qwen3, Gemma 3 text, Qwen3-MoE and Mixtral (`jaxgpt.weights.hf_families`,
with `hf_moe` for the expert layers).
Before any tensor is read, the config is compared with the tensor names and shapes in the files'
headers. `save_hf` picks the target class from the jaxgpt config and refuses, by name, every
setting that class cannot hold; exports are written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.weights import hf_families, hf_gpt2
from jaxgpt.weights.finite import check_finite_params
from jaxgpt.weights.hf_files import (  # noqa: F401  (resolve_checkpoint, WeightsError: this module's API too)
    CONFIG_FILE, INDEX_FILE, TOKENIZER_FILE, WEIGHTS_FILE, TensorReader, WeightsError, hf_cache_dir,
    resolve_checkpoint, tensor_shapes, write_safetensors,
)

HF_TOKENIZER_FILE = "tokenizer.json"


def read_hf_config(directory: Path) -> dict:
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(f"{directory} has no {CONFIG_FILE}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_path} is not valid JSON: {e}") from None


def config_from_hf(hf: dict, config_path: Path = Path(CONFIG_FILE)) -> GPTConfig:
    """The jaxgpt config of a Hugging Face `config.json` of any supported family."""
    kind = hf.get("model_type", "gpt2")
    try:
        return hf_gpt2.config_from_hf(hf) if kind == "gpt2" else hf_families.config_from_hf(hf)
    except KeyError as e:
        raise WeightsError(f"{config_path} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type, a value GPTConfig refuses, an unsupported option
        raise WeightsError(f"{config_path}: {e}") from None


def check_config_fits_tensors(cfg: GPTConfig, shapes: dict[str, tuple[int, ...]], config_path: Path,
                              block_prefix: str = "transformer.h.", embedding: str = "transformer.wte.weight") -> None:
    """Compare config.json's sizes with the tensors actually stored, before anything is allocated
    (an absurd `n_layer` in a config would otherwise build a model of that size)."""
    depth = block_prefix.count(".")
    blocks = {int(name.split(".")[depth]) for name in shapes if name.startswith(block_prefix)
              and name.split(".")[depth].isdigit()}
    if cfg.n_layers > len(blocks):  # more claimed than stored (extra stored blocks are named further on)
        raise WeightsError(f"{config_path} says n_layer={cfg.n_layers} but the weights hold {len(blocks)} blocks")
    checks = [(embedding, (cfg.vocab_size, cfg.emb_dim), "vocab_size, hidden size")]
    if cfg.position == "learned":
        checks.append(("transformer.wpe.weight", (cfg.context_length, cfg.emb_dim), "n_positions, n_embd"))
    for name, want, field in checks:
        if name in shapes and shapes[name] != want:
            raise WeightsError(f"{config_path} says ({field}) = {want} but {name} has shape {shapes[name]}")


def _check_names_and_shapes(expected: dict, shapes: dict, tied: bool) -> None:
    stored = {k: v for k, v in shapes.items() if not (tied and k == "lm_head.weight")}  # a tied head may be stored
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}")
    if extra:
        raise WeightsError(f"checkpoint has {len(extra)} tensor(s) this config does not use, e.g. {extra[:5]}")
    wrong = [(k, stored[k], v) for k, v in expected.items() if tuple(stored[k]) != tuple(v)]
    if wrong:
        name, got, want = wrong[0]
        raise WeightsError(f"tensor {name!r} has shape {tuple(got)}, expected {tuple(want)} from config.json")


def load_hf(name_or_dir: str, *, download: bool = False) -> tuple[dict, GPTConfig]:
    """(params, config) of a Hugging Face checkpoint (directory or cached model name) of a supported
    family: GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM."""
    directory = resolve_checkpoint(name_or_dir, download=download)
    hf = read_hf_config(directory)
    cfg = config_from_hf(hf, directory / CONFIG_FILE)
    shapes = tensor_shapes(directory)
    kind = hf.get("model_type", "gpt2")
    if kind == "gpt2":
        names = hf_gpt2.canonical_names(shapes)  # stored name -> `transformer.` name, buffers dropped
        check_config_fits_tensors(cfg, {new: shapes[old] for old, new in names.items()}, directory / CONFIG_FILE)
        stored = {new: old for old, new in names.items()}
        with TensorReader(directory) as read:  # the same one-tensor reader as the families
            _check_tied_head(read, cfg, stored.get("lm_head.weight"), stored.get("transformer.wte.weight"), directory)
            params = hf_gpt2.params_from_tensors({new: read(old) for old, new in names.items()}, cfg)
    else:
        check_config_fits_tensors(cfg, shapes, directory / CONFIG_FILE, "model.layers.", "model.embed_tokens.weight")
        _check_names_and_shapes(hf_families.expected_shapes(cfg, kind), shapes, cfg.tie_embeddings)
        with TensorReader(directory) as read:  # one tensor at a time: about one copy of the weights at the peak
            head = "lm_head.weight" if "lm_head.weight" in shapes else None
            _check_tied_head(read, cfg, head, "model.embed_tokens.weight", directory)
            params = hf_families.params_from_reader(read, cfg, kind)
    check_finite_params(params, str(directory))
    return params, cfg


def _check_tied_head(read, cfg: GPTConfig, head: Optional[str], embedding: Optional[str], directory: Path) -> None:
    """A config that ties the output head to the embedding, in a folder that also stores a head of
    its own, is accepted only when the stored head is the embedding: otherwise the folder
    contradicts itself (tying drops the stored head; a loader that keeps it computes other logits)."""
    if not cfg.tie_embeddings or head is None or embedding is None:
        return
    head_vd, emb_vd = read(head), read(embedding)
    if head_vd.shape != emb_vd.shape or not np.array_equal(head_vd, emb_vd):
        diff = f"largest difference {np.abs(head_vd - emb_vd).max():.3g}" if head_vd.shape == emb_vd.shape \
            else f"shape {head_vd.shape} against {emb_vd.shape}"
        raise WeightsError(f"{directory / CONFIG_FILE} says tie_word_embeddings is true, but the weights store an "
                           f"{head!r} that is not {embedding!r} ({diff}): set tie_word_embeddings to false to use the "
                           f"stored head, or remove {head!r} to tie it to the embedding")


def export_problems(cfg: GPTConfig) -> tuple[str, list[str]]:
    """(the HF model type `cfg` exports as, the settings that type cannot hold: empty when exportable).
    A model exported despite them would load and silently compute other logits."""
    if cfg.norm == "layernorm":
        return "gpt2", hf_gpt2.export_problems(cfg)
    kind, problems = hf_families.family_of(cfg)
    return kind, problems


def save_hf(params: dict, cfg: GPTConfig, out_dir: Path, *, max_shard_bytes: Optional[int] = None,
            tokenizer=None, force: bool = False) -> Path:
    """Write `params` as config.json + model.safetensors (sharded with an index above `max_shard_bytes`).

    The Hugging Face class follows from the config (GPT-2, Llama, Qwen3 or Gemma 3); a setting it
    cannot hold is refused by name (`export_problems`). With a tokenizer other than GPT-2's, its
    spec is written beside (`jaxgpt_tokenizer.json`). The export is written to a temporary folder
    and renamed into place: a non-empty `out_dir` is refused unless `force`, and then replaced
    whole (no stale shard or index of an older export survives).
    """
    from jaxgpt.atomic import atomic_directory, check_target
    from jaxgpt.nn.layout import unstack_layers

    kind, problems = export_problems(cfg)
    if problems:
        raise WeightsError(f"this model cannot be exported as Hugging Face {kind}: " + "; ".join(problems))
    check_target(out_dir, force)
    params = unstack_layers(params)  # GPT-2's h_0 … h_{L-1}, whichever layout the model trained in
    if kind == "gpt2":
        tensors, hf_config = hf_gpt2.tensors_from_params(params, cfg), hf_gpt2.config_to_hf(cfg)
    else:
        tensors, hf_config = hf_families.tensors_from_params(params, cfg, kind), hf_families.config_to_hf(cfg, kind)
    with atomic_directory(out_dir, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if tokenizer is not None and tokenizer.name != "gpt2":
            (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
        write_safetensors(tensors, tmp, max_shard_bytes)
    return Path(out_dir)


def load_tokenizer(directory: Path, cfg: GPTConfig):
    """The tokenizer of an HF checkpoint folder: the exported jaxgpt one if present, else the
    folder's `tokenizer.json` (through the `tokenizers` library), else GPT-2 BPE for GPT-2's
    vocabulary, else (a Llama/Qwen3/Gemma folder without one) ids only (`IdsTokenizer`)."""
    from jaxgpt.data.tokenizer import GPT2Tokenizer, tokenizer_from_dict

    spec_path = Path(directory) / TOKENIZER_FILE
    if spec_path.is_file():
        return tokenizer_from_dict(json.loads(spec_path.read_text()))
    if (Path(directory) / HF_TOKENIZER_FILE).is_file():
        from jaxgpt.data.tokenizer import HFTokenizer

        return HFTokenizer.from_folder(directory)
    hf = read_hf_config(directory)
    if hf.get("model_type", "gpt2") != "gpt2":  # a family model without its tokenizer: ids only
        from jaxgpt.data.tokenizer import IdsTokenizer

        eos = hf.get("eos_token_id")
        return IdsTokenizer(cfg.vocab_size, eos[0] if isinstance(eos, list) else eos)
    if cfg.vocab_size != 50257:
        raise WeightsError(f"{directory}: vocabulary of {cfg.vocab_size} is not GPT-2's 50,257 and neither "
                           f"{TOKENIZER_FILE} nor {HF_TOKENIZER_FILE} says which tokenizer it uses")
    return GPT2Tokenizer()
