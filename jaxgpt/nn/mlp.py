"""The position-wise feed-forward layer, chosen by `GPTConfig.mlp`.

- "gelu": GPT-2's d -> f, GELU (tanh approximation), -> d (params c_fc, c_proj);
- "swiglu" (Llama, Qwen3), "geglu" (Gemma): gated, act(x·W_gate) ∘ (x·W_up) -> d (c_gate, c_fc, c_proj);
- "relu2" (modded-nanogpt): d -> f, relu(·)², -> d.
The hidden width f is `GPTConfig.hidden_dim` (mlp_hidden, or mlp_ratio · d).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgpt.nn.dense import Dense

Array = jax.Array

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=True),
    "swiglu": nn.silu,
    "geglu": lambda x: nn.gelu(x, approximate=True),
    "relu2": lambda x: jnp.square(nn.relu(x)),
}
GATED = ("swiglu", "geglu")


class MLP(nn.Module):
    hidden: int
    kind: str = "gelu"  # a key of ACTIVATIONS
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x_btd: Array) -> Array:
        d = x_btd.shape[-1]
        dense = lambda features, name, std=0.02: Dense(  # noqa: E731
            features, use_bias=self.use_bias, dtype=self.dtype, kernel_init=nn.initializers.normal(std), name=name)
        act = ACTIVATIONS[self.kind]
        if self.kind in GATED:
            x_btf = act(dense(self.hidden, "c_gate")(x_btd)) * dense(self.hidden, "c_fc")(x_btd)
        else:
            x_btf = act(dense(self.hidden, "c_fc")(x_btd))
        return dense(d, "c_proj", self.out_init_std)(x_btf)
