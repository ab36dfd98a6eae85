"""Llama 3, Qwen3 and Gemma 3 (text) weights in the Hugging Face layout, in and out — and their
mixture-of-experts siblings Qwen3-MoE and Mixtral, whose MoE layers `jaxgpt.weights.hf_moe` maps.

The family is read from `config.json`'s `model_type` ("llama", "qwen3", "gemma3_text", "qwen3_moe",
"mixtral") on import,
and decided from the jaxgpt config on export (`family_of`, which names every setting the target
class cannot hold). The mapping (HF `nn.Linear` weights are (out, in): transposed here):

    model.embed_tokens.weight (V, d)                 wte/embedding
    model.layers.i.input_layernorm.weight            h_i/ln_1/scale
    model.layers.i.self_attn.{q,k,v}_proj.weight     h_i/attn/c_attn/kernel = [qᵀ | kᵀ | vᵀ]  (d, (n + 2m) h)
    model.layers.i.self_attn.o_proj.weight           h_i/attn/c_proj/kernel (n h, d)
    model.layers.i.self_attn.{q,k}_norm.weight       h_i/attn/{q,k}_norm/scale            (Qwen3, Gemma 3)
    model.layers.i.post_attention_layernorm.weight   h_i/ln_2/scale (Llama, Qwen3: the pre-MLP norm)
                                                     h_i/ln_post_attn/scale (Gemma 3: a real post-norm)
    model.layers.i.pre_feedforward_layernorm.weight  h_i/ln_2/scale                       (Gemma 3)
    model.layers.i.post_feedforward_layernorm.weight h_i/ln_post_mlp/scale                (Gemma 3)
    model.layers.i.mlp.{gate,up,down}_proj.weight    h_i/mlp/{c_gate, c_fc, c_proj}/kernel
    model.norm.weight                                ln_f/scale
    lm_head.weight (V, d), if not tied               lm_head/kernel (d, V)

Gemma's RMSNorm weights are stored as w in x·(1 + w): jaxgpt's `norm_unit_offset` keeps that
convention, so they copy as they are. Tensors are read one at a time (`safe_open`) and placed
straight into the parameter tree: the peak is about one copy of the weights.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.registry import attention_kind
from jaxgpt.weights import hf_moe

FAMILIES = ("llama", "qwen3", "gemma3_text", *hf_moe.ARCHITECTURES)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 **hf_moe.ARCHITECTURES}


def _rope(hf: dict, kind: Optional[str] = None) -> dict:
    """The RoPE parameters of config.json in either form: transformers 5's `rope_parameters`
    (per layer type for Gemma 3) or the older `rope_theta` / `rope_scaling` / `rope_local_base_freq`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and kind is not None and kind in params:
        return params[kind]
    if isinstance(params, dict) and "rope_theta" in params:
        return params
    if kind == "sliding_attention" and "rope_local_base_freq" in hf:
        return {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    scaling = hf.get("rope_scaling") or {}
    return {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
            "rope_theta": hf.get("rope_theta", 10000.0)}


def _layer_pattern(hf: dict, n_layers: int) -> Optional[int]:
    """`global_every` from Gemma 3's layer types (every k-th layer full attention), or a clear error."""
    types = hf.get("layer_types")
    if types is None:  # the older form: every k-th layer global
        return int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
    if len(types) != n_layers:
        raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers is {n_layers}")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if not full:
        return n_layers + 1  # every layer local
    k = full[0] + 1
    if [i for i in range(n_layers) if (i + 1) % k == 0] != full:
        raise ValueError(f"layer_types {types} is not a regular local/global pattern jaxgpt can express")
    return k


def config_from_hf(hf: dict) -> GPTConfig:
    """The jaxgpt config of a Llama, Qwen3, Gemma 3, Qwen3-MoE or Mixtral `config.json` (ValueError
    naming what it cannot hold)."""
    kind = hf.get("model_type")
    if kind in hf_moe.DENSE_FAMILY:
        dense = config_from_hf({**hf, "model_type": hf_moe.DENSE_FAMILY[kind]})
        return dense.replace(**hf_moe.moe_fields(hf, kind))
    n_layers, d = hf["num_hidden_layers"], hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // n_heads
    common = dict(
        vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"], emb_dim=d, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, n_layers=n_layers, drop_rate=0.0, norm="rmsnorm",
        ln_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp_hidden=hf["intermediate_size"], mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=bool(hf.get("attention_bias", False)), attn_out_bias=bool(hf.get("attention_bias", False)),
        position="rope", tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "gemma3_text")),
        head_size=None if head_dim * n_heads == d else head_dim,
    )
    if kind in ("llama", "qwen3"):
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r}: jaxgpt's gated MLP for {kind} is SwiGLU (silu)")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true (Qwen's per-layer windows) is not supported")
        rope = _rope(hf)
        cfg = dict(common, mlp="swiglu", qk_norm=kind == "qwen3", rope_base=float(rope["rope_theta"]))
        if rope.get("rope_type", "default") == "llama3":
            cfg.update(rope_scaling=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_context=int(rope["original_max_position_embeddings"]))
        elif rope.get("rope_type", "default") != "default":
            raise ValueError(f"RoPE type {rope['rope_type']!r} is not supported (default and llama3 are)")
        return GPTConfig(**cfg)
    if kind == "gemma3_text":
        act = hf.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"hidden_activation {act!r}: jaxgpt's GeGLU uses GELU's tanh approximation")
        if hf.get("attn_logit_softcapping") is not None:
            raise ValueError("attn_logit_softcapping is not supported (final_logit_softcapping is)")
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true: jaxgpt's models are causal")
        glob, local = _rope(hf, "full_attention"), _rope(hf, "sliding_attention")
        for which in (glob, local):
            if which.get("rope_type", "default") != "default":
                raise ValueError(f"Gemma 3 RoPE type {which['rope_type']!r} is not supported")
        every = _layer_pattern(hf, n_layers)
        return GPTConfig(**common, mlp="geglu", qk_norm=True, norm_unit_offset=True, post_norms=True, emb_scale=True,
                         query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                         rope_base=float(glob["rope_theta"]), rope_local_base=float(local["rope_theta"]),
                         sliding_window=hf.get("sliding_window"), global_every=every if every <= n_layers else None,
                         logit_softcap=hf.get("final_logit_softcapping"))
    raise ValueError(f"model_type {kind!r} is not one of {FAMILIES}")


def family_of(cfg: GPTConfig) -> tuple[Optional[str], list[str]]:
    """(the HF family `cfg` exports as, or None; the settings that family cannot hold)."""
    if cfg.norm == "layernorm":
        return None, ["norm='layernorm' (GPT-2 style: export as gpt2)"]
    kind = "gemma3_text" if cfg.norm_unit_offset else ("qwen3" if cfg.qk_norm else "llama")
    moe_kind = {"qwen3": "qwen3_moe", "llama": "mixtral"}.get(kind) if cfg.moe_experts else None
    wanted = {"llama": dict(mlp="swiglu", post_norms=False, emb_scale=False, qk_norm=False, query_scale=None,
                            rope_local_base=None, sliding_window=None, logit_softcap=None),
              "qwen3": dict(mlp="swiglu", post_norms=False, emb_scale=False, qk_norm=True, query_scale=None,
                            rope_local_base=None, sliding_window=None, logit_softcap=None, rope_scaling=None),
              "gemma3_text": dict(mlp="geglu", post_norms=True, emb_scale=True, qk_norm=True, rope_scaling=None,
                                  qkv_bias=False, attn_out_bias=False, mlp_bias=False)}[kind]
    problems = [f"{k}={getattr(cfg, k)!r} (a {kind} model has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.moe_experts and moe_kind is None:
        problems.append(f"moe_experts={cfg.moe_experts} ({kind} has no mixture-of-experts sibling)")
    elif moe_kind is not None:
        problems += hf_moe.moe_problems(cfg, moe_kind)
        kind = moe_kind
    if kind not in attention_kind(cfg.attention).exports:
        problems.append(f"attention={cfg.attention!r} ({kind} cannot hold it)")
    if cfg.position != "rope":
        problems.append(f"position={cfg.position!r} ({kind} uses RoPE)")
    if cfg.qkv_bias != cfg.attn_out_bias:
        problems.append("qkv_bias and attn_out_bias differ (HF's attention_bias sets both)")
    if kind == "gemma3_text" and cfg.sliding_window is None:
        problems.append("sliding_window unset (Gemma 3 has local layers)")
    if kind == "gemma3_text" and _query_pre_attn_scalar(cfg) is None:
        problems.append(f"query_scale={cfg.query_scale} (Gemma 3 stores an integer query_pre_attn_scalar s: s^-1/2)")
    return kind, problems


def _query_pre_attn_scalar(cfg: GPTConfig) -> Optional[int]:
    """Gemma's integer s with query_scale = s^-1/2 (None when the scale has no such s)."""
    if cfg.query_scale is None:
        return cfg.head_dim
    s = cfg.query_scale ** -2
    return int(round(s)) if abs(s - round(s)) < 1e-6 * s else None


def config_to_hf(cfg: GPTConfig, kind: str) -> dict:
    if kind in hf_moe.DENSE_FAMILY:
        dense = config_to_hf(cfg, hf_moe.DENSE_FAMILY[kind])
        dense.pop("mlp_bias", None)
        return {**dense, "architectures": [ARCHITECTURES[kind]], "model_type": kind,
                **hf_moe.moe_config_to_hf(cfg, kind)}
    d, n = cfg.emb_dim, cfg.n_heads
    out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
           "hidden_size": d, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": n, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.ln_eps,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias, "torch_dtype": "float32"}
    if kind == "gemma3_text":
        types = ["sliding_attention" if cfg.layer_window(i) is not None else "full_attention" for i in range(cfg.n_layers)]
        return {**out, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _query_pre_attn_scalar(cfg),
                "sliding_window": cfg.sliding_window, "layer_types": types,
                "final_logit_softcapping": cfg.logit_softcap, "attn_logit_softcapping": None,
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": cfg.rope_local_base or cfg.rope_base}}}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", "factor": cfg.rope_scaling, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_context}
    out = {**out, "hidden_act": "silu", "rope_parameters": rope}
    return {**out, "mlp_bias": cfg.mlp_bias} if kind == "llama" else out


def _block_names(kind: str, moe_layer: bool = False) -> dict[str, tuple[str, ...]]:
    """HF name within `model.layers.i.` -> jaxgpt path within `h_i` (norms, dense MLP; attention and
    an MoE layer's MLP apart)."""
    if kind in hf_moe.DENSE_FAMILY:
        names = _block_names(hf_moe.DENSE_FAMILY[kind])
        return {k: v for k, v in names.items() if not (moe_layer and k.startswith("mlp."))}
    names = {"input_layernorm.weight": ("ln_1", "scale"), "mlp.down_proj.weight": ("mlp", "c_proj", "kernel"),
             "mlp.gate_proj.weight": ("mlp", "c_gate", "kernel"), "mlp.up_proj.weight": ("mlp", "c_fc", "kernel")}
    if kind == "gemma3_text":
        names.update({"post_attention_layernorm.weight": ("ln_post_attn", "scale"),
                      "pre_feedforward_layernorm.weight": ("ln_2", "scale"),
                      "post_feedforward_layernorm.weight": ("ln_post_mlp", "scale")})
    else:
        names["post_attention_layernorm.weight"] = ("ln_2", "scale")
    if kind in ("qwen3", "gemma3_text"):
        names.update({"self_attn.q_norm.weight": ("attn", "q_norm", "scale"),
                      "self_attn.k_norm.weight": ("attn", "k_norm", "scale")})
    return names


def expected_shapes(cfg: GPTConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of `cfg` as a `kind` model, with its HF shape."""
    d, f, h, n, m = cfg.emb_dim, cfg.hidden_dim, cfg.head_dim, cfg.n_heads, cfg.kv_heads
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    per_block = {"self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (m * h, d),
                 "self_attn.v_proj.weight": (m * h, d), "self_attn.o_proj.weight": (d, n * h)}
    if cfg.qkv_bias:
        per_block.update({"self_attn.q_proj.bias": (n * h,), "self_attn.k_proj.bias": (m * h,),
                          "self_attn.v_proj.bias": (m * h,), "self_attn.o_proj.bias": (d,)})
    for name, path in _block_names(kind).items():  # a dense layer's; an MoE layer's MLP is replaced below
        if path[0] == "attn":  # q_norm, k_norm
            per_block[name] = (h,)
        elif name.startswith("mlp."):
            per_block[name] = (d, f) if name == "mlp.down_proj.weight" else (f, d)
        else:  # the block's norms
            per_block[name] = (d,)
    if cfg.mlp_bias:
        per_block.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)})
    for i in range(cfg.n_layers):
        layer = per_block
        if cfg.is_moe_layer(i):
            layer = {k: v for k, v in per_block.items() if not k.startswith("mlp.")}
            layer.update(hf_moe.expected_moe_shapes(cfg, kind))
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def params_from_reader(read, cfg: GPTConfig, kind: str) -> dict:
    """jaxgpt params {"params": …} from `read(name) -> np.ndarray` (one tensor at a time), float32."""
    get = lambda name: np.asarray(read(name), dtype=np.float32)  # noqa: E731
    p: dict = {"wte": {"embedding": get("model.embed_tokens.weight")}, "ln_f": {"scale": get("model.norm.weight")}}
    if not cfg.tie_embeddings:
        p["lm_head"] = {"kernel": np.ascontiguousarray(get("lm_head.weight").T)}
    for i in range(cfg.n_layers):
        pre, blk = f"model.layers.{i}.", {}
        if cfg.is_moe_layer(i):
            blk["mlp"] = hf_moe.read_moe_layer(get, pre, cfg, kind)
        for name, path in _block_names(kind, cfg.is_moe_layer(i)).items():
            arr = get(pre + name)
            node = blk
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = np.ascontiguousarray(arr.T) if path[-1] == "kernel" else arr
        attn = blk.setdefault("attn", {})
        attn["c_attn"] = {"kernel": np.concatenate([get(f"{pre}self_attn.{x}_proj.weight").T for x in "qkv"], axis=1)}
        attn["c_proj"] = {"kernel": np.ascontiguousarray(get(f"{pre}self_attn.o_proj.weight").T)}
        if cfg.qkv_bias:
            attn["c_attn"]["bias"] = np.concatenate([get(f"{pre}self_attn.{x}_proj.bias") for x in "qkv"])
            attn["c_proj"]["bias"] = get(f"{pre}self_attn.o_proj.bias")
        if cfg.mlp_bias:
            for hf_name, ours in (("gate_proj", "c_gate"), ("up_proj", "c_fc"), ("down_proj", "c_proj")):
                blk["mlp"][ours]["bias"] = get(f"{pre}mlp.{hf_name}.bias")
        p[f"h_{i}"] = blk
    return {"params": p}


def tensors_from_params(params: dict, cfg: GPTConfig, kind: str) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of jaxgpt params (GPT-2 block layout)."""
    p = params["params"] if "params" in params else params
    arr = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    out = {"model.embed_tokens.weight": arr(p["wte"]["embedding"]), "model.norm.weight": arr(p["ln_f"]["scale"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = arr(np.asarray(p["lm_head"]["kernel"]).T)
    n, m, h = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    for i in range(cfg.n_layers):
        pre, blk = f"model.layers.{i}.", p[f"h_{i}"]
        if cfg.is_moe_layer(i):
            out.update(hf_moe.write_moe_layer(blk["mlp"], pre, kind, arr))
        for name, path in _block_names(kind, cfg.is_moe_layer(i)).items():
            node = blk
            for key in path:
                node = node[key]
            out[pre + name] = arr(np.asarray(node).T if path[-1] == "kernel" else node)
        qkv = np.asarray(blk["attn"]["c_attn"]["kernel"])
        for x, (a, b) in zip("qkv", ((0, n * h), (n * h, (n + m) * h), ((n + m) * h, (n + 2 * m) * h))):
            out[f"{pre}self_attn.{x}_proj.weight"] = arr(qkv[:, a:b].T)
            if cfg.qkv_bias:
                out[f"{pre}self_attn.{x}_proj.bias"] = arr(np.asarray(blk["attn"]["c_attn"]["bias"])[a:b])
        out[f"{pre}self_attn.o_proj.weight"] = arr(np.asarray(blk["attn"]["c_proj"]["kernel"]).T)
        if cfg.qkv_bias:
            out[f"{pre}self_attn.o_proj.bias"] = arr(blk["attn"]["c_proj"]["bias"])
        if cfg.mlp_bias:
            for hf_name, ours in (("gate_proj", "c_gate"), ("up_proj", "c_fc"), ("down_proj", "c_proj")):
                out[f"{pre}mlp.{hf_name}.bias"] = arr(blk["mlp"][ours]["bias"])
    return out
