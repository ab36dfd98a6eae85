"""GPT-2 weights in the Hugging Face layout (`GPT2LMHeadModel`): the config and the tensor mapping.

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

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.registry import attention_kind
from jaxgpt.weights.hf_files import WeightsError, to_float32

_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def canonical_names(names) -> dict[str, str]:
    """Stored name -> `transformer.`-prefixed name (OpenAI's upload has no prefix); buffers dropped."""
    return {k: (k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k)
            for k in names if not k.endswith(_BUFFER_SUFFIXES)}


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
    d, v, t, f = cfg.emb_dim, cfg.vocab_size, cfg.context_length, cfg.hidden_dim
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


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: GPTConfig) -> dict:
    """jaxgpt params {"params": …} from HF-named tensors, with every mismatch named."""
    tensors = {new: tensors[old] for old, new in canonical_names(tensors).items()}
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
        arr = to_float32(name, arr)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = arr.T if transpose else arr
    return {"params": params}


def config_to_hf(cfg: GPTConfig) -> dict:
    eot = cfg.vocab_size - 1 if cfg.vocab_size == 50257 else None
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.hidden_dim, "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.ln_eps, "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "float32",
    }


def export_problems(cfg: GPTConfig) -> list[str]:
    """The settings of `cfg` that Hugging Face's GPT-2 cannot represent (empty: exportable). A model
    exported despite them would load and silently compute other logits."""
    problems = []
    if "gpt2" not in attention_kind(cfg.attention).exports:
        problems.append(f"attention={cfg.attention!r} (GPT-2 has softmax attention)")
    if cfg.position != "learned":
        problems.append(f"position={cfg.position!r} (GPT-2 has learned position embeddings)")
    if cfg.n_kv_heads not in (None, cfg.n_heads):
        problems.append(f"n_kv_heads={cfg.n_kv_heads} (GPT-2 has as many key/value heads as query heads)")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window} (GPT-2 attends to the whole context)")
    gpt2 = GPTConfig()
    for field in ("norm", "post_norms", "mlp", "mlp_bias", "attn_out_bias", "head_size", "qk_norm", "query_scale",
                  "emb_scale", "logit_softcap"):
        if getattr(cfg, field) != getattr(gpt2, field):
            problems.append(f"{field}={getattr(cfg, field)!r} (GPT-2 has {getattr(gpt2, field)!r})")
    return problems


def tensors_from_params(params: dict, cfg: GPTConfig) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of GPT-2 params (a model without qkv bias gets a zero c_attn.bias:
    the same function)."""
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
    return tensors


