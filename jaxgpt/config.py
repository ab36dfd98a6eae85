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

ATTENTION_IMPLS = ("auto", "naive", "xla", "blockwise")
POSITIONS = ("learned", "rope", "alibi", "none")  # see jaxgpt.positions
ATTENTION_KINDS = ("softmax", "mla", "linear")  # see jaxgpt.model.ATTENTION_LAYERS
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # float64 needs jax_enable_x64
# What a block keeps for the backward pass (jax.checkpoint policies; docs/performance.md):
# "none" keeps everything, "full" only the block's input (recomputes the rest), "dots" the matmul
# outputs, "dots_no_batch" the matmul outputs without batch dimensions (projections, not attention scores).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


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
    attn_impl: str = "auto"  # "naive" (explicit einsums), "xla" (jax.nn.dot_product_attention), "blockwise", "auto"
    dtype: str = "float32"  # compute dtype; parameters stay float32. "auto": bf16 on GPU/TPU, f32 on CPU
    mlp_ratio: int = 4  # hidden width of the MLP is mlp_ratio * emb_dim
    ln_eps: float = 1e-5  # LayerNorm epsilon (GPT-2's)
    emb_init_std: float = 0.02  # std of the wte/wpe initialisation (GPT-2: 0.02; PyTorch nn.Embedding: 1.0)
    # attention variants (docs/attention_variants.md); the defaults are GPT-2's
    attention: str = "softmax"  # "softmax", "mla" (multi-head latent attention), "linear" (causal linear attention)
    latent_dim: Optional[int] = None  # "mla": width of the shared key/value latent (what the cache stores)
    n_kv_heads: Optional[int] = None  # key/value heads: None = n_heads (multi-head), 1 = multi-query, else grouped
    position: str = "learned"  # "learned" (GPT-2's wpe table), "rope", "alibi" or "none"
    rope_base: float = 10000.0  # RoPE wavelength base
    sliding_window: Optional[int] = None  # local attention over this many positions (None: global)
    global_every: Optional[int] = None  # with sliding_window: every k-th layer stays global (6 = 5 local : 1 global)
    # execution choices: they change neither the parameters (names, shapes) nor the function computed
    scan_layers: bool = False  # run the blocks as one lax.scan over their stacked weights: compile time flat in depth
    remat: str = "none"  # rematerialisation per block, one of REMAT_POLICIES (memory for recomputation)

    def __post_init__(self) -> None:
        check_finite_numbers(self)
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ConfigError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        for name in ("ln_eps", "emb_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be positive, got {value!r}")
        for name in ("qkv_bias", "tie_embeddings", "scan_layers"):
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
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"GPTConfig.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if (self.attention == "mla") != (self.latent_dim is not None):
            raise ConfigError("GPTConfig.latent_dim is needed exactly when attention is 'mla'")
        if self.latent_dim is not None and (isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int)
                                            or self.latent_dim <= 0):
            raise ConfigError(f"GPTConfig.latent_dim must be a positive integer, got {self.latent_dim!r}")
        if self.attention == "linear" and (self.position in ("rope", "alibi") or self.sliding_window is not None):
            raise ConfigError("GPTConfig.attention 'linear' takes position 'learned' or 'none' and no sliding_window")
        if self.dtype not in DTYPES:
            raise ConfigError(f"GPTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"GPTConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.scan_layers and self.global_every is not None:
            raise ConfigError("GPTConfig.scan_layers needs identical layers; global_every makes some layers global "
                              "and others local (unset one of them)")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

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
