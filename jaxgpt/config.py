"""Model configuration: a frozen dataclass, its presets and its validation.

The config is the single description of a GPT's shape. It is hashable (frozen), so it can be a
static argument of jitted functions, and it round-trips through plain dicts (for checkpoints and
JSON). Invalid values raise `ConfigError` at construction, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import jax

from jaxgpt.registry import POSITIONS, RegistryError, attention_kind

ATTENTION_IMPLS = ("auto", "naive", "xla", "blockwise")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # float64 needs jax_enable_x64
# What a block keeps for the backward pass (jax.checkpoint policies; docs/performance.md):
# "none" keeps everything, "full" only the block's input (recomputes the rest), "dots" the matmul
# outputs, "dots_no_batch" the matmul outputs without batch dimensions (projections, not attention scores).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
NORMS = ("layernorm", "rmsnorm")  # see jaxgpt.nn.norms
MLPS = ("gelu", "swiglu", "geglu", "relu2")  # see jaxgpt.nn.mlp
MOE_ROUTERS = ("softmax", "sigmoid")  # see jaxgpt.nn.moe


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


def check_finite_numbers(config) -> None:
    """Refuse NaN and infinite values in any float field of a config dataclass (NaN slips past
    every range check: all comparisons with it are false)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{type(config).__name__}.{f.name} must be a finite number, got {value}")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # tokens in the vocabulary (GPT-2 BPE: 50,257)
    context_length: int = 1024  # longest input sequence; also the size of the position table
    emb_dim: int = 768  # model width d
    n_heads: int = 12  # attention heads; emb_dim must be divisible by it
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout on embeddings, attention weights and residual branches
    qkv_bias: bool = False  # bias on the fused Q/K/V projection (GPT-2 checkpoints have it)
    tie_embeddings: bool = False  # output head shares the token-embedding matrix
    zero_init_proj: bool = False  # the residual branches' output projections (attention's and the MLP's c_proj)
    # start at zero instead of N(0, 0.02/sqrt(2L)): each block starts as the identity (modded-nanogpt)
    attn_impl: str = "auto"  # "naive" (explicit einsums), "xla" (jax.nn.dot_product_attention), "blockwise", "auto"
    dtype: str = "float32"  # compute dtype; parameters stay float32. "auto": bf16 on GPU/TPU, f32 on CPU
    mlp_ratio: int = 4  # hidden width of the MLP is mlp_ratio * emb_dim
    ln_eps: float = 1e-5  # LayerNorm epsilon (GPT-2's)
    emb_init_std: float = 0.02  # std of the wte/wpe initialisation (GPT-2: 0.02; PyTorch nn.Embedding: 1.0)
    # attention variants (docs/attention_variants.md); the defaults are GPT-2's
    attention: str = "softmax"  # a kind of jaxgpt.registry.ATTENTION (`jaxgpt variant-check --list`; plugins add more)
    latent_dim: Optional[int] = None  # latent attention: width of the shared key/value latent (what the cache stores)
    n_kv_heads: Optional[int] = None  # key/value heads: None = n_heads (multi-head), 1 = multi-query, else grouped
    position: str = "learned"  # "learned" (GPT-2's wpe table), "rope", "alibi" or "none"
    rope_base: float = 10000.0  # RoPE wavelength base
    sliding_window: Optional[int] = None  # local attention over this many positions (None: global)
    global_every: Optional[int] = None  # with sliding_window: every k-th layer stays global (6 = 5 local : 1 global)
    attn_gate: bool = False  # softmax: a sigmoid gate from the layer input on each head's output (Qiu et al. 2025)
    attn_sink: bool = False  # softmax: a learned logit per head joins every softmax, with no value (gpt-oss)
    differential: bool = False  # softmax: differential attention, softmax(q1k1) - λ·softmax(q2k2) (Ye et al. 2024)
    # block options of today's open models (docs/families.md); the defaults are GPT-2's
    norm: str = "layernorm"  # "layernorm" (scale and bias) or "rmsnorm" (scale only), one of NORMS
    norm_unit_offset: bool = False  # RMSNorm multiplies by (1 + scale), scale initialised to 0 (Gemma)
    post_norms: bool = False  # also normalise each branch's output before the residual add (Gemma 3)
    mlp: str = "gelu"  # "gelu" (GPT-2), "swiglu" (Llama, Qwen), "geglu" (Gemma), "relu2" (modded-nanogpt)
    mlp_hidden: Optional[int] = None  # hidden width of the MLP (default: mlp_ratio * emb_dim)
    mlp_bias: bool = True  # biases of the MLP's projections
    attn_out_bias: bool = True  # bias of the attention output projection
    head_size: Optional[int] = None  # per-head width when it is not emb_dim / n_heads (Qwen3, Gemma 3)
    qk_norm: bool = False  # RMSNorm over each head's query and key before RoPE (Qwen3, Gemma 3)
    query_scale: Optional[float] = None  # multiplies q·k (default 1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-1/2)
    rope_local_base: Optional[float] = None  # RoPE base of the sliding-window layers (Gemma 3), rope_base elsewhere
    rope_scaling: Optional[float] = None  # Llama 3's frequency scaling factor (None: no scaling)
    rope_low_freq_factor: float = 1.0  # Llama 3 scaling: wavelengths above original/low are divided by the factor
    rope_high_freq_factor: float = 4.0  # ... those below original/high are kept; in between, blended
    rope_original_context: int = 8192  # Llama 3 scaling: the context length the frequencies were trained for
    emb_scale: bool = False  # multiply the token embeddings by sqrt(emb_dim) (Gemma)
    logit_softcap: Optional[float] = None  # final logits become cap * tanh(logits / cap)
    # mixture of experts (docs/moe.md): unset moe_experts keeps every MLP dense
    moe_experts: Optional[int] = None  # routed experts of each MoE layer
    moe_top_k: int = 2  # experts each token is sent to
    moe_hidden: Optional[int] = None  # hidden width of one expert (default: hidden_dim)
    moe_shared_experts: int = 0  # always-on experts beside the routed ones, run as one MLP of that many widths
    moe_every: int = 1  # every k-th layer is an MoE layer (Qwen's decoder_sparse_step)
    moe_first_dense: int = 0  # the first n layers stay dense (DeepSeek's first_k_dense_replace)
    moe_router: str = "softmax"  # "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" with a balancing bias (DeepSeek-V3)
    moe_renormalize: bool = True  # divide the k chosen gates by their sum (Mixtral; Qwen3's norm_topk_prob)
    moe_capacity_factor: Optional[float] = None  # None: dropless; else each expert takes at most
    # ceil(factor · tokens · k / experts) tokens in training and drops the rest (evaluation and decoding are dropless)
    moe_aux_loss_coef: float = 0.01  # Switch Transformer load-balancing loss weight
    moe_z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE): mean logsumexp(router logits)²
    moe_bias_rate: float = 0.0  # sigmoid router: after each step bias_e += rate · sign(mean load − load_e)
    # execution choices: they change neither the parameters (names, shapes) nor the function computed
    scan_layers: bool = False  # run the blocks as one lax.scan over their stacked weights: compile time flat in depth
    remat: str = "none"  # rematerialisation per block, one of REMAT_POLICIES (memory for recomputation)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        for name in ("ln_eps", "emb_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be positive, got {value!r}")
        for name in ("qkv_bias", "tie_embeddings", "zero_init_proj", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"GPTConfig.attn_impl must be one of {ATTENTION_IMPLS}, got {self.attn_impl!r}"
            )
        if self.n_kv_heads is not None and (isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, int)
                                            or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"GPTConfig.n_kv_heads must be a positive divisor of n_heads ({self.n_heads}), "
                              f"got {self.n_kv_heads!r}")
        if self.position not in POSITIONS:
            raise ConfigError(f"GPTConfig.position must be one of {POSITIONS}, got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"GPTConfig.position 'rope' needs an even head dimension, got {self.head_dim}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or self.rope_base <= 1:
            raise ConfigError(f"GPTConfig.rope_base must be a number > 1, got {self.rope_base!r}")
        for name in ("sliding_window", "global_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"GPTConfig.{name} must be a positive integer or unset, got {v!r}")
        if self.global_every is not None and self.sliding_window is None:
            raise ConfigError("GPTConfig.global_every needs a sliding_window for the other layers")
        if self.latent_dim is not None and (isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int)
                                            or self.latent_dim <= 0):
            raise ConfigError(f"GPTConfig.latent_dim must be a positive integer, got {self.latent_dim!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"GPTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"GPTConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        self._check_block_options()
        self._check_moe_options()
        if self.scan_layers and self.global_every is not None:
            raise ConfigError("GPTConfig.scan_layers needs identical layers; global_every makes some layers global "
                              "and others local (unset one of them)")

    def _check_block_options(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"GPTConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            raise ConfigError("GPTConfig.norm_unit_offset applies to norm 'rmsnorm' only")
        if self.mlp not in MLPS:
            raise ConfigError(f"GPTConfig.mlp must be one of {MLPS}, got {self.mlp!r}")
        for name in ("mlp_hidden", "head_size", "rope_original_context"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"GPTConfig.{name} must be a positive integer or unset, got {v!r}")
        for name in ("post_norms", "mlp_bias", "attn_out_bias", "qk_norm", "emb_scale", "norm_unit_offset", "attn_gate",
                     "attn_sink", "differential"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("query_scale", "rope_local_base", "rope_scaling", "logit_softcap"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"GPTConfig.{name} must be a positive number or unset, got {v!r}")
        if self.rope_scaling is not None and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError("GPTConfig needs 0 < rope_low_freq_factor < rope_high_freq_factor for Llama 3 scaling")
        if self.head_size is None and self.emb_dim % self.n_heads:
            raise ConfigError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}) "
                              "unless head_size is set")
        uses_rope = self.rope_scaling is not None or self.rope_local_base is not None
        if uses_rope and self.position != "rope":
            raise ConfigError("GPTConfig.rope_scaling and rope_local_base need position 'rope'")
        try:
            kind = attention_kind(self.attention)
        except RegistryError as e:
            raise ConfigError(f"GPTConfig.attention: {e}") from None
        problems = kind.problems(self)
        if problems:
            raise ConfigError(f"GPTConfig.attention {self.attention!r} cannot take: {'; '.join(problems)}")
        if self.differential and self.query_scale is not None:
            raise ConfigError("GPTConfig.differential sets its own score scale (1/sqrt(head_dim / 2)): unset query_scale")
        if self.differential and self.head_dim % 2:
            raise ConfigError(f"GPTConfig.differential splits each head's q and k in two halves: it needs an even "
                              f"head dimension, got {self.head_dim}")

    def _check_moe_options(self) -> None:
        if self.moe_experts is None:
            return
        for name in ("moe_experts", "moe_top_k", "moe_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.moe_top_k > self.moe_experts:
            raise ConfigError(f"GPTConfig.moe_top_k ({self.moe_top_k}) cannot exceed moe_experts ({self.moe_experts})")
        for name in ("moe_shared_experts", "moe_first_dense"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"GPTConfig.{name} must be a non-negative integer, got {v!r}")
        if self.moe_hidden is not None and (isinstance(self.moe_hidden, bool) or not isinstance(self.moe_hidden, int)
                                            or self.moe_hidden <= 0):
            raise ConfigError(f"GPTConfig.moe_hidden must be a positive integer or unset, got {self.moe_hidden!r}")
        if self.moe_router not in MOE_ROUTERS:
            raise ConfigError(f"GPTConfig.moe_router must be one of {MOE_ROUTERS}, got {self.moe_router!r}")
        if not isinstance(self.moe_renormalize, bool):
            raise ConfigError(f"GPTConfig.moe_renormalize must be true or false, got {self.moe_renormalize!r}")
        cf = self.moe_capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf <= 0):
            raise ConfigError(f"GPTConfig.moe_capacity_factor must be a positive number or unset, got {cf!r}")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"GPTConfig.{name} must be a non-negative number, got {v!r}")
        if self.moe_bias_rate > 0 and self.moe_router != "sigmoid":
            raise ConfigError("GPTConfig.moe_bias_rate balances the 'sigmoid' router's bias; set moe_router='sigmoid'")
        if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ConfigError(f"GPTConfig: moe_every={self.moe_every} and moe_first_dense={self.moe_first_dense} leave "
                              f"no MoE layer among {self.n_layers}")
        if self.scan_layers and any(not self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ConfigError("GPTConfig.scan_layers needs identical layers; moe_every/moe_first_dense make some "
                              "layers dense (unset one of them)")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has a mixture-of-experts MLP (Qwen3-MoE's rule, with DeepSeek's dense prefix)."""
        return (self.moe_experts is not None and layer >= self.moe_first_dense
                and (layer + 1) % self.moe_every == 0)

    @property
    def expert_hidden(self) -> int:
        """The hidden width of one expert."""
        return self.moe_hidden or self.hidden_dim

    @property
    def head_dim(self) -> int:
        return self.head_size or self.emb_dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width."""
        return self.mlp_hidden or self.mlp_ratio * self.emb_dim

    @property
    def rope_scaling_spec(self) -> Optional[tuple]:
        """Llama 3's RoPE scaling as (factor, low_freq_factor, high_freq_factor, original context), or None."""
        if self.rope_scaling is None:
            return None
        return (self.rope_scaling, self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_context)

    def layer_rope_base(self, layer: int) -> float:
        """The RoPE base of layer `layer`: `rope_local_base` for a sliding-window layer when set."""
        return self.rope_base_of_window(self.layer_window(layer))

    def rope_base_of_window(self, window: Optional[int]) -> float:
        """The RoPE base of a layer with this window: `rope_local_base` for a local layer when set."""
        return self.rope_local_base if window is not None and self.rope_local_base is not None else self.rope_base

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def layer_window(self, layer: int) -> Optional[int]:
        """The attention window of layer `layer` (0-based): None for a global layer."""
        if self.sliding_window is None:
            return None
        if self.global_every is not None and (layer + 1) % self.global_every == 0:
            return None
        return self.sliding_window

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {sorted(unknown)}; known: {field_names()}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        unknown = set(d) - set(field_names())
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {sorted(unknown)}; known: {field_names()}")
        return cls(**d)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(GPTConfig)]


# The book's GPT_CONFIG_124M and its larger siblings (context 1024, no qkv bias, untied head, drop 0.1).
# Small presets are for CPU work and tests.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # nanoGPT's CPU recipe shape (shakespeare_char): 4 layers, 4 heads, 128 wide, context 64.
    "tiny": GPTConfig(context_length=64, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0),
    # A little bigger: the default model of `jaxgpt train` (a few minutes on a laptop CPU).
    "small": GPTConfig(context_length=128, emb_dim=192, n_heads=6, n_layers=4, drop_rate=0.0),
    # For unit tests: compiles in about a second.
    "test": GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0),
}

# Today's open families as settings of the same model (docs/families.md), with their published shapes.
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
              drop_rate=0.0, tie_embeddings=True)
_QWEN3 = dict(_LLAMA, qk_norm=True, ln_eps=1e-6, rope_base=1_000_000.0)
_GEMMA3 = dict(_LLAMA, mlp="geglu", qk_norm=True, norm_unit_offset=True, post_norms=True, emb_scale=True,
               ln_eps=1e-6, rope_base=1_000_000.0, rope_local_base=10_000.0, global_every=6)
PRESETS.update({
    "llama-3.2-1b": GPTConfig(**_LLAMA, vocab_size=128_256, context_length=131_072, emb_dim=2048, n_heads=32,
                              n_kv_heads=8, n_layers=16, mlp_hidden=8192, ln_eps=1e-5, rope_base=500_000.0,
                              rope_scaling=32.0, rope_original_context=8192),
    "qwen3-0.6b": GPTConfig(**_QWEN3, vocab_size=151_936, context_length=40_960, emb_dim=1024, n_heads=16,
                            n_kv_heads=8, head_size=128, n_layers=28, mlp_hidden=3072),
    "gemma-3-270m": GPTConfig(**_GEMMA3, vocab_size=262_144, context_length=32_768, emb_dim=640, n_heads=4,
                              n_kv_heads=1, head_size=256, n_layers=18, mlp_hidden=2048, sliding_window=512,
                              query_scale=256 ** -0.5),
    # tiny ones of each, for tests and CPU experiments (every option of the family on)
    "llama-tiny": GPTConfig(**_LLAMA, vocab_size=64, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=2,
                            n_layers=2, mlp_hidden=128, ln_eps=1e-5, rope_base=500_000.0, rope_scaling=32.0,
                            rope_original_context=16),
    "qwen3-tiny": GPTConfig(**_QWEN3, vocab_size=64, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=2,
                            head_size=32, n_layers=2, mlp_hidden=128),
    "gemma3-tiny": GPTConfig(**{**_GEMMA3, "global_every": 2}, vocab_size=64, context_length=64, emb_dim=64,
                             n_heads=4, n_kv_heads=1, head_size=32, n_layers=2, mlp_hidden=128, sliding_window=8,
                             query_scale=24 ** -0.5),
})

# Mixtures of experts (docs/moe.md): the published shapes (not trained here) and tiny ones for tests.
_QWEN3_MOE = dict(_QWEN3, tie_embeddings=False, moe_router="softmax", moe_aux_loss_coef=0.001)
_MIXTRAL = dict(_LLAMA, tie_embeddings=False, rope_base=1_000_000.0, moe_router="softmax", moe_aux_loss_coef=0.02)
PRESETS.update({
    "qwen3-30b-a3b": GPTConfig(**_QWEN3_MOE, vocab_size=151_936, context_length=40_960, emb_dim=2048, n_heads=32,
                               n_kv_heads=4, head_size=128, n_layers=48, mlp_hidden=6144, moe_experts=128, moe_top_k=8,
                               moe_hidden=768, moe_renormalize=True),
    "mixtral-8x7b": GPTConfig(**_MIXTRAL, vocab_size=32_000, context_length=32_768, emb_dim=4096, n_heads=32,
                              n_kv_heads=8, n_layers=32, mlp_hidden=14_336, moe_experts=8, moe_top_k=2, ln_eps=1e-5),
    "qwen3-moe-tiny": GPTConfig(**_QWEN3_MOE, vocab_size=64, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=2,
                                head_size=32, n_layers=2, mlp_hidden=128, moe_experts=4, moe_top_k=2, moe_hidden=32),
    "mixtral-tiny": GPTConfig(**_MIXTRAL, vocab_size=64, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=2,
                              n_layers=2, mlp_hidden=48, moe_experts=4, moe_top_k=2, ln_eps=1e-5),
})


def get_preset(name: str, **overrides: Any) -> GPTConfig:
    """The preset `name` with `overrides` applied; a clear error for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def resolve_attn_impl(config: GPTConfig, *, attention_dropout: bool) -> str:
    """The attention implementation to run, decided at run time.

    `jax.nn.dot_product_attention` has no dropout on the attention weights, so a forward pass that
    needs it uses the naive path; otherwise "auto" takes the XLA op (cuDNN-capable on GPU).
    """
    if config.attn_impl != "auto":
        return config.attn_impl
    return "naive" if attention_dropout else "xla"


def resolve_dtype(config: GPTConfig):
    """The compute dtype, decided from the backend JAX reports when the config says "auto"."""
    import jax.numpy as jnp

    if config.dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(config.dtype)


def is_low_precision(dtype) -> bool:
    """True for the compute dtypes that take the mixed-precision path (bfloat16, float16)."""
    import jax.numpy as jnp

    return dtype is not None and jnp.dtype(dtype).itemsize < 4
