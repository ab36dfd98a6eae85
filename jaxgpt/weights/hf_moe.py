"""Mixture-of-experts weights in the Hugging Face layout: Qwen3-MoE and Mixtral.

Both are their dense family (`jaxgpt.weights.hf_families`: Qwen3, Llama) with the MLP of some
layers replaced by routed experts. Their MoE layers map as (HF `nn.Linear` weights are (out, in)):

    Qwen3-MoE: model.layers.i.mlp.gate.weight (E, d)                      h_i/mlp/router/kernel (d, E)
               model.layers.i.mlp.experts.j.{gate,up,down}_proj.weight    h_i/mlp/experts/{c_gate,c_fc,c_proj}/kernel[j]
    Mixtral:   model.layers.i.block_sparse_moe.gate.weight (E, d)         h_i/mlp/router/kernel (d, E)
               model.layers.i.block_sparse_moe.experts.j.{w1,w3,w2}.weight   … c_gate, c_fc, c_proj …[j]

These are the names of the published checkpoints and of what transformers' `save_pretrained`
writes (transformers 5 fuses the experts in memory, not on disk). The experts of one layer are
read one tensor at a time and stacked, so the peak stays near one copy of the weights.
Routing: both take a softmax over the experts and the top k; Mixtral renormalises the k gates
(its softmax over the top-k logits is the same thing), Qwen3-MoE does when `norm_topk_prob`.
"""

from __future__ import annotations

import numpy as np

from jaxgpt.config import GPTConfig

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
DENSE_FAMILY = {"qwen3_moe": "qwen3", "mixtral": "llama"}  # attention and norms as these
_PREFIX = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}
_EXPERT_NAMES = {"qwen3_moe": {"c_gate": "gate_proj", "c_fc": "up_proj", "c_proj": "down_proj"},
                 "mixtral": {"c_gate": "w1", "c_fc": "w3", "c_proj": "w2"}}


def moe_fields(hf: dict, kind: str) -> dict:
    """The GPTConfig fields of an MoE `config.json` (ValueError naming what jaxgpt cannot hold)."""
    n_layers = hf["num_hidden_layers"]
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    fields = dict(moe_experts=int(experts), moe_top_k=int(hf["num_experts_per_tok"]),
                  moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    if kind == "mixtral":
        if hf.get("sliding_window") is not None:
            raise ValueError("Mixtral with a sliding_window is not supported (Mixtral-8x7B and 8x22B have none)")
        return dict(fields, moe_renormalize=True, mlp_hidden=hf["intermediate_size"])
    dense_prefix = list(hf.get("mlp_only_layers") or [])
    if dense_prefix != list(range(len(dense_prefix))):
        raise ValueError(f"mlp_only_layers {dense_prefix}: jaxgpt keeps only a prefix of layers dense (0 … n-1)")
    fields.update(moe_renormalize=bool(hf.get("norm_topk_prob", False)), moe_hidden=hf["moe_intermediate_size"],
                  moe_every=int(hf.get("decoder_sparse_step", 1)), moe_first_dense=len(dense_prefix))
    if not any(i >= len(dense_prefix) and (i + 1) % fields["moe_every"] == 0 for i in range(n_layers)):
        raise ValueError("this qwen3_moe config has no MoE layer; load it as a dense qwen3 model")
    return fields


def moe_problems(cfg: GPTConfig, kind: str) -> list[str]:
    """The settings of an MoE `cfg` that a `kind` checkpoint cannot hold."""
    problems = []
    if cfg.moe_router != "softmax":
        problems.append(f"moe_router={cfg.moe_router!r} ({kind} routes by softmax)")
    if cfg.moe_shared_experts:
        problems.append(f"moe_shared_experts={cfg.moe_shared_experts} ({kind} has no shared experts)")
    if cfg.mlp_bias:
        problems.append("mlp_bias=True (the experts have no biases)")
    if kind == "mixtral":
        if not cfg.moe_renormalize:
            problems.append("moe_renormalize=False (Mixtral renormalises the top-k gates)")
        if cfg.moe_every != 1 or cfg.moe_first_dense:
            problems.append("dense layers among the MoE ones (every Mixtral layer is MoE)")
    return problems


def moe_config_to_hf(cfg: GPTConfig, kind: str) -> dict:
    out = {"num_experts_per_tok": cfg.moe_top_k, "router_aux_loss_coef": cfg.moe_aux_loss_coef,
           "output_router_logits": False}
    if kind == "mixtral":
        return {**out, "num_local_experts": cfg.moe_experts, "intermediate_size": cfg.expert_hidden,
                "sliding_window": None}
    return {**out, "num_experts": cfg.moe_experts, "moe_intermediate_size": cfg.expert_hidden,
            "norm_topk_prob": cfg.moe_renormalize, "decoder_sparse_step": cfg.moe_every,
            "mlp_only_layers": list(range(cfg.moe_first_dense)), "use_sliding_window": False}


def expected_moe_shapes(cfg: GPTConfig, kind: str) -> dict[str, tuple[int, ...]]:
    """The HF names and shapes of one MoE layer's tensors, relative to `model.layers.i.`."""
    d, f, pre = cfg.emb_dim, cfg.expert_hidden, _PREFIX[kind]
    shapes = {f"{pre}.gate.weight": (cfg.moe_experts, d)}
    for j in range(cfg.moe_experts):
        for ours, theirs in _EXPERT_NAMES[kind].items():
            shapes[f"{pre}.experts.{j}.{theirs}.weight"] = (d, f) if ours == "c_proj" else (f, d)
    return shapes


def read_moe_layer(get, layer_prefix: str, cfg: GPTConfig, kind: str) -> dict:
    """One MoE layer's "mlp" subtree from `get(name) -> float32 array`; experts stacked, kernels (in, out)."""
    pre = f"{layer_prefix}{_PREFIX[kind]}."
    experts = {ours: {"kernel": np.stack([get(f"{pre}experts.{j}.{theirs}.weight").T for j in range(cfg.moe_experts)])}
               for ours, theirs in _EXPERT_NAMES[kind].items()}
    return {"router": {"kernel": np.ascontiguousarray(get(f"{pre}gate.weight").T)}, "experts": experts}


def write_moe_layer(mlp: dict, layer_prefix: str, kind: str, arr) -> dict[str, np.ndarray]:
    """The HF tensors of one MoE layer's "mlp" subtree (`arr` makes a contiguous float32 array)."""
    pre = f"{layer_prefix}{_PREFIX[kind]}."
    out = {f"{pre}gate.weight": arr(np.asarray(mlp["router"]["kernel"]).T)}
    for ours, theirs in _EXPERT_NAMES[kind].items():
        stacked = np.asarray(mlp["experts"][ours]["kernel"])  # (E, in, out)
        for j in range(stacked.shape[0]):
            out[f"{pre}experts.{j}.{theirs}.weight"] = arr(stacked[j].T)
    return out
